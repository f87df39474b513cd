"""bnutils: the tested implementations behind the batch-normalization book.

Public names are re-exported here; the chapters import them from ``bnutils``.
"""
from .book import glue
from .data import binary_2d, digits, mnist1d, seed001_regression
from .diagnostics import (
                          SATURATION_THRESHOLD,
                          activation_stats,
                          capture_activations,
                          dead_unit_fraction,
                          gradient_norms,
                          layer_grad_norms,
                          saturation_fraction,
                          unit_percentiles,
                          update_ratios,
                          weight_snapshot,
)
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
from .landscape import ProbeResult, probe_gradient_direction
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormFunction
from .models import Net, init_weights, make_cnn, make_mlp
from .noisy_bn import NoisyBatchNorm1d, NoisyBatchNorm2d
from .norms import (
                    BatchRenorm,
                    GhostBatchNorm,
                    GroupNorm,
                    InstanceNorm1d,
                    InstanceNorm2d,
                    LayerNorm,
                    RMSNorm,
)
from .plotting import BN_COLOR, NO_BN_COLOR, PALETTE, set_style
from .recorders import ActivationStats, GradNorms, LandscapeProbe, UpdateRatios
from .session import setup_notebook
from .stacked import StackedHistory, StackedMLP, train_stacked
from .state import preserved_state
from .sync_bn import SyncBatchNorm, SyncBatchNormFunction, convert_sync_batchnorm, run_distributed
from .training import History, Recorder, accuracy, recalibrate, train

__all__ = [
    "BNCache", "BN_COLOR", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormFunction", "NO_BN_COLOR",
    "PALETTE",
    "batch_mean_var", "batchnorm_backward", "batchnorm_backward_fast", "batchnorm_forward",
    "batchnorm_inference", "binary_2d", "digits", "glue", "mnist1d", "numerical_gradient",
    "rel_error", "seed001_regression", "set_style", "setup_notebook", "update_running_stats",
    "fold_batchnorm",
    # experiment toolkit: models, training loop, diagnostics, landscape probes
    "ActivationStats", "GradNorms", "History", "LandscapeProbe", "Net", "NoisyBatchNorm1d",
    "NoisyBatchNorm2d", "ProbeResult", "Recorder", "SATURATION_THRESHOLD", "UpdateRatios",
    "activation_stats", "capture_activations", "dead_unit_fraction", "gradient_norms", "init_weights",
    "layer_grad_norms", "make_cnn", "make_mlp", "preserved_state", "probe_gradient_direction",
    "saturation_fraction", "train", "unit_percentiles", "update_ratios", "weight_snapshot",
    # alternatives to batch norm (chapter 16)
    "BatchRenorm", "GhostBatchNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "LayerNorm", "RMSNorm",
    # synchronized batch norm across CPU processes (chapter 15)
    "SyncBatchNorm", "SyncBatchNormFunction", "convert_sync_batchnorm", "run_distributed",
    # many small networks trained at once; evaluation helpers (issue 12)
    "StackedHistory", "StackedMLP", "accuracy", "recalibrate", "train_stacked",
]
__version__ = "0.1.0"
