"""A training dashboard: per-layer activation and gradient histograms, saturation and
update:data ratios over a short training run, drawn in one figure for several models
(Karpathy's makemore part 3 diagnostics, with and without batch norm).

:func:`record_training` trains a model with :func:`bnutils.train` and a :class:`DashboardRecorder`
that reads the model without changing its trajectory (every probe runs under
:func:`bnutils.state.preserved_state`); :func:`plot_dashboard` draws the records side by side.

- Activations: the outputs of every hidden activation module on a fixed probe batch, in training
  mode (BN normalizes with the probe batch's statistics, as during training).
- Gradients: ∂L/∂(activation output) on the same probe batch (L the mean loss over the probe batch).
- Saturation: :func:`bnutils.diagnostics.saturation_fraction` of each layer on the probe batch.
- update:data ratio of weight layer l at update s: std(W_after - W_before) / std(W_before), which is
  std(lr·grad) / std(W) for plain SGD (Karpathy plots its log10; ~1e-3 is his rule of thumb).
  Standard deviations are over all entries of the weight, in float64, population (ddof=0).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .diagnostics import (
    activation_kind,
    find_activations,
    find_weight_layers,
    saturation_fraction,
    weight_snapshot,
)
from .state import preserved_state
from .training import History, Recorder, TrainContext, loss_function, train

UPDATE_RATIO_GUIDE = 1e-3
"""Karpathy's rule of thumb for the update:data ratio per step (drawn as a guide line)."""


def std_ratio(update: torch.Tensor, data: torch.Tensor) -> float:
    """std(update) / std(data) over all entries, float64, ddof=0 (nan when std(data) is 0)."""
    u, d = update.detach().double(), data.detach().double()
    sd = float(d.std(unbiased=False))
    return float(u.std(unbiased=False)) / sd if sd > 0 else float("nan")


def capture_activation_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             loss_fn: str | Callable = "cross_entropy", *, train_mode: bool = True,
                             layers: Sequence[nn.Module] | None = None
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``loss_fn(model(x), y).backward()`` once; per activation layer, (activation, ∂L/∂activation).

    Both detached, shape of the activation output. ``train_mode=True`` (default) uses batch
    statistics in BN. The model's parameters, ``.grad``, buffers, modes and RNGs are restored.
    """
    layers = find_activations(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("the model has no activation layers to capture")
    loss_fn = loss_function(loss_fn)
    outputs: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, inputs, output):
            output.retain_grad()
            outputs[index] = output
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with preserved_state(model), torch.enable_grad():
            model.train(train_mode)
            loss_fn(model(x), y).backward()
            result = []
            for i in range(len(layers)):
                out = outputs[i]
                grad = torch.zeros_like(out) if out.grad is None else out.grad
                result.append((out.detach().clone(), grad.detach().clone()))
    finally:
        for h in handles:
            h.remove()
    return result


@dataclass
class DashboardRecord:
    """What :func:`record_training` recorded (L hidden activation layers, W weight layers).

    - ``layer_names`` (L), ``weight_layer_names`` (W);
    - ``update_steps`` (S,) and ``update_ratio`` (S, W): std(ΔW)/std(W) of update s;
    - ``saturation_steps`` (K,) and ``saturation`` (K, L): checkpoints (updates done) and the
      fraction of saturated activations of each layer on the probe batch (nan if not tanh/sigmoid);
    - ``activations``, ``gradients``: {checkpoint: [per-layer flat float32 arrays]}, the probe
      batch's activation outputs and ∂L/∂activation at the checkpoints ``hist_steps``;
    - ``train_loss`` (S,), ``history`` (the :class:`bnutils.History` of the run), ``lr``, ``label``.
    """

    layer_names: list[str]
    weight_layer_names: list[str]
    update_steps: np.ndarray
    update_ratio: np.ndarray
    saturation_steps: np.ndarray
    saturation: np.ndarray
    activations: dict[int, list[np.ndarray]]
    gradients: dict[int, list[np.ndarray]]
    train_loss: np.ndarray
    history: History | None = None
    lr: float = float("nan")
    label: str = ""
    config: dict = field(default_factory=dict)

    @property
    def hist_steps(self) -> list[int]:
        return sorted(self.activations)

    def histogram(self, kind: str, step: int | None = None, bins: int | Sequence[float] = 40,
                  range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Histograms of ``kind`` ("activations" or "gradients") per layer at checkpoint ``step``
        (default: the last one recorded): (counts (L, B), edges (B+1,)), the same edges for every
        layer. The default range covers every value of every layer, so each row sums to the number
        of values of that layer."""
        if kind not in ("activations", "gradients"):
            raise ValueError(f"kind must be 'activations' or 'gradients', got {kind!r}")
        data = getattr(self, kind)
        step = self.hist_steps[-1] if step is None else step
        if step not in data:
            raise ValueError(f"no {kind} recorded at step {step!r}; recorded steps: {self.hist_steps}")
        values = data[step]
        if range is None:
            lo = min(float(v.min()) for v in values)
            hi = max(float(v.max()) for v in values)
            m = max(abs(lo), abs(hi)) or 1.0
            range = (-m, m)
        edges = np.histogram_bin_edges(np.zeros(1), bins=bins, range=range)
        counts = np.stack([np.histogram(v, bins=edges)[0] for v in values])
        return counts, edges

    def log10_update_ratio(self) -> np.ndarray:
        """log10 of ``update_ratio`` (S, W) (-inf where an update was exactly zero)."""
        with np.errstate(divide="ignore"):
            return np.log10(self.update_ratio)


