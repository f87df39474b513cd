"""The training loop: determinism, divergence handling, evaluation schedule, History views,
and bnutils.optim equal to torch.optim."""
import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import bnutils as bn
from bnutils.optim import SGD, Adam


@functools.cache
def blobs(n=300, d=6, classes=3, seed=0):
    """A small separable-ish classification task (train 240 / test 60)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2
    y = rng.integers(0, classes, n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X[:240], y[:240], X[240:], y[240:]


def net(norm="bn", **kw):
    return bn.make_mlp(6, 16, 3, 2, norm=norm, seed=0, **kw)


def test_same_seed_same_history_different_seed_different():
    kw = dict(lr=0.1, steps=60, batch_size=20, eval_every=20)
    model_kw = dict(norm="noisy_bn", dropout=0.2)
    h1 = bn.train(net(**model_kw), blobs(), seed=1, **kw)
    h2 = bn.train(net(**model_kw), blobs(), seed=1, **kw)
    h3 = bn.train(net(**model_kw), blobs(), seed=2, **kw)
    np.testing.assert_array_equal(h1.train_loss, h2.train_loss)
    np.testing.assert_array_equal(h1.test_acc, h2.test_acc)
    assert not np.array_equal(h1.train_loss, h3.train_loss)
    assert h1.train_loss.shape == (60,) and not h1.diverged


def test_global_rng_untouched_and_model_trained_in_place():
    model = net()
    before = copy.deepcopy(model.state_dict())
    state = torch.get_rng_state()
    bn.train(model, blobs(), lr=0.1, steps=5, batch_size=20)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])
    assert model.training


def test_batches_are_slices_of_a_seeded_permutation():
    """Replay the loop by hand: one SGD step per batch of a torch.Generator(seed) permutation."""
    X, y, _, _ = blobs()
    model, manual = net("none"), net("none")
    h = bn.train(model, blobs()[:2], lr=0.05, steps=14, batch_size=40, seed=3, eval_every=None)
    gen = torch.Generator().manual_seed(3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    losses = []
    for s in range(14):
        if s % 6 == 0:  # 240 // 40 = 6 batches per epoch, a new permutation each epoch
            perm = torch.randperm(240, generator=gen)
        idx = perm[(s % 6) * 40:(s % 6 + 1) * 40]
        loss = nn.functional.cross_entropy(manual(Xt[idx]), yt[idx])
        manual.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in manual.parameters():
                p -= 0.05 * p.grad
        losses.append(loss.item())
    np.testing.assert_allclose(h.train_loss, losses, rtol=1e-6)
    for p, q in zip(model.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_evaluation_schedule_and_values():
    model = net()
    init = copy.deepcopy(model).eval()
    X, y, Xt, yt = (torch.as_tensor(a) for a in blobs())
    h = bn.train(model, blobs(), lr=0.1, epochs=3, batch_size=50, eval_every=5)
    assert h.steps_done == 3 * (240 // 50)  # incomplete last batches are dropped
    np.testing.assert_array_equal(h.step, [0, 5, 10, 12])
    with torch.no_grad():
        out = init(Xt)
        acc0 = float((out.argmax(1) == yt).double().mean())
        loss0 = float(nn.functional.cross_entropy(out, yt))
        train_acc0 = float((init(X).argmax(1) == y).double().mean())
    assert h.test_acc[0] == pytest.approx(acc0) and h.test_loss[0] == pytest.approx(loss0)
    assert h.train_acc[0] == pytest.approx(train_acc0)
    with torch.no_grad():
        model.eval()
        assert h.test_acc[-1] == pytest.approx(float((model(Xt).argmax(1) == yt).double().mean()))
    assert h.final() == h.test_acc[-1]


def test_divergence_stops_without_raising():
    # a linear regression with a step size far beyond 2 / (largest Hessian eigenvalue) blows up
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5)).astype(np.float32) * 10
    y = X.sum(1)
    model = bn.make_mlp(5, 1, 1, depth=0, seed=0)
    h = bn.train(model, (X, y, X, y), lr=10.0, steps=500, batch_size=20, loss="mse", eval_every=10)
    assert h.diverged and h.diverged_at is not None and h.diverged_at < 500
    assert h.steps_done == h.diverged_at + 1 == len(h.train_loss)
    assert not np.isfinite(h.train_loss[-1]) and np.all(np.isfinite(h.train_loss[:-1]))
    assert np.isnan(h.final("test_loss"))
    assert h.step[-1] <= h.diverged_at  # no evaluation after the divergence


def test_max_loss_counts_as_divergence():
    h = bn.train(net(), blobs(), lr=0.1, steps=20, batch_size=20, max_loss=0.1)
    assert h.diverged and h.diverged_at == 0 and len(h.train_loss) == 1


def test_lr_schedule_is_applied_each_step():
    model = net("none")
    before = copy.deepcopy(model.state_dict())
    h = bn.train(model, blobs(), lr=lambda s: 0.0, steps=5, batch_size=20)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert np.ptp(h.train_loss) > 0  # different batches, same parameters
    seen = []
    bn.train(net("none"), blobs(), lr=lambda s: seen.append(s) or 0.01, steps=4, batch_size=20)
    assert seen[-4:] == [0, 1, 2, 3]


def test_bce_and_mse_losses():
    X, y, Xt, yt = blobs()
    yb, ytb = (y == 0).astype(np.float32), (yt == 0).astype(np.float32)
    model = bn.make_mlp(6, 8, 1, 1, seed=0)
    h = bn.train(model, (X, yb, Xt, ytb), lr=0.5, steps=100, batch_size=40, loss="bce")
    model.eval()
    with torch.no_grad():
        acc = float(((model(torch.from_numpy(Xt))[:, 0] > 0) == torch.from_numpy(ytb).bool()).double().mean())
    assert h.test_acc[-1] == pytest.approx(acc) and acc > 0.9
    h = bn.train(bn.make_mlp(6, 8, 1, 1, seed=0), (X, yb, Xt, ytb), lr=0.1, steps=10, batch_size=40,
                 loss="mse")
    assert np.isnan(h.test_acc).all() and np.isfinite(h.test_loss).all()


def test_history_views():
    h = bn.train(net(), blobs(), lr=0.1, steps=20, batch_size=20, eval_every=10,
                 record=[bn.GradNorms(every=5)])
    df = h.evals()
    assert list(df.columns) == ["step", "test_acc", "test_loss", "train_acc", "train_eval_loss"]
    assert list(df.step) == [0, 10, 20]
    long = h.frame("grad_norms", "grad_norm")
    assert list(long.columns) == ["step", "layer", "value"] and len(long) == 4 * 3
    np.testing.assert_array_equal(long.value, h.records["grad_norms"]["grad_norm"].reshape(-1))
    d = h.as_dict()
    assert {"train_loss", "test_acc", "grad_norms.grad_norm", "grad_norms.step"} <= set(d)
    np.testing.assert_array_equal(d["grad_norms.step"], [0, 5, 10, 15])


def test_recorders_do_not_change_training():
    kw = dict(lr=0.1, steps=30, batch_size=20, eval_every=10, seed=4)
    model_kw = dict(norm="noisy_bn", dropout=0.3)
    plain = bn.train(net(**model_kw), blobs(), **kw)
    recs = [bn.GradNorms(every=3), bn.UpdateRatios(every=4), bn.ActivationStats(every=5, train_mode=True),
            bn.LandscapeProbe(every=7)]
    recorded = bn.train(net(**model_kw), blobs(), record=recs, **kw)
    np.testing.assert_array_equal(plain.train_loss, recorded.train_loss)
    np.testing.assert_array_equal(plain.test_acc, recorded.test_acc)
    assert list(recorded.records["landscape"]["step"]) == [0, 7, 14, 21, 28]
    assert list(recorded.records["activations"]["step"]) == [0, 5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(steps=5, epochs=1), ValueError, "exactly one of steps or epochs"),
    (dict(steps=5, batch_size=1000), ValueError, "larger than the training set"),
    (dict(steps=5, loss="hinge"), ValueError, "loss must be one of"),
    (dict(steps=5, optimizer="rmsprop"), ValueError, "optimizer must be one of"),
    (dict(steps=5, optimizer="adam", momentum=0.9), ValueError, "momentum applies"),
    (dict(steps=5, lr=float("nan")), ValueError, "lr must be"),
    (dict(steps=5, record=[bn.GradNorms(), bn.GradNorms()]), ValueError, "unique"),
])
def test_bad_arguments(kwargs, err, words):
    with pytest.raises(err, match=words):
        bn.train(net(), blobs(), **kwargs)


def test_bad_data():
    with pytest.raises(TypeError, match="data must be a tuple"):
        bn.train(net(), blobs()[0], steps=1)
    X, y, _, _ = blobs()
    with pytest.raises(ValueError, match="same number of examples"):
        bn.train(net(), (X, y[:-1]), steps=1)


def test_custom_optimizer_and_adam_train():
    h = bn.train(net(), blobs(), optimizer=lambda ps: SGD(ps, lr=0.1, momentum=0.9), steps=30, batch_size=20)
    assert h.config["optimizer"] == "custom" and h.final() > 0.5
    h = bn.train(net(), blobs(), optimizer="adam", lr=1e-2, steps=30, batch_size=20)
    assert h.final() > 0.5


@pytest.mark.parametrize("ours, theirs", [
    (lambda ps: SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)),
    (lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)),
    (lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=False)),
    (lambda ps: Adam(ps, lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False)),
    (lambda ps: Adam(ps, lr=1e-3, weight_decay=1e-2),
     lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-2, foreach=False)),
])
def test_optimizers_equal_torch_optim(ours, theirs):
    a, b = net(), net()
    opt_a, opt_b = ours(list(a.parameters())), theirs(list(b.parameters()))
    X, y = torch.as_tensor(blobs()[0][:40]), torch.as_tensor(blobs()[1][:40])
    for _ in range(6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
