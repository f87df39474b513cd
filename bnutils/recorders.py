"""Recorders: the diagnostics of :mod:`bnutils.diagnostics` and :mod:`bnutils.landscape` as hooks
for :func:`bnutils.train` (``train(..., record=[GradNorms(), ActivationStats(), ...])``).

Each records every ``every`` steps (default: the loop's ``eval_every``) and ends up in
``history.records[name]`` as ``{"step": (k,), key: (k, ...)}``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .diagnostics import activation_stats, layer_grad_norms, update_ratios, weight_snapshot
from .landscape import probe_gradient_direction
from .training import Recorder


class GradNorms(Recorder):
    """Per-weight-layer gradient norms ||∂L/∂W||₂ of the training batch, before the update.

    Keys: ``grad_norm`` (k, L) for weights; with ``bias=True`` also ``bias_grad_norm`` (k, L).
    """

    name = "grad_norms"

    def __init__(self, every: int | None = None, *, bias: bool = False, name: str | None = None):
        super().__init__(every, name)
        self.bias = bias

    def on_backward(self, step, model, ctx):
        row = {"grad_norm": layer_grad_norms(model)}
        if self.bias:
            row["bias_grad_norm"] = layer_grad_norms(model, attr="bias")
        self.steps.append(step)
        self.rows.append(row)


class UpdateRatios(Recorder):
    """Per-weight-layer update:data ratio ||ΔW||₂ / ||W||₂ of the update made at the step; key
    ``update_ratio`` (k, L). Equals ||lr·grad|| / ||W|| for plain SGD."""

    name = "update_ratios"

    def on_backward(self, step, model, ctx):
        self._before = weight_snapshot(model)

    def on_update(self, step, model, ctx):
        self.steps.append(step)
        self.rows.append({"update_ratio": update_ratios(model, self._before)})
        self._before = None


class ActivationStats(Recorder):
    """:func:`bnutils.diagnostics.activation_stats` of every hidden layer at checkpoints.

    ``x``: the evaluation batch; default: the first ``max_examples`` test examples (training
    examples when there is no test set). Eval mode by default (``train_mode=True``: batch
    statistics, state restored). Keys: pre_pct (k, L, P), pre_mean, pre_std, post_mean, post_std,
    saturation, dead_fraction, zero_fraction (k, L).
    """

    name = "activations"

    def __init__(self, every: int | None = None, *, x: torch.Tensor | np.ndarray | None = None,
                 percentiles: Sequence[float] = (15, 50, 85), unit: int | None = 0,
                 train_mode: bool = False, max_examples: int = 1000, name: str | None = None):
        super().__init__(every, name)
        self.x = x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        self.percentiles, self.unit, self.train_mode = tuple(percentiles), unit, train_mode
        self.max_examples = max_examples

    def start(self, model, ctx):
        super().start(model, ctx)
        if self.x is not None:
            self._x = self.x.float()
        else:
            X = ctx.X_test if ctx.X_test is not None else ctx.X_train
            self._x = X[: self.max_examples]

    def on_eval(self, step, model, ctx):
        self.steps.append(step)
        self.rows.append(activation_stats(model, self._x, percentiles=self.percentiles, unit=self.unit,
                                          train_mode=self.train_mode))


class LandscapeProbe(Recorder):
    """Santurkar et al.'s probes at the training batch, along the gradient, with step sizes
    ``lr * multipliers`` (the current learning rate). Leaves training unchanged (state restored).

    Keys: ``losses``, ``grad_dist`` (k, M); ``loss0``, ``grad_norm``, ``loss_range``,
    ``grad_predictiveness``, ``beta_smoothness`` (k,); ``weight_norm`` (k, L), the l2 norm of each
    weight layer's weight at the probe point. Raw-parameter probes are not scale-invariant: for a
    layer followed by BN, weights c times larger give the same function with gradients 1/c and
    curvature 1/c² as large, so compare them together with the weight norms. See
    :mod:`bnutils.landscape`.
    """

    name = "landscape"

    def __init__(self, every: int | None = None, *, multipliers: Sequence[float] = (0.5, 1, 2, 3, 4),
                 name: str | None = None):
        super().__init__(every, name)
        self.multipliers = np.asarray(multipliers, dtype=np.float64)

    def on_backward(self, step, model, ctx):
        res = probe_gradient_direction(model, ctx.loss_fn, ctx.x_batch, ctx.y_batch,
                                       ctx.lr * self.multipliers)
        self.steps.append(step)
        self.rows.append({"losses": res.losses, "grad_dist": res.grad_dist, "loss0": res.loss0,
                          "grad_norm": res.grad_norm, "loss_range": res.loss_range,
                          "grad_predictiveness": res.grad_predictiveness,
                          "beta_smoothness": res.beta_smoothness,
                          "weight_norm": np.array([float(torch.linalg.vector_norm(w.double()))
                                                   for w in weight_snapshot(model)])})