class DashboardRecorder(Recorder):
    """The recorder behind :func:`record_training`: update:data ratios at every update it is due
    (``every``, default 1), saturation every ``saturation_every`` checkpoints (and the last one),
    activation/gradient samples at the checkpoints ``hist_steps``, all on the probe batch ``x``/``y``."""

    name = "dashboard"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, hist_steps: Sequence[int] = (0,),
                 saturation_every: int = 10, total_steps: int | None = None, every: int = 1,
                 train_mode: bool = True, name: str | None = None):
        super().__init__(every, name)
        se = saturation_every
        if isinstance(se, bool) or not isinstance(se, int) or se < 1:
            raise ValueError(f"saturation_every must be a positive int, got {saturation_every!r}")
        self.x, self.y = x, y
        self.hist_steps = {int(s) for s in hist_steps}
        self.saturation_every, self.train_mode = saturation_every, train_mode
        self.total_steps = total_steps

    def start(self, model, ctx: TrainContext):
        super().start(model, ctx)
        self.layers = find_activations(model)
        if not self.layers:
            raise ValueError("the model has no activation layers (nn.Tanh, nn.ReLU, ...) to record")
        self.kinds = [activation_kind(m) for m in self.layers]
        self.weight_layers = find_weight_layers(model)
        self.sat_steps: list[int] = []
        self.sat_rows: list[np.ndarray] = []
        self.acts: dict[int, list[np.ndarray]] = {}
        self.grads: dict[int, list[np.ndarray]] = {}
        self._loss_fn = ctx.loss_fn

    def on_eval(self, step, model, ctx):
        want_hist = step in self.hist_steps
        # every checkpoint is offered when every=1; the last one is step == total_steps
        want_sat = step % self.saturation_every == 0 or step == self.total_steps
        if not (want_hist or want_sat):
            return
        captured = capture_activation_grads(model, self.x, self.y, self._loss_fn,
                                            train_mode=self.train_mode, layers=self.layers)
        if want_sat:
            self.sat_steps.append(step)
            self.sat_rows.append(np.array([saturation_fraction(a, k)
                                           for (a, _), k in zip(captured, self.kinds, strict=True)]))
        if want_hist:
            self.acts[step] = [a.reshape(-1).numpy().astype(np.float32) for a, _ in captured]
            self.grads[step] = [g.reshape(-1).numpy().astype(np.float32) for _, g in captured]

    def on_backward(self, step, model, ctx):
        self._before = weight_snapshot(model)

    def on_update(self, step, model, ctx):
        self.steps.append(step)
        self.rows.append({"update_ratio": np.array([
            std_ratio(layer.weight.detach() - w0, w0)
            for layer, w0 in zip(self.weight_layers, self._before, strict=True)])})
        self._before = None


