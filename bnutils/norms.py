"""Alternatives to batch norm, written from scratch as ``nn.Module``s (chapter 16).

Per-example normalizations (no batch dependence, same in train and eval):

- ``LayerNorm(normalized_shape)`` — over the trailing ``normalized_shape`` dims (Ba et al. 2016),
  drop-in for ``torch.nn.LayerNorm``;
- ``GroupNorm(num_groups, num_channels)`` — x (N, C, *): over each group of C/G channels and all
  spatial positions of one example (Wu & He 2018), drop-in for ``torch.nn.GroupNorm``;
- ``InstanceNorm1d/2d(num_features)`` — x (N, C, L) / (N, C, H, W): over the spatial positions of
  one channel of one example (Ulyanov et al. 2016), like ``torch.nn.InstanceNorm1d/2d`` without
  running statistics;
- ``RMSNorm(normalized_shape)`` — divide by the root mean square over the trailing dims, no
  centring (Zhang & Sennrich 2019), drop-in for ``torch.nn.RMSNorm``.

Batch-statistics variants (x is (N, C) or (N, C, *spatial); statistics per channel C):

- ``BatchRenorm(num_features, rmax=3, dmax=5)`` — Ioffe (2017);
- ``GhostBatchNorm(num_features, ghost_batch_size=32)`` — Hoffer et al. (2017).

All use the biased variance inside the normalization, as torch does. Every module takes one
``num_features``/width positional argument first (or a shape), so
``make_mlp(..., norm=bnutils.RMSNorm)`` and ``functools.partial(GhostBatchNorm, ghost_batch_size=8)``
work as ``norm=`` factories.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._validate import check_eps, check_momentum, check_training_batch
from .layers import _check_input


def _add_affine(module: nn.Module, n: int, affine: bool) -> None:
    """Per-channel weight (ones) and bias (zeros) of shape (n,), or None parameters when not affine."""
    if affine:
        module.weight = nn.Parameter(torch.ones(n))
        module.bias = nn.Parameter(torch.zeros(n))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _shape_tuple(normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"normalized_shape must be a positive int or a non-empty sequence of positive "
                         f"ints (the trailing dims to normalize over), got {normalized_shape!r}")
    return shape


def _check_trailing(x, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor whose trailing dims are {shape}, "
                        f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"expected input with trailing dims {shape} (normalized_shape), "
                         f"got input of shape {tuple(x.shape)}")


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ..., 1) to broadcast against (N, C, *spatial)."""
    return t.view((1, -1) + (1,) * (ndim - 2))


class _TrailingNorm(nn.Module):
    """Shared constructor of LayerNorm and RMSNorm: affine parameters of ``normalized_shape``."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None, elementwise_affine: bool,
                 bias: bool):
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = None if eps is None else check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if elementwise_affine and bias else None

    def _dims(self) -> tuple[int, ...]:
        return tuple(range(-len(self.normalized_shape), 0))

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNorm(_TrailingNorm):
    """Layer norm: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing dims.

    x (*, *normalized_shape) -> same shape. Statistics per example (and per leading position, e.g.
    per token), biased variance; identical in train and eval. Same constructor, parameters and
    results as ``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True):
        super().__init__(normalized_shape, eps, elementwise_affine, bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_trailing(x, self.normalized_shape)
        dims = self._dims()
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        return self._affine((x - mean) / torch.sqrt(var + self.eps))


class RMSNorm(_TrailingNorm):
    """RMS norm: ``x / sqrt(mean(x**2) + eps) * weight`` over the trailing dims (no centring, no bias).

    x (*, *normalized_shape) -> same shape. ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as
    ``torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True)`` does.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True):
        super().__init__(normalized_shape, eps, elementwise_affine, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _check_trailing(x, self.normalized_shape)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        ms = x.square().mean(self._dims(), keepdim=True)
        return self._affine(x * torch.rsqrt(ms + eps))


class GroupNorm(nn.Module):
    """Group norm: x (N, C, *spatial); channels split into ``num_groups`` groups of C/G; each group of
    one example is normalized over its channels and spatial positions, then a per-channel affine map.

    ``num_groups=1`` is layer norm over (C, *spatial); ``num_groups=C`` is instance norm with a
    per-channel affine map. Same constructor and results as ``torch.nn.GroupNorm``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        _positive_int(num_groups, "num_groups")
        _positive_int(num_channels, "num_channels")
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = check_eps(eps), affine
        _add_affine(self, num_channels, affine)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_channels)
        n = x.shape[0]
        g = x.reshape(n, self.num_groups, -1)  # (N, G, C/G * prod(spatial))
        mean = g.mean(2, keepdim=True)
        var = (g - mean).square().mean(2, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            y = y * _channel_view(self.weight, x.dim()) + _channel_view(self.bias, x.dim())
        return y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _InstanceNorm(nn.Module):
    _ndim = 0

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps, self.affine = check_eps(eps), affine
        _add_affine(self, num_features, affine)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features)
        if x.dim() != self._ndim:
            raise ValueError(f"{type(self).__name__} expects {self._ndim}D input (N, C, *spatial), "
                             f"got {x.dim()}D input of shape {tuple(x.shape)}")
        dims = tuple(range(2, x.dim()))
        if math.prod(x.shape[2:]) <= 1:
            raise ValueError(f"Expected more than 1 spatial element per channel, "
                             f"got input size {tuple(x.shape)}")
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * _channel_view(self.weight, x.dim()) + _channel_view(self.bias, x.dim())
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class InstanceNorm1d(_InstanceNorm):
    """Instance norm for x (N, C, L): each channel of each example over its L positions.
    Like ``torch.nn.InstanceNorm1d(num_features, eps=1e-5, affine=False)`` (no running statistics:
    the same computation in train and eval)."""
    _ndim = 3


