"""NumPy reference implementation of batch normalization (training and inference mode).

Shapes: ``x`` is (N, C) or (N, C, *spatial). Statistics are taken over every axis except
axis 1 (the channel/feature axis), so each of the C channels gets its own mean and variance,
computed from M = N * prod(spatial) values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import (
    check_array,
    check_channel_param,
    check_eps,
    check_momentum,
    check_training_batch,
    values_per_channel,
)


@dataclass(frozen=True)
class BNCache:
    """Intermediate values of the forward pass, kept for the backward pass.

    ``xc`` = x - mean, ``inv_std`` = 1/sqrt(var + eps), ``xhat`` = xc * inv_std; the
    per-channel arrays are stored with broadcastable shape (1, C, 1, ...).
    """
    x: np.ndarray
    mean: np.ndarray
    xc: np.ndarray
    var: np.ndarray
    std: np.ndarray
    inv_std: np.ndarray
    xhat: np.ndarray
    gamma: np.ndarray
    eps: float

    @property
    def axes(self) -> tuple[int, ...]:
        return reduction_axes(self.x.ndim)

    @property
    def m(self) -> int:
        """Number of values per channel."""
        return values_per_channel(self.x.shape)


def reduction_axes(ndim: int) -> tuple[int, ...]:
    """Axes the statistics are reduced over: all but axis 1."""
    return (0,) + tuple(range(2, ndim))


def channel_shape(ndim: int, c: int) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against an ndim-dimensional (N, C, ...) array."""
    return (1, c) + (1,) * (ndim - 2)


