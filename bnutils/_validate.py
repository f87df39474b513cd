"""Input checks shared by the NumPy reference and the torch layers.

Every check raises a ``TypeError`` or ``ValueError`` whose message names what was expected,
so that a wrong call fails loudly instead of broadcasting into a silent wrong answer.
"""
from __future__ import annotations

import numpy as np


def check_array(x, name: str = "x") -> np.ndarray:
    """Return ``x`` as a floating NumPy array of ndim >= 2, or raise."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy ndarray of shape (N, C) or (N, C, *spatial), "
                        f"got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float16/32/64), got {x.dtype}; "
                        f"convert with {name}.astype(np.float32) first")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C) or (N, C, *spatial) with ndim >= 2, "
                         f"got shape {x.shape}")
    return x


def check_channel_param(p, num_channels: int, name: str) -> np.ndarray:
    """Check a per-channel parameter such as gamma, beta or a running statistic: shape (C,)."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a NumPy ndarray of shape ({num_channels},), "
                        f"got {type(p).__name__}")
    if p.shape != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},) (one value per channel, "
                         f"axis 1 of x), got {p.shape}")
    return p


def check_eps(eps) -> float:
    """eps must be a finite positive number (it keeps the square root away from zero)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not np.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    return float(eps)


def check_momentum(momentum) -> float | None:
    """momentum must be None (cumulative average) or a number in [0, 1]."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (PyTorch convention: weight of the new "
                         f"batch statistic), got {momentum}")
    return float(momentum)


def values_per_channel(shape: tuple[int, ...]) -> int:
    """Number of values each channel's statistics are computed from: N * prod(spatial)."""
    return int(np.prod(shape[:1] + shape[2:]))


def check_training_batch(shape: tuple[int, ...]) -> None:
    """Batch statistics need at least two values per channel (same rule and wording as torch)."""
    if values_per_channel(shape) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}")
