"""bnutils: the tested implementations behind the batch-normalization book.

Public names are re-exported here; the chapters import them from ``bnutils``.
"""
from .book import glue
from .data import binary_2d, digits, mnist1d, seed001_regression
from .fold import fold_batchnorm
from .functional import (
                         BNCache,
                         batch_mean_var,
                         batchnorm_backward,
                         batchnorm_backward_fast,
                         batchnorm_forward,
                         batchnorm_inference,
                         update_running_stats,
)
from .gradcheck import numerical_gradient, rel_error
from .layers import BatchNorm1d, BatchNorm2d, BatchNormFunction
from .plotting import BN_COLOR, NO_BN_COLOR, PALETTE, set_style
from .session import setup_notebook

__all__ = [
    "BNCache", "BN_COLOR", "BatchNorm1d", "BatchNorm2d", "BatchNormFunction", "NO_BN_COLOR", "PALETTE",
    "batch_mean_var", "batchnorm_backward", "batchnorm_backward_fast", "batchnorm_forward",
    "batchnorm_inference", "binary_2d", "digits", "glue", "mnist1d", "numerical_gradient",
    "rel_error", "seed001_regression", "set_style", "setup_notebook", "update_running_stats",
    "fold_batchnorm",
]
__version__ = "0.1.0"
