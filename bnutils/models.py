"""Model builders for the experiments: an MLP and a small CNN with switchable normalization,
activation and initialization, whose layers the diagnostics can find by name."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .noisy_bn import NoisyBatchNorm1d, NoisyBatchNorm2d

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": nn.Identity,
    "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
}
NORMS = ("none", "bn", "noisy_bn", "ln", "gn", "rms", "in")
"""Names accepted by ``norm`` ("rms": MLP only; "in": instance norm, CNN only)."""
INITS = ("he", "he_uniform", "xavier", "xavier_uniform", "normal", "torch")

NormFactory = Callable[[int], nn.Module]


class Net(nn.Sequential):
    """``nn.Sequential`` plus the bookkeeping the diagnostics use.

    Attributes: ``weight_layers`` (every Linear/Conv2d in forward order, the output layer last),
    ``activations`` (the hidden activation modules in order: a forward hook on one sees the
    pre-activation as input and the activation as output), ``norms`` (the normalization modules
    in order), ``activation``, ``norm`` (names given to the builder).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], activation: str, norm: str):
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)
        self.activation, self.norm = activation, norm
        self.weight_layers = [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.activations = [m for n, m in self.named_modules() if n.split(".")[-1].startswith("act")]
        self.norms = [m for n, m in self.named_modules() if n.split(".")[-1].startswith("norm")]


class Residual(nn.Module):
    """``x + body(x)``: a skip connection around one hidden block (same width in and out)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _norm_layer(norm, width: int, spatial: bool, seed_source: Callable[[], int], kwargs: dict):
    """One normalization module for ``width`` features (channels when ``spatial``), or None."""
    if callable(norm) and not isinstance(norm, str):
        return norm(width)
    if norm == "none":
        return None
    if norm == "bn":
        return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(width, **kwargs)
    if norm == "noisy_bn":
        cls = NoisyBatchNorm2d if spatial else NoisyBatchNorm1d
        return cls(width, **{"seed": seed_source(), **kwargs})
    if norm == "ln":  # over every feature of one example (C, H, W for images, as in Wu & He)
        return nn.GroupNorm(1, width, **kwargs) if spatial else nn.LayerNorm(width, **kwargs)
    if norm == "gn":
        kw = {"num_groups": _largest_divisor_at_most(width, 32), **kwargs}
        return nn.GroupNorm(kw.pop("num_groups"), width, **kw)
    if norm == "rms" and not spatial:
        return nn.RMSNorm(width, **kwargs)
    if norm == "in" and spatial:
        return nn.GroupNorm(width, width, **kwargs)  # one group per channel = instance norm
    raise ValueError(f"norm must be one of {NORMS} (rms: MLP only; in: CNN only) or a callable "
                     f"num_features -> nn.Module, got {norm!r}")


def _activation(activation: str) -> nn.Module:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]()


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def init_weights(layers: Sequence[nn.Module], init: str = "he", scale: float | None = None,
                 bias_init: float = 0.0) -> None:
    """Initialize the weights of Linear/Conv layers in place, from the global torch RNG.

    - "he": N(0, scale² · 2/fan_in); "he_uniform": U(±scale · √(6/fan_in)) (same variance);
    - "xavier": N(0, scale² · 2/(fan_in+fan_out)); "xavier_uniform": U(±scale · √(6/(fan_in+fan_out)));
    - "normal": N(0, scale²) — CS231n's ``weight_scale`` (``scale`` defaults to 0.01);
    - "torch": PyTorch's default (U(±1/√fan_in) for weights and biases), times ``scale``.

    ``scale`` defaults to 1 (a gain multiplier) except for "normal". Biases are set to
    ``bias_init`` (default 0) except for "torch", which keeps PyTorch's default biases.
    fan_in/fan_out count the receptive field for convolutions, as ``torch.nn.init`` does.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if scale is None:
        scale = 0.01 if init == "normal" else 1.0
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"init_scale must be a finite number >= 0, got {scale!r}")
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            fan_in, fan_out = _fans(w)
            if init == "he":
                w.normal_(0.0, scale * math.sqrt(2.0 / fan_in))
            elif init == "he_uniform":
                bound = scale * math.sqrt(6.0 / fan_in)
                w.uniform_(-bound, bound)
            elif init == "xavier":
                w.normal_(0.0, scale * math.sqrt(2.0 / (fan_in + fan_out)))
            elif init == "xavier_uniform":
                bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
                w.uniform_(-bound, bound)
            elif init == "normal":
                w.normal_(0.0, scale)
            else:  # "torch": keep the default draw made at construction
                w.mul_(scale)
            if layer.bias is not None and init != "torch":
                layer.bias.fill_(bias_init)


