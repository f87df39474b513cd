"""Hypothesis strategies for batch-norm inputs: shapes (N, C) and (N, C, *spatial), parameters."""
import numpy as np
from hypothesis import strategies as st


@st.composite
def bn_shapes(draw, max_spatial_dims: int = 2, min_values: int = 2):
    """(N, C, *spatial) with at least ``min_values`` values per channel."""
    n = draw(st.integers(1, 8))
    c = draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 4), max_size=max_spatial_dims)))
    shape = (n, c) + spatial
    if n * int(np.prod(spatial)) < min_values:
        shape = (n + min_values,) + shape[1:]
    return shape


@st.composite
def bn_inputs(draw, dtype=np.float64):
    """x of a random shape with per-channel offsets and scales, plus gamma, beta, dout."""
    shape = draw(bn_shapes())
    seed = draw(st.integers(0, 2**32 - 1))
    loc = draw(st.floats(-50, 50))
    scale = draw(st.floats(0.1, 10))
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype) * rng.choice([-1, 1], c)
    beta = rng.standard_normal(c).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dout
