"""Snapshot and restore everything a probe could disturb: parameters, gradients, buffers, modes, RNGs.

Diagnostics that run extra forward/backward passes in the middle of training (the landscape probe,
activation statistics in training mode) wrap their work in :func:`preserved_state`, so that
training continues exactly as if they had never run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def module_generators(model: nn.Module) -> list[torch.Generator]:
    """Every ``torch.Generator`` held as an attribute by a submodule (e.g. NoisyBatchNorm's)."""
    gens, seen = [], set()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Generator) and id(value) not in seen:
                seen.add(id(value))
                gens.append(value)
    return gens


@dataclass
class RNGState:
    """The global torch CPU RNG state and the states of a model's own generators."""

    global_state: torch.Tensor
    generators: list[torch.Generator]
    generator_states: list[torch.Tensor]

    @classmethod
    def capture(cls, model: nn.Module) -> RNGState:
        gens = module_generators(model)
        return cls(torch.get_rng_state(), gens, [g.get_state() for g in gens])

    def restore(self) -> None:
        torch.set_rng_state(self.global_state)
        for gen, state in zip(self.generators, self.generator_states, strict=True):
            gen.set_state(state)


@dataclass
class ModelState:
    """Copies of a model's parameters, their ``.grad``, its buffers, training flags and RNG states."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]
    training: list[bool]
    rng: RNGState

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        params = list(model.parameters())
        return cls(
            params=[p.detach().clone() for p in params],
            grads=[None if p.grad is None else p.grad.detach().clone() for p in params],
            buffers=[b.detach().clone() for b in model.buffers()],
            training=[m.training for m in model.modules()],
            rng=RNGState.capture(model),
        )

    def restore(self, model: nn.Module) -> None:
        """Write the saved values back in place (bit for bit)."""
        params, buffers, modules = list(model.parameters()), list(model.buffers()), list(model.modules())
        if len(params) != len(self.params) or len(buffers) != len(self.buffers):
            raise ValueError("the model's parameters or buffers changed since the state was captured")
        with torch.no_grad():
            for p, saved, grad in zip(params, self.params, self.grads, strict=True):
                p.copy_(saved)
                p.grad = None if grad is None else grad.clone()
            for b, saved in zip(buffers, self.buffers, strict=True):
                b.copy_(saved)
        for m, flag in zip(modules, self.training, strict=True):
            m.training = flag
        self.rng.restore()


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Context manager: on exit, restore the model's parameters, gradients, buffers (BN running
    statistics, ``num_batches_tracked``), train/eval flags, the global torch RNG and the model's
    own generators to what they were on entry, even if the body raised.

    >>> with preserved_state(model):
    ...     model.train(); model(x)          # running statistics change here ...
    ... # ... and are back to their old values here
    """
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore(model)
