"""Data loaders: the seed's exact numbers, shapes, no downloads."""
import numpy as np

import bnutils as bn


def test_seed001_regression_is_the_seed_verbatim():
    rng = np.random.default_rng(42)
    A = rng.uniform(1, 10, 100)
    B = rng.uniform(1, 200, 100)
    y = 2 * A + 3 * B + rng.normal(size=100) * 0.1
    X, y_bn = bn.seed001_regression()
    np.testing.assert_array_equal(X[:, 0], A)
    np.testing.assert_array_equal(X[:, 1], B)
    np.testing.assert_array_equal(y_bn, y)


def test_binary_2d_shapes_and_labels():
    X_tr, y_tr, X_te, y_te = bn.binary_2d("circles", n=200)
    assert X_tr.shape == (100, 2) and X_te.shape == (100, 2)
    assert set(np.unique(y_tr)) == {0.0, 1.0}
    assert X_tr.dtype == np.float32


def test_digits_train_statistics_only():
    X_tr, y_tr, X_te, y_te = bn.digits(images=True)
    assert X_tr.shape[1:] == (1, 8, 8)
    assert abs(float(X_tr.mean())) < 1e-5 and abs(float(X_tr.std()) - 1) < 1e-5
    assert len(X_tr) + len(X_te) == 1797

