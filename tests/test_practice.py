"""bnutils.practice: the residual MLP, its stacked copy, decay groups, accumulation, fine-tuning."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnutils
from bnutils import practice as P


def small_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 12, generator=g)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    return X[:64], y[:64], X[64:], y[64:]


def test_residual_block_zero_init_is_identity_and_bias_free():
    net = P.residual_mlp(12, 8, 4, 3, zero_init=True, seed=0)
    assert all(m.bias is None for n, m in net.named_modules() if isinstance(m, nn.Linear) and n != "head")
    block = net.block1
    x = torch.relu(torch.randn(16, 8))
    assert torch.equal(block(x), x)  # relu(x + 0) = x for x >= 0
    assert float(P.residual_mlp(12, 8, 4, 3, zero_init=False, seed=0).block1.bn2.weight.detach().min()) == 1.0


def test_residual_mlp_seed_does_not_touch_global_rng():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    a, b = P.residual_mlp(12, 8, 4, 2, seed=5), P.residual_mlp(12, 8, 4, 2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_stacked_residual_equals_each_member():
    nets = [P.residual_mlp(12, 8, 4, 2, zero_init=z, seed=s) for z, s in ((False, 0), (True, 1), (False, 2))]
    stacked = P.StackedResidualMLP(copy.deepcopy(nets))
    x = torch.randn(10, 12)
    out = stacked(x)
    for k, net in enumerate(nets):
        torch.testing.assert_close(out[k], net.train()(x), rtol=1e-5, atol=1e-5)
        assert torch.allclose(stacked.mean_block1_bn1[k, 0], net.block1.bn1.running_mean, atol=1e-6)
    stacked.eval()
    for k, net in enumerate(nets):
        torch.testing.assert_close(stacked(x)[k], net.eval()(x), rtol=1e-5, atol=1e-5)


def test_stacked_residual_training_matches_a_plain_loop():
    data = small_data()
    net = P.residual_mlp(12, 8, 4, 2, seed=0)
    stacked = P.StackedResidualMLP([copy.deepcopy(net)])
    res = P.train_stacked_residual(stacked, data, lr=[0.05], steps=5, batch_size=16, momentum=0.9, seeds=[7])
    opt = bnutils.optim.SGD(list(net.parameters()), 0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    X, y = data[0], data[1]
    net.train()
    for s in range(5):
        if s % 4 == 0:
            perm = torch.randperm(64, generator=gen)
        idx = perm[(s % 4) * 16:(s % 4 + 1) * 16]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
        loss.backward()
        opt.step()
        assert res["train_loss"][s, 0] == pytest.approx(loss.item(), rel=1e-5)
    net.eval()
    with torch.no_grad():
        acc = float((net(data[2]).argmax(1) == data[3]).float().mean())
    assert res["test_acc"][0] == pytest.approx(acc, abs=1e-9)
    torch.testing.assert_close(stacked.linears["head"][0].T, net.head.weight.detach(), rtol=1e-4, atol=1e-5)


def test_stacked_residual_reports_divergence():
    stacked = P.StackedResidualMLP([P.residual_mlp(12, 8, 4, 2, seed=s) for s in range(2)])
    res = P.train_stacked_residual(stacked, small_data(), lr=[0.01, 1e6], steps=6, batch_size=16)
    assert list(res["diverged"]) == [False, True] and np.isnan(res["test_acc"][1])


def test_norm_parameters_split_and_decay_split_sgd():
    net = bnutils.make_mlp(12, 8, 4, depth=2, norm="bn", seed=0)
    other, norm = P.norm_parameters(net)
    assert {id(p) for p in norm} == {id(p) for m in net.norms for p in m.parameters()}
    assert len(other) + len(norm) == len(list(net.parameters()))
    opt = P.DecaySplitSGD(other, norm, lr=0.1, momentum=0.0, weight_decay=0.5)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    for p, b in zip(net.parameters(), before, strict=True):
        expected = b if any(p is q for q in norm) else b * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected)


def test_spare_norm_params_equals_decay_split_sgd():
    data = small_data()
    nets = [bnutils.make_mlp(12, 8, 4, depth=2, norm="bn", seed=s) for s in (0, 1)]
    stacked = bnutils.StackedMLP.from_nets(copy.deepcopy(nets))
    P.spare_norm_params(stacked, 0.05, [False, True])
    bnutils.train_stacked(stacked, data, lr=0.1, steps=6, batch_size=16, momentum=0.9, weight_decay=0.05,
                          shuffle=[0, 0], eval_every=None, eval_train=False)
    for k, (net, spare) in enumerate(zip(nets, (False, True), strict=True)):
        other, norm = P.norm_parameters(net)
        decay, keep = (other, norm) if spare else (other + norm, [])
        bnutils.train(net, data, lr=0.1, steps=6, batch_size=16, seed=0, eval_every=None, eval_train=False,
                      optimizer=lambda params, d=decay, n=keep: P.DecaySplitSGD(d, n, 0.1, 0.9, 0.05))
        torch.testing.assert_close(stacked.member_state(k)["norm1.weight"], net.norm1.weight.detach(),
                                   rtol=1e-4, atol=1e-5)


def test_train_accumulated_equals_plain_training_without_batch_statistics():
    data = small_data()
    a = bnutils.make_mlp(12, 8, 4, depth=1, norm="ln", seed=0)
    b = copy.deepcopy(a)
    acc_a = P.train_accumulated(a, data, lr=0.1, steps=4, micro_batch=4, accumulate=4, seed=0)
    acc_b = P.train_accumulated(b, data, lr=0.1, steps=4, micro_batch=16, accumulate=1, seed=0)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert acc_a == acc_b


def test_fine_tune_frozen_keeps_running_stats():
    data = small_data()
    net = bnutils.make_mlp(12, 8, 4, depth=1, norm="bn", seed=0)
    before = net.norm1.running_mean.clone()
    P.fine_tune(net, data[0], data[1], frozen_bn=True, lr=0.1, steps=3, batch_size=8)
    assert torch.equal(net.norm1.running_mean, before) and not net.training
    P.fine_tune(net, data[0], data[1], frozen_bn=False, lr=0.1, steps=3, batch_size=8)
    assert not torch.equal(net.norm1.running_mean, before)
