"""Engines for the "Batch norm in practice" chapter: a residual MLP with batch norm, weight decay that
spares the normalization parameters, and a training loop with gradient accumulation."""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .optim import SGD

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class ResidualBlock(nn.Module):
    """``relu(x + bn2(fc2(relu(bn1(fc1(x))))))``: the ResNet basic block with Linear layers.

    The Linear layers have no bias (the BN after each removes it anyway). ``zero_init=True`` sets
    ``bn2.weight`` (the block's last gamma) to 0, so the block starts as the identity
    (Goyal et al. 2017). ``norm``: "bn" (``nn.BatchNorm1d``) or "gn" (``nn.GroupNorm`` with 8 groups).
    """

    def __init__(self, width: int, zero_init: bool = False, norm: str = "bn"):
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = _norm(norm, width)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.bn2 = _norm(norm, width)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        return torch.relu(x + self.bn2(self.fc2(h)))


def _norm(norm: str, width: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm1d(width)
    if norm == "gn":
        return nn.GroupNorm(8 if width % 8 == 0 else 1, width)
    raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")


def residual_mlp(in_features: int, width: int, out_features: int, blocks: int, *,
                 zero_init: bool = False, norm: str = "bn", seed: int | None = None) -> nn.Sequential:
    """stem (Linear -> BN -> ReLU), ``blocks`` :class:`ResidualBlock` s, then a Linear head.

    Input (N, in_features) -> logits (N, out_features). ``zero_init``: the last gamma of every block
    starts at 0 instead of 1. ``seed``: draw the initial weights from ``torch.manual_seed(seed)``
    without touching the global RNG (None: the global RNG). Weights keep torch's default init.
    """
    if blocks < 0 or width < 1:
        raise ValueError(f"blocks must be >= 0 and width >= 1, got {blocks}, {width}")

    def build():
        layers = [("stem", nn.Linear(in_features, width, bias=False)), ("stem_norm", _norm(norm, width)),
                  ("stem_act", nn.ReLU())]
        layers += [(f"block{i}", ResidualBlock(width, zero_init, norm)) for i in range(1, blocks + 1)]
        layers.append(("head", nn.Linear(width, out_features)))
        return nn.Sequential(OrderedDict(layers))

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def norm_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(other parameters, normalization parameters): the gammas and betas of every BN/GN/LN module
    go in the second list, every other parameter (weights and biases of Linear/Conv) in the first."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(False)}
    params = list(model.parameters())
    return [p for p in params if id(p) not in norm_ids], [p for p in params if id(p) in norm_ids]


class DecaySplitSGD:
    """SGD with momentum whose L2 weight decay applies to some parameters only.

    ``decay``, ``no_decay``: lists of parameters; each list gets a :class:`bnutils.optim.SGD` with the
    same ``lr`` and ``momentum`` and weight decay ``weight_decay`` or 0. Exposes ``param_groups``,
    ``zero_grad`` and ``step``, so ``bnutils.train(..., optimizer=lambda params: DecaySplitSGD(...))``
    uses it (``train``'s learning-rate schedules set every group's lr).
    """

    def __init__(self, decay, no_decay, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.parts = [SGD(ps, lr, momentum=momentum, weight_decay=wd)
                      for ps, wd in ((list(decay), weight_decay), (list(no_decay), 0.0)) if ps]
        self.param_groups = [g for opt in self.parts for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()


def train_accumulated(model: nn.Module, data, *, lr: float, steps: int, micro_batch: int, accumulate: int,
                      momentum: float = 0.9, seed: int = 0) -> float:
    """Train with gradient accumulation and return the final test accuracy (eval mode).

    Each of the ``steps`` updates sums the gradients of ``accumulate`` forward/backward passes on
    consecutive micro-batches of ``micro_batch`` examples (loss divided by ``accumulate``, so the
    update has the scale of one batch of ``micro_batch * accumulate``). ``accumulate=1`` is ordinary
    mini-batch SGD. ``data``: (X_train, y_train, X_test, y_test), integer labels, cross-entropy.
    Shuffling uses ``torch.Generator(seed)``; the caller's RNG state is untouched.
    """
    X_tr, y_tr, X_te, y_te = (torch.as_tensor(np.asarray(a)) for a in data)
    if micro_batch < 1 or accumulate < 1:
        raise ValueError(f"micro_batch and accumulate must be >= 1, got {micro_batch}, {accumulate}")
    big = micro_batch * accumulate
    per_epoch = len(X_tr) // big
    if per_epoch < 1:
        raise ValueError(f"a batch of {big} examples is larger than the training set ({len(X_tr)})")
    opt = SGD(list(model.parameters()), lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for s in range(steps):
        j = s % per_epoch
        if j == 0:
            perm = torch.randperm(len(X_tr), generator=gen)
        idx = perm[j * big:(j + 1) * big]
        opt.zero_grad()
        for chunk in idx.split(micro_batch):
            loss = loss_fn(model(X_tr[chunk]), y_tr[chunk]) / accumulate
            if not math.isfinite(loss.item()):
                return float("nan")
            loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(X_te).argmax(1) == y_te).float().mean())


class StackedResidualMLP(nn.Module):
    """M independent :func:`residual_mlp` networks (batch norm) computed together with batched matmuls.

    Built from ``nets`` (a list of ``residual_mlp(...)`` of one shape, norm "bn"): member k starts with
    net k's weights, gammas, betas and running statistics, and computes what net k computes (up to
    float rounding; tested). Input (N, in) or (M, N, in) -> logits (M, N, out). In training mode each
    member normalizes with its own batch statistics over N and updates its running statistics as
    ``nn.BatchNorm1d`` does (momentum 0.1, unbiased variance); in eval mode it uses them.
    """

    def __init__(self, nets):
        super().__init__()
        nets = list(nets)
        self.m = len(nets)
        if self.m < 1:
            raise ValueError("give at least one network")
        names = [n for n, mod in nets[0].named_modules() if isinstance(mod, (nn.Linear, nn.BatchNorm1d))]
        self.order = names
        self.linears = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        self.gammas, self.betas = nn.ParameterDict(), nn.ParameterDict()
        for name in names:
            mods = [dict(net.named_modules())[name] for net in nets]
            key = name.replace(".", "_")
            if isinstance(mods[0], nn.Linear):
                weights = [m.weight.detach().transpose(0, 1) for m in mods]
                self.linears[key] = nn.Parameter(torch.stack(weights))
                if mods[0].bias is not None:
                    self.biases[key] = nn.Parameter(torch.stack([m.bias.detach() for m in mods]).unsqueeze(1))
            else:
                self.gammas[key] = nn.Parameter(torch.stack([m.weight.detach() for m in mods]).unsqueeze(1))
                self.betas[key] = nn.Parameter(torch.stack([m.bias.detach() for m in mods]).unsqueeze(1))
                self.register_buffer(f"mean_{key}", torch.stack([m.running_mean for m in mods]).unsqueeze(1))
                self.register_buffer(f"var_{key}", torch.stack([m.running_var for m in mods]).unsqueeze(1))
        self.blocks = sum(1 for n in names if n.endswith(".fc1"))
        self.momentum, self.eps = 0.1, 1e-5

    def _lin(self, name: str, h: torch.Tensor) -> torch.Tensor:
        key = name.replace(".", "_")
        out = torch.bmm(h, self.linears[key])
        return out + self.biases[key] if key in self.biases else out

    def _bn(self, name: str, z: torch.Tensor) -> torch.Tensor:
        key = name.replace(".", "_")
        rm, rv = getattr(self, f"mean_{key}"), getattr(self, f"var_{key}")
        if self.training:
            mean = z.mean(1, keepdim=True)
            zc = z - mean
            var = (zc * zc).mean(1, keepdim=True)  # faster than Tensor.var over a middle axis
            n = z.shape[1]
            with torch.no_grad():
                rm.mul_(1 - self.momentum).add_(self.momentum * mean)
                rv.mul_(1 - self.momentum).add_(self.momentum * var * (n / (n - 1)))
        else:
            mean, var = rm, rv
        return self.gammas[key] * (z - mean) / torch.sqrt(var + self.eps) + self.betas[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.m, -1, -1)
        h = torch.relu(self._bn("stem_norm", self._lin("stem", x)))
        for i in range(1, self.blocks + 1):
            b = f"block{i}"
            z = torch.relu(self._bn(f"{b}.bn1", self._lin(f"{b}.fc1", h)))
            h = torch.relu(h + self._bn(f"{b}.bn2", self._lin(f"{b}.fc2", z)))
        return self._lin("head", h)


def train_stacked_residual(model: StackedResidualMLP, data, *, lr, steps: int, batch_size: int = 64,
                           momentum: float = 0.9, seeds=None, max_loss: float = 1e3) -> dict:
    """SGD with momentum on every member at once; member k has learning rate ``lr[k]`` and draws its
    mini-batches with ``torch.Generator(seeds[k])`` (default k). A member whose loss becomes non-finite
    or exceeds ``max_loss`` is stopped (its learning rate set to 0) and reported as diverged.

    Returns {"test_acc": (M,) final eval-mode test accuracy (NaN if diverged), "diverged": (M,) bool,
    "train_loss": (steps, M) per-step training loss}.
    """
    X_tr, y_tr, X_te, y_te = (torch.as_tensor(np.asarray(a)) for a in data)
    m, n = model.m, len(X_tr)
    lr = torch.as_tensor(np.broadcast_to(np.asarray(lr, dtype=np.float32), (m,)).copy())
    seeds = list(range(m)) if seeds is None else list(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    per_epoch = n // batch_size
    params = list(model.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    diverged = torch.zeros(m, dtype=torch.bool)
    losses = np.full((steps, m), np.nan)
    model.train()
    for s in range(steps):
        if s % per_epoch == 0:
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
        idx = orders[:, (s % per_epoch) * batch_size:(s % per_epoch + 1) * batch_size]
        out = model(X_tr[idx])
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y_tr[idx].reshape(-1),
                                           reduction="none").reshape(m, -1).mean(1)
        losses[s] = loss.detach().numpy()
        diverged |= ~torch.isfinite(loss.detach()) | (loss.detach() > max_loss)
        for p in params:
            p.grad = None
        torch.where(diverged, torch.zeros_like(loss), loss).sum().backward()
        with torch.no_grad():
            rate = torch.where(diverged, torch.zeros_like(lr), lr)
            for p, buf in zip(params, bufs, strict=True):
                if p.grad is None:
                    continue
                g = torch.nan_to_num(p.grad)
                buf.mul_(momentum).add_(g)
                p.sub_(rate.view((m,) + (1,) * (p.dim() - 1)) * buf)
    model.eval()
    with torch.no_grad():
        acc = (model(X_te).argmax(-1) == y_te).float().mean(1).numpy().astype(np.float64)
    acc[diverged.numpy()] = np.nan
    return {"test_acc": acc, "diverged": diverged.numpy(), "train_loss": losses}


def set_bn_mode(model: nn.Module, frozen: bool) -> nn.Module:
    """Put ``model`` in training mode, with its batch-norm layers in eval mode when ``frozen``
    (they then normalize with their running statistics and do not update them; gamma and beta
    still learn). Returns ``model``."""
    model.train()
    if frozen:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def fine_tune(model: nn.Module, X, y, *, frozen_bn: bool, lr: float, steps: int, batch_size: int,
              momentum: float = 0.9, seed: int = 0) -> nn.Module:
    """Fine-tune ``model`` in place with SGD on (X, y) (cross-entropy) and return it in eval mode.

    ``frozen_bn``: batch norm in eval mode during fine-tuning (:func:`set_bn_mode`); else in training
    mode (batch statistics of each small batch, running statistics updated). Dropout, if any, is
    active either way. Mini-batches of ``batch_size`` from ``torch.Generator(seed)``, reshuffled
    each epoch; the caller's RNG state is untouched.
    """
    X, y = torch.as_tensor(np.asarray(X)), torch.as_tensor(np.asarray(y))
    opt = SGD(list(model.parameters()), lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(X) // batch_size
    set_bn_mode(model, frozen_bn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(steps):
            if s % per_epoch == 0:
                perm = torch.randperm(len(X), generator=gen)
            idx = perm[(s % per_epoch) * batch_size:(s % per_epoch + 1) * batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def spare_norm_params(stacked, weight_decay: float, members) -> list:
    """Exempt the gammas and betas of some members of a :class:`bnutils.StackedMLP` from L2 decay.

    ``train_stacked(..., weight_decay=wd)`` adds ``wd * p`` to every gradient. This registers a hook
    on each ``norm*.weight``/``norm*.bias`` tensor that subtracts ``wd * p`` again for the members
    where ``members`` (a bool sequence of length M) is true, so those members are trained as with
    ``DecaySplitSGD(other_params, norm_params, lr, momentum, wd)`` (tested). Returns the hook handles.
    """
    mask = torch.as_tensor(np.asarray(members, dtype=np.float32))
    if mask.shape != (stacked.num_members,):
        raise ValueError(f"members must have one entry per member ({stacked.num_members}), "
                         f"got {tuple(mask.shape)}")
    handles = []
    for name, p in stacked.named_parameters():
        if name.startswith("norm"):
            m = mask.to(p.dtype).view((-1,) + (1,) * (p.dim() - 1))
            handles.append(p.register_hook(lambda g, p=p, m=m: g - weight_decay * p.detach() * m))
    return handles
