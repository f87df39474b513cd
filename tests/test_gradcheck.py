"""bnutils.numerical_gradient on any view of an array, against the analytic gradient of a simple function."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bnutils


def f(x):
    """Element-wise and mixing parts: sin(x) + sum(x^2), shaped like x."""
    return np.sin(x) + np.sum(x * x)


def analytic(x, dout):
    """d/dx sum(f(x) * dout) = cos(x) * dout + 2 x * sum(dout)."""
    return np.cos(x) * dout + 2 * x * np.sum(dout)


VIEWS = {
    "contiguous": lambda a: a,
    "transposed": lambda a: a.T,
    "strided slice": lambda a: a[::2, 1:],
    "fortran order": np.asfortranarray,
    "reversed": lambda a: a[::-1, ::-1],
    "swapped axes of 3-d": lambda a: a.reshape(a.shape[0], -1, 1).swapaxes(0, 1),
}


@st.composite
def views(draw):
    rows, cols = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(sorted(VIEWS)))
    base = np.random.default_rng(seed).standard_normal((rows, cols))
    return kind, base, VIEWS[kind](base), seed


@given(views())
def test_matches_the_analytic_gradient_on_any_view(case):
    kind, base, x, seed = case
    original = base.copy()
    dout = np.random.default_rng(seed + 1).standard_normal(x.shape)
    num = bnutils.numerical_gradient(f, x, dout)
    assert num.shape == x.shape
    assert bnutils.rel_error(num, analytic(x, dout)) < 1e-8, kind
    assert np.array_equal(base, original), "x (and the array it views) must be restored"


@pytest.mark.parametrize("kind", ["transposed", "strided slice", "reversed"])
def test_non_contiguous_input_is_not_a_silent_zero(kind):
    x = VIEWS[kind](np.arange(1.0, 13.0).reshape(3, 4) / 7)
    assert not x.flags.c_contiguous
    num = bnutils.numerical_gradient(lambda v: v ** 2, x, np.ones(x.shape))
    assert np.allclose(num, 2 * x, rtol=1e-7, atol=1e-9)


def test_zero_dim_input():
    x = np.array(0.3)
    assert np.isclose(bnutils.numerical_gradient(np.sin, x, np.array(1.0)), np.cos(0.3))
