"""Per-layer diagnostics of a network: activation distributions, saturation, dead units,
gradient norms and update:data ratios (Ioffe & Szegedy's Fig. 1, Karpathy's makemore part 3).

Every function here reads the model without changing it: forward passes run under
:func:`bnutils.state.preserved_state`. "Layers" are the hidden activation modules (``model.activations``
of a :class:`bnutils.models.Net`, else every activation module found) for activation statistics,
and the weight layers (``model.weight_layers``, else every Linear/Conv) for gradients and updates.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .state import preserved_state
from .training import loss_function

SATURATION_THRESHOLD = 0.97
"""tanh is saturated where |tanh(z)| > 0.97; sigmoid where σ(z) < 0.03 or σ(z) > 0.97 (|σ - ½| > 0.47)."""

_ACTIVATION_TYPES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU)


def find_activations(model: nn.Module) -> list[nn.Module]:
    """The hidden activation modules, in forward order."""
    acts = getattr(model, "activations", None)
    if acts is None:
        acts = [m for m in model.modules() if isinstance(m, _ACTIVATION_TYPES)]
    return list(acts)


def find_weight_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear/Conv layers, in forward order (the output layer last)."""
    layers = getattr(model, "weight_layers", None)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return list(layers)


def activation_kind(module: nn.Module) -> str:
    """'sigmoid', 'tanh', 'relu' or 'other' (saturation and dead units are defined for the first three)."""
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.ReLU):
        return "relu"
    return "other"


