"""Batch norm as torch modules written from scratch, with a hand-written backward pass.

``BatchNormFunction`` is a ``torch.autograd.Function``: its forward computes training-mode batch
norm (corrected two-pass statistics, accurate in float32 even when |mean| >> std) and its backward
is the closed form of chapter 4,

    dx = gamma * inv_std / M * (M * dout - sum(dout) - xhat * sum(dout * xhat)),
    dgamma = sum(dout * xhat),  dbeta = sum(dout),

with sums over the M = N * prod(spatial) values of each channel. The backward is itself
differentiable (double backward, gradient penalties) and can be batched by vmap
(``is_grads_batched``, ``jacobian(vectorize=True)``). ``BatchNorm1d``, ``BatchNorm2d`` and
``BatchNorm3d`` wrap it in modules that are drop-ins for ``torch.nn.BatchNorm1d/2d/3d``: the same
constructor, parameters, buffers and ``state_dict`` keys (a state dict loads in either direction),
the same running-statistics rules and the same errors. NaN/inf in the input propagate to the
whole channel they are in, as in torch. They also work under ``torch.compile``, which compiles the
manual backward too (an (N, C) input's column sums are then taken in blocks of rows, for speed;
eager results do not change). Differences from torch's modules: they are not subclasses of
``torch.nn.modules.batchnorm._BatchNorm`` (code that tests ``isinstance`` against it will not see
them), and ``torch.func`` transforms of the forward (vmap, grad) are not supported by the Function.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validate import check_momentum


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    """Dimensions the statistics are reduced over: all but dim 1 (channels)."""
    return (0,) + tuple(range(2, ndim))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32 (as torch's CPU kernel does); others in their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Rows per block of the two-level column sum used under torch.compile (see _column_sum_compiled).
_BLOCK_ROWS = 32


def _per_channel_sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims`` -> (C,). torch's float sums are cascaded (pairwise-like), so float32 stays
    accurate; ``sum(dtype=torch.float64)`` would be too, but is many times slower on CPU (see
    benchmarks/), and ``torch.var_mean`` over dim 0 is slower still. Eager code always takes
    ``t.sum(dims)``; only a compiled (N, C) input takes the blocked sum below."""
    if dims == (0,) and torch.compiler.is_compiling():
        return _column_sum_compiled(t)
    return t.sum(dims)


def _column_sum_compiled(t: Tensor) -> Tensor:
    """Sum of t (N, C) over dim 0 -> (C,), as sums of blocks of ``_BLOCK_ROWS`` rows, then of those.

    For torch.compile only: inductor turns a plain ``t.sum(0)`` into 16-channel column strips, each
    walked down all N rows (a stride of C * 4 bytes: every load on another page, which defeats the
    hardware prefetcher), about 2x slower than torch's eager kernel at (4096, 1024). Over blocks
    it walks 32 rows at a time within cache instead (benchmarks/README.md has the figures). The
    two-level sum is also more accurate than inductor's single running sum per column.
    """
    n, c = t.shape
    blocks = n // _BLOCK_ROWS
    if blocks < 2:
        return t.sum(0)
    body = blocks * _BLOCK_ROWS
    total = t[:body].reshape(blocks, _BLOCK_ROWS, c).sum(1).sum(0)
    return total if body == n else total + t[body:].sum(0)