def _layer_names(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names.get(id(m), f"layer{i}") or f"layer{i}" for i, m in enumerate(modules, start=1)]


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.as_tensor(a)
    raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(a).__name__}")


def record_training(model: nn.Module, X, y, *, steps: int = 1000, lr: float = 0.1, batch_size: int = 32,
                    optimizer: str | Callable = "sgd", momentum: float = 0.0, seed: int = 0,
                    loss: str | Callable = "cross_entropy", probe: int = 512,
                    hist_steps: Sequence[int] | None = None, saturation_every: int | None = None,
                    label: str = "") -> DashboardRecord:
    """Train ``model`` in place on (X, y) for ``steps`` updates with :func:`bnutils.train` and
    record the dashboard's diagnostics; returns a :class:`DashboardRecord`.

    ``probe``: the first ``probe`` training examples form the fixed batch on which activations,
    gradients and saturation are measured (training mode, state restored). ``hist_steps``: the
    checkpoints (updates done, 0 … steps) with histogram samples (default: 0 and ``steps``).
    ``saturation_every``: default ``max(1, steps // 50)``. Training is exactly what
    ``bnutils.train(model, (X, y), steps=steps, lr=lr, batch_size=batch_size, seed=seed, ...)``
    would do: the probes never change the trajectory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    X, y = _as_tensor(X, "X"), _as_tensor(y, "y")
    if X.ndim < 2:
        raise ValueError(f"X must have shape (N, features...), got shape {tuple(X.shape)}")
    if len(X) != len(y):
        raise ValueError(f"X and y must have the same number of examples, got {len(X)} and {len(y)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(probe, int) or isinstance(probe, bool) or not 2 <= probe:
        raise ValueError(f"probe must be an int >= 2 (examples in the probe batch), got {probe!r}")
    hist_steps = (0, steps) if hist_steps is None else tuple(hist_steps)
    for s in hist_steps:
        if not isinstance(s, (int, np.integer)) or not 0 <= s <= steps:
            raise ValueError(f"hist_steps must be checkpoints in 0..steps={steps}, got {s!r}")
    saturation_every = max(1, steps // 50) if saturation_every is None else saturation_every
    X = X.float()
    if loss == "cross_entropy":
        y = y.long()
    elif isinstance(loss, str):
        y = y.float()
    xp, yp = X[:probe], y[:probe]
    rec = DashboardRecorder(xp, yp, hist_steps=hist_steps, saturation_every=saturation_every,
                            total_steps=steps)
    hist = train(model, (X, y), lr=lr, steps=steps, batch_size=batch_size, optimizer=optimizer,
                 momentum=momentum, seed=seed, loss=loss, eval_every=None, eval_train=False, record=[rec])
    ratios = rec.result().get("update_ratio", np.zeros((0, len(rec.weight_layers))))
    return DashboardRecord(
        layer_names=_layer_names(model, rec.layers),
        weight_layer_names=_layer_names(model, rec.weight_layers),
        update_steps=np.array(rec.steps, dtype=np.int64), update_ratio=np.asarray(ratios, dtype=np.float64),
        saturation_steps=np.array(rec.sat_steps, dtype=np.int64),
        saturation=np.array(rec.sat_rows, dtype=np.float64).reshape(len(rec.sat_steps), len(rec.layers)),
        activations=rec.acts, gradients=rec.grads, train_loss=hist.train_loss, history=hist,
        lr=float(lr), label=label,
        config=dict(steps=steps, batch_size=batch_size, seed=seed, probe=len(xp), hist_steps=hist_steps,
                    saturation_every=saturation_every, diverged=hist.diverged),
    )


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` steps along axis 0 (valid part only)."""
    if window <= 1 or len(values) < window:
        return values
    c = np.cumsum(np.vstack([np.zeros((1,) + values.shape[1:]), values]), axis=0)
    return (c[window:] - c[:-window]) / window