def _build(make_layers: Callable[[Callable[[], int]], list], seed: int | None, init, init_scale,
           bias_init, activation, norm) -> Net:
    def build():
        counter, base = iter(range(10**6)), []

        def seed_source() -> int:  # NoisyBN seeds: from ``seed``, else from the (seeded) global RNG
            if not base:
                base.append(seed if seed is not None else int(torch.randint(0, 2**20, ()).item()))
            return base[0] * 1000 + next(counter)

        net = Net(make_layers(seed_source), activation,
                  norm if isinstance(norm, str) else getattr(norm, "__name__", "custom"))
        init_weights(net.weight_layers, init, init_scale, bias_init)
        return net

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_mlp(in_features: int, hidden: int | Sequence[int], out_features: int, depth: int | None = None, *,
             activation: str = "relu", norm: str | NormFactory = "none", norm_position: str = "before",
             init: str = "he", init_scale: float | None = None, bias: bool = True, bias_init: float = 0.0,
             dropout: float = 0.0, residual: bool = False, norm_kwargs: dict | None = None,
             seed: int | None = None) -> Net:
    """A multilayer perceptron: ``depth`` hidden blocks of width ``hidden``, then a Linear output.

    Each hidden block is ``fc{i} -> norm{i} -> act{i} [-> drop{i}]`` (``norm_position="before"`` the
    activation, as in Ioffe & Szegedy) or ``fc{i} -> act{i} -> norm{i} [-> drop{i}]`` ("after");
    ``norm="none"`` leaves the norm out. ``hidden`` may be a list of widths (then ``depth`` is
    its length). ``residual=True`` wraps every hidden block whose input and output widths agree as
    ``res{i} = x + block(x)``. ``norm`` is a name from ``NORMS`` ("bn", "noisy_bn", "ln", "gn" with
    the largest group count <= 32 dividing the width, "rms") or a callable ``width -> nn.Module``
    (e.g. ``bnutils.BatchNorm1d``); ``norm_kwargs`` go to the named norm's constructor.
    ``init``/``init_scale``/``bias_init``: see :func:`init_weights` (all weight layers, output
    included). ``seed``: draw the initial weights (and NoisyBN seeds) from ``torch.manual_seed(seed)``
    without touching the global RNG; None uses the global RNG. Input (N, in_features) ->
    output (N, out_features) (logits).
    """
    widths = _widths(hidden, depth)
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position must be 'before' or 'after' the activation, got {norm_position!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    _activation(activation)
    kwargs = dict(norm_kwargs or {})

    def make_layers(seed_source):
        layers, d_in = [], in_features
        for i, width in enumerate(widths, start=1):
            block = [(f"fc{i}", nn.Linear(d_in, width, bias=bias))]
            nl = _norm_layer(norm, width, False, seed_source, kwargs)
            act = [(f"act{i}", _activation(activation))]
            normed = [] if nl is None else [(f"norm{i}", nl)]
            block += normed + act if norm_position == "before" else act + normed
            if dropout > 0:
                block.append((f"drop{i}", nn.Dropout(dropout)))
            if residual and d_in == width:
                layers.append((f"res{i}", Residual(nn.Sequential(OrderedDict(block)))))
            else:
                layers += block
            d_in = width
        layers.append(("out", nn.Linear(d_in, out_features, bias=bias)))
        return layers

    return _build(make_layers, seed, init, init_scale, bias_init, activation, norm)


def _widths(hidden, depth) -> list[int]:
    if isinstance(hidden, int):
        if depth is None or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"with an int width, depth must be an int >= 0 (number of hidden layers), "
                             f"got {depth!r}")
        widths = [hidden] * depth
    else:
        widths = list(hidden)
        if depth is not None and depth != len(widths):
            raise ValueError(f"depth={depth} disagrees with the {len(widths)} widths in hidden={hidden!r}")
    if any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"hidden widths must be positive ints, got {hidden!r}")
    return widths


def make_cnn(in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (16, 32), *,
             image_size: int = 8, activation: str = "relu", norm: str | NormFactory = "bn",
             norm_position: str = "before", kernel_size: int = 3, pool: bool = True,
             init: str = "he", init_scale: float | None = None, bias: bool = True, bias_init: float = 0.0,
             dropout: float = 0.0, norm_kwargs: dict | None = None, seed: int | None = None) -> Net:
    """A small CNN for (N, in_channels, image_size, image_size) images such as the 8x8 digits.

    Blocks ``conv{i} (k x k, 'same' padding) -> norm{i} -> act{i} [-> pool{i} (2x2 max)]`` (norm
    after the activation with ``norm_position="after"``), then ``flatten -> [drop] -> out``
    (Linear to ``num_classes`` logits). Norms: "bn" (BatchNorm2d, per-channel statistics over
    N, H, W), "noisy_bn", "gn", "ln" (GroupNorm with one group: C, H, W of one example), "in"
    (one group per channel), or a callable ``channels -> nn.Module``. Other options as in
    :func:`make_mlp`. Default: 8x8 -> 16 channels 4x4 -> 32 channels 2x2 -> 10 logits.
    """
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position must be 'before' or 'after' the activation, got {norm_position!r}")
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
    _activation(activation)
    kwargs = dict(norm_kwargs or {})

    def make_layers(seed_source):
        layers, c_in, size = [], in_channels, image_size
        for i, c in enumerate(channels, start=1):
            layers.append((f"conv{i}", nn.Conv2d(c_in, c, kernel_size, padding=kernel_size // 2, bias=bias)))
            nl = _norm_layer(norm, c, True, seed_source, kwargs)
            normed = [] if nl is None else [(f"norm{i}", nl)]
            act = [(f"act{i}", _activation(activation))]
            layers += normed + act if norm_position == "before" else act + normed
            if pool and size >= 2:
                layers.append((f"pool{i}", nn.MaxPool2d(2)))
                size //= 2
            c_in = c
        layers.append(("flatten", nn.Flatten()))
        if dropout > 0:
            layers.append(("drop", nn.Dropout(dropout)))
        layers.append(("out", nn.Linear(c_in * size * size, num_classes, bias=bias)))
        return layers

    return _build(make_layers, seed, init, init_scale, bias_init, activation, norm)