def _check_input(x, num_channels: int | None = None) -> None:
    """x must be a floating tensor (N, C, *spatial) with the expected number of channels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor of shape (N, C, *spatial), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *spatial) with at least 2 dims, got {tuple(x.shape)}")
    if num_channels is not None and x.shape[1] != num_channels:
        raise ValueError(f"expected input with {num_channels} channels (dim 1), got input of shape "
                         f"{tuple(x.shape)} with {x.shape[1]}")


def _check_param(p, num_channels: int, name: str) -> None:
    if p is not None and tuple(p.shape) != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},) (one value per channel), "
                         f"got {tuple(p.shape)}")


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """(1, C, 1, ...): per-channel vectors viewed to broadcast against x (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _shifted_statistics(xw: Tensor, shift: Tensor, dims: tuple[int, ...], m: int):
    """Corrected two-pass statistics (Chan, Golub & LeVeque 1983) of xw (N, C, *spatial), M = m > 0.

    ``shift`` (C,) is a first estimate of the mean, mean0 = sum(x) / M. The deviations
    xc = xw - shift are exact when |mean| >> std, and their mean ``corr`` (C,) corrects the rounding
    of mean0: mean = mean0 + corr, biased var = mean(xc^2) - corr^2 (C,). Returns
    (xc, corr, var, xc^2). Ordinary ops, so autograd can differentiate it; the identities hold for
    any constant shift, so a shift without gradient history leaves the gradients exact.
    """
    xc = xw - shift.view(_channel_shape(xw))
    corr = _per_channel_sum(xc, dims) / m
    sq = xc * xc
    var = (_per_channel_sum(sq, dims) / m - corr * corr).clamp(min=0)
    return xc, corr, var, sq


def _backward_closed_form(x, weight, dout, mean0, corr, inv_std, m, need_dx=True):
    """The fast backward (not differentiable): returns dx (N, C, *spatial; None unless ``need_dx``)
    and dgamma, dbeta (C,).

    xc = x - mean0 is recomputed rather than saved, so that only x is kept alive between forward
    and backward (as torch's kernel does). No ``out=`` writes and in-place ops only on tensors
    derived from dout: vmap can batch it (is_grads_batched, jacobian(vectorize=True)).
    """
    dims, shape = _reduce_dims(x.dim()), _channel_shape(x)
    xc = x.to(mean0.dtype) - mean0.view(shape)
    dout = dout.to(xc.dtype)
    sum_dout = _per_channel_sum(dout, dims)  # = dbeta
    sum_dout_xhat = (_per_channel_sum(dout * xc, dims) - corr * sum_dout) * inv_std  # = dgamma
    if not need_dx:
        return None, sum_dout_xhat, sum_dout
    g = inv_std if weight is None else weight.to(xc.dtype) * inv_std  # gamma * inv_std
    # gamma*inv_std/M * (M*dout - sum(dout) - xhat*sum(dout*xhat)) regrouped per channel as
    # a*dout + b + c*xc, so that it takes two fused elementwise passes (addcmul).
    c = -g * inv_std * sum_dout_xhat / max(m, 1)
    b = -g * sum_dout / max(m, 1) - c * corr
    dx = torch.addcmul(b.view(shape), dout, g.view(shape))
    dx.addcmul_(xc, c.view(shape))
    return dx, sum_dout_xhat, sum_dout


def _backward_differentiable(x, weight, dout, mean0, eps, m):
    """The same closed form from ordinary ops on the saved x, weight and dout, so that autograd can
    differentiate it (double backward: gradient penalties, Hessian-vector products).

    Recomputes the statistics from x with the forward's own shift mean0 (C,), so the values match
    the forward's. Returns dx (N, C, *spatial), dgamma and dbeta (C,).
    """
    dims, shape = _reduce_dims(x.dim()), _channel_shape(x)
    mm = max(m, 1)  # empty batch: all sums are 0
    xc, corr, var, _ = _shifted_statistics(x.to(mean0.dtype), mean0, dims, mm)
    inv_std = torch.rsqrt(var + eps)
    xhat = (xc - corr.view(shape)) * inv_std.view(shape)
    dout = dout.to(xc.dtype)
    sum_dout = _per_channel_sum(dout, dims)
    sum_dout_xhat = _per_channel_sum(dout * xhat, dims)
    g = inv_std if weight is None else weight.to(xc.dtype) * inv_std
    dx = g.view(shape) * (dout - (sum_dout.view(shape) + xhat * sum_dout_xhat.view(shape)) / mm)
    return dx, sum_dout_xhat, sum_dout


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the manual closed-form backward.

    ``out, mean, var = BatchNormFunction.apply(x, weight, bias, eps)``

    x: (N, C, *spatial) float tensor; weight, bias: (C,) tensors or None (no affine transform);
    eps > 0. Returns ``out`` (x's shape and dtype) and the batch ``mean`` and *biased* ``var``
    (shape (C,), x's dtype or float32 for half-precision x; not differentiable), which a module
    uses to update its running statistics.
    The backward is differentiable: with ``create_graph=True`` it is built from ordinary ops
    (double backward works); otherwise it takes the fast fused path.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        _check_input(x)
        _check_param(weight, x.shape[1], "weight")
        _check_param(bias, x.shape[1], "bias")
        if not isinstance(eps, (int, float)) or eps <= 0.0:  # (traceable by dynamo)
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        dims, shape = _reduce_dims(x.dim()), _channel_shape(x)
        m = x.numel() // x.shape[1] if x.shape[1] else 0
        cdt = _compute_dtype(x.dtype)
        xw = x.to(cdt)
        if m == 0:  # empty batch: empty output, as torch (the statistics are never used)
            mean0 = corr = torch.zeros(x.shape[1], dtype=cdt, device=x.device)
            xc = xw - mean0.view(shape)
            var = torch.ones_like(mean0)
            scratch = torch.empty_like(xc)
        else:
            mean0 = _per_channel_sum(xw, dims) / m
            # The squares are then reused as the output buffer: one fresh x-sized tensor fewer
            # (memory, and page faults when the allocator returns memory to the OS).
            xc, corr, var, scratch = _shifted_statistics(xw, mean0, dims, m)
        mean = mean0 + corr
        inv_std = torch.rsqrt(var + eps)
        scale = inv_std if weight is None else weight.to(cdt) * inv_std
        # out = gamma * (xc - corr) * inv_std + beta = xc * scale + (beta - corr * scale)
        shift = -corr * scale if bias is None else bias.to(cdt) - corr * scale
        out = torch.addcmul(shift.view(shape), xc, scale.view(shape), out=scratch)
        ctx.save_for_backward(x, weight, mean0, corr, inv_std)
        ctx.m, ctx.eps = m, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return out.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dout: Tensor, _dmean, _dvar):
        x, weight, mean0, corr, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must have a graph themselves
            dx, dweight, dbias = _backward_differentiable(x, weight, dout, mean0, ctx.eps, ctx.m)
        else:
            dx, dweight, dbias = _backward_closed_form(x, weight, dout, mean0, corr, inv_std, ctx.m,
                                                       ctx.needs_input_grad[0])
        dx = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        dweight = dweight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


def _check_eps(eps, training: bool) -> None:
    """torch's rule and messages (F.batch_norm): eps > 0 with batch statistics, else eps >= 0."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_training_batch(x: Tensor) -> None:
    """Same rule and message as torch: batch statistics need more than one value per channel."""
    size = x.size()
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


class _BatchNorm(nn.Module):
    """Shared machinery of BatchNorm1d/2d/3d: torch.nn's attributes, buffers and update rules."""

    _version = 2  # torch's _NormBase version: 2 added num_batches_tracked
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int (the number of channels C), "
                             f"got {num_features!r}")
        check_momentum(momentum)  # (torch accepts any eps here and checks it in forward)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, batch count 0 (when statistics are tracked)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight (gamma) to 1 and bias (beta) to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # State dicts saved before torch's version 2 lack num_batches_tracked: default it to 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # A module built on the meta device has no value to keep: substitute 0 (as torch), or
            # load_state_dict(assign=True) would leave the counter on meta.
            nbt = self.num_batches_tracked
            keep = nbt is not None and nbt.device != torch.device("meta")
            state_dict[key] = nbt if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (N, C, *spatial) per channel; returns a tensor of x's shape and dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        self._check_input_dim(x)
        _check_input(x, self.num_features)
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # before the batch-size check, exactly as torch
            if self.momentum is None:  # cumulative moving average over all batches so far
                if torch.compiler.is_compiling():  # a tensor: float(tensor) would break the graph
                    factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
                else:
                    factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
        # Batch statistics in training, and in eval when there are no running buffers.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if use_batch_stats:
            _check_training_batch(x)
            _check_eps(self.eps, training=True)
            out, mean, var = BatchNormFunction.apply(x, self.weight, self.bias, self.eps)
            update = self.training and self.track_running_stats and self.running_mean is not None
            if update and x.numel() > 0:
                m = x.numel() // x.shape[1]
                with torch.no_grad():
                    unbiased = var * (m / (m - 1))
                    self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                    self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)
            return out
        _check_eps(self.eps, training=False)
        return self._inference(x)

    def _inference(self, x: Tensor) -> Tensor:
        """Eval mode: a fixed per-channel affine map from the running statistics (plain autograd)."""
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        inv_std = torch.rsqrt(self.running_var + self.eps)
        scale = inv_std if self.weight is None else self.weight * inv_std
        out = (x - self.running_mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(x.dtype)


class BatchNorm1d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: x is (N, C) or (N, C, L); statistics per channel C.

    Same constructor ``(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    device=None, dtype=None)``, parameters ``weight``/``bias``, buffers ``running_mean``,
    ``running_var`` (unbiased, updated as ``(1 - momentum) * old + momentum * new``; momentum=None is
    the cumulative average) and ``num_batches_tracked``. Training uses batch statistics with the
    manual backward of ``BatchNormFunction``; eval uses the running statistics.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 2 and x.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: x is (N, C, H, W); statistics per channel C over N, H, W.

    Same constructor, parameters, buffers, state_dict keys and rules as ``BatchNorm1d``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: x is (N, C, D, H, W); statistics per channel C over N, D, H, W.

    Same constructor, parameters, buffers, state_dict keys and rules as ``BatchNorm1d``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")
