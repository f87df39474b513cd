"""Data sets that are generated or ship with an installed package: nothing is downloaded."""
from __future__ import annotations

import functools
import random

import numpy as np


def seed001_regression(n: int = 100, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The two-feature regression of seed 001, exactly as written there (for the defaults).

    A ~ U(1, 10), B ~ U(1, 200), y = 2A + 3B + 0.1 * noise. Returns X (n, 2) with columns
    [A, B] and y (n,). The draws happen in the seed's order, so the numbers are the seed's.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 10, n)
    b = rng.uniform(1, 200, n)
    y = 2 * a + 3 * b + rng.normal(size=n) * 0.1
    return np.column_stack([a, b]), y


def binary_2d(kind: str = "circles", n: int = 1000, noise: float = 0.1, seed: int = 1,
              test_fraction: float = 0.5):
    """A 2-D binary classification task from scikit-learn's generators, split in two halves.

    ``kind`` is "circles" (two concentric rings, factor 0.5) or "moons". Returns
    (X_train, y_train, X_test, y_test) as float32 arrays, X (n_split, 2), y (n_split,) in {0, 1}.
    """
    from sklearn.datasets import make_circles, make_moons

    if kind == "circles":
        X, y = make_circles(n_samples=n, noise=noise, factor=0.5, random_state=seed)
    elif kind == "moons":
        X, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    else:
        raise ValueError(f"kind must be 'circles' or 'moons', got {kind!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_train = int(round(n * (1 - test_fraction)))
    X, y = X.astype(np.float32), y.astype(np.float32)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def digits(test_fraction: float = 0.25, seed: int = 0, standardize: bool = True, images: bool = False):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split train/test.

    Returns (X_train, y_train, X_test, y_test); X is float32, (n, 64), or (n, 1, 8, 8) with
    ``images=True``; y is int64. Standardization uses the training split's statistics only.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_fraction,
                                              random_state=seed, stratify=y)
    if standardize:
        mean, std = X_tr.mean(), X_tr.std()  # one scalar: keeps the pixel geometry intact
        X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    if images:
        X_tr, X_te = X_tr.reshape(-1, 1, 8, 8), X_te.reshape(-1, 1, 8, 8)
    return (X_tr.astype(np.float32), y_tr.astype(np.int64),
            X_te.astype(np.float32), y_te.astype(np.int64))


def mnist1d(seed: int = 42, num_samples: int = 5000):
    """MNIST-1D built locally (never downloaded): 40-sample 1-D signals of 10 digit classes.

    Returns (X_train, y_train, X_test, y_test), X float32 (n, 40), y int64 (80/20 split).
    Building it takes a few seconds, so the arrays are cached in memory per (seed, num_samples);
    every call returns fresh copies. The generator's reseeding of Python's and NumPy's global
    RNGs is undone, so calling this does not change any other random draw.
    """
    return tuple(a.copy() for a in _mnist1d_cached(int(seed), int(num_samples)))


@functools.lru_cache(maxsize=4)
def _mnist1d_cached(seed: int, num_samples: int):
    from mnist1d.data import get_dataset_args, make_dataset

    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10 (one per class), got {num_samples}")
    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)  # calls random.seed / np.random.seed(args.seed)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (data["x"].astype(np.float32), data["y"].astype(np.int64),
              data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))
    for a in arrays:
        a.flags.writeable = False
    return arrays