def batch_mean_var(x: np.ndarray, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, shape (1, C, 1, ...), in ``dtype`` (default x's).

    Two passes (mean first, then the mean of squared deviations) with float64 accumulation,
    as torch's CPU kernel does for (N, C, H, W) input. The one-pass formula E[x^2] - E[x]^2
    cancels catastrophically when |mean| >> std (chapter 2 shows it).
    """
    axes = reduction_axes(x.ndim)
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)  # pass 1, float64 accumulator
    xc = x - mean                                              # float64 deviations
    var = np.mean(xc * xc, axis=axes, keepdims=True)           # pass 2: mean squared deviation
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    return mean.astype(dtype), var.astype(dtype)


def batchnorm_forward(x, gamma, beta, eps: float = 1e-5):
    """Training-mode batch norm. x (N, C, *spatial), gamma and beta (C,) -> (out, cache).

    ``out`` has x's shape and dtype: gamma * (x - mean) / sqrt(var + eps) + beta with the
    batch mean and biased batch variance of each channel. NaN/inf in x propagate to the
    whole channel they are in, as in torch.
    """
    x = check_array(x)
    c = x.shape[1]
    gamma = check_channel_param(gamma, c, "gamma")
    beta = check_channel_param(beta, c, "beta")
    eps = check_eps(eps)
    check_training_batch(x.shape)

    shape = channel_shape(x.ndim, c)
    mean64, var64 = batch_mean_var(x, dtype=np.float64)
    # Centre with the float64 mean, then round: subtracting the mean rounded to float32 would
    # shift the whole channel by that rounding error (up to 0.03 at |mean| = 1e6).
    xc = (x - mean64).astype(x.dtype)
    mean, var = mean64.astype(x.dtype), var64.astype(x.dtype)
    std = np.sqrt(var + x.dtype.type(eps))
    inv_std = 1 / std
    xhat = xc * inv_std
    out = gamma.reshape(shape).astype(x.dtype) * xhat + beta.reshape(shape).astype(x.dtype)
    cache = BNCache(x=x, mean=mean, xc=xc, var=var, std=std, inv_std=inv_std,
                    xhat=xhat, gamma=gamma.reshape(shape).astype(x.dtype), eps=eps)
    return out, cache


def _check_dout(dout, cache: BNCache) -> np.ndarray:
    if not isinstance(cache, BNCache):
        raise TypeError(f"cache must be the BNCache returned by batchnorm_forward, "
                        f"got {type(cache).__name__}")
    if not isinstance(dout, np.ndarray):
        raise TypeError(f"dout must be a NumPy ndarray of shape {cache.x.shape}, "
                        f"got {type(dout).__name__}")
    if dout.shape != cache.x.shape:
        raise ValueError(f"dout must have the shape of the forward input {cache.x.shape}, "
                         f"got {dout.shape}")
    if not np.issubdtype(dout.dtype, np.floating):
        raise TypeError(f"dout must have a floating dtype, got {dout.dtype}")
    return dout


def batchnorm_backward(dout, cache: BNCache):
    """Staged backward pass, node by node through the forward graph.

    dout has x's shape; returns (dx, dgamma, dbeta) with shapes x.shape, (C,), (C,).
    Graph: mean -> xc = x - mean -> sq = xc^2 -> var = mean(sq) -> std = sqrt(var + eps)
    -> inv = 1/std -> xhat = xc * inv -> out = gamma * xhat + beta.
    """
    dout = _check_dout(dout, cache)
    axes, m = cache.axes, cache.m

    def total(a):  # sum over the reduced axes, keeping (1, C, 1, ...) for broadcasting
        return a.sum(axis=axes, keepdims=True)

    # out = gamma * xhat + beta
    dbeta = total(dout)
    dgamma = total(dout * cache.xhat)
    dxhat = dout * cache.gamma
    # xhat = xc * inv  (xc feeds two nodes: here and sq)
    dxc = dxhat * cache.inv_std
    dinv = total(dxhat * cache.xc)
    # inv = 1 / std
    dstd = -dinv / cache.std**2
    # std = sqrt(var + eps)
    dvar = dstd * 0.5 / cache.std
    # var = mean(sq) over the M values of each channel
    dsq = np.broadcast_to(dvar / m, cache.x.shape)
    # sq = xc ** 2
    dxc = dxc + 2 * cache.xc * dsq
    # xc = x - mean  (x feeds two nodes: here and mean)
    dx = dxc.copy()
    dmean = -total(dxc)
    # mean = sum(x) / M
    dx += dmean / m
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def batchnorm_backward_fast(dout, cache: BNCache):
    """Closed-form backward pass: the staged graph collapsed into one expression.

    dx = gamma * inv_std / M * (M * dout - sum(dout) - xhat * sum(dout * xhat)).
    """
    dout = _check_dout(dout, cache)
    axes, m = cache.axes, cache.m
    dbeta = dout.sum(axis=axes, keepdims=True)
    dgamma = (dout * cache.xhat).sum(axis=axes, keepdims=True)
    dx = (cache.gamma * cache.inv_std / m) * (m * dout - dbeta - cache.xhat * dgamma)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def update_running_stats(running_mean, running_var, cache: BNCache, momentum: float = 0.1):
    """Return the new (running_mean, running_var) after one training batch, PyTorch convention.

    new = (1 - momentum) * old + momentum * batch_stat, where the variance fed in is the
    *unbiased* batch variance var * M / (M - 1). Shapes (C,). (Keras writes the same update
    with momentum_keras = 1 - momentum_torch.)
    """
    c = cache.x.shape[1]
    running_mean = check_channel_param(running_mean, c, "running_mean")
    running_var = check_channel_param(running_var, c, "running_var")
    momentum = check_momentum(momentum)
    if momentum is None:
        raise ValueError("momentum must be a number in [0, 1] here; the cumulative average "
                         "(momentum=None) needs a batch count: use the torch layer")
    m = cache.m
    batch_mean = cache.mean.reshape(-1)
    batch_var_unbiased = cache.var.reshape(-1) * (m / (m - 1))
    new_mean = (1 - momentum) * running_mean + momentum * batch_mean
    new_var = (1 - momentum) * running_var + momentum * batch_var_unbiased
    return new_mean, new_var


def batchnorm_inference(x, gamma, beta, running_mean, running_var, eps: float = 1e-5):
    """Inference-mode batch norm with fixed (population) statistics; any batch size, even 1.

    x (N, C, *spatial); gamma, beta, running_mean, running_var (C,). Each sample is
    transformed independently: an affine map per channel.
    """
    x = check_array(x)
    c = x.shape[1]
    for name, p in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)]:
        check_channel_param(p, c, name)
    eps = check_eps(eps)
    shape = channel_shape(x.ndim, c)
    scale = (gamma / np.sqrt(running_var + eps)).astype(x.dtype)
    shift = (beta - running_mean * gamma / np.sqrt(running_var + eps)).astype(x.dtype)
    return x * scale.reshape(shape) + shift.reshape(shape)
