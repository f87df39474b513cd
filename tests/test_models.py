"""Model builders: layer order per option, shapes, initialization statistics, seeding."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import bnutils as bn
from bnutils.models import Residual, init_weights

NORM_TYPES = {"bn": nn.BatchNorm1d, "noisy_bn": bn.NoisyBatchNorm1d, "ln": nn.LayerNorm,
              "gn": nn.GroupNorm, "rms": nn.RMSNorm}


def kinds(model):
    return [type(m) for m in model.children()]


@pytest.mark.parametrize("norm", ["none", *NORM_TYPES])
@pytest.mark.parametrize("position", ["before", "after"])
def test_mlp_layer_order(norm, position):
    m = bn.make_mlp(5, 7, 3, depth=2, activation="tanh", norm=norm, norm_position=position, seed=0)
    block = [nn.Linear]
    if norm == "none":
        block += [nn.Tanh]
    elif position == "before":
        block += [NORM_TYPES[norm], nn.Tanh]
    else:
        block += [nn.Tanh, NORM_TYPES[norm]]
    assert kinds(m) == block * 2 + [nn.Linear]
    assert [n for n, _ in m.named_children()][0] == "fc1" and list(dict(m.named_children()))[-1] == "out"
    assert len(m.activations) == 2 and all(isinstance(a, nn.Tanh) for a in m.activations)
    assert len(m.weight_layers) == 3 and m.weight_layers[-1] is m.out
    assert len(m.norms) == (0 if norm == "none" else 2)
    assert m(torch.randn(4, 5)).shape == (4, 3)


def test_mlp_widths_depth_dropout_and_bias():
    m = bn.make_mlp(10, [8, 6], 2, activation="relu", dropout=0.2, bias=False, seed=0)
    assert kinds(m) == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(lay.in_features, lay.out_features) for lay in m.weight_layers] == [(10, 8), (8, 6), (6, 2)]
    assert all(lay.bias is None for lay in m.weight_layers)
    assert kinds(bn.make_mlp(4, 9, 2, depth=0)) == [nn.Linear]
    assert all(isinstance(a, nn.Identity) for a in bn.make_mlp(4, 3, 2, 2, activation="linear").activations)


def test_gn_default_groups_divide_width():
    m = bn.make_mlp(4, 100, 2, 1, norm="gn")
    assert m.norms[0].num_groups == 25 and 100 % m.norms[0].num_groups == 0
    m = bn.make_mlp(4, 100, 2, 1, norm="gn", norm_kwargs={"num_groups": 4})
    assert m.norms[0].num_groups == 4


def test_residual_blocks_add_the_skip():
    m = bn.make_mlp(5, 6, 2, depth=3, activation="tanh", residual=True, seed=1)
    assert kinds(m) == [nn.Linear, nn.Tanh, Residual, Residual, nn.Linear]  # the first block changes width
    x = torch.randn(3, 5)
    h = torch.tanh(m.fc1(x))
    for res in (m.res2, m.res3):
        h = h + res.body(h)
    torch.testing.assert_close(m(x), m.out(h))
    assert len(m.activations) == 3 and len(m.weight_layers) == 4


def test_norm_factory_is_used():
    m = bn.make_mlp(4, 6, 2, 2, norm=lambda n: nn.BatchNorm1d(n, momentum=0.5))
    assert [type(x) for x in m.norms] == [nn.BatchNorm1d] * 2 and m.norms[0].momentum == 0.5
    layers = pytest.importorskip("bnutils.layers")
    m = bn.make_mlp(4, 6, 2, 2, norm=layers.BatchNorm1d)
    assert all(isinstance(x, layers.BatchNorm1d) for x in m.norms) and m.norm == "BatchNorm1d"


@pytest.mark.parametrize("norm, norm_type", [("bn", nn.BatchNorm2d), ("noisy_bn", bn.NoisyBatchNorm2d),
                                             ("gn", nn.GroupNorm), ("ln", nn.GroupNorm), ("in", nn.GroupNorm),
                                             ("none", None)])
def test_cnn_layer_order_and_shape(norm, norm_type):
    m = bn.make_cnn(1, 10, (4, 8), norm=norm, seed=0)
    block = [nn.Conv2d] + ([norm_type] if norm_type else []) + [nn.ReLU, nn.MaxPool2d]
    assert kinds(m) == block * 2 + [nn.Flatten, nn.Linear]
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert m.out.in_features == 8 * 2 * 2
    if norm in ("ln", "in"):
        assert m.norms[0].num_groups == (1 if norm == "ln" else 4)


def test_cnn_without_pooling_and_norm_after():
    m = bn.make_cnn(1, 10, (3,), pool=False, norm_position="after", dropout=0.5, activation="tanh")
    assert kinds(m) == [nn.Conv2d, nn.Tanh, nn.BatchNorm2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert m.out.in_features == 3 * 8 * 8


@pytest.mark.parametrize("init, expected_std", [
    ("he", math.sqrt(2 / 400)), ("xavier", math.sqrt(2 / (400 + 600))),
    ("he_uniform", math.sqrt(2 / 400)), ("xavier_uniform", math.sqrt(2 / (400 + 600))),
])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_init_std_matches_the_formula(init, expected_std, scale):
    layer = nn.Linear(400, 600)
    torch.manual_seed(0)
    init_weights([layer], init, scale, bias_init=0.25)
    w = layer.weight.detach().double()
    # 240 000 draws: the sample std is within ~0.2 % of the true one
    assert float(w.std()) == pytest.approx(scale * expected_std, rel=0.01)
    assert abs(float(w.mean())) < 0.01 * scale * expected_std
    assert torch.all(layer.bias == 0.25)
    if init.endswith("uniform"):
        bound = scale * expected_std * math.sqrt(3)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0])
def test_normal_init_is_the_cs231n_weight_scale(scale):
    m = bn.make_mlp(300, 300, 10, 2, init="normal", init_scale=scale, seed=0)
    for layer in m.weight_layers:
        assert float(layer.weight.detach().double().std()) == pytest.approx(scale, rel=0.02)
        assert torch.all(layer.bias == 0)
    default = bn.make_mlp(300, 300, 10, 1, init="normal", seed=0)
    assert float(default.fc1.weight.detach().std()) == pytest.approx(0.01, rel=0.02)


def test_conv_fans_count_the_receptive_field():
    m = bn.make_cnn(3, 10, (64,), init="he", seed=0)
    assert float(m.conv1.weight.detach().double().std()) == pytest.approx(math.sqrt(2 / (3 * 9)), rel=0.05)


def test_torch_init_keeps_defaults_times_scale():
    a = bn.make_mlp(50, 40, 3, 1, init="torch", seed=3)
    b = bn.make_mlp(50, 40, 3, 1, init="torch", init_scale=2.0, seed=3)
    torch.testing.assert_close(b.fc1.weight, 2 * a.fc1.weight)
    torch.testing.assert_close(b.fc1.bias, a.fc1.bias)
    assert float(a.fc1.weight.detach().abs().max()) <= 1 / math.sqrt(50)


def test_seed_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = bn.make_mlp(8, 16, 4, 2, norm="noisy_bn", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = bn.make_mlp(8, 16, 4, 2, norm="noisy_bn", seed=7)
    c = bn.make_mlp(8, 16, 4, 2, norm="noisy_bn", seed=8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    assert [n.seed for n in a.norms] == [n.seed for n in b.norms]
    assert len({n.seed for n in a.norms}) == 2  # each noisy layer has its own stream
    # without a seed, the (seeded) global RNG decides
    torch.manual_seed(1)
    d = bn.make_mlp(8, 16, 4, 2)
    torch.manual_seed(1)
    e = bn.make_mlp(8, 16, 4, 2)
    assert torch.equal(d.fc1.weight, e.fc1.weight)


@pytest.mark.parametrize("kwargs, words", [
    (dict(activation="swish"), "activation must be one of"),
    (dict(norm="batch"), "norm must be one of"),
    (dict(norm="in"), "norm must be one of"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(init="kaiming"), "init must be one of"),
    (dict(init_scale=-1.0), "init_scale"),
    (dict(dropout=1.0), "dropout"),
])
def test_mlp_bad_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        bn.make_mlp(4, 5, 2, 1, **kwargs)


def test_mlp_bad_shapes():
    with pytest.raises(ValueError, match="depth must be"):
        bn.make_mlp(4, 5, 2)
    with pytest.raises(ValueError, match="disagrees"):
        bn.make_mlp(4, [5, 5], 2, depth=3)
    with pytest.raises(ValueError, match="in_features"):
        bn.make_mlp(0, 5, 2, 1)
    with pytest.raises(ValueError, match="norm must be one of"):
        bn.make_cnn(norm="rms")
    with pytest.raises(ValueError, match="kernel_size"):
        bn.make_cnn(kernel_size=2)


def test_net_is_a_sequential_with_a_state_dict():
    m = bn.make_mlp(4, 5, 2, 1, norm="bn")
    assert isinstance(m, nn.Sequential)
    assert set(m.state_dict()) >= {"fc1.weight", "norm1.running_mean", "out.bias"}
    np.testing.assert_equal(len(list(m.parameters())), 6)
