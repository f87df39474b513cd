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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import bnutils
from bnutils import GhostBatchNorm, StackedMLP, accuracy, recalibrate, train_stacked
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


def test_a_mixed_stack_trains_each_member_like_its_single_network():
    data = toy_data()
    kinds = ["bn", "brn", "ln", "gbn", "bn", "none", "gn"]  # any order, norms with running statistics mixed
    nets = [bnutils.make_mlp(6, 8, 3, 2, norm=NORMS[k], seed=i,
                             norm_kwargs={"num_groups": 2} if k == "gn" else None).double()
            for i, k in enumerate(kinds)]
    model = StackedMLP.from_nets(copy.deepcopy(nets))
    history = train_stacked(model, data, lr=0.1, steps=8, batch_size=10, shuffle=list(range(7)), momentum=0.5,
                            eval_every=4)
    for k, net in enumerate(nets):
        losses = reference_train(net, data, lr=0.1, steps=8, batch_size=10, seed=k, momentum=0.5)
        np.testing.assert_allclose(history.train_loss[:, k], losses, **TIGHT)
        assert_member_equals(model, k, net)


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


MIXED = ["bn", "bn", "gbn", "brn", "ln", "gn", "none"]


@settings(max_examples=25)  # about 0.1 s each; the fixed cases above cover each norm already
@given(kinds=st.lists(st.sampled_from(MIXED), min_size=1, max_size=5),
       position=st.sampled_from(["before", "after"]),
       modes=st.lists(st.sampled_from(["train", "batch", "eval"]), min_size=1, max_size=4),
       n=st.sampled_from([2, 3, 4, 6, 7, 8, 10]), seed=st.integers(0, 2**16))  # no ghost batch of 1