class InstanceNorm2d(_InstanceNorm):
    """Instance norm for x (N, C, H, W): each channel of each example over its H*W positions.
    Like ``torch.nn.InstanceNorm2d(num_features, eps=1e-5, affine=False)`` without running statistics."""
    _ndim = 4


class _BatchStatNorm(nn.Module):
    """Per-channel affine parameters and input checks shared by BatchRenorm and GhostBatchNorm."""

    def __init__(self, num_features: int, eps: float, momentum, affine: bool):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps, self.momentum, self.affine = check_eps(eps), check_momentum(momentum), affine
        _add_affine(self, num_features, affine)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _affine(self, y: Tensor) -> Tensor:
        if self.affine:
            y = y * _channel_view(self.weight, y.dim()) + _channel_view(self.bias, y.dim())
        return y

    @staticmethod
    def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel batch mean and biased variance, both (C,)."""
        var, mean = torch.var_mean(x, (0,) + tuple(range(2, x.dim())), correction=0)
        return mean, var


class BatchRenorm(_BatchStatNorm):
    """Batch renormalization (Ioffe 2017) for x (N, C) or (N, C, *spatial), per channel C.

    Training: with batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased variance) and
    the running ``mu`` (``running_mean``) and ``sigma`` (``running_std``),
    ``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``,
    both treated as constants in backprop (``.detach()``), and
    ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias``. Then ``mu += momentum * (mu_B - mu)`` and
    ``sigma += momentum * (sigma_B - sigma)`` (the paper's update of sigma itself, not of a variance).
    Eval: ``y = weight * (x - mu) / sigma + bias``. ``rmax=1, dmax=0`` is batch norm in training.
    ``rmax``/``dmax`` are plain attributes, so a training loop can ramp them up (the paper starts at
    1 and 0 and relaxes to 3 and 5).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 rmax: float = 3.0, dmax: float = 5.0):
        if momentum is None:
            raise ValueError("BatchRenorm needs a momentum in [0, 1] (the update rate alpha), got None")
        super().__init__(num_features, eps, momentum, affine)
        if not (isinstance(rmax, (int, float)) and rmax >= 1):
            raise ValueError(f"rmax must be a number >= 1 (r is clipped to [1/rmax, rmax]), got {rmax!r}")
        if not (isinstance(dmax, (int, float)) and dmax >= 0):
            raise ValueError(f"dmax must be a number >= 0 (d is clipped to [-dmax, dmax]), got {dmax!r}")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features)
        nd = x.dim()
        if not self.training:
            mu, sigma = _channel_view(self.running_mean, nd), _channel_view(self.running_std, nd)
            return self._affine((x - mu) / sigma)
        check_training_batch(tuple(x.shape))
        mean, var = self._stats(x)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r = (std / self.running_std).clamp(1.0 / self.rmax, self.rmax)
            d = ((mean - self.running_mean) / self.running_std).clamp(-self.dmax, self.dmax)
        xhat = ((x - _channel_view(mean, nd)) / _channel_view(std, nd) * _channel_view(r, nd)
                + _channel_view(d, nd))
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.add_(self.momentum * (mean.detach() - self.running_mean))
            self.running_std.add_(self.momentum * (std.detach() - self.running_std))
        return self._affine(xhat)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"rmax={self.rmax}, dmax={self.dmax}")


class GhostBatchNorm(_BatchStatNorm):
    """Ghost batch norm (Hoffer et al. 2017) for x (N, C) or (N, C, *spatial), per channel C.

    Training: the batch is split along dim 0 into consecutive ghost batches of ``ghost_batch_size``
    examples (the last one may be smaller, as ``torch.split`` does); each is batch-normalized with
    its own mean and biased variance. The running statistics are updated once **per ghost batch**,
    in order, exactly as if ``torch.nn.BatchNorm`` had been called on each chunk
    (``(1 - momentum) * old + momentum * new``, unbiased variance; momentum=None is the cumulative
    average over ghost batches). Eval: the running statistics, as in batch norm.
    ``ghost_batch_size >= N`` is ordinary batch norm.
    """

    def __init__(self, num_features: int, ghost_batch_size: int = 32, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine)
        self.ghost_batch_size = _positive_int(ghost_batch_size, "ghost_batch_size")
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features)
        nd = x.dim()
        if not self.training:
            inv = torch.rsqrt(self.running_var + self.eps)
            return self._affine((x - _channel_view(self.running_mean, nd)) * _channel_view(inv, nd))
        chunks = torch.split(x, self.ghost_batch_size, dim=0)
        for c in chunks:
            check_training_batch(tuple(c.shape))
        outs = []
        for c in chunks:
            mean, var = self._stats(c)
            outs.append((c - _channel_view(mean, nd)) * _channel_view(torch.rsqrt(var + self.eps), nd))
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                m = c.numel() // c.shape[1]
                self.running_mean.mul_(1 - f).add_(f * mean)
                self.running_var.mul_(1 - f).add_(f * var * (m / (m - 1)))
        return self._affine(torch.cat(outs, 0))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}")
