"""Many small MLPs trained at once: one batched matrix product per layer for all of them.

A :class:`StackedMLP` holds M independent networks ("members") of one shape. Layer i's weights
of all members form one (M, out, in) tensor, so a forward pass is one ``torch.baddbmm`` per layer
instead of M small matrix products; each member has its own normalization statistics, its own
mini-batches and its own learning rate. Member k computes exactly what the ``make_mlp`` network
it was stacked from computes (up to float rounding), which the tests check member by member
against ``bnutils.train``.

Inputs, outputs and captured activations are (M, N, features): member, example, unit (inside,
features come before examples, see ``forward``). Normalizations (``norm``, per member):
"none", "bn" (batch norm), "gn" (group norm), "ln" (layer norm), "brn" (batch renorm, Ioffe 2017)
and "gbn" (ghost batch norm), with the semantics of torch's and bnutils' modules. Modes of a
forward pass: "train" (batch statistics; running statistics updated), "eval" (running statistics)
and "batch" (what "train" computes, with the running statistics left untouched).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .models import _largest_divisor_at_most, _widths
from .training import History, _as_tensors, loss_function

NORMS = ("none", "bn", "gn", "ln", "brn", "gbn")
MODES = ("train", "eval", "batch")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "linear": lambda h: h,
    "leaky_relu": F.leaky_relu, "gelu": F.gelu,
}
_RUNNING = ("bn", "gbn", "brn")  # kinds that keep running statistics


def _runs(values: Sequence) -> list[tuple[object, slice]]:
    """Consecutive runs of equal values: [(value, slice of members)], so each kind is computed once."""
    if values.count(values[0]) == len(values):  # one kind (the usual case): no Python loop over M
        return [(values[0], slice(0, len(values)))]
    runs, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[start]:
            runs.append((values[start], slice(start, k)))
            start = k
    return runs


def _per_member(value, m: int, name: str, allowed=None) -> list:
    """One value for every member: a single value repeated, or a sequence of length m."""
    values = [value] * m if isinstance(value, str) or callable(value) else list(value)
    if len(values) != m:
        raise ValueError(f"{name} must be one value or a sequence of {m} (one per member), got {len(values)}")
    for v in values:
        if allowed is not None and not callable(v) and v not in allowed:
            raise ValueError(f"{name} must be one of {tuple(allowed)} (or a sequence of them), got {v!r}")
    return values


class _Linear(nn.Module):
    """The stacked weights (M, out, in) and biases (M, out) of one layer (names as in nn.Linear)."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class _Norm(nn.Module):
    """Per-member affine parameters (M, width) and running statistics of one normalized layer.

    ``running_std`` is batch renorm's; ``num_batches_tracked`` (M,) counts the batches (ghost
    batches for "gbn") each member's statistics have seen, for ``momentum=None``.
    """

    def __init__(self, m: int, width: int, momentum: float | None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(m, width))
        self.bias = nn.Parameter(torch.zeros(m, width))
        self.register_buffer("running_mean", torch.zeros(m, width))
        self.register_buffer("running_var", torch.ones(m, width))
        self.register_buffer("running_std", torch.ones(m, width))
        self.register_buffer("num_batches_tracked", torch.zeros(m, dtype=torch.long))
        self.momentum = momentum

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.running_std.fill_(1)
        self.num_batches_tracked.zero_()

    def factor(self, sl: slice) -> float:
        """The weight of the next batch statistic (momentum, or 1/count for a cumulative average)."""
        self.num_batches_tracked[sl] += 1
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked[sl.start])


