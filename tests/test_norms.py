"""bnutils.norms against torch (LayerNorm, GroupNorm, InstanceNorm, RMSNorm) and against the defining
equations (Batch Renormalization, Ghost Batch Norm)."""
import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bnutils import make_cnn, make_mlp
from bnutils.norms import (
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    LayerNorm,
    RMSNorm,
)

TOL = {"rtol": 1e-9, "atol": 1e-10}



def _data(shape, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (loc + scale * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dout, g


def _randomize(mine: nn.Module, ref: nn.Module, g) -> None:
    """Same random affine parameters in both modules (float64)."""
    mine.double()
    ref.double()
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(mine.named_parameters(), ref.named_parameters(), strict=True):
            assert n1 == n2 and p1.shape == p2.shape
            p1.copy_(torch.randn(p1.shape, generator=g, dtype=torch.float64))
            p2.copy_(p1)


def _compare(mine, ref, x, dout):
    """Outputs and gradients (input and every parameter) of two modules on the same input."""
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = mine(x), ref(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    (y1 * dout).sum().backward()
    (y2 * dout).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    for p1, p2 in zip(mine.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, **TOL)


seeds = st.integers(0, 2**31 - 1)
locs = st.floats(-20, 20)
scales = st.floats(0.1, 10)


@given(n=st.integers(1, 5), t=st.integers(1, 4), d=st.integers(2, 9), seed=seeds, loc=locs, scale=scales,
       affine=st.booleans(), bias=st.booleans(), two_dims=st.booleans())
def test_layernorm_matches_torch(n, t, d, seed, loc, scale, affine, bias, two_dims):
    shape = (n, t, d)
    normalized = (t, d) if two_dims else d
    x, dout, g = _data(shape, seed, loc, scale)
    mine, ref = LayerNorm(normalized, 1e-5, affine, bias), nn.LayerNorm(normalized, 1e-5, affine, bias)
    _randomize(mine, ref, g)
    _compare(mine, ref, x, dout)


@given(n=st.integers(1, 5), t=st.integers(1, 4), d=st.integers(1, 9), seed=seeds, loc=locs, scale=scales,
       affine=st.booleans(), eps=st.sampled_from([None, 1e-6, 1e-2]))
def test_rmsnorm_matches_torch(n, t, d, seed, loc, scale, affine, eps):
    x, dout, g = _data((n, t, d), seed, loc, scale)
    mine, ref = RMSNorm(d, eps, affine), nn.RMSNorm(d, eps, affine)
    _randomize(mine, ref, g)
    _compare(mine, ref, x, dout)


@given(n=st.integers(1, 5), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), max_size=2), seed=seeds, loc=locs, scale=scales,
       affine=st.booleans())
def test_groupnorm_matches_torch(n, groups, per_group, spatial, seed, loc, scale, affine):
    c = groups * per_group
    if per_group * int(np.prod(spatial)) < 2:  # a group needs two values (torch would divide by zero)
        spatial = spatial + [2]
    x, dout, g = _data((n, c, *spatial), seed, loc, scale)
    mine, ref = GroupNorm(groups, c, 1e-5, affine), nn.GroupNorm(groups, c, 1e-5, affine)
    _randomize(mine, ref, g)
    _compare(mine, ref, x, dout)


@given(n=st.integers(1, 5), c=st.integers(1, 5), spatial=st.lists(st.integers(2, 5), min_size=1, max_size=2),
       seed=seeds, loc=locs, scale=scales, affine=st.booleans(), training=st.booleans())
def test_instancenorm_matches_torch(n, c, spatial, seed, loc, scale, affine, training):
    x, dout, g = _data((n, c, *spatial), seed, loc, scale)
    mine_cls, ref_cls = (InstanceNorm1d, nn.InstanceNorm1d) if len(spatial) == 1 else (InstanceNorm2d,
                                                                                          nn.InstanceNorm2d)
    mine, ref = mine_cls(c, 1e-5, affine), ref_cls(c, 1e-5, affine=affine)
    _randomize(mine, ref, g)
    mine.train(training)
    ref.train(training)
    _compare(mine, ref, x, dout)


def test_groupnorm_special_cases_are_layer_and_instance_norm():
    x, _, _ = _data((3, 4, 5, 5), 0)
    torch.testing.assert_close(GroupNorm(1, 4).double()(x), LayerNorm((4, 5, 5), elementwise_affine=False)(x))
    torch.testing.assert_close(GroupNorm(4, 4, affine=False)(x), InstanceNorm2d(4)(x))


# --- Batch Renormalization -------------------------------------------------------------------------

def _renorm_reference(x, w, b, mu, sigma, rmax, dmax, eps, detach=True):
    """The paper's Algorithm 1 written out in one expression; r and d detached when ``detach``."""
    dims = (0,) + tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax)
    d = torch.clamp((mu_b - mu) / sigma, -dmax, dmax)
    if detach:
        r, d = r.detach(), d.detach()
    xhat = (x - mu_b.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    return w.view(view) * xhat + b.view(view), mu_b, sigma_b


def _renorm_with_state(shape, seed, rmax, dmax):
    x, dout, g = _data(shape, seed, loc=1.5, scale=2.0)
    m = BatchRenorm(shape[1], rmax=rmax, dmax=dmax, momentum=0.2).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        m.bias.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        m.running_mean.copy_(torch.randn(shape[1], generator=g, dtype=torch.float64))
        m.running_std.copy_(0.3 + torch.rand(shape[1], generator=g, dtype=torch.float64) * 3)
    return m, x, dout


@given(shape=st.sampled_from([(8, 3), (5, 2, 4), (4, 3, 3, 2)]), seed=seeds,
       rmax=st.floats(1.0, 4.0), dmax=st.floats(0.0, 3.0))
def test_batch_renorm_matches_written_out_formula_with_stop_gradient(shape, seed, rmax, dmax):
    m, x, dout = _renorm_with_state(shape, seed, rmax, dmax)
    mu0, sigma0 = m.running_mean.clone(), m.running_std.clone()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    y_ref, mu_b, sigma_b = _renorm_reference(x2, w, b, mu0, sigma0, rmax, dmax, m.eps)
    torch.testing.assert_close(y, y_ref, **TOL)
    (y * dout).sum().backward()
    (y_ref * dout).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(m.weight.grad, w.grad, **TOL)
    torch.testing.assert_close(m.bias.grad, b.grad, **TOL)
    # running statistics: mu += a (mu_B - mu), sigma += a (sigma_B - sigma)
    torch.testing.assert_close(m.running_mean, mu0 + 0.2 * (mu_b.detach() - mu0), **TOL)
    torch.testing.assert_close(m.running_std, sigma0 + 0.2 * (sigma_b.detach() - sigma0), **TOL)


def test_batch_renorm_gradient_is_bn_gradient_times_r_and_differs_without_stop_gradient():
    """Closed form: with r, d constant, dL/dx is the BN input gradient scaled by r (per channel);
    letting gradients flow through r and d gives a different answer (the test can fail)."""
    m, x, dout = _renorm_with_state((16, 3), 7, rmax=10.0, dmax=10.0)
    mu0, sigma0 = m.running_mean.clone(), m.running_std.clone()
    (m(x) * dout).sum().backward()
    with torch.no_grad():
        mu_b, var_b = x.mean(0), x.var(0, unbiased=False)
        sigma_b = torch.sqrt(var_b + m.eps)
        xh = (x - mu_b) / sigma_b
        r = torch.clamp(sigma_b / sigma0, 1 / 10, 10)
        assert (r != 1).all()
        g = dout * m.weight
        dx = r / sigma_b * (g - g.mean(0) - xh * (g * xh).mean(0))
    torch.testing.assert_close(x.grad, dx, **TOL)
    x3 = x.detach().clone().requires_grad_()
    y_nd, _, _ = _renorm_reference(x3, m.weight.detach(), m.bias.detach(), mu0, sigma0, 10.0, 10.0, m.eps,
                                   detach=False)
    (y_nd * dout).sum().backward()
    assert (x3.grad - dx).abs().max() > 1e-3


@given(shape=st.sampled_from([(8, 3), (5, 2, 4), (4, 3, 3, 2)]), seed=seeds)
def test_batch_renorm_with_r1_d0_is_batch_norm(shape, seed):
    m, x, dout = _renorm_with_state(shape, seed, rmax=1.0, dmax=0.0)
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1]).double()
    with torch.no_grad():
        ref.weight.copy_(m.weight)
        ref.bias.copy_(m.bias)
    _compare(m, ref, x, dout)


