"""A small, deterministic training loop that records a History and never crashes on divergence.

Data stay as tensors and mini-batches are index slices of a permutation drawn from the loop's own
``torch.Generator`` (no DataLoader); evaluation runs every ``eval_every`` updates; diagnostics plug
in as :class:`Recorder` objects (see :mod:`bnutils.recorders`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .optim import SGD, Adam
from .state import preserved_state

LOSSES = ("cross_entropy", "mse", "bce")
OPTIMIZERS = ("sgd", "adam")


class Recorder:
    """Base class of a diagnostic hook. Subclasses override any of the ``on_*`` methods and append
    to ``self.rows`` (one dict of NumPy values per record) and ``self.steps``.

    ``every``: record every that many steps (None: the loop's ``eval_every``).
    Timeline: a *checkpoint* t is the state after t updates (t = 0 … steps). ``on_eval(t, …)``
    runs at checkpoints t % every == 0 and at the last one; ``on_backward(s, …)`` runs in update
    s (s = 0 … steps-1, s % every == 0) after ``loss.backward()`` and before ``optimizer.step()``
    (gradients of batch s at the parameters of checkpoint s); ``on_update(s, …)`` right after
    that update. ``ctx`` is the loop's :class:`TrainContext`.
    """

    name = "recorder"

    def __init__(self, every: int | None = None, name: str | None = None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int or None, got {every!r}")
        self.every = every
        if name is not None:
            self.name = name
        self.steps: list[int] = []
        self.rows: list[dict] = []

    def start(self, model: nn.Module, ctx: TrainContext) -> None:
        self.steps, self.rows = [], []

    def on_eval(self, step: int, model: nn.Module, ctx: TrainContext) -> None: ...
    def on_backward(self, step: int, model: nn.Module, ctx: TrainContext) -> None: ...
    def on_update(self, step: int, model: nn.Module, ctx: TrainContext) -> None: ...

    def result(self) -> dict[str, np.ndarray]:
        """``{"step": (k,), key: (k, ...) for each recorded key}``."""
        out = {"step": np.array(self.steps, dtype=np.int64)}
        for key in (self.rows[0] if self.rows else {}):
            out[key] = np.stack([np.asarray(r[key]) for r in self.rows])
        return out


@dataclass
class TrainContext:
    """What recorders may read: the data, the current batch, loss, optimizer and learning rate."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor | None
    y_test: torch.Tensor | None
    loss_fn: Callable
    optimizer: object
    lr: float = 0.0
    x_batch: torch.Tensor | None = None
    y_batch: torch.Tensor | None = None
    loss: float = float("nan")


@dataclass
class History:
    """What a run recorded.

    ``train_loss[s]``: loss of mini-batch s at the parameters before update s (s = 0 … steps_done-1;
    the last entry is the non-finite loss if the run diverged). ``step``: the checkpoints
    (updates done) at which the model was evaluated, with ``test_acc``, ``test_loss``,
    ``train_acc``, ``train_eval_loss`` (full sets, eval mode; nan where not defined).
    ``records[name]``: each recorder's :meth:`Recorder.result`. ``diverged``/``diverged_at``: the
    loss became non-finite (or exceeded ``max_loss``) at update ``diverged_at``, and training
    stopped there. ``wall_time`` in seconds (never print it in compared notebook outputs).
    """

    train_loss: np.ndarray
    step: np.ndarray
    test_acc: np.ndarray
    test_loss: np.ndarray
    train_acc: np.ndarray
    train_eval_loss: np.ndarray
    records: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    diverged: bool = False
    diverged_at: int | None = None
    steps_done: int = 0
    config: dict = field(default_factory=dict)
    wall_time: float = 0.0

    def evals(self):
        """The evaluation checkpoints as a pandas DataFrame (one row per checkpoint)."""
        import pandas as pd

        return pd.DataFrame({"step": self.step, "test_acc": self.test_acc, "test_loss": self.test_loss,
                             "train_acc": self.train_acc, "train_eval_loss": self.train_eval_loss})

    def frame(self, name: str, key: str, axes: Sequence[str] = ("layer", "index")):
        """A recorder's array ``records[name][key]`` in long form: columns step, one per extra axis
        (named by ``axes``: layer index, then e.g. percentile or step-size index), value."""
        import pandas as pd

        rec = self.records[name]
        values = np.asarray(rec[key])
        index = np.indices(values.shape).reshape(values.ndim, -1)
        cols = {"step": rec["step"][index[0]]}
        for axis, name_ in zip(range(1, values.ndim), axes, strict=False):
            cols[name_] = index[axis]
        cols["value"] = values.reshape(-1)
        return pd.DataFrame(cols)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Every array in one flat dict; recorder arrays are keyed "name.key"."""
        out = {"train_loss": self.train_loss, "step": self.step, "test_acc": self.test_acc,
               "test_loss": self.test_loss, "train_acc": self.train_acc,
               "train_eval_loss": self.train_eval_loss}
        for name, rec in self.records.items():
            out.update({f"{name}.{k}": v for k, v in rec.items()})
        return out

    def final(self, key: str = "test_acc") -> float:
        """Last evaluated value of ``key`` (nan if the run diverged or nothing was evaluated)."""
        values = getattr(self, key)
        return float("nan") if self.diverged or len(values) == 0 else float(values[-1])


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.reshape(y.shape) if out.numel() == y.numel() else out, y)


def loss_function(loss: str | Callable) -> Callable:
    """The loss callable ``(output, target) -> scalar`` for a name in ``LOSSES`` (or ``loss`` itself)."""
    if callable(loss) and not isinstance(loss, str):
        return loss
    if loss == "cross_entropy":
        return nn.functional.cross_entropy
    if loss == "mse":  # a (N, 1) output against (N,) targets is compared element by element
        return _mse
    if loss == "bce":
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(y.shape), y)
    raise ValueError(f"loss must be one of {LOSSES} or a callable (output, target) -> scalar tensor, "
                     f"got {loss!r}")


def _accuracy(out: torch.Tensor, y: torch.Tensor, loss) -> float:
    if loss == "bce":
        return float(((out.reshape(y.shape) > 0) == (y > 0.5)).double().mean())
    if loss == "mse" or out.ndim != 2 or out.shape[1] < 2 or y.dtype.is_floating_point:
        return float("nan")
    return float((out.argmax(dim=1) == y).double().mean())


def _as_tensors(data, loss):
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 4):
        raise TypeError("data must be a tuple (X_train, y_train) or (X_train, y_train, X_test, y_test) "
                        f"of arrays or tensors, got {type(data).__name__} of length "
                        f"{len(data) if hasattr(data, '__len__') else '?'}")
    y_dtype = torch.int64 if loss == "cross_entropy" else torch.float32 if loss in ("mse", "bce") else None
    out = []
    for i, arr in enumerate(data):
        t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(np.asarray(arr))
        if i % 2 == 0:
            t = t.float()
        elif y_dtype is not None:
            t = t.to(y_dtype)
        out.append(t)
    for X, y in zip(out[0::2], out[1::2], strict=True):
        if len(X) != len(y):
            raise ValueError(f"X and y must have the same number of examples, got {len(X)} and {len(y)}")
    if len(out) == 2:
        out += [None, None]
    return out


def _make_optimizer(optimizer, params, lr0, momentum, weight_decay):
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "sgd":
        return SGD(params, lr=lr0, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adam":
        if momentum != 0:
            raise ValueError("momentum applies to optimizer='sgd'; Adam's betas are fixed at (0.9, 0.999)")
        return Adam(params, lr=lr0, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> optimizer "
                     f"(e.g. a torch.optim class with its settings bound), got {optimizer!r}")


def train(model: nn.Module, data, *, lr: float | Callable[[int], float] = 0.1, steps: int | None = None,
          epochs: int | None = None, batch_size: int = 60, optimizer: str | Callable = "sgd",
          momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
          loss: str | Callable = "cross_entropy", eval_every: int | None = 100, eval_train: bool = True,
          record: Sequence[Recorder] = (), max_loss: float | None = None) -> History:
    """Train ``model`` in place with mini-batch SGD/Adam and return a :class:`History`.

    ``data``: (X_train, y_train[, X_test, y_test]) arrays or tensors, e.g. ``bnutils.mnist1d()``.
    Give ``steps`` (updates) or ``epochs`` (passes of ``len(X_train) // batch_size`` updates; the
    incomplete last batch of each epoch is dropped, so BN never sees a tiny batch).
    ``lr``: a number, or a function of the update index s (e.g. ``lambda s: 1e-3 * 1.01**s``).
    ``loss``: "cross_entropy" (integer labels; accuracy = argmax), "bce" (one logit per example;
    accuracy of logit > 0), "mse" (no accuracy), or a callable ``(output, target) -> scalar``.
    ``optimizer``: "sgd" (with ``momentum``), "adam" (bnutils.optim's copies of torch.optim's
    SGD/Adam, which skip torch.optim's seconds-long first import), or a callable
    ``params -> optimizer`` with ``param_groups``, ``zero_grad`` and ``step``.

    Deterministic given ``seed`` and the model's initial state: the shuffling uses its own
    ``torch.Generator(seed)``, and the global torch RNG (dropout) is seeded with ``seed`` inside a
    ``fork_rng`` block, so the caller's RNG state is untouched. Divergence (a non-finite loss, or
    loss > ``max_loss``) stops training and sets ``History.diverged``; nothing is raised.
    Evaluation (eval mode, no grad, full sets) happens at checkpoints 0, eval_every, 2·eval_every,
    … and at the end (``eval_every=None``: at the start and the end only).
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    X_tr, y_tr, X_te, y_te = _as_tensors(data, loss)
    n = len(X_tr)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // batch_size
    if steps is None:
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        steps = epochs * per_epoch
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    lr_fn = lr if callable(lr) else None
    lr0 = float(lr_fn(0)) if lr_fn else float(lr)
    if not (math.isfinite(lr0) and lr0 >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr0!r}")
    loss_fn = loss_function(loss)
    opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr0, momentum,
                          weight_decay)
    ctx = TrainContext(X_tr, y_tr, X_te, y_te, loss_fn, opt, lr=lr0)
    eval_every = eval_every or max(steps, 1)
    recorders = list(record)
    names = [r.name for r in recorders]
    if len(set(names)) != len(names):
        raise ValueError(f"recorder names must be unique (pass name=...), got {names}")
    for r in recorders:
        r.effective_every = r.every or eval_every

    eval_keys = ("step", "test_acc", "test_loss", "train_acc", "train_eval_loss")
    evals: dict[str, list] = {k: [] for k in eval_keys}

    def evaluate(t: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for X, y, acc_key, loss_key, wanted in ((X_te, y_te, "test_acc", "test_loss", True),
                                                    (X_tr, y_tr, "train_acc", "train_eval_loss", eval_train)):
                if X is None or not wanted:
                    evals[acc_key].append(float("nan"))
                    evals[loss_key].append(float("nan"))
                    continue
                out = model(X)
                evals[loss_key].append(float(loss_fn(out, y)))
                evals[acc_key].append(_accuracy(out, y, loss))
        model.train(was_training)
        evals["step"].append(t)

    def checkpoint(t: int, last: bool) -> None:
        if t % eval_every == 0 or last:
            evaluate(t)
        for r in recorders:
            if t % r.effective_every == 0 or last:
                r.on_eval(t, model, ctx)

    train_loss = np.full(steps, np.nan)
    diverged_at = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for r in recorders:
            r.start(model, ctx)
        for s in range(steps):
            checkpoint(s, last=False)
            j = s % per_epoch
            if j == 0:  # shuffle once per epoch; the batches are then views (no per-step gather)
                perm = torch.randperm(n, generator=gen)
                X_epoch, y_epoch = X_tr[perm], y_tr[perm]
            xb = X_epoch[j * batch_size:(j + 1) * batch_size]
            yb = y_epoch[j * batch_size:(j + 1) * batch_size]
            if lr_fn is not None:
                ctx.lr = float(lr_fn(s))
                for group in opt.param_groups:
                    group["lr"] = ctx.lr
            out = model(xb)
            loss_t = loss_fn(out, yb)
            value = loss_t.item()
            train_loss[s] = value
            if not math.isfinite(value) or (max_loss is not None and value > max_loss):
                diverged_at = s
                break
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            due = [r for r in recorders if s % r.effective_every == 0]
            if due:
                ctx.x_batch, ctx.y_batch, ctx.loss = xb, yb, value
                for r in due:
                    r.on_backward(s, model, ctx)
            opt.step()
            for r in due:
                r.on_update(s, model, ctx)
        else:
            checkpoint(steps, last=True)
    steps_done = steps if diverged_at is None else diverged_at + 1
    history = History(
        train_loss=train_loss[:steps_done],
        **{k: np.array(v, dtype=np.int64 if k == "step" else np.float64) for k, v in evals.items()},
        records={r.name: r.result() for r in recorders},
        diverged=diverged_at is not None, diverged_at=diverged_at, steps_done=steps_done,
        config=dict(lr=lr if not callable(lr) else getattr(lr, "__name__", "schedule"), steps=steps,
                    batch_size=batch_size, optimizer=optimizer if isinstance(optimizer, str) else "custom",
                    momentum=momentum, weight_decay=weight_decay, seed=seed,
                    loss=loss if isinstance(loss, str) else "custom"),
        wall_time=time.perf_counter() - start,
    )
    return history


def _has_running_stats(module: nn.Module) -> bool:
    """A batch-norm-like module: running_mean and running_var buffers and a momentum (None allowed)."""
    return (isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor)
            and hasattr(module, "momentum"))


