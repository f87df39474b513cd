"""Synchronized batch norm on CPU with ``torch.distributed`` (gloo), and a local process launcher.

``torch.nn.SyncBatchNorm`` only runs on GPUs. ``SyncBatchNorm`` here computes the statistics of the
*global* batch (all processes of the group together) on CPU:

* forward: each process computes, per channel, its value count ``n_r``, mean and M2 (sum of squared
  deviations, corrected two-pass); the triples are all-gathered and combined as in Chan, Golub &
  LeVeque (accurate, and correct for unequal local batch sizes):
  ``N = sum n_r``, ``mean = sum n_r mean_r / N``, ``M2 = sum (M2_r + n_r (mean_r - mean)^2)``,
  ``var = M2 / N`` (biased, used to normalize); running_var gets ``M2 / (N - 1)``.
* backward: ``sum(dout)`` and ``sum(dout * xhat)`` are all-reduced, and
  ``dx = gamma * inv_std * (dout - sum(dout) / N - xhat * sum(dout * xhat) / N)``; the weight and
  bias gradients returned are the *local* sums (DistributedDataParallel then averages them).

Gradient convention (the same as torch's SyncBatchNorm under DDP): if process r minimizes loss_r,
x_r.grad is d(sum_s loss_s)/dx_r and the parameter gradients are (1/W) * d(sum_s loss_s)/dparam
(DDP's average over the W processes).

``run_distributed(fn, world_size, *args, timeout=...)`` starts ``world_size`` processes on this
machine, joins them into a gloo group over 127.0.0.1 and returns each rank's ``fn(rank, world_size,
*args)``; it kills the processes it started when the timeout expires.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layers import _BatchNorm, _check_input, _compute_dtype, _reduce_dims


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics over all processes of ``group``.

    ``out, mean, var, count = SyncBatchNormFunction.apply(x, weight, bias, eps, group, sync)``

    x: (N_r, C, *spatial) on this process (N_r may differ between processes, and may be 0);
    weight, bias: (C,) or None. Returns out (x's shape and dtype) and the global per-channel
    ``mean``, biased ``var`` (C,) and the global number of values per channel ``count`` (a float
    tensor), which are not differentiable. Every process of the group must call it (collective);
    with ``sync`` False it uses this process's batch alone and communicates nothing.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group=None,
                sync: bool = True):
        _check_input(x)
        c = x.shape[1]
        dims = _reduce_dims(x.dim())
        shape = (1, c) + (1,) * (x.dim() - 2)
        n = x.numel() // c if c else 0
        cdt = _compute_dtype(x.dtype)
        xw = x.to(cdt)
        if n > 0:  # local mean and M2, corrected two-pass (accurate when |mean| >> std)
            mean0 = xw.sum(dims) / n
            xc = xw - mean0.view(shape)
            corr = xc.sum(dims) / n
            m2 = ((xc * xc).sum(dims) - n * corr * corr).clamp(min=0)
            mean_l = mean0 + corr
        else:
            mean_l = m2 = torch.zeros(c, dtype=cdt, device=x.device)
        # The C-sized statistics travel and are combined in float64 (cheap, and exact counts).
        package = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=x.device),
                             mean_l.double(), m2.double()])
        world = _world(group) if sync else 1
        if world > 1:
            parts = [torch.empty_like(package) for _ in range(world)]
            dist.all_gather(parts, package, group=group)
            table = torch.stack(parts)
        else:
            table = package.unsqueeze(0)
        counts, means, m2s = table[:, :1], table[:, 1:c + 1], table[:, c + 1:]
        total = counts.sum()
        if float(total) <= 1:
            raise ValueError(f"Expected more than 1 value per channel over all processes when training, "
                             f"got {int(total)} (local input size {tuple(x.size())})")
        mean64 = (counts * means).sum(0) / total
        var64 = (m2s + counts * (means - mean64) ** 2).sum(0) / total
        mean, var = mean64.to(cdt), var64.to(cdt)
        inv_std = torch.rsqrt(var + eps)
        xc = xw - mean.view(shape)
        scale = inv_std if weight is None else weight.to(cdt) * inv_std
        out = xc * scale.view(shape)
        if bias is not None:
            out = out + bias.to(cdt).view(shape)
        ctx.save_for_backward(xc, inv_std, weight)
        ctx.total = float(total)
        ctx.group = group
        ctx.sync = world > 1
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        count = total.to(cdt)
        ctx.mark_non_differentiable(mean, var, count)
        return out.to(x.dtype), mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor, _dmean, _dvar, _dcount):
        xc, inv_std, weight = ctx.saved_tensors
        c = xc.shape[1]
        dims = _reduce_dims(xc.dim())
        shape = (1, c) + (1,) * (xc.dim() - 2)
        dout = dout.to(xc.dtype)
        sum_dout = dout.sum(dims)  # local dbeta
        sum_dout_xhat = (dout * xc).sum(dims) * inv_std  # local dgamma
        sums = torch.cat([sum_dout, sum_dout_xhat])
        if ctx.sync:  # always (not only when dx is needed): every rank must join
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        g_dout, g_dout_xhat = sums[:c], sums[c:]
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            g = inv_std if weight is None else weight.to(xc.dtype) * inv_std
            xhat = xc * inv_std.view(shape)
            dx = g.view(shape) * (dout - (g_dout / ctx.total).view(shape)
                                  - xhat * (g_dout_xhat / ctx.total).view(shape))
            dx = dx.to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dout_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dout.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the global batch over a process group.

    Same constructor as ``BatchNorm1d/2d`` plus ``process_group`` (None: the default group), same
    parameters, buffers and state_dict keys. Accepts (N, C, *spatial) with any number of spatial dims.
    Training: normalizes with the global mean/variance (every process of the group must call forward
    and backward together) and updates the running statistics with the global mean and the unbiased
    global variance ``M2 / (N - 1)`` -- identical on every process. Without an initialized process
    group (or with one process) it is ordinary batch norm. Eval: the running statistics, no
    communication; with ``track_running_stats=False``, this process's batch statistics, also without
    communication (as torch's SyncBatchNorm does), so one process may evaluate alone.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *spatial), got {x.dim()}D input")

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (N, C, *spatial) with global batch statistics (training) or running ones (eval)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        self._check_input_dim(x)
        _check_input(x, self.num_features)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return self._inference(x)
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Only training synchronizes: in eval mode (track_running_stats=False) each process
        # normalizes with its own batch, so evaluating on one process alone cannot deadlock.
        out, mean, var, count = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps,
                                                            self.process_group, self.training)
        if self.training and self.track_running_stats and self.running_mean is not None:
            total = float(count)
            with torch.no_grad():
                unbiased = var * (total / (total - 1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)
        return out


def _is_batchnorm(m: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm as TorchBN
    return isinstance(m, (TorchBN, _BatchNorm)) and not isinstance(m, SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every torch.nn / bnutils BatchNorm{1,2,3}d in ``module`` by a ``SyncBatchNorm``.

    Parameters, running statistics and settings are copied (the same tensors' values; dtype and
    device kept). Returns the converted module (``module`` itself is changed in place for children).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if _is_batchnorm(module):
        ref = module.running_mean if module.running_mean is not None else module.weight
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group=process_group, **kw)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats and module.running_mean is not None:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


# ----------------------------------------------------------------------------------------------
# Launcher: W local processes in a gloo group on 127.0.0.1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, outdir, threads, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # report to the parent; never hang it
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)  # skip atexit handlers inherited from the parent (fork)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0,
                    start_method: str = "fork", threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group.

    The group talks over 127.0.0.1 only. Returns the list of the ranks' return values (saved with
    ``torch.save``, so tensors, numbers, dicts and lists are fine). ``start_method`` "fork" (default,
    fast, works with functions defined in a notebook) or "spawn" (``fn`` must be importable).
    Raises RuntimeError with the child's traceback if a rank fails, TimeoutError (after killing the
    processes) if they are not all done within ``timeout`` seconds.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    ctx = mp.get_context(start_method)
    if start_method == "fork":
        # DistributedDataParallel imports torch._dynamo lazily (seconds): import it once here so that
        # the forked children inherit it instead of each importing it again.
        import torch._dynamo  # noqa: F401
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bnutils_dist_") as outdir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, outdir, threads, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            if any(p.is_alive() for p in procs):
                raise TimeoutError(f"run_distributed: not all {world_size} processes finished "
                                   f"within {timeout} s; killed them")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        errors = [r for r in range(world_size) if os.path.exists(os.path.join(outdir, f"rank{r}.err"))]
        if errors:
            with open(os.path.join(outdir, f"rank{errors[0]}.err")) as f:
                raise RuntimeError(f"rank {errors[0]} failed:\n{f.read()}")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm", "free_port",
           "run_distributed"]
