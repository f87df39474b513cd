"""SyncBatchNorm on CPU: 2 gloo processes (127.0.0.1) vs one process on the concatenated batch."""
import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnutils
from bnutils.sync_bn import SyncBatchNorm, convert_sync_batchnorm, run_distributed

torch.set_num_threads(1)
SIZES = (3, 5)  # unequal local batch sizes
W = len(SIZES)


def make_model(bn: str = "torch") -> nn.Module:
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d if bn == "torch" else bnutils.BatchNorm2d
    bn1 = nn.BatchNorm1d if bn == "torch" else bnutils.BatchNorm1d
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn2(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 4), bn1(4, momentum=0.3))
    with torch.no_grad():  # non-trivial affine parameters
        for m in model:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, bnutils.BatchNorm1d, bnutils.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double()


def data():
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64) * 2 + 3
    gw = torch.randn(n, 4, generator=g, dtype=torch.float64)  # loss = sum(out * gw)
    return x, gw


def step(model, x, gw):
    """Two training forward passes (running stats updated twice); grads of the first; eval output."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out * gw).sum().backward()
    model(x.detach() * 0.5 + 1)
    model.eval()
    ev = model(x.detach())
    bns = [m for m in model.modules() if hasattr(m, "running_mean")]
    return {"out": out.detach(), "xgrad": x.grad,
            "grads": [p.grad.clone() for p in model.parameters()],
            "running": [(m.running_mean.clone(), m.running_var.clone()) for m in bns], "eval": ev.detach()}


def _worker(rank, world_size, sync):
    x, gw = data()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    model = make_model("bnutils")
    if sync:
        model = convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    res = step(ddp, x[sl], gw[sl])
    res["grads"] = [p.grad.clone() for p in model.parameters()]
    return res


def reference():
    x, gw = data()
    return step(make_model("torch"), x, gw)


@pytest.fixture(scope="module")
def runs():
    return {sync: run_distributed(_worker, W, sync, timeout=90) for sync in (True, False)}


def close(a, b):
    return torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.timeout(200)
def test_sync_matches_single_process_on_concatenated_batch(runs):
    ref = reference()
    res = runs[True]
    assert close(torch.cat([r["out"] for r in res]), ref["out"])
    assert close(torch.cat([r["eval"] for r in res]), ref["eval"])
    assert close(torch.cat([r["xgrad"] for r in res]), ref["xgrad"])
    for r in res:  # DDP averages the parameter gradients over the W processes
        for g, gref in zip(r["grads"], ref["grads"], strict=True):
            assert close(g * W, gref)
        for (m, v), (mref, vref) in zip(r["running"], ref["running"], strict=True):
            assert close(m, mref) and close(v, vref)


@pytest.mark.timeout(200)
def test_per_process_bn_differs(runs):
    ref = reference()
    res = runs[False]
    out = torch.cat([r["out"] for r in res])
    assert (out - ref["out"]).abs().max() > 1e-3
    assert (torch.cat([r["xgrad"] for r in res]) - ref["xgrad"]).abs().max() > 1e-3
    # DDP broadcasts rank 0's buffers before each forward: both ranks hold rank 0's local statistics
    assert (res[0]["running"][0][1] - ref["running"][0][1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 7), (4, 3, 2, 5)])
def test_single_process_is_plain_batch_norm(shape):
    torch.manual_seed(2)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 5).requires_grad_()
    ref_bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(3, momentum=None).double()
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.uniform_(-1, 1)
    bn = convert_sync_batchnorm(ref_bn.__class__(3, momentum=None).double())
    bn.load_state_dict(ref_bn.state_dict())
    assert isinstance(bn, SyncBatchNorm)
    gw = torch.randn(shape, dtype=torch.float64)
    outs, grads = [], []
    for m in (bn, ref_bn):
        x.grad = None
        for _ in range(2):
            out = m(x)
        (out * gw).sum().backward()
        outs.append(out)
        grads.append([x.grad.clone(), m.weight.grad, m.bias.grad])
    assert close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        assert close(a, b)
    assert close(bn.running_mean, ref_bn.running_mean) and close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 2


def test_convert_nested_and_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(bnutils.BatchNorm1d(4), nn.ReLU()))
    model = convert_sync_batchnorm(model)
    assert isinstance(model[1][0], SyncBatchNorm)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_sync_batchnorm("not a module")
    with pytest.raises(ValueError, match="more than 1 value"):
        SyncBatchNorm(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="channels"):
        SyncBatchNorm(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_worker, 0, True)


def _fails(rank, world_size):
    raise KeyError(f"boom on rank {rank}")


@pytest.mark.timeout(60)
def test_launcher_reports_child_errors():
    with pytest.raises(RuntimeError, match="boom on rank"):
        run_distributed(_fails, 2, timeout=30)


def _eval_without_running_stats(rank, world_size):
    """Both ranks train one step together; then only rank 0 evaluates (would deadlock if eval synced)."""
    x, _ = data()
    lo = sum(SIZES[:rank])
    xr = x[lo:lo + SIZES[rank], :, 0, 0]  # (n_r, 2)
    bn = SyncBatchNorm(2, track_running_stats=False).double()
    bn(xr).sum().backward()  # collective: both ranks
    bn.eval()
    return bn(xr).detach() if rank == 0 else None


@pytest.mark.timeout(120)
def test_eval_without_running_stats_uses_local_batch_and_does_not_communicate():
    res = run_distributed(_eval_without_running_stats, W, timeout=60)
    x, _ = data()
    local = x[:SIZES[0], :, 0, 0]
    ref = nn.BatchNorm1d(2, track_running_stats=False).double().eval()(local)  # torch: local batch stats
    assert res[1] is None and close(res[0], ref)


@pytest.mark.parametrize("bn", ["torch", "bnutils"])
def test_convert_shares_parameters_and_buffers_so_an_earlier_optimizer_still_trains_them(bn):
    """As torch's convert_sync_batchnorm: the same Parameter and buffer objects, not copies."""
    model = make_model(bn)
    old = [m for m in model if hasattr(m, "running_mean")]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the conversion
    model = convert_sync_batchnorm(model)
    new = [m for m in model if isinstance(m, SyncBatchNorm)]
    assert len(new) == len(old) == 2
    for a, b in zip(old, new, strict=True):
        assert b.weight is a.weight and b.bias is a.bias
        assert b.running_mean is a.running_mean and b.running_var is a.running_var
        assert b.num_batches_tracked is a.num_batches_tracked
    before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in new]
    x, gw = data()
    (model(x) * gw).sum().backward()
    optimizer.step()
    for m, (w, b) in zip(new, before, strict=True):
        assert m.weight.grad is not None
        assert not torch.equal(m.weight.detach(), w) and not torch.equal(m.bias.detach(), b), \
            "the optimizer built before the conversion did not update the converted layer"
        assert int(m.num_batches_tracked) == 1