class StackedMLP(nn.Module):
    """M independent MLPs ``in_features -> hidden x depth -> out_features``, computed together.

    Member k's hidden block i is ``fc{i} -> norm{i} -> activation`` (``norm_position="before"``)
    or ``fc{i} -> activation -> norm{i}`` ("after"), as in :func:`bnutils.make_mlp`, whose
    parameter names the stacked tensors share: ``fc1.weight`` is (M, hidden, in_features),
    ``norm1.weight`` (gamma) is (M, hidden), ``out.bias`` is (M, out_features).
    ``norm``/``activation``: one name for all members or a sequence of M names (members of one
    kind are computed together, so keep equal kinds next to each other). ``activation`` may also
    be a callable (e.g. ``lambda h: F.leaky_relu(h, 0.1)``). ``num_groups`` (gn; default: the
    largest divisor of the width <= 32, as make_mlp), ``ghost_batch_size`` (gbn), ``rmax``,
    ``dmax`` (brn; plain attributes, so training can ramp them), ``momentum`` (None: cumulative
    average), ``eps``: as in the torch/bnutils modules.

    Initial weights: He-normal N(0, 2/fan_in), zero biases, gamma 1, beta 0, drawn layer by layer
    as (M, in, out) tensors from ``torch.Generator().manual_seed(seed)`` (the global RNG if seed
    is None). Use :meth:`from_nets` to start from ``make_mlp`` networks instead, or overwrite
    ``weights`` under ``torch.no_grad()``.
    """

    def __init__(self, num_members: int, in_features: int, hidden: int | Sequence[int], out_features: int,
                 depth: int | None = None, *, norm: str | Sequence[str] = "none",
                 activation: str | Callable | Sequence = "relu", norm_position: str = "before",
                 num_groups: int | None = None, ghost_batch_size: int = 32, rmax: float = 3.0,
                 dmax: float = 5.0, momentum: float | None = 0.1, eps: float = 1e-5, seed: int | None = None):
        super().__init__()
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be a positive int, got {num_members!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if norm_position not in ("before", "after"):
            raise ValueError(f"norm_position must be 'before' or 'after' the activation, "
                             f"got {norm_position!r}")
        widths = _widths(hidden, depth)
        m = num_members
        self.num_members, self.widths, self.norm_position = m, widths, norm_position
        self.norms = _per_member(norm, m, "norm", NORMS)
        self.activations = _per_member(activation, m, "activation", ACTIVATIONS)
        self.num_groups, self.ghost_batch_size = num_groups, ghost_batch_size
        self.rmax, self.dmax, self.momentum, self.eps = float(rmax), float(dmax), momentum, eps
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        sizes = [in_features, *widths, out_features]
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            w = torch.randn(m, d_in, d_out, generator=gen) * math.sqrt(2.0 / d_in)
            name = "out" if i == len(sizes) - 1 else f"fc{i}"
            self.add_module(name, _Linear(w.transpose(1, 2).contiguous(), torch.zeros(m, d_out)))
            if name != "out" and any(k != "none" for k in self.norms):
                self.add_module(f"norm{i}", _Norm(m, d_out, momentum))
        self._check_groups()

    def _check_groups(self) -> None:
        if "gn" in self.norms:
            for w in self.widths:
                if w % self.groups(w):
                    raise ValueError(f"num_groups={self.num_groups} does not divide the hidden width {w}")
        if not isinstance(self.ghost_batch_size, int) or self.ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be a positive int, got {self.ghost_batch_size!r}")

    def groups(self, width: int) -> int:
        return self.num_groups or _largest_divisor_at_most(width, 32)

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def layers(self) -> list[nn.Module]:
        """The weight layers in forward order, the output layer last."""
        return [getattr(self, f"fc{i}") for i in range(1, self.depth + 1)] + [self.out]

    @property
    def weights(self) -> list[nn.Parameter]:
        """Every layer's stacked weight (M, out, in), the output layer last."""
        return [layer.weight for layer in self.layers]

    # ----- construction from, and comparison with, single networks -----

    @classmethod
    def from_nets(cls, nets: Sequence[nn.Module]) -> StackedMLP:
        """Stack ``make_mlp`` networks of one shape (norm "none", "bn", "ln", "gn", or
        BatchRenorm/GhostBatchNorm factories; any activation name): member k starts as a copy of
        nets[k], its parameters and running statistics included."""
        nets = list(nets)
        if not nets:
            raise ValueError("from_nets needs at least one network")
        specs = [_describe(net) for net in nets]
        shape = specs[0]["shape"]
        positions = {s["norm_position"] for s in specs if s["norm"] != "none"} or {"before"}
        for k, spec in enumerate(specs):
            if spec["shape"] != shape:
                raise ValueError(f"nets[{k}] has layer widths {spec['shape']}, nets[0] {shape}: the members "
                                 f"of a StackedMLP need one shape")
        if len(positions) > 1:
            raise ValueError("the networks put their norms at different places (before and after the "
                             "activation); a StackedMLP needs one norm_position")
        opts: dict = {}
        for spec in specs:  # settings such as eps or momentum are shared by all members
            for key, value in spec["options"].items():
                if opts.setdefault(key, value) != value:
                    raise ValueError(f"the networks' normalizations differ in {key} ({opts[key]} and "
                                     f"{value}); the members of a StackedMLP share it")
        model = cls(len(nets), shape[0], list(shape[1:-1]), shape[-1], norm=[s["norm"] for s in specs],
                    activation=[s["activation"] for s in specs], norm_position=positions.pop(),
                    **opts).to(next(nets[0].parameters()).dtype)
        for k, net in enumerate(nets):
            model.load_member(k, net.state_dict())
        return model

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member k's parameters and running statistics under ``make_mlp``'s state-dict names
        (``fc1.weight`` (hidden, in), ``norm1.running_var`` ...; batch renorm has ``running_std``
        instead of ``running_var``), as copies."""
        affine, counted = ("weight", "bias"), ("running_mean", "num_batches_tracked")
        kept = {"none": (), "ln": affine, "gn": affine, "bn": affine + counted + ("running_var",),
                "gbn": affine + counted + ("running_var",), "brn": affine + counted + ("running_std",)}
        kept = kept[self.norms[k]]
        return {name: t[k].clone() for name, t in self.state_dict().items()
                if not name.startswith("norm") or name.split(".")[1] in kept}

    @torch.no_grad()
    def load_member(self, k: int, state: dict[str, Tensor]) -> None:
        """Overwrite member k with a state dict in ``member_state``'s format (missing keys keep
        their values)."""
        own = self.state_dict()
        for name, value in state.items():
            if name not in own:
                raise ValueError(f"unknown state key {name!r}; expected make_mlp names such as 'fc1.weight'")
            target = own[name][k]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{name}: expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)

    def members(self, index: Sequence[int] | Tensor) -> StackedMLP:
        """A new StackedMLP of the given members (copies, same settings, in that order)."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = index.tolist()
        sub = StackedMLP.__new__(StackedMLP)
        nn.Module.__init__(sub)
        sub.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        sub.num_members = len(pick)
        sub.norms = [self.norms[i] for i in pick]
        sub.activations = [self.activations[i] for i in pick]
        for name, child in self.named_children():
            new = _Linear.__new__(_Linear) if isinstance(child, _Linear) else _Norm.__new__(_Norm)
            nn.Module.__init__(new)
            for pname, p in child.named_parameters(recurse=False):
                setattr(new, pname, nn.Parameter(p.detach()[index].clone()))
            for bname, b in child.named_buffers(recurse=False):
                new.register_buffer(bname, b[index].clone())
            new.momentum = getattr(child, "momentum", None)
            sub.add_module(name, new)
        sub.train(self.training)
        return sub

    @torch.no_grad()
    def load_members(self, index: Sequence[int] | Tensor, other: StackedMLP) -> None:
        """Write ``other``'s members into rows ``index`` (the inverse of :meth:`members`)."""
        index = torch.as_tensor(index, dtype=torch.long)
        mine = self.state_dict()
        for name, value in other.state_dict().items():
            mine[name][index] = value

    # ----- forward -----

    def forward(self, x: Tensor, mode: str | None = None, capture: list | None = None) -> Tensor:
        """x (N, in) (the same examples for every member) or (M, N, in) -> logits (M, N, out).

        ``mode``: "train", "eval" or "batch" (None: "train" if ``self.training`` else "eval").
        ``capture``: a list that receives, for every hidden layer, the activation's input and
        output, both (M, N, width) and detached.
        """
        mode = ("train" if self.training else "eval") if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        # Inside, activations are (M, features, N): the batch of one unit of one member is a
        # contiguous row, so batch norm of all members is one F.batch_norm call without copies.
        h = self._stacked_input(x)
        for i, fc in enumerate(self.layers[:-1], start=1):
            h = torch.baddbmm(fc.bias.unsqueeze(2), fc.weight, h)
            if self.norm_position == "before":
                h = self._normalize(h, i, mode)
            a = self._activate(h)
            if capture is not None:
                capture.append((h.detach().transpose(1, 2), a.detach().transpose(1, 2)))
            h = a if self.norm_position == "before" else self._normalize(a, i, mode)
        return torch.baddbmm(self.out.bias.unsqueeze(2), self.out.weight, h).transpose(1, 2)

    def _stacked_input(self, x) -> Tensor:
        """x (N, in) or (M, N, in) -> (M, in, N)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, in) or (M, N, in), "
                            f"got {type(x).__name__}")
        d_in, m = self.layers[0].weight.shape[2], self.num_members
        if x.dim() == 2 and x.shape[1] == d_in:
            return x.t().contiguous().expand(m, d_in, len(x))
        if x.dim() == 3 and x.shape[0] == m and x.shape[2] == d_in:
            return x.transpose(1, 2)
        raise ValueError(f"x must have shape (N, {d_in}) or ({m}, N, {d_in}) (members, examples, features), "
                         f"got {tuple(x.shape)}")

    def _activate(self, h: Tensor) -> Tensor:
        runs = _runs(self.activations)  # recomputed per call: members()/users may change the lists
        fns = [ACTIVATIONS[a] if isinstance(a, str) else a for a, _ in runs]
        if len(runs) == 1:
            return fns[0](h)
        return torch.cat([fn(h[sl]) for fn, (_, sl) in zip(fns, runs, strict=True)])

    def _normalize(self, h: Tensor, i: int, mode: str) -> Tensor:
        runs = _runs(self.norms)
        if runs == [("none", slice(0, self.num_members))]:
            return h
        layer = getattr(self, f"norm{i}")
        parts = [self._norm_run(h[sl], kind, sl, layer, mode) for kind, sl in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _norm_run(self, z: Tensor, kind: str, sl: slice, layer: _Norm, mode: str) -> Tensor:
        """Normalize z (m, width, N), the members ``sl`` that all use norm ``kind``."""
        if kind == "none":
            return z
        m, width, n = z.shape
        gamma, beta = layer.weight[sl].unsqueeze(2), layer.bias[sl].unsqueeze(2)
        if kind == "ln":  # over the units of one example
            return F.layer_norm(z.transpose(1, 2), (width,), eps=self.eps).transpose(1, 2) * gamma + beta
        if kind == "gn":
            y = F.group_norm(z.transpose(1, 2).reshape(m * n, width), self.groups(width), eps=self.eps)
            return y.view(m, n, width).transpose(1, 2) * gamma + beta
        if kind == "brn":
            return self._renorm(z, sl, layer, mode) * gamma + beta
        if kind == "bn" or mode == "eval":
            return self._batch_norm(z, sl, layer, mode)
        chunks = torch.split(z, self.ghost_batch_size, dim=2)  # ghost batches: consecutive examples
        return torch.cat([self._batch_norm(c, sl, layer, mode) for c in chunks], 2)

    def _batch_norm(self, z: Tensor, sl: slice, layer: _Norm, mode: str) -> Tensor:
        """torch's batch norm on every unit of every member: the m * width channels of (1, m * width, N)."""
        m, width, n = z.shape
        stats = (None, None) if mode == "batch" else (layer.running_mean[sl].view(-1),
                                                      layer.running_var[sl].view(-1))
        factor = layer.factor(sl) if mode == "train" else 0.0
        return F.batch_norm(z.reshape(1, m * width, n), *stats, layer.weight[sl].reshape(-1),
                            layer.bias[sl].reshape(-1), mode != "eval", factor, self.eps).view(m, width, n)

    def _renorm(self, z: Tensor, sl: slice, layer: _Norm, mode: str) -> Tensor:
        """Batch renorm as bnutils.BatchRenorm (r, d are constants in backprop)."""
        mu, sigma = layer.running_mean[sl].unsqueeze(2), layer.running_std[sl].unsqueeze(2)
        if mode == "eval":
            return (z - mu) / sigma
        var, mean = torch.var_mean(z, 2, correction=0, keepdim=True)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r = (std / sigma).clamp(1.0 / self.rmax, self.rmax)
            d = ((mean - mu) / sigma).clamp(-self.dmax, self.dmax)
            if mode == "train":  # through .data: the buffers' other rows are saved by other members'
                f = layer.factor(sl)  # F.batch_norm, which must not see them modified (it does not use them)
                running_mean, running_std = layer.running_mean.data, layer.running_std.data
                running_mean[sl] += f * (mean.squeeze(2) - running_mean[sl])
                running_std[sl] += f * (std.squeeze(2) - running_std[sl])
        return (z - mean) / std * r + d

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{k} x{s.stop - s.start}" for k, s in _runs(self.norms))
        return (f"members={self.num_members}, widths={self.widths}, norm=[{kinds}], "
                f"norm_position={self.norm_position}")


