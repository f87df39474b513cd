"""The one setup call every notebook makes first: seeds, thread counts, print and plot style."""
from __future__ import annotations

import random

import numpy as np

from .plotting import set_style

TORCH_THREADS = 1
"""Torch's BatchNorm reductions round differently with other thread counts, and training
amplifies that; one thread makes every stored output reproducible on any machine."""


def setup_notebook(seed: int = 0, threads: int = TORCH_THREADS) -> np.random.Generator:
    """Seed Python, NumPy and torch, fix torch/BLAS thread counts, set print and plot style.

    Also turns off torch's oneDNN and NNPACK convolutions, whose rounding depends on the CPU model
    (together with the code paths ``bnutils.cpu`` pins, this makes outputs reproducible across CPUs).

    Returns a fresh ``np.random.Generator`` seeded with ``seed`` for the notebook to use.
    """
    import torch
    from threadpoolctl import threadpool_limits

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # oneDNN and NNPACK convolutions pick their blocking from the CPU's cache sizes, so their rounding
    # differs between CPU models; torch's own convolution (im2col + MKL's reproducible GEMM, see
    # bnutils.cpu) does not. About a third slower for the book's small CNNs.
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    threadpool_limits(limits=threads)  # BLAS inside NumPy too
    np.set_printoptions(precision=4, suppress=True)
    set_style()
    return np.random.default_rng(seed)