def capture_activations(model: nn.Module, x: torch.Tensor, *, train_mode: bool = False,
                        layers: Sequence[nn.Module] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(x)`` once and return, per activation layer, (pre-activation, activation).

    Each tensor has shape (N, width) or (N, C, H, W), detached. ``train_mode=False`` (default)
    evaluates in eval mode (BN uses running statistics, no dropout, no BN noise);
    ``train_mode=True`` in training mode (batch statistics). Either way the model's parameters,
    buffers, modes and RNG states are left exactly as they were.
    """
    layers = find_activations(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("the model has no activation layers to capture")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index):
        def fn(module, inputs, output):
            captured[index] = (inputs[0].detach(), output.detach())
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with preserved_state(model), torch.no_grad():
            model.train(train_mode)
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(layers))]


def _per_unit(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C): one column per unit/channel."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).T if t.ndim > 2 else t


def unit_percentiles(pre: torch.Tensor, unit: int | None = 0,
                     q: Sequence[float] = (15, 50, 85)) -> np.ndarray:
    """Percentiles ``q`` (in %) of one unit's values over the batch (and positions); (len(q),).

    ``unit=None`` pools every unit of the layer. Computed with ``np.percentile`` (linear interpolation).
    """
    cols = _per_unit(pre)
    values = cols.reshape(-1) if unit is None else cols[:, unit]
    return np.percentile(values.double().numpy(), q)


def saturation_fraction(post: torch.Tensor, kind: str) -> float:
    """Fraction of activation values in the flat tails: |tanh| > 0.97; sigmoid < 0.03 or > 0.97.

    ``kind`` is "tanh" or "sigmoid"; for any other activation the answer is nan (not defined).
    """
    if kind == "tanh":
        return float((post.abs() > SATURATION_THRESHOLD).double().mean())
    if kind == "sigmoid":
        return float(((post - 0.5).abs() > SATURATION_THRESHOLD - 0.5).double().mean())
    return float("nan")


def dead_unit_fraction(post: torch.Tensor) -> float:
    """Fraction of units (channels) whose activation is exactly 0 for every example (and position).

    Meant for ReLU outputs on an evaluation batch: such a unit passes no gradient to its weights
    on that batch. Shape (N, width) or (N, C, *spatial).
    """
    cols = _per_unit(post)
    return float((cols == 0).all(dim=0).double().mean())


def activation_stats(model: nn.Module, x: torch.Tensor, *, percentiles: Sequence[float] = (15, 50, 85),
                     unit: int | None = 0, train_mode: bool = False) -> dict[str, np.ndarray]:
    """Statistics of every hidden layer on the batch ``x``; arrays indexed by layer (L = #layers).

    - ``pre_pct`` (L, len(percentiles)): percentiles of unit ``unit``'s pre-activation (the input
      of the nonlinearity, after BN when BN comes before it) — Ioffe & Szegedy's Fig. 1;
    - ``pre_mean``, ``pre_std``, ``post_mean``, ``post_std`` (L,): over all examples and units;
    - ``saturation`` (L,): :func:`saturation_fraction` (nan for non-saturating activations);
    - ``dead_fraction`` (L,): :func:`dead_unit_fraction` for ReLU layers, nan otherwise;
    - ``zero_fraction`` (L,): fraction of activation values exactly 0 (inactive ReLU outputs).
    """
    layers = find_activations(model)
    captured = capture_activations(model, x, train_mode=train_mode, layers=layers)
    out: dict[str, list] = {k: [] for k in ("pre_pct", "pre_mean", "pre_std", "post_mean", "post_std",
                                            "saturation", "dead_fraction", "zero_fraction")}
    for module, (pre, post) in zip(layers, captured, strict=True):
        kind = activation_kind(module)
        out["pre_pct"].append(unit_percentiles(pre, unit, percentiles))
        pre64, post64 = pre.double(), post.double()
        out["pre_mean"].append(float(pre64.mean()))
        out["pre_std"].append(float(pre64.std(unbiased=False)))
        out["post_mean"].append(float(post64.mean()))
        out["post_std"].append(float(post64.std(unbiased=False)))
        out["saturation"].append(saturation_fraction(post, kind))
        out["dead_fraction"].append(dead_unit_fraction(post) if kind == "relu" else float("nan"))
        out["zero_fraction"].append(float((post == 0).double().mean()))
    return {k: np.array(v) for k, v in out.items()}


def layer_grad_norms(model: nn.Module, layers: Sequence[nn.Module] | None = None,
                     attr: str = "weight") -> np.ndarray:
    """l2 (Frobenius) norm of each layer's current ``.grad`` of ``attr`` ("weight" or "bias"); (L,).

    A missing gradient counts as 0. Reads ``.grad``: call after ``loss.backward()``.
    """
    layers = find_weight_layers(model) if layers is None else list(layers)
    norms = []
    for layer in layers:
        p = getattr(layer, attr, None)
        norms.append(0.0 if p is None or p.grad is None else float(torch.linalg.vector_norm(p.grad.double())))
    return np.array(norms)


def gradient_norms(model: nn.Module, loss_fn: str | Callable, x: torch.Tensor, y: torch.Tensor, *,
                   attr: str = "weight") -> np.ndarray:
    """Per-layer gradient norms of ``loss_fn(model(x), y)`` at the current parameters; (L,).

    ``loss_fn``: a callable or a name accepted by :func:`bnutils.train` ("cross_entropy", "mse", "bce").

    For "at initialization" measurements: the model's mode is used as it is (training mode:
    BN with batch statistics) and everything, ``.grad`` included, is restored afterwards.
    """
    loss_fn = loss_function(loss_fn)
    with preserved_state(model):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        return layer_grad_norms(model, attr=attr)


def weight_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the weight layers' weights, to pass to :func:`update_ratios` after an update."""
    return [layer.weight.detach().clone() for layer in find_weight_layers(model)]


def update_ratios(model: nn.Module, before: Sequence[torch.Tensor]) -> np.ndarray:
    """update:data ratio per weight layer, ||W_after - W_before||₂ / ||W_before||₂; (L,).

    This is the update the optimizer actually made, so it equals ||lr · grad|| / ||W|| for plain
    SGD and stays right for momentum/Adam. (Karpathy plots log10 of a similar ratio of standard
    deviations; ~1e-3 per step is his rule of thumb.)
    """
    layers = find_weight_layers(model)
    if len(before) != len(layers):
        raise ValueError(f"expected {len(layers)} weight snapshots (one per weight layer), got {len(before)}")
    ratios = []
    for layer, w0 in zip(layers, before, strict=True):
        w0d = w0.double()
        ratios.append(float(torch.linalg.vector_norm(layer.weight.detach().double() - w0d)
                            / torch.linalg.vector_norm(w0d)))
    return np.array(ratios)
