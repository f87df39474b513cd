"""Every bad input named in the contract raises a clear error instead of a wrong answer."""
import numpy as np
import pytest

import bnutils as bn

X = np.random.default_rng(0).standard_normal((4, 3))
G, B = np.ones(3), np.zeros(3)


@pytest.mark.parametrize("x, err, words", [
    (np.ones(5), ValueError, "ndim >= 2"),
    (np.ones((4, 3), dtype=np.int64), TypeError, "floating dtype"),
    ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], TypeError, "ndarray"),
])
def test_bad_x(x, err, words):
    with pytest.raises(err, match=words):
        bn.batchnorm_forward(x, G, B)


@pytest.mark.parametrize("gamma, beta, words", [
    (np.ones(4), B, r"gamma must have shape \(3,\)"),
    (G, np.zeros((1, 3)), r"beta must have shape \(3,\)"),
    (np.ones((3, 1)), B, r"gamma must have shape \(3,\)"),
])
def test_bad_gamma_beta(gamma, beta, words):
    with pytest.raises(ValueError, match=words):
        bn.batchnorm_forward(X, gamma, beta)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        bn.batchnorm_forward(X, G, B, eps=eps)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn.batchnorm_forward(np.ones(shape), G, B)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_bad_momentum(momentum):
    _, cache = bn.batchnorm_forward(X, G, B)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bn.update_running_stats(np.zeros(3), np.ones(3), cache, momentum=momentum)


@pytest.mark.parametrize("backward", [bn.batchnorm_backward, bn.batchnorm_backward_fast])
def test_mismatched_dout(backward):
    _, cache = bn.batchnorm_forward(X, G, B)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward input \(4, 3\)"):
        backward(np.ones((4, 2)), cache)
    with pytest.raises(TypeError, match="cache must be the BNCache"):
        backward(np.ones((4, 3)), {"x": X})


def test_inference_checks_running_stats_shape():
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        bn.batchnorm_inference(X, G, B, np.zeros(3), np.ones(2))
