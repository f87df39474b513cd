"""Santurkar et al. (2018)'s loss-landscape probes (their Sec. 3.2, Fig. 4), without side effects.

At the current parameters x and one mini-batch, with g = ∇L(x), move to x' = x - η g for a few
step sizes η and measure there the loss L(x') and the gradient ∇L(x'):

- loss range        max_η L(x') - min_η L(x')                  (how much the loss varies along g);
- gradient predictiveness  max_η ||∇L(x') - g||₂               (how far the gradient drifts);
- effective β-smoothness   max_η ||∇L(x') - g||₂ / ||x' - x||₂  (a local Lipschitz constant of ∇L).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .state import preserved_state
from .training import loss_function


@dataclass
class ProbeResult:
    """One probe. Arrays have one entry per step size, in the order given."""

    step_sizes: np.ndarray
    loss0: float           # L(x) on the batch
    grad_norm: float       # ||g||₂ (all trainable parameters, flattened)
    losses: np.ndarray     # L(x - η g)
    grad_dist: np.ndarray  # ||∇L(x - η g) - g||₂
    distances: np.ndarray  # ||x' - x||₂ = η ||g||₂

    @property
    def loss_range(self) -> float:
        """max - min of the loss over the moved points (x itself is included only if 0 is a step size)."""
        return float(np.max(self.losses) - np.min(self.losses))

    @property
    def grad_predictiveness(self) -> float:
        """Largest l2 distance between the gradient at a moved point and at x (lower = more predictive)."""
        return float(np.max(self.grad_dist))

    @property
    def beta_smoothness(self) -> float:
        """Largest ||∇L(x') - ∇L(x)|| / ||x' - x|| over the moved points with x' != x."""
        moved = self.distances > 0
        if not moved.any():
            return float("nan")
        return float(np.max(self.grad_dist[moved] / self.distances[moved]))


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """All gradients concatenated into one float64 vector (zeros where ``.grad`` is None)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).double()
                      for p in params])


def probe_gradient_direction(model: nn.Module, loss_fn: str | Callable, x: torch.Tensor, y: torch.Tensor,
                             step_sizes: Sequence[float]) -> ProbeResult:
    """Probe the landscape along the negative gradient on the batch (x, y); see the module docstring.

    The model is evaluated in its current mode (training mode during training: BN uses the
    batch's statistics, as in the training loss). Every evaluation — at x and at each x' — starts
    from the same state: parameters, buffers (BN running statistics) and RNG states (global torch
    RNG, NoisyBatchNorm's generators) as on entry, so random layers (dropout, noisy BN) draw the
    same noise at every point and the curve is a function of η alone. On exit everything is
    restored bit for bit, including the parameters' ``.grad``: training continues as if the probe
    had never run. ``loss_fn(model(x), y)`` must return a scalar tensor (or give a loss name of
    :func:`bnutils.train`). Non-finite losses are
    returned as they are (the summaries are then nan/inf), never raised.
    """
    etas = np.asarray(step_sizes, dtype=np.float64)
    if etas.ndim != 1 or etas.size == 0 or not np.all(np.isfinite(etas)):
        raise ValueError(f"step_sizes must be a non-empty 1-D sequence of finite numbers, got {step_sizes!r}")
    loss_fn = loss_function(loss_fn)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters to probe")
    with preserved_state(model) as state:
        def evaluate(eta: float, direction: torch.Tensor | None) -> tuple[float, torch.Tensor]:
            state.restore(model)  # parameters, buffers, modes and RNGs as on entry
            if direction is not None:
                with torch.no_grad():
                    offset = 0
                    for p in params:
                        n = p.numel()
                        p.sub_((eta * direction[offset:offset + n]).view_as(p).to(p.dtype))
                        offset += n
            for p in params:
                p.grad = None
            loss = loss_fn(model(x), y)
            loss.backward()
            return float(loss.item()), flat_grad(params)

        loss0, g0 = evaluate(0.0, None)
        losses, dists = [], []
        for eta in etas:
            loss, g = evaluate(float(eta), g0)
            losses.append(loss)
            dists.append(float(torch.linalg.vector_norm(g - g0)))
    grad_norm = float(torch.linalg.vector_norm(g0))
    return ProbeResult(step_sizes=etas, loss0=loss0, grad_norm=grad_norm, losses=np.array(losses),
                       grad_dist=np.array(dists), distances=np.abs(etas) * grad_norm)
