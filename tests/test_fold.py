"""fold_batchnorm: the folded layer equals bn(layer(x)) in eval mode, for torch's and bnutils' BN."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnutils as bn

BN = {("torch", 1): nn.BatchNorm1d, ("torch", 2): nn.BatchNorm2d,
      ("bnutils", 1): bn.BatchNorm1d, ("bnutils", 2): bn.BatchNorm2d}



def trained_bn(impl, dim, c, affine, momentum, input_shape, seed, dtype):
    """A BN with nontrivial running statistics and affine parameters, then switched to eval."""
    gen = torch.Generator().manual_seed(seed)
    norm = BN[impl, dim](c, affine=affine, momentum=momentum, dtype=dtype)
    for _ in range(3):
        norm(3 * torch.randn(input_shape, generator=gen, dtype=dtype) - 1)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(c, generator=gen, dtype=dtype))
            norm.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
    return norm.eval()


def assert_folded_equal(layer, norm, x, tol):
    weight_before = layer.weight.detach().clone()
    folded = fold_and_check_type(layer, norm)
    with torch.no_grad():
        expected = norm(layer(x))
        actual = folded(x)
    err = (actual - expected).abs().max().item()
    assert err <= tol * (1 + expected.abs().max().item()), f"max abs error {err:.3g}"
    assert torch.equal(layer.weight, weight_before)  # the original layer is left alone


def fold_and_check_type(layer, norm):
    folded = bn.fold_batchnorm(layer, norm)
    assert type(folded) is type(layer) and folded is not layer
    assert folded.bias is not None and folded.weight.dtype == layer.weight.dtype
    return folded


@st.composite
def linear_cases(draw):
    return {"impl": draw(st.sampled_from(["torch", "bnutils"])), "fan_in": draw(st.integers(1, 12)),
            "fan_out": draw(st.integers(1, 12)), "bias": draw(st.booleans()), "affine": draw(st.booleans()),
            "momentum": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
            "seed": draw(st.integers(0, 2**31 - 1))}


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    return {"impl": draw(st.sampled_from(["torch", "bnutils"])), "groups": groups,
            "c_in": groups * draw(st.integers(1, 3)), "c_out": groups * draw(st.integers(1, 3)),
            "kernel": draw(st.integers(1, 3)), "stride": draw(st.integers(1, 2)),
            "padding": draw(st.integers(0, 2)), "dilation": draw(st.integers(1, 2)),
            "padding_mode": draw(st.sampled_from(["zeros", "reflect", "circular"])),
            "bias": draw(st.booleans()), "affine": draw(st.booleans()),
            "momentum": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
            "seed": draw(st.integers(0, 2**31 - 1))}


def linear_setup(case, dtype):
    torch.default_generator.manual_seed(case["seed"])  # (torch.manual_seed is slow: CUDA lazy init)
    layer = nn.Linear(case["fan_in"], case["fan_out"], bias=case["bias"], dtype=dtype)
    norm = trained_bn(case["impl"], 1, case["fan_out"], case["affine"], case["momentum"],
                      (8, case["fan_out"]), case["seed"], dtype)
    return layer, norm, torch.randn(5, case["fan_in"], dtype=dtype)


def conv_setup(case, dtype):
    torch.default_generator.manual_seed(case["seed"])  # (torch.manual_seed is slow: CUDA lazy init)
    layer = nn.Conv2d(case["c_in"], case["c_out"], case["kernel"], stride=case["stride"],
                      padding=case["padding"], dilation=case["dilation"], groups=case["groups"],
                      bias=case["bias"], padding_mode=case["padding_mode"], dtype=dtype)
    norm = trained_bn(case["impl"], 2, case["c_out"], case["affine"], case["momentum"],
                      (4, case["c_out"], 3, 3), case["seed"], dtype)
    return layer, norm, torch.randn(3, case["c_in"], 7, 6, dtype=dtype)


@given(linear_cases())
def test_fold_linear_float32(case):
    assert_folded_equal(*linear_setup(case, torch.float32), tol=1e-6)


@given(linear_cases())
def test_fold_linear_float64(case):
    assert_folded_equal(*linear_setup(case, torch.float64), tol=1e-12)


@given(conv_cases())
def test_fold_conv2d_float32(case):
    assert_folded_equal(*conv_setup(case, torch.float32), tol=1e-6)


@given(conv_cases())
def test_fold_conv2d_float64(case):
    assert_folded_equal(*conv_setup(case, torch.float64), tol=1e-12)


def test_fold_conv1d_and_conv3d():
    norm1 = trained_bn("bnutils", 1, 4, True, 0.1, (5, 4, 6), 0, torch.float64)
    assert_folded_equal(nn.Conv1d(2, 4, 3, dtype=torch.float64), norm1,
                        torch.randn(2, 2, 9, dtype=torch.float64), tol=1e-12)
    norm3 = nn.BatchNorm3d(4, dtype=torch.float64)
    norm3(torch.randn(3, 4, 2, 2, 2, dtype=torch.float64) * 2 + 1)
    assert_folded_equal(nn.Conv3d(2, 4, 2, dtype=torch.float64), norm3.eval(),
                        torch.randn(2, 2, 4, 4, 4, dtype=torch.float64), tol=1e-12)
    ours3 = bn.BatchNorm3d(4, dtype=torch.float64)
    ours3.load_state_dict(norm3.state_dict())
    assert_folded_equal(nn.Conv3d(2, 4, 2, dtype=torch.float64), ours3.eval(),
                        torch.randn(2, 2, 4, 4, 4, dtype=torch.float64), tol=1e-12)


def test_folded_network_matches_in_eval():
    """Folding every Conv+BN pair of a small CNN leaves its eval-mode predictions unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), bn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten())
    for _ in range(5):
        net(torch.randn(16, 1, 8, 8))
    net.eval()
    folded = nn.Sequential(bn.fold_batchnorm(net[0], net[1]), nn.ReLU(),
                           bn.fold_batchnorm(net[3], net[4]), nn.ReLU(), nn.Flatten())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-6, rtol=1e-5)