def plot_dashboard(records: Mapping[str, DashboardRecord], *, step: int | None = None, bins: int = 50,
                   smooth: int = 10, figsize: tuple[float, float] | None = None):
    """One figure comparing the records (columns: one per record, e.g. {"no BN": a, "BN": b}).

    Rows: activation histograms per layer at checkpoint ``step`` (default: the last recorded),
    gradient histograms ∂L/∂activation per layer (same step; one symmetric range for all columns
    that covers 99.5% of the values, the tails beyond it are not drawn),
    saturation per layer over training (%), and log10 update:data ratio per weight layer over
    updates (running mean over ``smooth`` updates) with the 1e-3 guide line. Layers are coloured
    from the colour-blind-safe ``bnutils.PALETTE``, alternately solid and dashed. Returns
    the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from .plotting import PALETTE

    if not isinstance(records, Mapping) or not records:
        raise TypeError("records must be a non-empty mapping {label: DashboardRecord}, "
                        f"got {type(records).__name__}")
    for key, r in records.items():
        if not isinstance(r, DashboardRecord):
            raise TypeError(f"records[{key!r}] must be a DashboardRecord (from record_training), "
                            f"got {type(r).__name__}")
    recs = list(records.items())
    ncols = len(recs)
    fig, axes = plt.subplots(4, ncols, figsize=figsize or (3.6 * ncols + 1.4, 11.5), squeeze=False,
                             sharey="row")
    n_layers = max(len(r.layer_names) for _, r in recs)
    n_weights = max(len(r.weight_layer_names) for _, r in recs)
    colors = [PALETTE[i % len(PALETTE)] for i in range(max(n_layers, n_weights))]
    styles = ["-" if i % 2 == 0 else (0, (4, 1.5)) for i in range(len(colors))]  # neighbours differ twice

    steps_used = [r.hist_steps[-1] if step is None else step for _, r in recs]
    # gradients have long tails: one symmetric range for every panel, covering 99.5% of the values
    gmax = max(float(np.percentile(np.abs(np.concatenate(r.gradients[s])), 99.5))
               for (_, r), s in zip(recs, steps_used, strict=True)) or 1.0
    amax = max(max(float(np.abs(a).max()) for a in r.activations[s]) for (_, r), s in zip(recs, steps_used,
                                                                                              strict=True))
    arange = (-1.0, 1.0) if amax <= 1.0 else (-amax, amax)

    for col, ((title, r), s) in enumerate(zip(recs, steps_used, strict=True)):
        for row, (kind, rng) in enumerate((("activations", arange), ("gradients", (-gmax, gmax)))):
            counts, edges = r.histogram(kind, s, bins=bins, range=rng)
            centers = (edges[:-1] + edges[1:]) / 2
            ax = axes[row, col]
            for i, c in enumerate(counts):
                frac = c / max(c.sum(), 1)
                ax.plot(centers, frac, color=colors[i], ls=styles[i], lw=1.5, label=r.layer_names[i])
            what = "activation output" if kind == "activations" else "∂L/∂activation"
            ax.set_title(f"{title}: {kind} at step {s}")
            ax.set_xlabel(what)
            if col == 0:
                ax.set_ylabel("fraction of values per bin")
        ax = axes[2, col]
        for i in range(r.saturation.shape[1]):
            ax.plot(r.saturation_steps, 100 * r.saturation[:, i], color=colors[i], ls=styles[i], lw=1.5,
                    label=r.layer_names[i])
        ax.set_title(f"{title}: saturation")
        ax.set_xlabel("update step")
        if col == 0:
            ax.set_ylabel("saturated activations (%)")
        ax = axes[3, col]
        lr_log = r.log10_update_ratio()
        sm = _smooth(lr_log, smooth)
        x = r.update_steps[len(r.update_steps) - len(sm):] if len(sm) else r.update_steps[:0]
        for i in range(sm.shape[1] if sm.ndim == 2 else 0):
            ax.plot(x, sm[:, i], color=colors[i], ls=styles[i], lw=1.5, label=r.weight_layer_names[i])
        ax.axhline(np.log10(UPDATE_RATIO_GUIDE), color="black", ls="--", lw=1.2, label="1e-3 guide")
        ax.set_title(f"{title}: update:data ratio")
        ax.set_xlabel("update step")
        if col == 0:
            ax.set_ylabel("log10 std(ΔW) / std(W)")
    for row in range(4):
        axes[row, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.suptitle("Training dashboard: " + " vs ".join(t for t, _ in recs))
    return fig
