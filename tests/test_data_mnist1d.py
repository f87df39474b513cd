"""MNIST-1D: built locally, equal to the package's own generator, cached without side effects."""
import random

import numpy as np

import bnutils as bn


def test_small_mnist1d_equals_make_dataset_and_leaves_global_rngs_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    X, y, Xt, yt = bn.mnist1d(seed=3, num_samples=200)
    assert random.random() == expected_py and np.random.rand() == expected_np
    args = get_dataset_args()
    args.seed, args.num_samples = 3, 200
    ref = make_dataset(args)
    np.testing.assert_array_equal(X, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(yt, ref["y_test"])
    assert X.shape == (160, 40) and Xt.shape == (40, 40)
    assert X.dtype == np.float32 and y.dtype == np.int64


def test_cached_calls_return_independent_copies():
    X, y, Xt, yt = bn.mnist1d()
    assert X.shape == (4000, 40) and Xt.shape == (1000, 40) and set(np.unique(y)) == set(range(10))
    X[:] = 0
    X2 = bn.mnist1d()[0]
    assert X2.flags.writeable and np.abs(X2).sum() > 0
