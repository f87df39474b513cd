"""bnutils.exercises: the grader passes correct code and names each known mistake in wrong code."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnutils
from bnutils import exercises as ex

# ----------------------------------------------------------------------------------------- forward

AXES = {"channel": lambda x: (0,) + tuple(range(2, x.ndim)), "batch": lambda x: (0,),
        "example": lambda x: tuple(range(1, x.ndim))}


def make_forward(ddof=0, eps_mode="inside", axes="channel", one_pass=False, affine="ok"):
    def forward(x, gamma, beta, eps):
        red = AXES[axes](x)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        mean = x.mean(axis=red, keepdims=True)
        if one_pass:
            var = (x * x).mean(axis=red, keepdims=True) - mean * mean
        else:
            var = x.var(axis=red, ddof=ddof, keepdims=True)
        denom = {"inside": np.sqrt(var + eps), "outside": np.sqrt(var) + eps}[eps_mode]
        xhat = (x - mean) / denom
        g, b = gamma.reshape(shape), beta.reshape(shape)
        out = {"ok": g * xhat + b, "swapped": b * xhat + g}[affine]
        return out, None
    return forward


def check(result, status, mistake=None):
    assert result.status == status, result.message
    if mistake is not None:
        assert mistake in result.mistakes, result.message
    return result


def test_forward_reference_and_correct_pass(capsys):
    r = check(ex.check_forward(bnutils.batchnorm_forward), "correct")
    assert bool(r) and r.message.startswith("correct")
    assert capsys.readouterr().out.strip() == f"check_forward: {r.message}"
    check(ex.check_forward(lambda *a: make_forward()(*a)[0]), "correct")  # returning out alone is fine


@pytest.mark.parametrize("kwargs, mistake", [
    (dict(ddof=1), "unbiased_variance"),
    (dict(eps_mode="outside"), "eps_outside_sqrt"),
    (dict(axes="batch"), "wrong_axes"),
    (dict(axes="example"), "wrong_axes"),
    (dict(affine="swapped"), "gamma_beta_swapped"),
    (dict(one_pass=True), "one_pass_variance"),
])
def test_forward_mistakes_are_named(kwargs, mistake):
    r = check(ex.check_forward(make_forward(**kwargs), verbose=False), "wrong", mistake)
    assert not r and len(r.mistakes) == 1


def test_forward_two_mistakes_both_named():
    r = check(ex.check_forward(make_forward(ddof=1, eps_mode="outside"), verbose=False), "wrong")
    assert set(r.mistakes) == {"unbiased_variance", "eps_outside_sqrt"}


def test_forward_eps_missing_and_wrong_shape():
    def no_eps(x, gamma, beta, eps):
        return make_forward()(x, gamma, beta, 0.0)
    check(ex.check_forward(no_eps, verbose=False), "wrong", "eps_missing")
    check(ex.check_forward(lambda x, g, b, e: x.sum(axis=1), verbose=False), "wrong", "wrong_shape")


def test_not_implemented_and_errors_are_one_line(capsys):
    def skeleton(*args):
        raise NotImplementedError
    for check_fn in (ex.check_forward, ex.check_backward, ex.check_running_stats, ex.check_fold):
        r = check_fn(skeleton)
        assert r.status == "not implemented" and r.message == "not implemented yet"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and all(line.endswith("not implemented yet") for line in out)

    class Skeleton(nn.Module):
        def __init__(self, num_features, eps=1e-5, momentum=0.1):
            super().__init__()
            raise NotImplementedError
    assert ex.check_layer(Skeleton, verbose=False).status == "not implemented"

    def broken(x, gamma, beta, eps):
        raise ValueError("oops")
    r = check(ex.check_forward(broken, verbose=False), "error")
    assert "ValueError: oops" in r.message


def test_output_is_deterministic_and_seeded():
    a = ex.check_forward(make_forward(ddof=1), verbose=False)
    b = ex.check_forward(make_forward(ddof=1), verbose=False)
    assert a == b


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000))
def test_diagnoses_do_not_depend_on_the_draw(seed):
    check(ex.check_forward(bnutils.batchnorm_forward, seed=seed, verbose=False), "correct")
    check(ex.check_forward(make_forward(ddof=1), seed=seed, verbose=False), "wrong", "unbiased_variance")
    check(ex.check_forward(make_forward(eps_mode="outside"), seed=seed, verbose=False), "wrong",
          "eps_outside_sqrt")
    check(ex.check_backward(no_gamma_backward, seed=seed, verbose=False), "wrong", "gamma_missing_from_dx")
    check(ex.check_running_stats(make_running(flipped=True), seed=seed, verbose=False), "wrong",
          "momentum_flipped")


# ---------------------------------------------------------------------------------------- backward

def make_backward(gamma_in_dx=True, param_axes=None, mistake=None):
    def backward(dout, cache):
        axes = cache.axes
        m = cache.m
        g = cache.gamma if gamma_in_dx else 1.0
        s1 = dout.sum(axis=axes, keepdims=True)
        s2 = (dout * cache.xhat).sum(axis=axes, keepdims=True)
        if mistake == "divides_by_n":
            m = dout.shape[0]
        dx = g * cache.inv_std * (dout - s1 / m - cache.xhat * s2 / m)
        if mistake == "no_variance_path":
            dx = g * cache.inv_std * (dout - s1 / m)
        pa = axes if param_axes is None else param_axes
        dgamma = (dout * cache.xhat).sum(axis=pa)
        dbeta = dout.sum(axis=pa)
        if mistake == "swapped":
            dgamma, dbeta = dbeta, dgamma
        return dx, dgamma.reshape(-1) if param_axes is None else dgamma, \
            dbeta.reshape(-1) if param_axes is None else dbeta
    return backward


def no_gamma_backward(dout, cache):
    return make_backward(gamma_in_dx=False)(dout, cache)


def test_backward_references_pass():
    check(ex.check_backward(bnutils.batchnorm_backward, verbose=False), "correct")
    check(ex.check_backward(bnutils.batchnorm_backward_fast, verbose=False), "correct")
    check(ex.check_backward(make_backward(), verbose=False), "correct")


def test_backward_with_the_readers_own_forward():
    def forward(x, gamma, beta, eps):
        out, cache = bnutils.batchnorm_forward(x, gamma, beta, eps)
        return out, {"bn": cache}

    def backward(dout, cache):
        return bnutils.batchnorm_backward(dout, cache["bn"])
    check(ex.check_backward(backward, forward=forward, verbose=False), "correct")


@pytest.mark.parametrize("backward, mistake", [
    (make_backward(gamma_in_dx=False), "gamma_missing_from_dx"),
    (make_backward(mistake="divides_by_n"), "dx_divides_by_n"),
    (make_backward(mistake="no_variance_path"), "dx_no_variance_path"),
    (make_backward(mistake="swapped"), "dgamma_dbeta_swapped"),
    (make_backward(param_axes=1), "dgamma_wrong_axes"),
    (make_backward(param_axes=1), "dbeta_wrong_axes"),
    (make_backward(param_axes=0), "dbeta_wrong_axes"),
])
def test_backward_mistakes_are_named(backward, mistake):
    check(ex.check_backward(backward, verbose=False), "wrong", mistake)


def test_backward_summed_over_everything():
    def backward(dout, cache):
        dx, dgamma, _ = bnutils.batchnorm_backward_fast(dout, cache)
        return dx, dgamma, dout.sum()
    r = check(ex.check_backward(backward, verbose=False), "wrong", "dbeta_wrong_axes")
    assert r.mistakes == ("dbeta_wrong_axes",)


# ---------------------------------------------------------------------------------- running stats

def make_running(flipped=False, biased=False, in_place=False):
    def update(running_mean, running_var, x, momentum):
        axes = (0,) + tuple(range(2, x.ndim))
        m = 1 - momentum if flipped else momentum
        var = x.var(axis=axes, ddof=0 if biased else 1)
        new = ((1 - m) * running_mean + m * x.mean(axis=axes), (1 - m) * running_var + m * var)
        if in_place:
            running_mean[:], running_var[:] = new
            return None
        return new
    return update


def test_running_stats_correct_and_in_place():
    check(ex.check_running_stats(make_running(), verbose=False), "correct")
    check(ex.check_running_stats(make_running(in_place=True), verbose=False), "correct")

    def via_bnutils(rm, rv, x, momentum):
        cache = bnutils.batchnorm_forward(x, np.ones(x.shape[1]), np.zeros(x.shape[1]))[1]
        return bnutils.update_running_stats(rm, rv, cache, momentum)
    check(ex.check_running_stats(via_bnutils, verbose=False), "correct")


@pytest.mark.parametrize("kwargs, mistakes", [
    (dict(flipped=True), {"momentum_flipped"}),
    (dict(biased=True), {"running_var_not_bessel_corrected"}),
    (dict(flipped=True, biased=True), {"momentum_flipped", "running_var_not_bessel_corrected"}),
])
def test_running_stats_mistakes_are_named(kwargs, mistakes):
    r = check(ex.check_running_stats(make_running(**kwargs), verbose=False), "wrong")
    assert set(r.mistakes) == mistakes


# ------------------------------------------------------------------------------------------ layers

class MyBN(nn.Module):
    """A from-scratch BN with switchable mistakes (class attributes set by subclasses)."""
    ddof, flipped, bessel, eval_batch = 0, False, True, False
    buffers, eps_outside, spatial = True, False, True

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if self.buffers:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean, self.running_var = torch.zeros(num_features), torch.ones(num_features)

    def forward(self, x):
        axes = [0] + list(range(2, x.dim())) if self.spatial else [0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training or self.eval_batch:
            mean = x.mean(axes, keepdim=True)
            var = x.var(axes, unbiased=bool(self.ddof), keepdim=True)
            if self.training:
                with torch.no_grad():
                    channel_axes = [0] + list(range(2, x.dim()))
                    m = 1 - self.momentum if self.flipped else self.momentum
                    v = x.var(channel_axes, unbiased=self.bessel)
                    self.running_mean.mul_(1 - m).add_(m * x.mean(channel_axes))
                    self.running_var.mul_(1 - m).add_(m * v)
                    if self.buffers:
                        self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        denom = var.sqrt() + self.eps if self.eps_outside else (var + self.eps).sqrt()
        return self.weight.view(shape) * (x - mean) / denom + self.bias.view(shape)


class MyBN2d(MyBN):
    pass


def test_layer_reference_and_correct_pass():
    check(ex.check_layer(bnutils.BatchNorm1d, verbose=False), "correct")
    check(ex.check_layer(bnutils.BatchNorm2d, verbose=False), "correct")
    check(ex.check_layer(nn.BatchNorm2d, verbose=False), "correct")
    check(ex.check_layer(MyBN, verbose=False), "correct")
    check(ex.check_layer(MyBN2d, verbose=False), "correct")


@pytest.mark.parametrize("attrs, kind, mistake", [
    (dict(ddof=1), "1d", "unbiased_variance"),
    (dict(eps_outside=True), "2d", "eps_outside_sqrt"),
    (dict(spatial=False), "2d", "wrong_axes"),
    (dict(flipped=True), "1d", "momentum_flipped"),
    (dict(bessel=False), "2d", "running_var_not_bessel_corrected"),
    (dict(eval_batch=True), "1d", "eval_uses_batch_stats"),
    (dict(buffers=False), "1d", "missing_buffers"),
])
def test_layer_mistakes_are_named(attrs, kind, mistake):
    cls = type("Wrong", (MyBN,), attrs)
    check(ex.check_layer(cls, kind, verbose=False), "wrong", mistake)


# -------------------------------------------------------------------------------------------- fold

def make_fold(mistake=None):
    def fold(layer, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + (0 if mistake == "eps_missing" else bn.eps))
        new = copy.deepcopy(layer)
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.bias)
        with torch.no_grad():
            new.weight.mul_(scale.view((-1,) + (1,) * (layer.weight.dim() - 1)))
            bias = (b if mistake == "bias_not_scaled" else b * scale) + bn.bias - bn.running_mean * scale
            new.bias = nn.Parameter(bias.detach())
        return new
    return fold


def test_fold_reference_and_correct_pass():
    check(ex.check_fold(bnutils.fold_batchnorm, verbose=False), "correct")
    check(ex.check_fold(make_fold(), verbose=False), "correct")


@pytest.mark.parametrize("mistake", ["eps_missing", "bias_not_scaled"])
def test_fold_mistakes_are_named(mistake):
    check(ex.check_fold(make_fold(mistake), verbose=False), "wrong", mistake)


def test_fold_that_modifies_its_input():
    def in_place(layer, bn):
        folded = bnutils.fold_batchnorm(layer, bn)
        with torch.no_grad():
            layer.weight.copy_(folded.weight)
        return folded
    check(ex.check_fold(in_place, verbose=False), "wrong", "modifies_input")