def _describe(net: nn.Module) -> dict:
    """Shape, norm kind, activation and norm options of one make_mlp network."""
    from . import norms as bn_norms
    from .layers import BatchNorm1d
    from .noisy_bn import NoisyBatchNorm1d

    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears or any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules()):
        raise TypeError(f"expected a make_mlp network (nn.Linear layers), got {type(net).__name__}")
    shape = (linears[0].in_features, *[lin.out_features for lin in linears])
    names = [name for name, _ in net.named_children()]
    if any(name.startswith(("res", "drop")) for name in names):
        raise ValueError("residual blocks and dropout are not supported by StackedMLP")
    norm_modules = [m for n, m in net.named_children() if n.startswith("norm")]
    norm, options = "none", {}
    if norm_modules:
        first = norm_modules[0]
        if isinstance(first, NoisyBatchNorm1d):
            raise TypeError("NoisyBatchNorm1d draws its own noise; StackedMLP does not stack it")
        if isinstance(first, (nn.BatchNorm1d, BatchNorm1d, bn_norms.GhostBatchNorm, bn_norms.BatchRenorm)):
            options = dict(momentum=first.momentum, eps=first.eps)
            norm = "bn" if isinstance(first, (nn.BatchNorm1d, BatchNorm1d)) else "gbn" if isinstance(
                first, bn_norms.GhostBatchNorm) else "brn"
            if norm == "gbn":
                options["ghost_batch_size"] = first.ghost_batch_size
            if norm == "brn":
                options.update(rmax=first.rmax, dmax=first.dmax)
        elif isinstance(first, (nn.LayerNorm, bn_norms.LayerNorm)):
            norm, options = "ln", dict(eps=first.eps)
        elif isinstance(first, (nn.GroupNorm, bn_norms.GroupNorm)):
            norm, options = "gn", dict(eps=first.eps, num_groups=first.num_groups)
        else:
            raise TypeError(f"unsupported normalization {type(first).__name__}; expected BatchNorm1d, "
                            f"LayerNorm, GroupNorm, BatchRenorm or GhostBatchNorm")
    position = "after" if "norm1" in names and names.index("norm1") > names.index("act1") else "before"
    activation = getattr(net, "activation", "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
    return dict(shape=shape, norm=norm, options=options, activation=activation, norm_position=position)


# ----- training -----


class _StackedOptimizer:
    """torch.optim's SGD (momentum, L2 weight decay) or Adam on stacked parameters, with a learning
    rate per parameter that is a number or one rate per member (M,). Adam and SGD act element by
    element, so this is M independent optimizers. With a number the arithmetic is bnutils.optim's."""

    def __init__(self, kind: str, momentum: float, weight_decay: float, eps: float = 1e-8):
        self.kind, self.momentum, self.weight_decay, self.eps = kind, momentum, weight_decay, eps
        self.state: dict[str, dict[str, Tensor]] = {}
        self.t = 0

    def select(self, index: Tensor) -> None:
        """Keep the state of the members ``index`` only (after others stopped)."""
        for st in self.state.values():
            for key, value in st.items():
                st[key] = value[index]

    @torch.no_grad()
    def step(self, named_params, rate: Callable[[str], float | Tensor]) -> None:
        self.t += 1
        for name, p in named_params:
            if p.grad is None:
                continue
            lr = rate(name)
            per_member = isinstance(lr, Tensor)
            if per_member:
                lr = lr.to(p.dtype).view(-1, *[1] * (p.dim() - 1))
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            st = self.state.setdefault(name, {})
            if self.kind == "sgd":
                if self.momentum != 0:
                    if "buf" not in st:
                        st["buf"] = grad.detach().clone()
                    else:
                        st["buf"].mul_(self.momentum).add_(grad)
                    grad = st["buf"]
                if per_member:
                    p.sub_(lr * grad)
                else:
                    p.add_(grad, alpha=-lr)
                continue
            beta1, beta2, eps = 0.9, 0.999, self.eps
            if not st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            st["m"].lerp_(grad, 1 - beta1)
            st["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (st["v"].sqrt() / (1 - beta2 ** self.t) ** 0.5).add_(eps)
            if per_member:
                p.addcdiv_(st["m"] * (-lr / (1 - beta1 ** self.t)), denom)
            else:
                p.addcdiv_(st["m"], denom, value=-lr / (1 - beta1 ** self.t))


@dataclass
class StackedHistory:
    """What :func:`train_stacked` recorded, one column per member.

    ``train_loss`` (steps, M): loss of each member's mini-batch before update s (nan after the
    member stopped; the non-finite value itself at ``diverged_at``). ``step`` (k,): the
    evaluated checkpoints; ``test_acc``, ``test_loss``, ``train_acc``, ``train_eval_loss`` (k, M):
    full sets in eval mode (nan where not evaluated). ``diverged_at`` (M,): the update at which
    a member's loss became non-finite (or exceeded max_loss) and it stopped, -1 if it never did.
    """

    train_loss: np.ndarray
    step: np.ndarray
    test_acc: np.ndarray
    test_loss: np.ndarray
    train_acc: np.ndarray
    train_eval_loss: np.ndarray
    diverged_at: np.ndarray
    config: dict = field(default_factory=dict)

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_at >= 0

    def member(self, k: int) -> History:
        """Member k's record as the :class:`bnutils.History` that ``bnutils.train`` returns."""
        stop = int(self.diverged_at[k])
        done = len(self.train_loss) if stop < 0 else stop + 1
        rows = self.step <= stop if stop >= 0 else np.ones(len(self.step), dtype=bool)
        return History(train_loss=self.train_loss[:done, k], step=self.step[rows],
                       test_acc=self.test_acc[rows, k], test_loss=self.test_loss[rows, k],
                       train_acc=self.train_acc[rows, k], train_eval_loss=self.train_eval_loss[rows, k],
                       diverged=stop >= 0, diverged_at=None if stop < 0 else stop, steps_done=done,
                       config=dict(self.config))

    def final(self, key: str = "test_acc") -> np.ndarray:
        """(M,) the last evaluated value of ``key`` per member (nan for members that diverged)."""
        values = getattr(self, key)
        if len(values) == 0:
            return np.full(len(self.diverged_at), np.nan)
        return np.where(self.diverged, np.nan, values[-1])


def _rate_function(lr, m: int) -> Callable[[int, str], float | Tensor]:
    """lr -> a function (step, parameter name) -> a number or an (m,) tensor of rates."""
    def checked(value, full_check=True):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"learning rates must be finite numbers >= 0, got {value!r}")
            return float(value)
        t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
        if t.dim() == 0:
            return checked(float(t))
        if t.dim() != 1 or len(t) != m or not t.is_floating_point():
            raise ValueError(f"lr must be a number or {m} numbers (one per member), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        if full_check and not (torch.isfinite(t).all() and (t >= 0).all()):
            raise ValueError(f"learning rates must be finite numbers >= 0, got {t.tolist()}")
        return t

    if callable(lr):  # tensors are checked in full at step 0 only: the check costs more than the update
        return lambda step, name: checked(lr(step, name), full_check=step == 0)
    fixed = checked(lr)
    return lambda step, name: fixed


def _epoch_orders(shuffle, m: int, n: int) -> Callable[[int], Tensor | None]:
    """shuffle -> a function epoch -> (m, n) example order per member (None: the data's order)."""
    if shuffle is None:
        return lambda epoch: None
    if callable(shuffle):
        def drawn(epoch):
            order = torch.as_tensor(shuffle(epoch))
            if tuple(order.shape) != (m, n) or order.dtype != torch.long:
                raise ValueError(f"shuffle(epoch) must return an int64 tensor of shape ({m}, {n}) (one "
                                 f"order of the training set per member), got {order.dtype} "
                                 f"{tuple(order.shape)}")
            return order
        return drawn
    seeds = [shuffle] * m if isinstance(shuffle, int) else list(shuffle)
    if len(seeds) != m or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"shuffle must be None, an int seed, {m} int seeds (one per member) or a callable "
                         f"epoch -> (M, n) order, got {shuffle!r}")
    # bnutils.train(seed=s) draws randperm(n) from its own Generator(s) once per epoch
    generators = {s: torch.Generator().manual_seed(s) for s in dict.fromkeys(seeds)}

    def per_seed(epoch):
        perms = {s: torch.randperm(n, generator=g) for s, g in generators.items()}
        return torch.stack([perms[s] for s in seeds])
    return per_seed


def _member_loss(loss: str | Callable) -> Callable[[Tensor, Tensor], Tensor]:
    """(logits (m, N, out), targets (m, N[, out])) -> (m,) losses, each the mean over its batch."""
    if loss == "cross_entropy":  # classes on dim 1: StackedMLP's logits are a view of (m, out, N)
        return lambda out, y: F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
    if loss == "mse":
        return lambda out, y: ((out.reshape(y.shape) if out.numel() == y.numel() else out) - y
                               ).square().flatten(1).mean(1)
    if loss == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(y.shape), y,
                                                                 reduction="none").flatten(1).mean(1)
    if callable(loss) and not isinstance(loss, str):
        per_member = loss_function(loss)
        return lambda out, y: torch.stack([per_member(o, t) for o, t in zip(out, y, strict=True)])
    raise ValueError(f"loss must be 'cross_entropy', 'mse', 'bce' or a callable (output, target) -> scalar, "
                     f"got {loss!r}")


