"""NoisyBatchNorm: BN plus Santurkar et al.'s noise, exactly as documented."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import bnutils as bn


def twin_bn(noisy):
    plain = nn.BatchNorm1d(noisy.num_features)
    plain.load_state_dict(noisy.state_dict())
    return plain


def test_eval_mode_is_plain_batchnorm():
    noisy = bn.NoisyBatchNorm1d(6, seed=1)
    with torch.no_grad():
        noisy.running_mean.uniform_(-1, 1)
        noisy.running_var.uniform_(0.5, 2)
        noisy.weight.uniform_(0.5, 2)
    plain = twin_bn(noisy)
    noisy.eval(), plain.eval()
    x = torch.randn(5, 6)
    state = noisy.generator.get_state()
    assert torch.equal(noisy(x), plain(x))
    assert torch.equal(noisy.generator.get_state(), state)  # no noise drawn


def test_train_mode_is_scale_times_bn_plus_shift():
    noisy, replay = bn.NoisyBatchNorm1d(6, seed=3), bn.NoisyBatchNorm1d(6, seed=3)
    plain = twin_bn(noisy)
    x = torch.randn(8, 6) * 3 + 1
    global_state = torch.get_rng_state()
    out = noisy(x)
    assert torch.equal(torch.get_rng_state(), global_state)  # own generator only
    scale, shift, mu, sigma = replay.draw_noise((8, 6))
    torch.testing.assert_close(out, scale * plain(x) + shift)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    torch.testing.assert_close(noisy.running_var, plain.running_var)
    assert not torch.equal(noisy(x), out)  # a new draw at the next step


def test_gradient_sees_the_noise_as_a_constant():
    noisy, replay = bn.NoisyBatchNorm1d(4, seed=5), bn.NoisyBatchNorm1d(4, seed=5)
    noisy(torch.randn(10, 4)).sum().backward()
    scale, _, _, _ = replay.draw_noise((10, 4))
    # out = s * (gamma * xhat + beta) + m  =>  d sum(out) / d beta = sum over the batch of s
    torch.testing.assert_close(noisy.bias.grad, scale.sum(0))


def test_noise_statistics_match_the_definition():
    layer = bn.NoisyBatchNorm1d(1, seed=0)
    draws = [layer.draw_noise((2000,)) for _ in range(1500)]
    mu = np.array([d[2] for d in draws])
    sigma = np.array([d[3] for d in draws])
    # per layer and step: mu ~ U(-0.5, 0.5), sigma ~ U(1, 1.25)
    assert mu.min() >= -0.5 and mu.max() <= 0.5
    assert sigma.min() >= 1.0 and sigma.max() <= 1.25
    assert mu.mean() == pytest.approx(0.0, abs=0.03)        # sd of the mean: 0.29/sqrt(1500) = 0.0075
    assert mu.std() == pytest.approx(1 / np.sqrt(12), rel=0.05)
    assert sigma.mean() == pytest.approx(1.125, abs=0.01)
    assert sigma.std() == pytest.approx(0.25 / np.sqrt(12), rel=0.05)
    # per element: shift ~ U(mu - 0.1, mu + 0.1), scale ~ N(sigma, 0.1^2)
    dev_shift = np.concatenate([d[1].numpy() - d[2] for d in draws[:200]])
    dev_scale = np.concatenate([d[0].numpy() - d[3] for d in draws[:200]])
    assert dev_shift.min() >= -0.1 - 1e-6 and dev_shift.max() <= 0.1 + 1e-6
    assert dev_shift.mean() == pytest.approx(0.0, abs=1e-3)
    assert dev_shift.std() == pytest.approx(0.2 / np.sqrt(12), rel=0.01)
    assert dev_scale.mean() == pytest.approx(0.0, abs=1e-3)
    assert dev_scale.std() == pytest.approx(0.1, rel=0.01)
    # marginals over steps: E[shift] = 0, Var = 1/12 + 0.2^2/12; E[scale] = 1.125, Var = 0.25^2/12 + 0.01
    shift_means = np.array([d[1].numpy().mean() for d in draws])
    assert shift_means.mean() == pytest.approx(0.0, abs=0.03)


def test_2d_noise_is_per_element():
    layer = bn.NoisyBatchNorm2d(3, seed=0)
    x = torch.randn(4, 3, 5, 5)
    out = layer(x)
    assert out.shape == x.shape
    scale, shift, _, _ = bn.NoisyBatchNorm2d(3, seed=0).draw_noise(x.shape)
    assert scale.shape == x.shape and len(torch.unique(shift)) == shift.numel()


def test_seed_makes_it_reproducible():
    x = torch.randn(6, 4)
    assert torch.equal(bn.NoisyBatchNorm1d(4, seed=9)(x), bn.NoisyBatchNorm1d(4, seed=9)(x))
    assert not torch.equal(bn.NoisyBatchNorm1d(4, seed=9)(x), bn.NoisyBatchNorm1d(4, seed=10)(x))


@pytest.mark.parametrize("kwargs", [dict(mean_range=-0.1), dict(std_range=(1.3, 1.2)), dict(scale_std=-1.0),
                                    dict(shift_spread=-0.5)])
def test_bad_noise_parameters(kwargs):
    with pytest.raises(ValueError, match="expected"):
        bn.NoisyBatchNorm1d(3, **kwargs)


@pytest.mark.parametrize("ours, theirs", [(bn.NoisyBatchNorm1d, nn.BatchNorm1d),
                                         (bn.NoisyBatchNorm2d, nn.BatchNorm2d)])
def test_constructor_takes_torch_arguments_with_torch_defaults(ours, theirs):
    mine = inspect.signature(ours.__init__).parameters
    for name, param in inspect.signature(theirs.__init__).parameters.items():
        assert name in mine and (mine[name].kind, mine[name].default) == (param.kind, param.default), name
    kw = dict(eps=1e-3, momentum=None, affine=True, track_running_stats=True, dtype=torch.float64, bias=False)
    a, b = ours(5, **kw), theirs(5, **kw)
    assert {k: (v.shape, v.dtype) for k, v in a.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in b.state_dict().items()}
    assert a.bias is None and a.momentum is None and a.eps == 1e-3


def test_drifting_noise_is_a_random_walk_of_mu_and_log_sigma():
    layer, replay = bn.NoisyBatchNorm1d(3, seed=4, walk_step=0.05), torch.Generator().manual_seed(4)
    assert layer.walk_mu_sigma() == pytest.approx((0.0, 1.125))
    mu, log_sigma = 0.0, np.log(1.125)
    for _ in range(5):
        scale, shift, m, s = layer.draw_noise((400, 3))
        step = torch.randn(2, generator=replay, dtype=torch.float64).numpy() * 0.05
        mu, log_sigma = mu + step[0], log_sigma + bn.noisy_bn.WALK_LOG_STD_RATIO * step[1]
        torch.empty((400, 3)).uniform_(0, 1, generator=replay)      # keep the replay in step
        torch.empty((400, 3)).normal_(0, 1, generator=replay)
        assert (m, s) == pytest.approx((mu, np.exp(log_sigma)), abs=1e-12)
        assert shift.min() >= m - 0.1 - 1e-6 and shift.max() <= m + 0.1 + 1e-6
        assert scale.mean().item() == pytest.approx(s, abs=0.03)
    assert layer.walk_mu_sigma() == pytest.approx((mu, np.exp(log_sigma)))


def test_drifting_layer_in_eval_mode_applies_the_current_state():
    layer = bn.NoisyBatchNorm1d(4, seed=2, walk_step=0.3)
    x = torch.randn(16, 4) * 2 + 1
    for _ in range(3):
        layer(x)
    plain = twin_bn(layer)
    layer.eval(), plain.eval()
    mu, sigma = layer.walk_mu_sigma()
    state = layer.generator.get_state()
    torch.testing.assert_close(layer(x), plain(x) * sigma + mu)
    assert torch.equal(layer.generator.get_state(), state)       # no noise drawn in eval mode
    layer.eval_walk = False
    assert torch.equal(layer(x), plain(x))
    assert set(layer.state_dict()) == set(plain.state_dict())     # walk state is not persistent


def test_preserved_state_restores_the_walk():
    net = bn.make_mlp(5, 8, 2, 2, norm="noisy_bn", norm_kwargs={"walk_step": 0.1}, seed=0)
    x = torch.randn(10, 5)
    before = [m.walk_state.clone() for m in net.norms]
    with bn.preserved_state(net):
        net(x)
        assert not torch.equal(net.norms[0].walk_state, before[0])
    assert all(torch.equal(m.walk_state, b) for m, b in zip(net.norms, before, strict=True))


def test_walk_step_is_validated():
    with pytest.raises(ValueError, match="walk_step"):
        bn.NoisyBatchNorm1d(3, walk_step=-1.0)
