"""Landscape probes and state preservation: exact restoration, manual re-evaluation, closed form."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnutils as bn

X = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(32) % 3
CE = nn.functional.cross_entropy


def snapshot(model):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            torch.get_rng_state(),
            [n.generator.get_state() for n in model.norms if hasattr(n, "generator")])


def assert_same(a, b):
    for pa, pb in zip(a[0], b[0], strict=True):
        assert torch.equal(pa, pb)
    for ga, gb in zip(a[1], b[1], strict=True):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3] == b[3]
    assert torch.equal(a[4], b[4])
    assert all(torch.equal(x, y) for x, y in zip(a[5], b[5], strict=True))


def noisy_net():
    m = bn.make_mlp(5, 8, 3, 2, norm="noisy_bn", dropout=0.2, seed=0)
    CE(m(X), Y).backward()  # some existing gradients, moved running statistics
    return m


def test_preserved_state_restores_everything():
    m = noisy_net()
    before = snapshot(m)
    with bn.preserved_state(m):
        m.eval()
        m.train()
        for _ in range(2):
            CE(m(X), Y).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1.0)
        torch.rand(3)
    assert_same(before, snapshot(m))


def test_preserved_state_restores_after_an_exception():
    m = noisy_net()
    before = snapshot(m)
    with pytest.raises(RuntimeError), bn.preserved_state(m):
        m(X)
        raise RuntimeError("boom")
    assert_same(before, snapshot(m))


def test_probe_restores_the_model_exactly():
    m = noisy_net()
    before = snapshot(m)
    bn.probe_gradient_direction(m, CE, X, Y, [0.1, 0.5, 1.0])
    assert_same(before, snapshot(m))


def manual_loss_and_grad(model, params_like, x, y, rng_state):
    """Evaluate a copy of ``model`` at the given parameter values, with a given global RNG state."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(other.parameters(), params_like, strict=True):
            p.copy_(v)
    other.zero_grad()
    torch.set_rng_state(rng_state)
    loss = CE(other(x), y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1).double() for p in other.parameters()])


def test_probe_values_equal_manual_evaluation():
    m = bn.make_mlp(5, 8, 3, 2, activation="tanh", norm="bn", dropout=0.1, seed=1)
    m.train()
    etas = [0.05, 0.2, 1.0]
    rng = torch.get_rng_state()
    res = bn.probe_gradient_direction(m, CE, X, Y, etas)
    base = [p.detach().clone() for p in m.parameters()]
    loss0, g0 = manual_loss_and_grad(m, base, X, Y, rng)
    assert res.loss0 == pytest.approx(loss0, rel=1e-6)
    assert res.grad_norm == pytest.approx(float(g0.norm()), rel=1e-6)
    sizes = [p.numel() for p in base]
    for k, eta in enumerate(etas):
        moved = [p - (eta * g).view_as(p).float() for p, g in zip(base, g0.split(sizes), strict=True)]
        loss, g = manual_loss_and_grad(m, moved, X, Y, rng)
        assert res.losses[k] == pytest.approx(loss, rel=1e-5)
        assert res.grad_dist[k] == pytest.approx(float((g - g0).norm()), rel=1e-4)
    assert res.loss_range == pytest.approx(max(res.losses) - min(res.losses))
    assert res.grad_predictiveness == max(res.grad_dist)
    assert res.beta_smoothness == pytest.approx(max(res.grad_dist / (np.array(etas) * res.grad_norm)))
    torch.set_rng_state(rng)


def test_random_layers_draw_the_same_noise_at_every_point():
    m = noisy_net()
    res = bn.probe_gradient_direction(m, CE, X, Y, [0.0, 0.3, 0.0])
    assert res.losses[0] == res.loss0 == res.losses[2]
    assert res.grad_dist[0] == 0.0
    again = bn.probe_gradient_direction(m, CE, X, Y, [0.0, 0.3, 0.0])
    np.testing.assert_array_equal(res.losses, again.losses)


def test_quadratic_closed_form():
    """L(w) = a/2 w^2: g = a w, L(w - eta g) = a/2 w^2 (1 - eta a)^2, ||g' - g|| = eta a^2 |w|, beta = a."""
    a, w = 3.0, 2.0
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w)

    def loss_fn(out, y):
        return 0.5 * a * out.pow(2).mean()

    etas = np.array([0.1, 0.2, 0.5])
    res = bn.probe_gradient_direction(model, loss_fn, torch.ones(1, 1), None, etas)
    np.testing.assert_allclose(res.losses, 0.5 * a * w**2 * (1 - etas * a) ** 2, rtol=1e-6)
    np.testing.assert_allclose(res.grad_dist, etas * a**2 * w, rtol=1e-6)
    assert res.beta_smoothness == pytest.approx(a, rel=1e-6)
    assert res.loss_range == pytest.approx(np.ptp(0.5 * a * w**2 * (1 - etas * a) ** 2), rel=1e-6)


def test_non_finite_losses_are_returned_not_raised():
    model = nn.Linear(1, 1, bias=False)

    def loss_fn(out, y):
        return torch.exp(out.pow(2)).mean()

    with torch.no_grad():
        model.weight.fill_(3.0)
    res = bn.probe_gradient_direction(model, loss_fn, torch.ones(1, 1), None, [1e3])
    assert not np.isfinite(res.losses[0])


def test_recorder_uses_lr_times_multipliers():
    rng = np.random.default_rng(0)
    Xd = rng.normal(size=(90, 5)).astype(np.float32)
    yd = (Xd[:, 0] > 0).astype(np.int64)
    model = bn.make_mlp(5, 8, 2, 1, norm="bn", seed=0)
    ref = copy.deepcopy(model)
    h = bn.train(model, (Xd, yd), lr=0.2, steps=2, batch_size=30, seed=0,
                 record=[bn.LandscapeProbe(every=1, multipliers=(0.5, 2))])
    rec = h.records["landscape"]
    idx = torch.randperm(90, generator=torch.Generator().manual_seed(0))[:30]
    xb, yb = torch.from_numpy(Xd)[idx], torch.from_numpy(yd)[idx]
    res = bn.probe_gradient_direction(ref, CE, xb, yb, [0.1, 0.4])
    np.testing.assert_array_equal(rec["losses"][0], res.losses)
    assert rec["loss_range"][0] == res.loss_range and rec["beta_smoothness"][0] == res.beta_smoothness
    assert rec["losses"].shape == (2, 2) and rec["loss0"][0] == h.train_loss[0]
    # weight norms at the first probe: those of the initial weights (fc1, fc2)
    expected = [float(torch.linalg.vector_norm(w.double())) for w in bn.weight_snapshot(ref)]
    assert rec["weight_norm"].shape == (2, 2)
    np.testing.assert_allclose(rec["weight_norm"][0], expected, rtol=1e-12)


def test_bad_step_sizes():
    with pytest.raises(ValueError, match="step_sizes"):
        bn.probe_gradient_direction(nn.Linear(1, 1), CE, X, Y, [])
