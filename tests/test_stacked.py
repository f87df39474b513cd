"""bnutils.stacked: every member of a StackedMLP trains as the same network trained alone.

References: ``bnutils.train`` itself (float32), and in float64 the same loop written out for one
plain torch network (make_mlp with torch.nn.BatchNorm1d / LayerNorm / GroupNorm, bnutils'
BatchRenorm and GhostBatchNorm), with bnutils.optim's SGD/Adam.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import bnutils
from bnutils import GhostBatchNorm, StackedMLP, accuracy, train_stacked
from bnutils.optim import SGD, Adam

TIGHT = dict(rtol=1e-9, atol=1e-10)


def toy_data(n=48, d=6, classes=3, n_test=20, seed=0):
    g = np.random.default_rng(seed)
    X, X_te = g.standard_normal((n, d)), g.standard_normal((n_test, d))
    w = g.standard_normal((d, classes))
    return X, (X @ w).argmax(1), X_te, (X_te @ w).argmax(1)


def reference_train(net, data, *, lr, steps, batch_size, seed, optimizer="sgd", momentum=0.0):
    """bnutils.train's loop for one float64 network: per-epoch randperm from Generator(seed), batches
    are consecutive slices, the incomplete last batch is dropped. Returns the mini-batch losses."""
    X, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    params = list(net.parameters())
    opt = SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd" else Adam(params, lr=lr)
    gen, per_epoch, losses = torch.Generator().manual_seed(seed), len(X) // batch_size, []
    net.train()
    for s in range(steps):
        if s % per_epoch == 0:
            perm = torch.randperm(len(X), generator=gen)
        idx = perm[(s % per_epoch) * batch_size:(s % per_epoch + 1) * batch_size]
        loss = F.cross_entropy(net(X[idx]), y[idx])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.array(losses)


def assert_member_equals(model, k, net, skip=()):
    state, expected = model.member_state(k), net.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        if key not in skip:
            torch.testing.assert_close(state[key], value, **TIGHT, msg=key)


NORMS = {  # StackedMLP name -> make_mlp norm argument
    "none": "none", "bn": "bn", "ln": "ln", "gn": "gn",
    "brn": functools.partial(bnutils.BatchRenorm, rmax=1.5, dmax=0.5),
    "gbn": functools.partial(GhostBatchNorm, ghost_batch_size=4),
}


def nets_for(norm, seeds, **kw):
    kwargs = {"norm_kwargs": {"num_groups": 2}} if norm == "gn" else {}
    return [bnutils.make_mlp(6, 8, 3, 2, norm=NORMS[norm], seed=s, **kwargs, **kw).double() for s in seeds]


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_members_train_like_single_networks(norm, optimizer):
    data = toy_data()
    lrs, seeds = [0.05, 0.3, 0.1], [0, 1, 0]  # members 0 and 2 see the same batches at different rates
    lrs = [lr / 10 for lr in lrs] if optimizer == "adam" else lrs
    nets = nets_for(norm, [3, 4, 5])
    model = StackedMLP.from_nets(copy.deepcopy(nets))
    momentum = 0.9 if optimizer == "sgd" else 0.0
    history = train_stacked(model, data, lr=lrs, steps=15, batch_size=10, shuffle=seeds, optimizer=optimizer,
                            momentum=momentum, eval_every=5)
    for k, net in enumerate(nets):
        losses = reference_train(net, data, lr=lrs[k], steps=15, batch_size=10, seed=seeds[k],
                                 optimizer=optimizer, momentum=momentum)
        np.testing.assert_allclose(history.train_loss[:, k], losses, **TIGHT)
        # A bias just before batch statistics has a gradient of 0 in exact arithmetic, i.e. rounding
        # noise, which Adam scales up to steps of about lr (chapter 11): not comparable, and no effect
        # on the outputs (the running mean follows the bias).
        noise = {"fc1.bias", "fc2.bias", "norm1.running_mean", "norm2.running_mean"} \
            if optimizer == "adam" and norm in ("bn", "gbn", "brn") else set()
        assert_member_equals(model, k, net, skip=noise)
        assert history.member(k).test_acc[-1] == accuracy(net, data[2], data[3])


def test_float32_members_match_bnutils_train():
    data = bnutils.digits()
    nets = [bnutils.make_mlp(64, 16, 10, 2, norm="bn", seed=s) for s in (0, 1)]
    model = StackedMLP.from_nets(copy.deepcopy(nets))
    history = train_stacked(model, data, lr=[0.05, 0.2], steps=30, batch_size=32, shuffle=[7, 8],
                            eval_every=10)
    for k, (net, lr, seed) in enumerate(zip(nets, [0.05, 0.2], [7, 8], strict=True)):
        ref = bnutils.train(net, data, lr=lr, steps=30, batch_size=32, seed=seed, eval_every=10)
        member = history.member(k)
        np.testing.assert_allclose(member.train_loss, ref.train_loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(member.step, ref.step)
        np.testing.assert_allclose(member.test_acc, ref.test_acc, atol=1 / 450 + 1e-9)
        np.testing.assert_allclose(member.train_eval_loss, ref.train_eval_loss, rtol=1e-4)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("position", ["before", "after"])
def test_modes_match_the_modules(norm, position):
    """train: batch statistics, running ones updated; batch: the same output, buffers untouched;
    eval: running statistics. Member by member against the torch/bnutils modules."""
    nets = nets_for(norm, [0, 1], norm_position=position)
    model = StackedMLP.from_nets(nets)
    x = torch.randn(12, 6, dtype=torch.float64)
    for mode in ("train", "batch", "eval"):
        before = copy.deepcopy(model.state_dict())
        out = model(x, mode=mode)
        for k, net in enumerate(nets):
            snapshot = copy.deepcopy(net.state_dict())
            net.train(mode != "eval")
            torch.testing.assert_close(out[k], net(x), **TIGHT)
            if mode == "batch":
                net.load_state_dict(snapshot)
            assert_member_equals(model, k, net)
        changed = any(not torch.equal(before[key], value) for key, value in model.state_dict().items())
        assert changed == (mode == "train" and norm in ("bn", "gbn", "brn")), mode