def _batches(X, batch_size: int | None, drop_last: bool) -> list[torch.Tensor]:
    n = len(X)
    if batch_size is None:
        return [X]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None (all of X at once), got {batch_size!r}")
    stop = n - n % batch_size if drop_last else n
    if stop == 0:
        raise ValueError(f"no complete batch of {batch_size} in {n} examples (drop_last=True)")
    return [X[i:i + batch_size] for i in range(0, stop, batch_size)]


def _as_input(X, model: nn.Module) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    t = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if not t.is_floating_point():
        raise TypeError(f"X must be a floating array or tensor of inputs (N, ...), got dtype {t.dtype}")
    param = next(model.parameters(), None)
    return t if param is None else t.to(param.dtype)


def recalibrate(model: nn.Module, X, batch_size: int | None = 64) -> nn.Module:
    """A copy of ``model`` (in eval mode) whose batch-norm running statistics are re-estimated on X.

    Every module with ``running_mean``/``running_var`` buffers (torch's and bnutils' BatchNorm,
    GhostBatchNorm, SyncBatchNorm, a StackedMLP's layers) is reset and, with ``momentum=None``,
    averages the batch statistics of consecutive batches of X (``batch_size=None``: X at once,
    giving its exact mean and unbiased variance) in training mode, without gradients; momenta
    are restored afterwards. The same arithmetic as ``torch.optim.swa_utils.update_bn`` over
    those batches. Batch renorm's ``running_std`` is left as it is. ``model`` is not modified.
    """
    model = copy.deepcopy(model)
    X = _as_input(X, model)
    norms = [m for m in model.modules() if _has_running_stats(m)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.running_mean.zero_()
        m.running_var.fill_(1)
        if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
            m.num_batches_tracked.zero_()
        m.momentum = None  # cumulative average over the recalibration batches, not an EMA
    model.train()
    with torch.no_grad():
        for xb in _batches(X, batch_size, drop_last=False):
            model(xb)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def accuracy(model: nn.Module, X, y, *, mode: str = "eval", batch_size: int | None = None,
             drop_last: bool = False):
    """Fraction of the examples of X whose largest logit is the label y; nan if a logit is not finite.

    ``mode``: "eval" (running statistics), "train" (batch statistics of each batch, which also
    update the running statistics, as a forgotten ``model.eval()`` does) or "batch" (batch
    statistics; every buffer is restored afterwards). ``batch_size``: consecutive batches of X
    (None: all at once); ``drop_last`` leaves out an incomplete last batch (and its examples).
    The model's train/eval flag is restored. An ``nn.Module`` gives a float; a
    :class:`bnutils.StackedMLP` (logits (M, N, classes)) gives an (M,) array, one per member.
    """
    if mode not in ("eval", "train", "batch"):
        raise ValueError(f"mode must be 'eval', 'train' or 'batch', got {mode!r}")
    X = _as_input(X, model)
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if y.dtype.is_floating_point or y.shape != X.shape[:1]:
        raise ValueError(f"y must hold one integer label per example of X, shape ({len(X)},), "
                         f"got {y.dtype} {tuple(y.shape)}")
    stacked = hasattr(model, "num_members")
    was_training = model.training
    state = preserved_state(model) if mode == "batch" else contextlib.nullcontext()
    with state, torch.no_grad():
        model.train(mode != "eval")
        outs = [model(xb) for xb in _batches(X, batch_size, drop_last)]
    model.train(was_training)
    out = torch.cat(outs, -2)  # (N, classes) or (M, N, classes)
    y = y[:out.shape[-2]]
    correct = (out.argmax(-1) == y).double().mean(-1)
    finite = torch.isfinite(out).flatten(-2).all(-1) if stacked else torch.isfinite(out).all()
    result = torch.where(finite, correct, torch.full_like(correct, float("nan")))
    return result.numpy() if stacked else float(result)