def test_convert_without_affine_or_running_stats():
    bn = bnutils.BatchNorm1d(3, affine=False, track_running_stats=False)
    new = convert_sync_batchnorm(bn)
    assert new.weight is None and new.bias is None and new.running_mean is None
    assert isinstance(new, SyncBatchNorm) and new(torch.randn(4, 3)).shape == (4, 3)


def _rank1_raises(rank, world_size):
    if rank == 1:
        time.sleep(0.5)  # rank 0 is waiting in the barrier by then
        raise KeyError("boom on rank 1")
    dist.barrier()  # fails on rank 0 with gloo's "Connection closed by peer"


def _rank1_killed(rank, world_size):
    if rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(3))


@pytest.mark.timeout(60)
def test_launcher_reports_the_rank_that_failed_first_and_every_traceback():
    with pytest.raises(RuntimeError) as info:
        run_distributed(_rank1_raises, 2, timeout=30)
    message = str(info.value)
    assert message.startswith("run_distributed: rank 1 failed first (KeyError: 'boom on rank 1')"), message
    assert "2 of 2 ranks failed" in message
    first, second = message.index("--- rank 1:"), message.index("--- rank 0:")
    assert first < second, "rank 0's consequence is listed before rank 1's cause"
    assert "_rank1_raises" in message[first:second] and "dist.barrier()" in message[second:]


@pytest.mark.timeout(60)
def test_launcher_reports_a_killed_rank_with_its_exit_code():
    with pytest.raises(RuntimeError) as info:
        run_distributed(_rank1_killed, 2, timeout=30)
    message = str(info.value)
    assert message.startswith("run_distributed: rank 1 failed first (exit code -9 (killed by SIGKILL))"), \
        message
    assert message.index("--- rank 1:") < message.index("--- rank 0:")


def _rank1_never_joins(rank, world_size):
    if rank == 1:
        time.sleep(120)
    dist.barrier()


@pytest.mark.timeout(60)
def test_collectives_time_out_and_the_stragglers_are_killed():
    """The process group has a timeout: rank 0 raises instead of waiting in the barrier for good,
    and rank 1, still busy, is killed a few seconds after that failure, long before ``timeout``."""
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_rank1_never_joins, 2, timeout=50, collective_timeout=2)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert message.startswith("run_distributed: rank 0 failed first"), message
    assert "Timed out" in message and "ranks [1] were still running" in message


@pytest.mark.timeout(60)
def test_rendezvous_picks_no_port_that_another_process_could_take(monkeypatch):
    """Picking a free port and binding it later is a race: simulate losing it. The launcher must not
    depend on a port chosen in advance (the old one asked free_port() and bound it in rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(bnutils.sync_bn, "free_port", lambda: port, raising=False)
        assert run_distributed(_rank_plus_sum, 2, timeout=30) == [1.0, 2.0]


def _rank_plus_sum(rank, world_size):
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t) + rank - 1


def test_eps_is_checked_in_forward_as_torch_does():
    """torch accepts any eps at construction; a forward with batch statistics needs eps > 0, eval eps >= 0."""
    layer = SyncBatchNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        layer(torch.randn(4, 3))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(4, 3))).all()
    layer.eps = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        layer(torch.randn(4, 3))
