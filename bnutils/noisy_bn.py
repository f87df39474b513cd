"""Santurkar et al. (2018)'s "noisy" batch norm: BN followed by time-varying, non-zero-mean,
non-unit-variance noise, which *adds* distributional instability (internal covariate shift)."""
from __future__ import annotations

import math

import torch
from torch import nn

WALK_LOG_STD_RATIO = 0.25
"""In a random walk, log sigma steps by ``WALK_LOG_STD_RATIO * walk_step``: the ratio of the sds of
sigma and mu under the fresh draws, (0.25/sqrt 12) / (1/sqrt 12)."""


class _NoisyBatchNorm:
    """Mixin: draw the noise from the module's own ``torch.Generator`` and apply it after BN.

    Placed before the torch BatchNorm class in the bases, so its constructor takes torch's arguments
    (passed on unchanged) plus the noise settings."""

    eval_walk = True  # eval mode of a drifting layer applies the walk's current sigma and mu

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, mean_range: float = 0.5, std_range: tuple[float, float] = (1.0, 1.25),
                 shift_spread: float = 0.1, scale_std: float = 0.1, seed: int = 0,
                 walk_step: float | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        lo, hi = (float(v) for v in std_range)
        if mean_range < 0 or shift_spread < 0 or scale_std < 0 or not 0 <= lo <= hi:
            raise ValueError("expected mean_range >= 0, shift_spread >= 0, scale_std >= 0 and "
                             f"0 <= std_range[0] <= std_range[1]; got mean_range={mean_range}, "
                             f"std_range={std_range}, shift_spread={shift_spread}, scale_std={scale_std}")
        if walk_step is not None and not (walk_step >= 0 and lo > 0):
            raise ValueError(f"walk_step must be None or >= 0 (with std_range[0] > 0), got {walk_step!r}")
        self.mean_range, self.std_range = float(mean_range), (lo, hi)
        self.shift_spread, self.scale_std = float(shift_spread), float(scale_std)
        self.walk_step = None if walk_step is None else float(walk_step)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # The random walk's state (mu, log sigma): buffers, so that bnutils.preserved_state restores
        # them; not persistent, so the state_dict keys stay those of torch's BatchNorm.
        self.register_buffer("walk_state", torch.tensor([0.0, math.log((lo + hi) / 2)], dtype=torch.float64),
                             persistent=False)

    def draw_noise(self, shape, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One draw for one layer and step: returns (scale, shift, mu, sigma), scale/shift of ``shape``.

        mu ~ U(-mean_range, mean_range) and sigma ~ U(*std_range) once per call (per layer and
        step); then per element shift ~ U(mu - shift_spread, mu + shift_spread) and
        scale ~ N(sigma, scale_std**2) (``scale_std`` is a standard deviation).
        """
        g = self.generator
        if self.walk_step is None:
            u_mu, u_sigma = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            mu = (2 * u_mu - 1) * self.mean_range
            lo, hi = self.std_range
            sigma = lo + (hi - lo) * u_sigma
        else:  # one random-walk step of (mu, log sigma), then the same per-element jitter
            step = torch.randn(2, generator=g, dtype=torch.float64) * self.walk_step
            step[1] *= WALK_LOG_STD_RATIO
            self.walk_state.add_(step.to(self.walk_state))
            mu, sigma = self.walk_mu_sigma()
        shift = torch.empty(shape, dtype=dtype).uniform_(mu - self.shift_spread, mu + self.shift_spread,
                                                         generator=g)
        scale = torch.empty(shape, dtype=dtype).normal_(sigma, self.scale_std, generator=g)
        return scale, shift, mu, sigma

    def walk_mu_sigma(self) -> tuple[float, float]:
        """The random walk's current (mu, sigma); (0, middle of std_range) before the first step."""
        mu, log_sigma = self.walk_state.tolist()
        return mu, math.exp(log_sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            if self.walk_step is not None and self.eval_walk:
                mu, sigma = self.walk_mu_sigma()   # the drift's current state, without the jitter
                return y * sigma + mu
            return y
        scale, shift, _, _ = self.draw_noise(y.shape, y.dtype)
        return torch.addcmul(shift, y, scale)  # scale * y + shift

    def extra_repr(self) -> str:
        walk = "" if self.walk_step is None else f", walk_step={self.walk_step}"
        return (super().extra_repr() + f", mean_range={self.mean_range}, std_range={self.std_range}, "
                f"shift_spread={self.shift_spread}, scale_std={self.scale_std}, seed={self.seed}{walk}")


_DOC = """{name}: ``torch.nn.{base}`` followed, in training mode only, by Santurkar et al.'s noise.

What is implemented, exactly: ``z = BN(x)`` (batch statistics, running statistics updated, γ and β
applied as in ``torch.nn.{base}``), then ``out = s * z + m`` where, for every call in training mode
(one call per layer per training step),

- ``mu ~ U(-mean_range, mean_range)`` and ``sigma ~ U(std_range[0], std_range[1])`` are two scalars
  for the whole layer (defaults 0.5 and (1, 1.25));
- ``m`` and ``s`` have the full shape of ``z`` {shape} (one value per example and element):
  ``m ~ U(mu - shift_spread, mu + shift_spread)`` (default spread 0.1) and
  ``s ~ N(sigma, scale_std**2)`` (default standard deviation 0.1), all independent.

**Drifting variant** (``walk_step`` given): ``mu`` and ``sigma`` are not redrawn at every step but
follow a random walk, so the shift *accumulates* over training instead of jittering around zero.
They start at 0 and the middle of ``std_range``; every training-mode call first takes one step,
``mu += walk_step * N(0, 1)`` and ``log sigma += WALK_LOG_STD_RATIO * walk_step * N(0, 1)``
(unbounded), then draws the per-element ``m`` and ``s`` around them as above. The state lives in
the non-persistent buffer ``walk_state`` = (mu, log sigma). In eval mode a drifting layer outputs
``sigma * z + mu`` with the current state and no jitter (set ``eval_walk = False`` for plain BN).

The noise is a constant for autograd (no gradient flows into it). It is drawn from the module's
own ``self.generator`` (a ``torch.Generator`` seeded with ``seed``), so runs are reproducible and
the global torch RNG is untouched. In eval mode the layer is exactly ``torch.nn.{base}`` (no noise),
except for the drifting variant.
The defaults are the book's reading of Santurkar et al. (2018), "How does batch normalization help
optimization?", NeurIPS, Sec. 2.1 ("noisy" BatchNorm: i.i.d. noise with a non-zero mean and a
non-unit variance, redrawn at every training step, injected after each BN layer).
"""


class NoisyBatchNorm1d(_NoisyBatchNorm, nn.BatchNorm1d):
    pass


class NoisyBatchNorm2d(_NoisyBatchNorm, nn.BatchNorm2d):
    pass


NoisyBatchNorm1d.__doc__ = _DOC.format(name="NoisyBatchNorm1d", base="BatchNorm1d", shape="(N, C)")
NoisyBatchNorm2d.__doc__ = _DOC.format(name="NoisyBatchNorm2d", base="BatchNorm2d", shape="(N, C, H, W)")
