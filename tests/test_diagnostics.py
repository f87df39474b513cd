"""Diagnostics against hand computations: pre-activations and percentiles, saturation, dead units,
gradient norms, update:data ratios, and the recorders that log them during training."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from strategies import bn_shapes
from torch import nn

import bnutils as bn

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1


def trained_bn_net():
    m = bn.make_mlp(5, 7, 3, 2, activation="sigmoid", norm="bn", seed=0)
    with torch.no_grad():  # move the running statistics and affine parameters away from their defaults
        for _ in range(3):
            m(X)
        for norm in m.norms:
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    return m


@pytest.mark.parametrize("train_mode", [False, True])
def test_captured_pre_activations_equal_a_manual_forward(train_mode):
    m = trained_bn_net()
    state = copy.deepcopy(m.state_dict())
    captured = bn.capture_activations(m, X, train_mode=train_mode)
    h = X
    for i, (pre, post) in enumerate(captured, start=1):
        z = getattr(m, f"fc{i}")(h).detach()
        norm = getattr(m, f"norm{i}")
        if train_mode:
            mean, var = z.mean(0), z.var(0, unbiased=False)
        else:
            mean, var = norm.running_mean, norm.running_var
        expected = (z - mean) / torch.sqrt(var + norm.eps) * norm.weight.detach() + norm.bias.detach()
        torch.testing.assert_close(pre, expected)
        torch.testing.assert_close(post, torch.sigmoid(expected))
        h = post
    for k, v in m.state_dict().items():  # running statistics untouched, even in training mode
        assert torch.equal(v, state[k])
    assert m.training


def test_unit_percentiles_are_numpy_percentiles():
    m = trained_bn_net()
    stats = bn.activation_stats(m, X, percentiles=(15, 50, 85), unit=2)
    pres = [pre for pre, _ in bn.capture_activations(m, X)]
    for layer, pre in enumerate(pres):
        expected = np.percentile(pre[:, 2].double().numpy(), [15, 50, 85])  # bnutils works in float64
        np.testing.assert_allclose(stats["pre_pct"][layer], expected)
        assert stats["pre_mean"][layer] == pytest.approx(float(pre.double().mean()))
    pooled = bn.activation_stats(m, X, percentiles=(10, 90), unit=None)["pre_pct"]
    np.testing.assert_allclose(pooled[0], np.percentile(pres[0].double().numpy().ravel(), [10, 90]))


def test_conv_percentiles_pool_one_channel_over_batch_and_positions():
    pre = torch.randn(4, 3, 5, 5)
    np.testing.assert_allclose(bn.unit_percentiles(pre, unit=1, q=(25, 75)),
                               np.percentile(pre[:, 1].double().numpy().ravel(), [25, 75]))


def test_saturation_on_known_values():
    tanh_out = torch.tensor([[0.98, -0.99], [0.5, 0.97]])
    assert bn.saturation_fraction(tanh_out, "tanh") == 0.5  # 0.97 itself is not saturated
    sig_out = torch.tensor([[0.01, 0.5], [0.98, 0.03]])
    assert bn.saturation_fraction(sig_out, "sigmoid") == 0.5
    assert np.isnan(bn.saturation_fraction(sig_out, "relu"))


def test_saturation_of_a_badly_scaled_tanh_net():
    big = bn.make_mlp(5, 50, 2, 2, activation="tanh", init="normal", init_scale=5.0, seed=0)
    small = bn.make_mlp(5, 50, 2, 2, activation="tanh", init="normal", init_scale=0.01, seed=0)
    assert bn.activation_stats(big, X)["saturation"].min() > 0.9
    assert bn.activation_stats(small, X)["saturation"].max() == 0.0


def test_dead_unit_fraction_on_a_constructed_net():
    m = bn.make_mlp(2, 4, 1, 1, activation="relu", seed=0)
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
        m.fc1.bias.copy_(torch.tensor([-1.0, -100.0, 0.0, 0.0]))
    x = torch.tensor([[1.0, -1.0], [2.0, -3.0], [0.5, -0.1]])  # first input always > 0, second < 0
    # unit 0: bias -1 -> dead; unit 1: x0 + x1 - 100 < 0 -> dead; unit 2: x0 > 0 -> alive;
    # unit 3: x1 < 0 on every example -> dead on this batch
    stats = bn.activation_stats(m, x)
    assert stats["dead_fraction"][0] == 0.75
    assert stats["zero_fraction"][0] == 0.75
    _, post = bn.capture_activations(m, x)[0]
    assert bn.dead_unit_fraction(post) == 0.75
    assert np.isnan(bn.activation_stats(bn.make_mlp(2, 4, 1, 1, activation="tanh"), x)["dead_fraction"][0])


@given(st.data())
def test_saturation_dead_units_and_percentiles_match_numpy(data):
    shape = data.draw(bn_shapes(min_values=1))
    values = st.sampled_from([0.0, 0.01, 0.5, -0.5, 0.98, -0.99, 1.0])
    a = data.draw(arrays(np.float32, shape, elements=values))
    t = torch.from_numpy(a)
    per_unit = np.moveaxis(a, 1, 0).reshape(shape[1], -1)  # (C, N * spatial)
    assert bn.dead_unit_fraction(t) == pytest.approx(np.mean(np.all(per_unit == 0, axis=1)))
    assert bn.saturation_fraction(t, "tanh") == pytest.approx(np.mean(np.abs(a) > 0.97))
    assert bn.saturation_fraction(t, "sigmoid") == pytest.approx(np.mean((a < 0.03) | (a > 0.97)))
    unit = data.draw(st.integers(0, shape[1] - 1))
    np.testing.assert_allclose(bn.unit_percentiles(t, unit, (0, 15, 50, 85, 100)),
                               np.percentile(per_unit[unit].astype(np.float64), [0, 15, 50, 85, 100]))


def test_dead_channels_in_a_cnn():
    post = torch.relu(torch.randn(6, 4, 3, 3))
    post[:, 1] = 0
    assert bn.dead_unit_fraction(post) == 0.25


def test_layer_grad_norms_equal_manual():
    m = trained_bn_net()
    y = torch.arange(64) % 3
    nn.functional.cross_entropy(m(X), y).backward()
    manual = [float(torch.linalg.norm(lay.weight.grad)) for lay in m.weight_layers]
    np.testing.assert_allclose(bn.layer_grad_norms(m), manual, rtol=1e-6)
    np.testing.assert_allclose(bn.layer_grad_norms(m, attr="bias"),
                               [float(torch.linalg.norm(lay.bias.grad)) for lay in m.weight_layers],
                               rtol=1e-6)


def test_gradient_norms_restore_state_and_grads():
    m = trained_bn_net()
    y = torch.arange(64) % 3
    state = copy.deepcopy(m.state_dict())
    norms = bn.gradient_norms(m, nn.functional.cross_entropy, X, y)
    assert all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k])
    ref = copy.deepcopy(m)
    nn.functional.cross_entropy(ref(X), y).backward()
    manual = [float(torch.linalg.norm(lay.weight.grad)) for lay in ref.weight_layers]
    np.testing.assert_allclose(norms, manual, rtol=1e-6)
    np.testing.assert_array_equal(bn.gradient_norms(m, "cross_entropy", X, y), norms)


def first_batch(data, batch_size, seed):
    X, y = (torch.as_tensor(a) for a in data[:2])
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return X[idx], y[idx]


def data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    return X[:150], y[:150], X[150:], y[150:]


def test_recorded_grad_norms_and_update_ratios_at_step_zero():
    lr = 0.3
    model = bn.make_mlp(5, 8, 3, 2, norm="bn", seed=0)
    ref = copy.deepcopy(model)
    h = bn.train(model, data(), lr=lr, steps=3, batch_size=30, seed=5, eval_every=1,
                 record=[bn.GradNorms(), bn.UpdateRatios()])
    xb, yb = first_batch(data(), 30, 5)
    nn.functional.cross_entropy(ref(xb), yb).backward()
    grads = [float(torch.linalg.norm(lay.weight.grad)) for lay in ref.weight_layers]
    weights = [float(torch.linalg.norm(lay.weight.detach())) for lay in ref.weight_layers]
    np.testing.assert_allclose(h.records["grad_norms"]["grad_norm"][0], grads, rtol=1e-6)
    # plain SGD: ||W_after - W_before|| / ||W_before|| = lr ||grad|| / ||W||
    np.testing.assert_allclose(h.records["update_ratios"]["update_ratio"][0],
                               lr * np.array(grads) / np.array(weights), rtol=1e-4)
    assert h.records["update_ratios"]["update_ratio"].shape == (3, 3)


def test_update_ratios_direct():
    m = bn.make_mlp(3, 4, 2, 1, seed=0)
    before = bn.weight_snapshot(m)
    with torch.no_grad():
        m.fc1.weight.mul_(1.1)
    np.testing.assert_allclose(bn.update_ratios(m, before), [0.1, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="one per weight layer"):
        bn.update_ratios(m, before[:1])


def test_activation_recorder_at_checkpoint_zero_is_the_initial_model():
    model = bn.make_mlp(5, 8, 3, 2, activation="tanh", norm="bn", seed=0)
    expected = bn.activation_stats(model, torch.as_tensor(data()[2]))
    h = bn.train(model, data(), lr=0.1, steps=10, batch_size=30, eval_every=5, record=[bn.ActivationStats()])
    rec = h.records["activations"]
    assert list(rec["step"]) == [0, 5, 10]
    assert rec["pre_pct"].shape == (3, 2, 3) and rec["saturation"].shape == (3, 2)
    for key, value in expected.items():
        np.testing.assert_array_equal(rec[key][0], value)
    long = h.frame("activations", "pre_pct", axes=("layer", "percentile"))
    assert list(long.columns) == ["step", "layer", "percentile", "value"] and len(long) == 3 * 2 * 3


def test_activation_recorder_uses_the_given_batch():
    model = bn.make_mlp(5, 8, 3, 1, seed=0)
    x = data()[0][:17]
    h = bn.train(model, data(), lr=0.0, steps=1, batch_size=30, record=[bn.ActivationStats(x=x, unit=None)])
    expected = bn.activation_stats(model, torch.as_tensor(x), unit=None)
    np.testing.assert_array_equal(h.records["activations"]["pre_pct"][0], expected["pre_pct"])