# --- errors ----------------------------------------------------------------------------------------


def test_training_mode_bn_is_refused():
    with pytest.raises(ValueError, match=r"training mode.*bn.eval\(\)"):
        bn.fold_batchnorm(nn.Linear(3, 4), bn.BatchNorm1d(4))


def test_bn_without_running_stats_is_refused():
    with pytest.raises(ValueError, match="no running statistics"):
        bn.fold_batchnorm(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False).eval())


@pytest.mark.parametrize("layer, norm", [(nn.Linear(3, 4), bn.BatchNorm1d(5)),
                                         (nn.Conv2d(3, 6, 3), nn.BatchNorm2d(4))])
def test_channel_mismatch(layer, norm):
    with pytest.raises(ValueError, match="channel mismatch"):
        bn.fold_batchnorm(layer, norm.eval())


@pytest.mark.parametrize("layer, norm, words", [
    (nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4), "layer must be a torch.nn.Linear, Conv1d, Conv2d"),
    (nn.ReLU(), nn.BatchNorm1d(4), "layer must be a torch.nn.Linear"),
    (nn.Linear(3, 4), nn.LayerNorm(4), "bn must be a torch.nn or bnutils BatchNorm1d/2d/3d"),
    (nn.Linear(3, 4), nn.BatchNorm2d(4), "a Linear must be followed by a BatchNorm1d"),
    (nn.Conv2d(3, 4, 3), bn.BatchNorm1d(4), "a Conv2d must be followed by a BatchNorm2d"),
])
def test_unsupported_types(layer, norm, words):
    with pytest.raises(TypeError, match=words):
        bn.fold_batchnorm(layer, norm.eval())