def test_mixed_norms_and_modes_member_by_member(kinds, position, modes, n, seed):
    """Any mix of norms in one stack, any order (equal kinds need not be adjacent), any sequence of modes."""
    nets = [bnutils.make_mlp(5, 4, 3, 2, norm=NORMS[k], seed=seed + i, norm_position=position,
                             activation=["relu", "tanh"][i % 2],
                             norm_kwargs={"num_groups": 2} if k == "gn" else None).double()
            for i, k in enumerate(kinds)]
    model = StackedMLP.from_nets(nets)
    assert model.norms == kinds
    x = torch.randn(len(kinds), n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for mode in modes:
        out = model(x, mode=mode)
        for k, net in enumerate(nets):
            snapshot = copy.deepcopy(net.state_dict())
            net.train(mode != "eval")
            torch.testing.assert_close(out[k], net(x[k]), **TIGHT)
            if mode == "batch":
                net.load_state_dict(snapshot)
            assert_member_equals(model, k, net)


def test_a_diverging_member_stops_like_bnutils_train_and_the_others_go_on():
    data = toy_data()
    nets = nets_for("bn", [0, 1, 2])
    model = StackedMLP.from_nets(copy.deepcopy(nets))
    lrs = [0.1, 300.0, 0.2]  # member 1's loss exceeds max_loss within a few steps
    history = train_stacked(model, data, lr=lrs, steps=20, batch_size=10, shuffle=[0, 1, 2], eval_every=5,
                            max_loss=8.0)
    assert history.diverged.tolist() == [False, True, False]
    for k, net in enumerate(nets):
        ref = bnutils.train(copy.deepcopy(net).float(), data, lr=lrs[k], steps=20, batch_size=10, seed=k,
                            eval_every=5, max_loss=8.0)
        member = history.member(k)
        assert (member.diverged, member.diverged_at, member.steps_done) == (ref.diverged, ref.diverged_at,
                                                                              ref.steps_done)
        np.testing.assert_array_equal(member.step, ref.step)
        losses = reference_train(net, data, lr=lrs[k], steps=member.steps_done, batch_size=10, seed=k)
        np.testing.assert_allclose(member.train_loss, losses, **TIGHT)
        if member.diverged:  # stopped before the update at the bad loss: its parameters are those before it
            assert member.train_loss[-1] > 8.0 and np.isnan(history.train_loss[member.steps_done:, k]).all()
            assert np.isnan(history.test_acc[history.step > member.diverged_at, k]).all()
            continue
        assert_member_equals(model, k, net)


def test_learning_rate_schedules_and_per_layer_rates():
    data = toy_data()
    net = nets_for("bn", [0])[0]
    model = StackedMLP.from_nets([copy.deepcopy(net)] * 2)
    frozen_out = model.out.weight.detach().clone()

    def rate(step, name):  # member 0: a growing rate everywhere; member 1: the output layer frozen
        grow = 0.05 * 1.1 ** step
        return torch.tensor([grow, 0.0 if name.startswith("out") else grow], dtype=torch.float64)

    train_stacked(model, data, lr=rate, steps=12, batch_size=10, shuffle=3, eval_every=None)
    ref = copy.deepcopy(net)
    opt = SGD(ref.parameters(), lr=0.05)
    X, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    gen = torch.Generator().manual_seed(3)
    for s in range(12):
        if s % 4 == 0:
            perm = torch.randperm(len(X), generator=gen)
        idx = perm[(s % 4) * 10:(s % 4 + 1) * 10]
        opt.param_groups[0]["lr"] = 0.05 * 1.1 ** s
        opt.zero_grad()
        F.cross_entropy(ref(X[idx]), y[idx]).backward()
        opt.step()
    assert_member_equals(model, 0, ref)
    torch.testing.assert_close(model.out.weight[1], frozen_out[1], rtol=0, atol=0)
    assert not torch.equal(model.fc1.weight[1], model.fc1.weight[0] * 0 + net.fc1.weight)


def test_shuffle_none_and_callable_orders():
    data = toy_data(n=20)
    nets = nets_for("ln", [0, 1])
    orders = [torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(10 * e + k))
                           for k in (0, 1)]) for e in range(3)]
    cases = ((None, lambda e, k: torch.arange(20)), (lambda e: orders[e], lambda e, k: orders[e][k]))
    for shuffle, order_of in cases:
        model = StackedMLP.from_nets(copy.deepcopy(nets))
        history = train_stacked(model, data, lr=0.1, epochs=3, batch_size=20 if shuffle is None else 5,
                                shuffle=shuffle, eval_every=None)
        batch = 20 if shuffle is None else 5
        for k, net in enumerate(copy.deepcopy(nets)):
            opt, losses = SGD(net.parameters(), lr=0.1), []
            X, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
            for e in range(3):
                for j in range(20 // batch):
                    idx = order_of(e, k)[j * batch:(j + 1) * batch]
                    loss = F.cross_entropy(net(X[idx]), y[idx])
                    losses.append(loss.item())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            np.testing.assert_allclose(history.train_loss[:, k], losses, **TIGHT)
            assert_member_equals(model, k, net)


def test_mse_loss_full_batch_and_callbacks():
    x = torch.linspace(-1, 1, 16, dtype=torch.float64)[:, None]
    target = x[:, 0].abs()
    model = StackedMLP(3, 1, 4, 1, 2, norm="bn", seed=0).double()
    nets = [bnutils.make_mlp(1, 4, 1, 2, norm="bn").double() for _ in range(3)]
    for k, net in enumerate(nets):
        net.load_state_dict(model.member_state(k))
    seen = []
    train_stacked(model, (x, target), lr=0.01, steps=6, batch_size=16, optimizer="adam", loss="mse",
                  shuffle=None, eval_every=None, callback_every=2,
                  callback=lambda step, m, members: seen.append((step, members.tolist())))
    assert seen == [(0, [0, 1, 2]), (2, [0, 1, 2]), (4, [0, 1, 2]), (6, [0, 1, 2])]
    for k, net in enumerate(nets):
        opt = Adam(net.parameters(), lr=0.01)
        for _ in range(6):
            opt.zero_grad()
            F.mse_loss(net(x)[:, 0], target).backward()
            opt.step()
        noise = {"fc1.bias", "fc2.bias", "norm1.running_mean", "norm2.running_mean"}  # Adam before BN
        assert_member_equals(model, k, net, skip=noise)


@pytest.mark.parametrize("eps", [1e-20, 1e-3])
def test_adam_eps_is_adams_epsilon(eps):
    data = toy_data()
    X, y = (torch.as_tensor(a) for a in data[:2])
    nets = nets_for("bn", [0, 1])
    model = StackedMLP.from_nets(copy.deepcopy(nets))
    history = train_stacked(model, data, lr=0.01, steps=5, batch_size=16, optimizer="adam",
                            adam_eps=eps, shuffle=None, eval_every=None)
    for k, net in enumerate(nets):
        opt = Adam(net.parameters(), lr=0.01, eps=eps)
        for s in range(5):
            xb, yb = X[s * 16 % 48:][:16].to(torch.float64), y[s * 16 % 48:][:16]
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            assert abs(loss.item() - history.train_loss[s, k]) < 1e-9
            loss.backward()
            opt.step()
        noise = {"fc1.bias", "fc2.bias", "norm1.running_mean", "norm2.running_mean"}  # Adam before BN
        assert_member_equals(model, k, net, skip=noise)


def test_adam_eps_is_checked():
    model = StackedMLP(2, 6, 4, 3, 1, seed=0)
    with pytest.raises(ValueError, match="adam_eps"):
        train_stacked(model, toy_data(), steps=1, optimizer="adam", adam_eps=-1.0)


def test_capture_gives_each_activations_input_and_output():
    nets = nets_for("bn", [0, 1], norm_position="after")
    model = StackedMLP.from_nets(nets)
    x = torch.randn(7, 6, dtype=torch.float64)
    captured = []
    model(x, mode="batch", capture=captured)
    for k, net in enumerate(nets):
        expected = bnutils.capture_activations(net, x, train_mode=True)
        for (pre, post), (pre_k, post_k) in zip(captured, expected, strict=True):
            torch.testing.assert_close(pre[k], pre_k, **TIGHT)
            torch.testing.assert_close(post[k], post_k, **TIGHT)


def test_the_default_initialization_is_he_normal_from_the_seed():
    model = StackedMLP(4, 6, [5, 7], 3, seed=11)
    g = torch.Generator().manual_seed(11)
    for layer, (d_in, d_out) in zip(model.layers, [(6, 5), (5, 7), (7, 3)], strict=True):
        expected = torch.randn(4, d_in, d_out, generator=g) * np.sqrt(2 / d_in)
        torch.testing.assert_close(layer.weight.detach(), expected.transpose(1, 2), rtol=0, atol=0)
        assert not layer.bias.detach().any()


# ----- accuracy and recalibrate -----


def test_accuracy_modes_batches_and_non_finite_logits():
    X, y, X_te, y_te = toy_data(n=30)
    net = nets_for("bn", [0])[0]
    X_t = torch.as_tensor(X)
    net.train()
    expected_train = (net(X_t[:8]).argmax(1) == torch.as_tensor(y[:8])).double().mean().item()
    net.load_state_dict(nets_for("bn", [0])[0].state_dict())
    before = copy.deepcopy(net.state_dict())
    assert accuracy(net, X[:8], y[:8], mode="batch") == expected_train
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # "batch": buffers untouched
    net.eval()
    full = accuracy(net, X, y)
    assert full == (net(X_t).argmax(1) == torch.as_tensor(y)).double().mean().item() and not net.training
    assert accuracy(net, X, y, batch_size=7) == full  # eval mode: batches do not matter
    per_batch = [accuracy(net, X[i:i + 8], y[i:i + 8], mode="batch") for i in (0, 8, 16)]
    assert accuracy(net, X, y, mode="batch", batch_size=8, drop_last=True) == pytest.approx(
        np.mean(per_batch))
    accuracy(net, X, y, mode="train", batch_size=8)
    assert not torch.equal(before["norm1.running_mean"], net.norm1.running_mean)  # "train" updates them
    with torch.no_grad():
        net.out.bias[0] = float("nan")
    assert np.isnan(accuracy(net, X, y))


def test_accuracy_of_a_stack_is_each_members():
    X, y, _, _ = toy_data(n=30)
    nets = nets_for("gbn", [0, 1, 2])
    model = StackedMLP.from_nets(nets)
    for mode in ("eval", "batch"):
        acc = accuracy(model, X, y, mode=mode, batch_size=10)
        assert acc.shape == (3,)
        assert acc.tolist() == [accuracy(net, X, y, mode=mode, batch_size=10) for net in nets]


@pytest.mark.parametrize("batch_size", [None, 8])
def test_recalibrate_averages_batch_statistics_and_copies(batch_size):
    X = torch.as_tensor(toy_data(n=24)[0])
    nets = nets_for("bn", [0, 1])
    for net in nets:  # running statistics far from the data's
        net.norm1.running_mean.fill_(5.0)
    model = StackedMLP.from_nets(nets)
    fixed = recalibrate(nets[0], X, batch_size=batch_size)
    assert nets[0].norm1.running_mean[0] == 5.0 and not fixed.training  # the original is untouched
    batches = [X] if batch_size is None else list(X.split(batch_size))
    h = [nets[0].fc1(xb) for xb in batches]
    torch.testing.assert_close(fixed.norm1.running_mean, torch.stack([b.mean(0) for b in h]).mean(0), **TIGHT)
    torch.testing.assert_close(fixed.norm1.running_var, torch.stack([b.var(0) for b in h]).mean(0), **TIGHT)
    assert fixed.norm1.momentum == nets[0].norm1.momentum
    stacked = recalibrate(model, X, batch_size=batch_size)
    for k, net in enumerate(nets):
        assert_member_equals(stacked, k, recalibrate(net, X, batch_size=batch_size))


# ----- bad input -----


def test_bad_input_raises_clear_errors():
    data = toy_data()
    model = StackedMLP(2, 6, 8, 3, 1, norm="bn", seed=0)
    fit = functools.partial(train_stacked, model, data, steps=1, batch_size=10)
    cases = [
        (lambda: StackedMLP(0, 6, 8, 3, 1), ValueError, "num_members must be a positive int"),
        (lambda: StackedMLP(2, 6, 8, 3, 1, norm="batchnorm"), ValueError, "norm must be one of"),
        (lambda: StackedMLP(2, 6, 8, 3, 1, norm=["bn"]), ValueError, "sequence of 2"),
        (lambda: StackedMLP(2, 6, 8, 3, 1, activation="swish"), ValueError, "activation must be one of"),
        (lambda: StackedMLP(2, 6, 8, 3, 1, norm="gn", num_groups=3), ValueError, "does not divide"),
        (lambda: StackedMLP(2, 6, 8, 3, 1, norm_position="middle"), ValueError, "'before' or 'after'"),
        (lambda: model(np.zeros((4, 6))), TypeError, "must be a torch.Tensor"),
        (lambda: model(torch.zeros(4, 5)), ValueError, r"shape \(N, 6\) or \(2, N, 6\)"),
        (lambda: model(torch.zeros(4, 6), mode="test"), ValueError, "mode must be one of"),
        (lambda: model(torch.zeros(1, 6), mode="train"), ValueError, "more than 1 value per channel"),
        (lambda: StackedMLP.from_nets([]), ValueError, "at least one network"),
        (lambda: StackedMLP.from_nets([bnutils.make_mlp(6, 8, 3, 1), bnutils.make_mlp(6, 9, 3, 1)]),
         ValueError, "one shape"),
        (lambda: StackedMLP.from_nets([bnutils.make_mlp(6, 8, 3, 1, norm="noisy_bn")]), TypeError, "Noisy"),
        (lambda: StackedMLP.from_nets([bnutils.make_cnn()]), TypeError, "expected a make_mlp network"),
        (lambda: train_stacked(nets_for("bn", [0])[0], data, steps=1), TypeError, "must be a StackedMLP"),
        (lambda: train_stacked(model, data, steps=1, epochs=1), ValueError, "exactly one of steps or epochs"),
        (lambda: fit(lr=[0.1]), ValueError, "one per member"),
        (lambda: fit(lr=-1.0), ValueError, "finite numbers >= 0"),
        (lambda: fit(lr=lambda s, name: float("nan")), ValueError, "finite"),
        (lambda: fit(shuffle=[0]), ValueError, "2 int seeds"),
        (lambda: fit(shuffle=lambda e: torch.zeros(2, 3)), ValueError,
         r"int64 tensor of shape \(2, 48\)"),
        (lambda: fit(optimizer="rmsprop"), ValueError, "'sgd' or 'adam'"),
        (lambda: fit(optimizer="adam", momentum=0.9), ValueError, "momentum"),
        (lambda: fit(batch_size=100), ValueError, "larger than the training set"),
        (lambda: fit(loss="hinge"), ValueError, "loss must be"),
        (lambda: train_stacked(model, data[:1], steps=1), TypeError, "data must be a tuple"),
        (lambda: accuracy(model, data[0], data[1], mode="test"), ValueError, "mode must be"),
        (lambda: accuracy(model, data[0], data[1][:5]), ValueError, "one integer label per example"),
        (lambda: accuracy(model, data[0], data[1], batch_size=0), ValueError, "batch_size must be"),
        (lambda: accuracy("net", data[0], data[1]), TypeError, "torch.nn.Module"),
        (lambda: recalibrate(model, data[1]), TypeError, "floating"),
        (lambda: model.load_member(0, {"fc9.weight": torch.zeros(1)}), ValueError, "unknown state key"),
        (lambda: model.load_member(0, {"fc1.weight": torch.zeros(1)}), ValueError,
         r"expected shape \(8, 6\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["none", "bn", "gn"]), min_size=1, max_size=12))
def test_runs_are_the_consecutive_groups_of_equal_values(values):
    import itertools

    from bnutils.stacked import _runs

    expected, start = [], 0
    for value, group in itertools.groupby(values):
        n = len(list(group))
        expected.append((value, slice(start, start + n)))
        start += n
    assert _runs(values) == expected


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("norm", ["none", "bn"])
def test_deep_narrow_nets_with_a_rate_each_train_like_single_networks(norm, position):
    """Chapter 10's setting: 1 -> 6 x 2 -> 1, full-batch Adam on MSE, one rate per network,
    leaky ReLU; each member against its make_mlp network trained alone (torch BatchNorm1d)."""
    x = torch.linspace(-1, 1, 16, dtype=torch.float64)[:, None]
    target = x[:, 0].abs()
    lrs = [1e-3, 1e-2, 1e-1]
    model = StackedMLP(3, 1, 2, 1, 6, norm=norm, norm_position=position,
                       activation="leaky_relu", seed=7).double()
    nets = [bnutils.make_mlp(1, 2, 1, 6, norm=norm, norm_position=position,
                             activation="leaky_relu").double() for _ in lrs]
    for k, net in enumerate(nets):
        net.load_state_dict(model.member_state(k))
    history = train_stacked(model, (x, target), lr=np.array(lrs), steps=8, batch_size=16,
                            optimizer="adam", loss="mse", shuffle=None, eval_every=None,
                            eval_train=False)
    for k, (net, lr) in enumerate(zip(nets, lrs, strict=True)):
        opt = Adam(net.parameters(), lr=lr)
        for s in range(8):
            opt.zero_grad()
            loss = F.mse_loss(net(x)[:, 0], target)
            assert abs(loss.item() - history.train_loss[s, k]) < 1e-9
            loss.backward()
            opt.step()
        # biases in front of BN get round-off gradients only; Adam turns them into steps
        noise = ({f"fc{i}.bias" for i in range(1, 7)} | {f"norm{i}.running_mean" for i in range(1, 7)}
                 if norm == "bn" and position == "before" else set())
        assert_member_equals(model, k, net, skip=noise)
        captured = []
        model.members([k])(x, mode="batch", capture=captured)
        for (pre, post), (pre_k, post_k) in zip(
                captured, bnutils.capture_activations(net, x, train_mode=True), strict=True):
            torch.testing.assert_close(pre[0], pre_k, **TIGHT)
            torch.testing.assert_close(post[0], post_k, **TIGHT)
