"""Numerical gradient checking: central differences and a scale-free relative error."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                       dout: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Gradient of sum(f(x) * dout) with respect to x by central differences.

    ``f`` maps an array shaped like ``x`` to an array shaped like ``dout``. Each entry of x is
    nudged by +h and -h in turn, in place (x is restored afterwards), so the cost is 2 * x.size calls.
    x may be any view, contiguous or not (a transpose, a strided slice); it must be writeable.
    Use float64: in float32 the truncation and rounding errors swamp the comparison.
    """
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a floating NumPy array, got {type(x).__name__}")
    if h <= 0:
        raise ValueError(f"h must be > 0, got {h}")
    grad = np.zeros_like(x)
    # Index x itself, entry by entry: x.reshape(-1) is a *copy* when x is not contiguous (a transposed
    # or strided view), and nudging a copy leaves f(x) unchanged (an all-zero gradient).
    for i in np.ndindex(x.shape):
        old = x[i]  # a scalar: a copy of the entry
        x[i] = old + h
        plus = f(x).copy()
        x[i] = old - h
        minus = f(x)
        x[i] = old
        # subtract before summing: the two sums are nearly equal and would cancel
        grad[i] = np.sum((plus - minus) * dout) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / max(||a|| + ||b||, tiny): 0 for equal arrays, 1 for a = -b, scale-free.

    A norm-wise error does not blow up on entries that are both near zero, unlike the
    element-wise max(|a-b| / (|a|+|b|)).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    denom = max(np.linalg.norm(a) + np.linalg.norm(b), np.finfo(np.float64).tiny)
    return float(np.linalg.norm(a - b) / denom)
