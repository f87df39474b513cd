"""The one setup call every notebook makes first: seeds, thread counts, print and plot style."""
from __future__ import annotations

import random

import numpy as np

from .plotting import set_style

TORCH_THREADS = 1
"""Torch's reductions split work by thread, and the split changes the rounding; one thread makes
a re-run on the same machine bitwise repeatable whatever its core count (and is fastest for the
book's small tensors)."""


def setup_notebook(seed: int = 0, threads: int = TORCH_THREADS) -> np.random.Generator:
    """Seed Python, NumPy and torch, fix torch/BLAS thread counts, set print and plot style.

    Outputs still differ in the last bits between CPUs (vectorized kernels sum in other orders);
    the book's verification compares such outputs within stated tolerances (``bnutils.nbval_tolerance``).

    Returns a fresh ``np.random.Generator`` seeded with ``seed`` for the notebook to use.
    """
    import torch
    from threadpoolctl import threadpool_limits

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # BLAS inside NumPy too
    np.set_printoptions(precision=4, suppress=True)
    set_style()
    return np.random.default_rng(seed)