def test_batch_renorm_unclipped_train_output_equals_eval_with_old_running_stats():
    """When r and d are not clipped, (x - mu_B)/sigma_B * r + d = (x - mu)/sigma: train = eval."""
    m, x, _ = _renorm_with_state((32, 4), 3, rmax=100.0, dmax=100.0)
    m.eval()
    y_eval = m(x)
    m.train()
    torch.testing.assert_close(m(x), y_eval, **TOL)


def test_batch_renorm_eval_uses_running_stats_and_does_not_update():
    m, x, _ = _renorm_with_state((6, 2), 1, 3.0, 5.0)
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x)
    expect = m.weight * (x - m.running_mean) / m.running_std + m.bias
    torch.testing.assert_close(y, expect, **TOL)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


# --- Ghost Batch Norm ------------------------------------------------------------------------------

@given(shape=st.sampled_from([(12, 3), (8, 2, 4), (6, 3, 3, 2)]), seed=seeds,
       momentum=st.sampled_from([0.1, 0.5, None]))
def test_ghost_bn_with_one_ghost_batch_is_batch_norm(shape, seed, momentum):
    x, dout, g = _data(shape, seed, 2.0, 3.0)
    m = GhostBatchNorm(shape[1], ghost_batch_size=shape[0], momentum=momentum)
    ref = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(shape[1], momentum=momentum)
    _randomize(m, ref, g)
    _compare(m, ref, x, dout)
    torch.testing.assert_close(m.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(m.running_var, ref.running_var, **TOL)
    m.eval()
    ref.eval()
    torch.testing.assert_close(m(x), ref(x), **TOL)


@given(ghost=st.sampled_from([2, 3, 4, 5]), seed=seeds, momentum=st.sampled_from([0.1, None]))
def test_ghost_bn_is_per_chunk_batch_norm_with_sequential_running_updates(ghost, seed, momentum):
    n, c = 12, 3
    x, dout, g = _data((n, c, 2), seed, -1.0, 2.0)
    m = GhostBatchNorm(c, ghost_batch_size=ghost, momentum=momentum)
    ref = nn.BatchNorm1d(c, momentum=momentum)
    _randomize(m, ref, g)
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    y_ref = torch.cat([ref(chunk) for chunk in torch.split(x2, ghost)])  # last chunk smaller if ghost = 5
    torch.testing.assert_close(y, y_ref, **TOL)
    (y * dout).sum().backward()
    (y_ref * dout).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, **TOL)
    torch.testing.assert_close(m.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(m.running_var, ref.running_var, **TOL)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == -(-n // ghost)
    # and it is not batch norm over the whole batch
    full = nn.BatchNorm1d(c).double()
    assert (y.detach() - full(x.detach())).abs().max() > 1e-3


# --- errors and factories --------------------------------------------------------------------------

@pytest.mark.parametrize("make, x, err, match", [
    (lambda: LayerNorm(4), torch.zeros(2, 3), ValueError, "trailing dims"),
    (lambda: LayerNorm(4), np.zeros((2, 4)), TypeError, "torch.Tensor"),
    (lambda: LayerNorm(4), torch.zeros(2, 4, dtype=torch.long), TypeError, "floating"),
    (lambda: RMSNorm((2, 3)), torch.zeros(2, 3, 2), ValueError, "trailing dims"),
    (lambda: GroupNorm(2, 4), torch.zeros(2, 3, 5), ValueError, "4 channels"),
    (lambda: InstanceNorm2d(3), torch.zeros(2, 3, 5), ValueError, "4D input"),
    (lambda: InstanceNorm1d(3), torch.zeros(2, 3, 1), ValueError, "more than 1 spatial"),
    (lambda: BatchRenorm(3), torch.zeros(1, 3), ValueError, "more than 1 value per channel"),
    (lambda: BatchRenorm(3), torch.zeros(4), ValueError, "at least 2 dims"),
    (lambda: GhostBatchNorm(3, 4), torch.zeros(5, 3), ValueError, "more than 1 value per channel"),
    (lambda: GhostBatchNorm(3, 4), torch.zeros(8, 2), ValueError, "3 channels"),
])
def test_bad_input_raises(make, x, err, match):
    with pytest.raises(err, match=match):
        make()(x)


@pytest.mark.parametrize("make, match", [
    (lambda: GroupNorm(3, 4), "divisible"),
    (lambda: LayerNorm(0), "normalized_shape"),
    (lambda: LayerNorm(4, eps=0), "eps"),
    (lambda: BatchRenorm(3, rmax=0.5), "rmax"),
    (lambda: BatchRenorm(3, dmax=-1), "dmax"),
    (lambda: BatchRenorm(3, momentum=None), "momentum"),
    (lambda: BatchRenorm(3, momentum=1.5), "momentum"),
    (lambda: GhostBatchNorm(3, ghost_batch_size=0), "ghost_batch_size"),
    (lambda: InstanceNorm2d(0), "num_features"),
])
def test_bad_constructor_args_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("factory", [LayerNorm, RMSNorm, BatchRenorm, GhostBatchNorm,
                                     functools.partial(GhostBatchNorm, ghost_batch_size=4),
                                     lambda w: GroupNorm(2, w)])
def test_usable_as_mlp_norm_factory(factory):
    net = make_mlp(10, 8, 3, depth=2, norm=factory, seed=0)
    assert len(net.norms) == 2
    assert net(torch.randn(16, 10)).shape == (16, 3)


@pytest.mark.parametrize("factory", [BatchRenorm, GhostBatchNorm, InstanceNorm2d, lambda c: GroupNorm(1, c)])
def test_usable_as_cnn_norm_factory(factory):
    net = make_cnn(norm=factory, seed=0)
    assert net(torch.randn(8, 1, 8, 8)).shape == (8, 10)
