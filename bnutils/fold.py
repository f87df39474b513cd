"""Fold an inference-mode batch norm into the Linear or Conv layer that feeds it.

In eval mode BN is a fixed per-channel affine map, y = scale * z + shift with
scale = gamma / sqrt(running_var + eps) and shift = beta - running_mean * scale. Applied to the
output z = W x + b of the layer before it, it gives one layer with weight scale[:, None] * W and
bias scale * b + shift: the same function, one layer and one memory pass fewer at inference.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import layers

# layer type -> the BN input rank its output has: Linear (N, F) -> BatchNorm1d, Conv2d -> BatchNorm2d, ...
_LAYER_BN_DIM = {nn.Linear: 1, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BN_DIM = {nn.BatchNorm1d: 1, layers.BatchNorm1d: 1, nn.BatchNorm2d: 2, layers.BatchNorm2d: 2,
           nn.BatchNorm3d: 3, layers.BatchNorm3d: 3}


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a new layer equal to ``bn(layer(x))`` with ``bn`` in eval mode; inputs are unchanged.

    ``layer``: ``nn.Linear`` (followed by a BatchNorm1d on its (N, out_features) output) or
    ``nn.Conv1d/2d/3d`` (followed by BatchNorm1d/2d/3d), with or without bias, any stride, padding,
    dilation and groups. ``bn``: torch's or bnutils' BatchNorm1d/2d/3d or a subclass,
    in eval mode, with running statistics. The arithmetic is done in float64 and cast back to the
    layer's dtype. The returned layer always has a bias and has the same training flag as ``layer``.
    """
    bn_dim = next((d for cls, d in _BN_DIM.items() if isinstance(bn, cls)), None)
    if bn_dim is None:
        raise TypeError(f"bn must be a torch.nn or bnutils BatchNorm1d/2d/3d, "
                        f"got {type(bn).__name__}")
    layer_dim = next((d for cls, d in _LAYER_BN_DIM.items() if isinstance(layer, cls)), None)
    if layer_dim is None:
        raise TypeError(f"layer must be a torch.nn.Linear, Conv1d, Conv2d or Conv3d, "
                        f"got {type(layer).__name__} (transposed convolutions are not supported)")
    if layer_dim != bn_dim:
        expected = {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}[layer_dim]
        raise TypeError(f"a {type(layer).__name__} must be followed by a {expected} to be folded, "
                        f"got {type(bn).__name__}")
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        raise ValueError(f"channel mismatch: {type(layer).__name__} has {out_channels} output channels "
                         f"but {type(bn).__name__} normalizes {bn.num_features}")
    if bn.training:
        raise ValueError("bn is in training mode, where it normalizes with batch statistics and cannot "
                         "be folded; call bn.eval() first (folding uses the running statistics)")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): it normalizes with "
                         "batch statistics even in eval mode, so there is no fixed map to fold")

    with torch.no_grad():
        f64 = torch.float64
        inv_std = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
        scale = inv_std if bn.weight is None else bn.weight.to(f64) * inv_std
        shift = -bn.running_mean.to(f64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(f64)
        w = layer.weight.to(f64) * scale.view((-1,) + (1,) * (layer.weight.dim() - 1))
        b = shift if layer.bias is None else layer.bias.to(f64) * scale + shift

        folded = copy.deepcopy(layer)
        folded.weight = nn.Parameter(w.to(layer.weight.dtype))
        folded.bias = nn.Parameter(b.to(layer.weight.dtype))
    return folded
