"""Plain SGD and Adam with torch.optim's update rules, without torch.optim's start-up cost.

Constructing the first ``torch.optim`` optimizer in a process imports ``torch._dynamo``, which
takes several seconds on a small machine — a large share of a chapter's 60 s budget. These two
classes do the same arithmetic as ``torch.optim.SGD``/``Adam`` (single-tensor path, tested equal)
with the small interface the training loop needs: ``param_groups[0]["lr"]``, ``zero_grad``, ``step``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class _Optimizer:
    def __init__(self, params: Iterable[torch.Tensor], lr: float, **defaults):
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        self.params = params
        self.param_groups = [{"params": params, "lr": float(lr), **defaults}]
        self.state: dict[int, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class SGD(_Optimizer):
    """``torch.optim.SGD`` (momentum, dampening 0, optional Nesterov, L2 weight decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in self.params:
            if p.grad is None:
                continue
            d_p = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if momentum != 0:
                state = self.state.setdefault(id(p), {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf.mul_(momentum).add_(d_p)
                d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.add_(d_p, alpha=-lr)


class Adam(_Optimizer):
    """``torch.optim.Adam`` (bias-corrected moments, L2 weight decay added to the gradient)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0 or weight_decay < 0:
            raise ValueError(f"expected betas in [0, 1), eps >= 0, weight_decay >= 0, got {betas}, {eps}, "
                             f"{weight_decay}")
        super().__init__(params, lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in self.params:
            if p.grad is None:
                continue
            grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            state = self.state.setdefault(id(p), {})
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1 ** t)
            denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
