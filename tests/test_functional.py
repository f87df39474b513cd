"""The NumPy reference against torch autograd (float64), finite differences and closed-form facts."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import bn_inputs

import bnutils as bn


def torch_reference(x, gamma, beta, dout, eps=1e-5):
    """Training-mode batch norm and its gradients from torch autograd."""
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    out = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()


@given(bn_inputs())
def test_forward_and_both_backwards_match_torch_autograd(case):
    x, gamma, beta, dout = case
    out, cache = bn.batchnorm_forward(x, gamma, beta)
    ref_out, ref_dx, ref_dg, ref_db = torch_reference(x, gamma, beta, dout)
    np.testing.assert_allclose(out, ref_out, rtol=1e-9, atol=1e-9)
    for backward in (bn.batchnorm_backward, bn.batchnorm_backward_fast):
        dx, dg, db = backward(dout, cache)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(dg, ref_dg, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(db, ref_db, rtol=1e-9, atol=1e-9)


@given(bn_inputs())
def test_staged_and_closed_form_backward_agree(case):
    x, gamma, beta, dout = case
    _, cache = bn.batchnorm_forward(x, gamma, beta)
    staged = bn.batchnorm_backward(dout, cache)
    fast = bn.batchnorm_backward_fast(dout, cache)
    # dx can be tiny by cancellation (N=2), so compare against the scale of its terms
    scale = np.abs(dout).max() * np.abs(cache.gamma * cache.inv_std).max()
    for a, b in zip(staged, fast, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(scale, 1.0))


@given(st.integers(0, 10_000), st.sampled_from([(6, 3), (4, 2, 3), (3, 2, 2, 2)]))
def test_backward_matches_finite_differences(seed, shape):
    rng = np.random.default_rng(seed)
    x = 3 + 2 * rng.standard_normal(shape)
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    dout = rng.standard_normal(shape)
    _, cache = bn.batchnorm_forward(x, gamma, beta)
    dx, dg, db = bn.batchnorm_backward(dout, cache)
    num_dx = bn.numerical_gradient(lambda v: bn.batchnorm_forward(v, gamma, beta)[0], x, dout)
    num_dg = bn.numerical_gradient(lambda g: bn.batchnorm_forward(x, g, beta)[0], gamma.copy(), dout)
    num_db = bn.numerical_gradient(lambda b: bn.batchnorm_forward(x, gamma, b)[0], beta.copy(), dout)
    assert bn.rel_error(dx, num_dx) < 1e-7
    assert bn.rel_error(dg, num_dg) < 1e-7
    assert bn.rel_error(db, num_db) < 1e-7


@given(bn_inputs())
def test_output_has_batch_statistics_gamma_and_beta(case):
    x, gamma, beta, _ = case
    out, cache = bn.batchnorm_forward(x, gamma, beta)
    axes = cache.axes
    # xhat has mean 0 and biased variance var/(var+eps) per channel (closed form)
    np.testing.assert_allclose(cache.xhat.mean(axis=axes), 0, atol=1e-9)
    var = x.var(axis=axes)
    np.testing.assert_allclose(cache.xhat.var(axis=axes), var / (var + 1e-5), rtol=1e-8)
    np.testing.assert_allclose(out.mean(axis=axes), beta, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 2)).astype(dtype)
    out, cache = bn.batchnorm_forward(x, np.ones(3, dtype), np.zeros(3, dtype))
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in bn.batchnorm_backward_fast(np.ones_like(x), cache))


@pytest.mark.parametrize("shape", [(1000, 4), (64, 4, 5, 5)])
def test_float32_large_mean_normalizes_accurately(shape):
    """Mean 1e4, std 1 in float32: std within 1e-3 of 1, mean within float32's resolution."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    c = shape[1]
    out, cache = bn.batchnorm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
    out64 = out.astype(np.float64)
    assert np.all(np.abs(out64.std(axis=cache.axes) - 1) < 1e-3)
    assert np.all(np.abs(out64.mean(axis=cache.axes)) < 1e-2)


@pytest.mark.parametrize("loc", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape", [(1000, 4), (16, 4, 8, 8)])
def test_float32_output_matches_float64_computation_at_any_mean(loc, shape):
    """The float32 output is the float64 result on the same numbers, rounded: no shift by the
    rounding error of the mean (which would be up to 0.03 at mean 1e6), exact zero mean."""
    rng = np.random.default_rng(1)
    x = (loc + rng.standard_normal(shape)).astype(np.float32)
    c = shape[1]
    out, cache = bn.batchnorm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
    ref, _ = bn.batchnorm_forward(x.astype(np.float64), np.ones(c), np.zeros(c))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert np.all(np.abs(out.astype(np.float64).mean(axis=cache.axes)) < 1e-6)


def test_one_pass_variance_really_fails_in_float32():
    """The failure the two-pass formula avoids: E[x^2] - E[x]^2 loses everything at mean 1e4."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((1000, 4))).astype(np.float32)
    one_pass = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    _, two_pass = bn.batch_mean_var(x)
    true_var = x.astype(np.float64).var(axis=0)
    assert np.max(np.abs(one_pass - true_var)) > 0.1
    np.testing.assert_allclose(two_pass.reshape(-1), true_var, rtol=1e-4)


@given(bn_inputs())
def test_running_stats_follow_pytorch_convention(case):
    x, gamma, beta, _ = case
    c = x.shape[1]
    rm, rv = np.zeros(c), np.ones(c)
    _, cache = bn.batchnorm_forward(x, gamma, beta)
    new_m, new_v = bn.update_running_stats(rm, rv, cache, momentum=0.1)
    trm, trv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, training=True, momentum=0.1)
    np.testing.assert_allclose(new_m, trm.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_v, trv.numpy(), rtol=1e-10, atol=1e-12)


@given(bn_inputs())
def test_inference_matches_torch_eval(case):
    x, gamma, beta, _ = case
    c = x.shape[1]
    rng = np.random.default_rng(1)
    rm, rv = rng.standard_normal(c), rng.uniform(0.1, 3, c)
    out = bn.batchnorm_inference(x, gamma, beta, rm, rv)
    ref = torch.nn.functional.batch_norm(torch.tensor(x), torch.tensor(rm), torch.tensor(rv),
                                         torch.tensor(gamma), torch.tensor(beta), training=False)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-9, atol=1e-9)


def test_inference_accepts_a_batch_of_one():
    x = np.array([[1.0, 2.0]])
    out = bn.batchnorm_inference(x, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), eps=1e-12)
    np.testing.assert_allclose(out, x)


def test_nan_propagates_to_its_channel_only():
    x = np.arange(12.0).reshape(4, 3)
    x[0, 1] = np.nan
    out, _ = bn.batchnorm_forward(x, np.ones(3), np.zeros(3))
    assert np.isnan(out[:, 1]).all()
    assert np.isfinite(out[:, [0, 2]]).all()
