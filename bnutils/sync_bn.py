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
machine, joins them into a gloo group over 127.0.0.1 (rendezvous through a file, with a timeout)
and returns each rank's ``fn(rank, world_size, *args)``; if a rank fails it reports every rank's
traceback or exit code, first failure first, and it kills the processes it started when the
timeout expires.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import re
import signal
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .layers import _BatchNorm, _check_eps, _check_input, _compute_dtype, _reduce_dims


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
        _check_eps(self.eps, use_batch_stats)  # torch's rule: eps > 0 with batch statistics, else >= 0
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

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does, the new layer *shares* the old one's
    parameters and buffers (the same ``nn.Parameter`` and tensor objects, not copies), so an
    optimizer built before the conversion keeps updating gamma and beta, and the running
    statistics are the same tensors. Returns the converted module (``module`` itself is changed in
    place for children).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if _is_batchnorm(module):
        ref = module.running_mean if module.running_mean is not None else module.weight
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group=process_group, **kw)
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


# ----------------------------------------------------------------------------------------------
# Launcher: W local processes in a gloo group on 127.0.0.1


_GRACE_SECONDS = 5.0  # after a first failure, how long the other ranks get before they are killed
# Errors that only say a peer went away: the consequence of another rank's failure, never its cause.
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|ECONNRESET|EPIPE|"
                        r"[Cc]onnection refused|Socket closed|[Pp]eer .*(closed|disconnected)")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # the parent never reads a half-written report


def _worker(fn, rank, world_size, store_path, outdir, threads, group_timeout, args):
    os.environ.update(GLOO_SOCKET_IFNAME="lo", RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    code = 0
    try:
        timeout = datetime.timedelta(seconds=group_timeout)
        # Rendezvous through a file in the parent's temporary directory: no port is picked, so none
        # can be taken by another process between picking and binding (gloo's own connections bind
        # port 0, which the kernel assigns atomically).
        store = dist.FileStore(store_path, world_size)
        store.set_timeout(timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # report to the parent; never hang it
        failed_at = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of this machine
        _write_json(os.path.join(outdir, f"rank{rank}.err"),
                    {"time": failed_at, "traceback": traceback.format_exc()})
        code = 1
    os._exit(code)  # skip atexit handlers inherited from the parent (fork)


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def _failure_report(failures: list[tuple[bool, float, int, str, str]], killed: list[int],
                    world_size: int) -> str:
    """failures: (peer_lost, time, rank, one-line summary, details). First failure first: ranks with
    an error of their own (or an exit code) by time, then those that only lost a peer."""
    failures = sorted(failures)
    first = failures[0]
    parts = [f"run_distributed: rank {first[2]} failed first ({first[3]}); "
             f"{len(failures)} of {world_size} ranks failed"
             + (f"; ranks {killed} were still running {_GRACE_SECONDS:g} s later and were killed"
                if killed else "") + "."]
    for _, _, rank, summary, details in failures:
        parts.append(f"--- rank {rank}: {summary}\n{details}".rstrip())
    return "\n\n".join(parts)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0,
                    start_method: str = "fork", threads: int = 1,
                    collective_timeout: float | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in a gloo group.

    The group talks over 127.0.0.1 only; the processes meet through a file store in a temporary
    directory (no port to pick). Returns the list of the ranks' return values (saved with
    ``torch.save``, so tensors, numbers, dicts and lists are fine). ``start_method`` "fork" (default,
    fast, works with functions defined in a notebook) or "spawn" (``fn`` must be importable).
    ``collective_timeout`` (seconds, default ``timeout``) is the process group's timeout: a rank
    waiting longer than that in the rendezvous or in a collective raises instead of hanging.

    Raises RuntimeError if a rank fails, with every failed rank's traceback, or exit code if it
    died without one (killed, crashed), first failure first: a rank whose error only says that a
    peer went away (connection reset) comes after the rank that caused it. Once one rank has
    failed, the others get a few seconds to finish, then are killed. Raises TimeoutError (after
    killing the processes) if they are not all done within ``timeout`` seconds.
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    group_timeout = timeout if collective_timeout is None else collective_timeout
    if not group_timeout > 0:
        raise ValueError(f"collective_timeout must be > 0 seconds, got {collective_timeout}")
    ctx = mp.get_context(start_method)
    if start_method == "fork":
        # DistributedDataParallel imports torch._dynamo lazily (seconds): import it once here so that
        # the forked children inherit it instead of each importing it again.
        import torch._dynamo  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="bnutils_dist_") as outdir:
        store_path = os.path.join(outdir, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(fn, r, world_size, store_path, outdir, threads, group_timeout, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        exited_at: dict[int, float] = {}
        first_failure: float | None = None
        running = dict(enumerate(procs))
        try:
            while running:
                limit = deadline if first_failure is None else min(deadline, first_failure + _GRACE_SECONDS)
                left = limit - time.monotonic()
                if left <= 0:
                    break
                ready = set(mp_connection.wait([p.sentinel for p in running.values()], timeout=left))
                now = time.monotonic()
                for r, p in list(running.items()):
                    if p.sentinel in ready:
                        p.join()
                        exited_at[r] = now
                        del running[r]
                        if p.exitcode != 0 and first_failure is None:
                            first_failure = now
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        failures = []
        for r, p in enumerate(procs):
            err = os.path.join(outdir, f"rank{r}.err")
            if r in running:
                continue
            if os.path.exists(err):
                with open(err) as f:
                    report = json.load(f)
                tb = report["traceback"].rstrip()
                last = tb.splitlines()[-1] if tb else "no traceback"
                failures.append((bool(_PEER_LOST.search(tb)), report["time"], r, last, tb))
            elif p.exitcode != 0:
                failures.append((False, exited_at[r], r, _exit_description(p.exitcode),
                                 "(no traceback: the process was killed or crashed outside Python)"))
        if failures:
            raise RuntimeError(_failure_report(failures, sorted(running), world_size))
        if running:
            raise TimeoutError(f"run_distributed: ranks {sorted(running)} of {world_size} had not finished "
                               f"within {timeout} s; killed them")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm", "run_distributed"]