def _accuracies(out: Tensor, y: Tensor, loss) -> np.ndarray:
    if loss == "bce":
        return ((out.reshape(y.shape) > 0) == (y > 0.5)).double().flatten(1).mean(1).numpy()
    if loss != "cross_entropy":
        return np.full(len(out), np.nan)
    return (out.argmax(-1) == y).double().mean(1).numpy()


def train_stacked(model: StackedMLP, data, *, lr=0.1, steps: int | None = None, epochs: int | None = None,
                  batch_size: int = 60, optimizer: str = "sgd", momentum: float = 0.0,
                  weight_decay: float = 0.0, adam_eps: float = 1e-8,
                  shuffle=0, loss: str | Callable = "cross_entropy", eval_every: int | None = 100,
                  eval_train: bool = True, max_loss: float | None = None,
                  callback: Callable | None = None, callback_every: int = 1) -> StackedHistory:
    """Train every member of ``model`` in place, member k as ``bnutils.train`` would train it alone.

    ``data``: (X_train, y_train[, X_test, y_test]), shared by all members. ``steps``/``epochs``,
    ``batch_size`` (the incomplete last batch of an epoch is dropped), ``optimizer`` ("sgd" with
    ``momentum``, or "adam"), ``weight_decay``, ``loss`` ("cross_entropy", "mse", "bce" or a
    callable), ``eval_every``, ``eval_train``, ``max_loss``: as in :func:`bnutils.train`.
    ``adam_eps``: Adam's epsilon (torch's default 1e-8), added to the root of the second moment.
    ``lr``: a number, M numbers (one per member), or a function ``(step, name) -> number or (M,)
    rates`` of the update index and the parameter name (``"fc1.weight"``, ``"norm2.bias"``,
    ``"out.weight"``...), for schedules and per-layer rates.
    ``shuffle``: each member's order of the training set, redrawn every epoch: an int seed or M
    seeds (member k sees the mini-batches of ``bnutils.train(..., seed=shuffle[k])``), a callable
    ``epoch -> (M, n)`` int64 orders, or None (the data's own order, e.g. full-batch training).
    A member whose loss becomes non-finite stops, as bnutils.train does: before that update, its
    parameters and running statistics stay as they were, and the others go on without it.
    ``callback(step, model, members)`` runs at the checkpoints ``step % callback_every == 0``
    (before update ``step``) and after the last update; ``model`` then holds the members still
    training, whose original indices are ``members`` (an int array), e.g. to record weight norms
    or ramp batch renorm's ``rmax``/``dmax``.
    """
    if not isinstance(model, StackedMLP):
        raise TypeError(f"model must be a StackedMLP, got {type(model).__name__}")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    for name, v in (("batch_size", batch_size), ("callback_every", callback_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int)
                                   or eval_every < 1):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if optimizer == "adam" and momentum != 0:
        raise ValueError("momentum applies to optimizer='sgd'; Adam's betas are fixed at (0.9, 0.999)")
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
    if not (isinstance(adam_eps, (int, float)) and math.isfinite(adam_eps) and adam_eps >= 0):
        raise ValueError(f"adam_eps must be a finite number >= 0, got {adam_eps!r}")
    X_tr, y_tr, X_te, y_te = _as_tensors(data, loss)  # checks, and the labels' dtype
    dtype = model.out.weight.dtype  # inputs in the model's dtype, without a detour through float32

    def in_model_dtype(a):
        if a is None:
            return None
        return (a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))).to(dtype)

    X_tr, X_te = in_model_dtype(data[0]), in_model_dtype(data[2] if len(data) == 4 else None)
    if loss in ("mse", "bce"):  # float targets in the model's dtype too
        y_tr, y_te = in_model_dtype(data[1]), in_model_dtype(data[3] if len(data) == 4 else None)
    n, m = len(X_tr), model.num_members
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({n} examples)")
    per_epoch = n // batch_size
    if steps is None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        steps = epochs * per_epoch
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    rate, order_of, loss_fn = _rate_function(lr, m), _epoch_orders(shuffle, m, n), _member_loss(loss)
    opt = _StackedOptimizer(optimizer, momentum, weight_decay, adam_eps)
    eval_every = eval_every or max(steps, 1)

    keys = ("test_acc", "test_loss", "train_acc", "train_eval_loss")
    evals: dict[str, list] = {k: [] for k in keys}
    eval_steps: list[int] = []
    train_loss = np.full((steps, m), np.nan)
    diverged_at = np.full(m, -1)
    active = np.arange(m)  # original indices of the members in `work`
    work = model

    def evaluate(t: int) -> None:
        rows = {k: np.full(m, np.nan) for k in keys}
        work.eval()
        with torch.no_grad():
            for X, y, acc_key, loss_key, wanted in ((X_te, y_te, "test_acc", "test_loss", True),
                                                    (X_tr, y_tr, "train_acc", "train_eval_loss", eval_train)):
                if X is None or not wanted:
                    continue
                out = work(X)
                target = y.expand(len(active), *y.shape)
                rows[loss_key][active] = loss_fn(out, target).double().numpy()
                rows[acc_key][active] = _accuracies(out, target, loss)
        work.train()
        for k in keys:
            evals[k].append(rows[k])
        eval_steps.append(t)

    def checkpoint(t: int, last: bool) -> None:
        if t % eval_every == 0 or last:
            evaluate(t)
        if callback is not None and (t % callback_every == 0 or last):
            callback(t, work, active.copy())

    work.train()
    for s in range(steps):
        checkpoint(s, last=False)
        j = s % per_epoch
        if j == 0:  # a new epoch: every member's order of the training set, gathered once
            order = order_of(s // per_epoch)
            X_ep, y_ep = (X_tr, y_tr) if order is None else (X_tr[order[active]], y_tr[order[active]])
        batch = slice(j * batch_size, (j + 1) * batch_size)
        xb = X_ep[batch] if order is None else X_ep[:, batch]
        yb = y_ep[batch].expand(len(active), *y_ep[batch].shape) if order is None else y_ep[:, batch]
        losses = loss_fn(work(xb, mode="train"), yb)
        values = losses.detach().double().numpy()
        train_loss[s, active] = values
        bad = ~np.isfinite(values) if max_loss is None else ~(np.isfinite(values) & (values <= max_loss))
        keep = np.flatnonzero(~bad)
        (losses if not bad.any() else losses[torch.as_tensor(keep)]).sum().backward()
        if bad.any():  # these members stop here, before this update, as bnutils.train stops
            diverged_at[active[bad]] = s
            if work is not model:
                model.load_members(active[bad], work.members(np.flatnonzero(bad)))
            if len(keep) == 0:
                active = active[keep]
                break
            work = _without_stopped(work, keep, opt)
            active = active[keep]
            if order is not None:
                X_ep, y_ep = X_ep[torch.as_tensor(keep)], y_ep[torch.as_tensor(keep)]
        opt.step(work.named_parameters(), lambda name, s=s, rows=active: _active_rates(rate(s, name), rows))
        for p in work.parameters():
            p.grad = None
    else:
        checkpoint(steps, last=True)
    if work is not model and len(active):
        model.load_members(active, work)
    for k in keys:
        evals[k] = np.array(evals[k]).reshape(len(eval_steps), m)
    return StackedHistory(train_loss=train_loss, step=np.array(eval_steps, dtype=np.int64),
                          diverged_at=diverged_at, **evals,
                          config=dict(steps=steps, batch_size=batch_size, optimizer=optimizer,
                                      momentum=momentum, weight_decay=weight_decay,
                                      loss=loss if isinstance(loss, str) else "custom"))


def _active_rates(value, active: np.ndarray):
    if not isinstance(value, Tensor) or len(active) == len(value):  # (nobody stopped: no gather)
        return value
    return value[torch.as_tensor(active)]


def _without_stopped(work: StackedMLP, keep: np.ndarray, opt: _StackedOptimizer) -> StackedMLP:
    """The members ``keep`` of ``work`` as a new model, with their gradients and optimizer state."""
    index = torch.as_tensor(keep)
    grads = {name: p.grad[index] for name, p in work.named_parameters() if p.grad is not None}
    sub = work.members(index)
    for name, p in sub.named_parameters():
        p.grad = grads.get(name)
    opt.select(index)
    return sub
