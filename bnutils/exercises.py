"""A grader for the reader's own batch norm: ``from bnutils import exercises``.

Each ``check_*`` function runs the reader's code on a fixed set of randomized cases (shapes (N, D)
and (N, C, H, W); float64 and float32; tiny, ordinary and large means), compares it with the book's
reference, prints **one line** and returns a :class:`Result`. The line is either ``correct ...`` or a
diagnosis naming the likely mistake. A diagnosis is never a guess: the grader computes what each
known mistake (and each combination of up to three of them) would output on the same cases, in
float64, and names the one the reader's output matches. A reader function that raises
``NotImplementedError`` (an unfilled skeleton) gives ``not implemented yet``, so a notebook with
empty exercises still runs top to bottom. Cases are drawn from ``np.random.default_rng(seed)``
(``seed=0`` by default): the printed line is deterministic.

Calling conventions (NumPy arrays unless stated):

``check_forward(fn)``
    ``fn(x, gamma, beta, eps) -> out`` or ``-> (out, cache)`` (as :func:`bnutils.batchnorm_forward`).
    ``x`` is (N, C) or (N, C, H, W); ``gamma``, ``beta`` are (C,); training mode: batch statistics
    over every axis except axis 1, biased variance. ``out`` must have x's shape and dtype.
``check_backward(fn, forward=None)``
    ``fn(dout, cache) -> (dx, dgamma, dbeta)``, staged or closed form. ``cache`` is what
    ``forward(x, gamma, beta, eps)[1]`` returns; by default ``forward`` is
    :func:`bnutils.batchnorm_forward`, whose :class:`bnutils.BNCache` has fields ``x, mean, xc,
    var, std, inv_std, xhat, gamma, eps`` (per-channel ones shaped (1, C, 1, 1)). Pass your own
    forward to grade a backward that reads your own cache.
``check_running_stats(fn)``
    ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)``: one training batch ``x``
    updates the (C,) running statistics in **PyTorch's convention**,
    ``new = (1 - momentum) * old + momentum * batch_stat`` with the *unbiased* batch variance. Returning
    ``None`` after updating the two arrays in place is accepted too.
``check_layer(cls, kind=None)``
    ``cls`` is a ``torch.nn.Module`` class built like ``torch.nn.BatchNorm1d/2d``:
    ``cls(num_features, eps=1e-5, momentum=0.1)``, parameters ``weight`` and ``bias``, buffers
    ``running_mean``, ``running_var``, ``num_batches_tracked``. It is compared with torch's layer on
    state_dict keys and initial values, training outputs, input/weight/bias gradients, buffers after
    two steps, eval-mode outputs (batch of one included, buffers untouched), the constructor's eps
    and momentum, and float32 input with a large mean. ``kind`` is "1d" or "2d"; by default "2d" if
    the class name contains "2d", else "1d".
``check_fold(fn)``
    ``fn(layer, bn) -> new_layer`` (as :func:`bnutils.fold_batchnorm`): ``layer`` an ``nn.Linear`` or
    ``nn.Conv2d`` (with or without bias), ``bn`` a torch BatchNorm1d/2d in eval mode; the new layer
    must compute ``bn(layer(x))``, leaving ``layer`` and ``bn`` unchanged.

Every ``check_*`` also takes ``seed=0`` (which random cases) and ``verbose=True`` (print the line).

Mistakes diagnosed (the key in ``Result.mistakes`` first):

- forward: ``unbiased_variance``, ``eps_outside_sqrt``, ``eps_missing``, ``sqrt_missing``,
  ``wrong_axes`` (batch axis only, per example = layer norm, whole array, spatial = instance norm),
  ``mean_not_subtracted``, ``gamma_beta_swapped``, ``gamma_missing``, ``beta_missing``,
  ``one_pass_variance`` (right in float64, wrong in float32 with a large mean), ``wrong_shape``,
  ``wrong_dtype``;
- backward: ``gamma_missing_from_dx``, ``dx_no_mean_path``, ``dx_no_variance_path``,
  ``dx_stats_constant``, ``dx_divides_by_n`` (N instead of M = N·H·W), ``dx_batch_axis_only``,
  ``dx_sign``, ``dgamma_wrong_axes``/``dbeta_wrong_axes``, ``dgamma_dbeta_swapped``,
  ``dgamma_uses_x``;
- running statistics: ``momentum_flipped``, ``running_var_not_bessel_corrected``,
  ``running_var_is_std``, ``momentum_ignored``, ``not_updated``, ``wrong_axes``;
- layer: the forward, backward and running-statistics ones above, plus ``missing_buffers``,
  ``state_dict_keys``, ``initial_values``, ``eval_uses_batch_stats``, ``eval_updates_stats``,
  ``constructor_args_ignored``, ``num_batches_tracked``;
- fold: ``eps_missing``, ``eps_outside_sqrt``, ``sqrt_missing``, ``bias_not_scaled``,
  ``bias_dropped``, ``mean_not_subtracted``, ``gamma_missing``, ``beta_missing``,
  ``scaled_input_axis``, ``modifies_input``, ``no_bias``.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Result", "check_backward", "check_fold", "check_forward", "check_layer",
           "check_running_stats"]


# --------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Result:
    """Outcome of a check: true only when ``status == "correct"``.

    ``status``: "correct", "wrong", "not implemented" or "error" (the reader's code raised);
    ``message``: the one line printed; ``mistakes``: keys of the diagnosed mistakes (see the module
    docstring), empty when correct or undiagnosed.
    """
    status: str
    message: str
    mistakes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:  # the line was printed already; do not show it twice
        pass


class _NotImplemented(Exception):
    pass


class _Raised(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _call(fn: Callable, *args, where: str = ""):
    try:
        return fn(*args)
    except NotImplementedError:
        raise _NotImplemented() from None
    except Exception as e:  # the reader's code failed: say how, on which input
        raise _Raised(f"raised {type(e).__name__}: {e}" + (f" ({where})" if where else "")) from None


def _finish(name: str, result: Result, verbose: bool) -> Result:
    if verbose:
        print(f"{name}: {result.message}")
    return result


def _graded(name: str, body: Callable[[], Result], verbose: bool) -> Result:
    try:
        result = body()
    except _NotImplemented:
        result = Result("not implemented", "not implemented yet")
    except _Raised as e:
        result = Result("error", f"your code {e.what}")
    return _finish(name, result, verbose)


def _wrong(parts: list[tuple[str, str]], context: str = "") -> Result:
    keys = tuple(dict.fromkeys(k for k, _ in parts))
    text = "; ".join(dict.fromkeys(t for _, t in parts))
    return Result("wrong", f"wrong{' ' + context if context else ''}: {text}", keys)


def _close(a, b, rtol: float, atol: float) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=False))


def _max_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    return float("inf") if not np.all(np.isfinite(d)) else float(d.max(initial=0.0))


F64 = dict(rtol=1e-6, atol=1e-8)
"""Agreement in float64: round-off of any correct formula is ~1e-12; every listed mistake is >= 1e-4."""


# ----------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class _Case:
    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float
    label: str

    @property
    def shape_text(self) -> str:
        return f"x of shape {self.x.shape}, {self.x.dtype}, {self.label}"


def _make_case(rng, shape, dtype, loc, scale, eps, label) -> _Case:
    c = shape[1]
    locs = loc * rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    scales = scale * rng.uniform(0.5, 2.0, c)
    cshape = (1, c) + (1,) * (len(shape) - 2)
    x = locs.reshape(cshape) + scales.reshape(cshape) * rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    return _Case(x.astype(dtype), gamma.astype(dtype), beta.astype(dtype), eps, label)


def _cases(seed: int) -> tuple[list[_Case], list[_Case]]:
    """(float64 diagnosis cases, float32 numerics cases). N != C everywhere, so a sum over the wrong
    axis cannot have the right shape by accident."""
    rng = np.random.default_rng(seed)
    f64 = [
        _make_case(rng, (16, 5), np.float64, 2.0, 1.5, 1e-5, "ordinary means"),
        _make_case(rng, (6, 3, 4, 5), np.float64, 1.0, 2.0, 1e-5, "ordinary means"),
        _make_case(rng, (12, 4), np.float64, 1e-3, 1e-2, 1e-3, "tiny means and spreads"),
        _make_case(rng, (5, 4, 3, 3), np.float64, 1e-3, 3e-2, 1e-3, "tiny means and spreads"),
        _make_case(rng, (20, 3), np.float64, 1e3, 1.0, 1e-5, "large means"),
    ]
    f32 = [
        _make_case(rng, (16, 5), np.float32, 2.0, 1.5, 1e-5, "ordinary means"),
        _make_case(rng, (32, 3, 4, 4), np.float32, 1e4, 1.0, 1e-5, "large means (|mean| ~ 1e4, std ~ 1)"),
        _make_case(rng, (256, 4), np.float32, 1e4, 1.0, 1e-5, "large means (|mean| ~ 1e4, std ~ 1)"),
    ]
    return f64, f32


# ------------------------------------------------------------------------------------- forward variants

_AXES_TEXT = {
    "batch": "over axis 0 only (per channel *and position* for (N, C, H, W))",
    "example": "over each example's features (that is layer norm)",
    "axis1": "over axis 1, the channel axis",
    "all": "over the whole array (one mean and variance for all channels)",
    "spatial": "over each example's spatial positions (that is instance norm)",
}


def _axes(ndim: int, mode: str):
    if mode == "channel":
        return (0,) + tuple(range(2, ndim))
    if mode == "batch":
        return (0,)
    if mode == "example":
        return tuple(range(1, ndim))
    if mode == "axis1":
        return (1,)  # = "example" for (N, D)
    if mode == "all":
        return tuple(range(ndim))
    if mode == "spatial":
        return tuple(range(2, ndim)) if ndim > 2 else None
    raise ValueError(mode)


def _cshape(x) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


_FWD_OPTIONS = {  # option -> (correct value, wrong values)
    "axes": ("channel", ("batch", "example", "axis1", "all", "spatial")),
    "ddof": (0, (1,)),
    "eps": ("inside", ("outside", "none", "nosqrt")),
    "center": (True, (False,)),
    "affine": ("ok", ("swapped", "no_gamma", "no_beta", "none")),
}
_FWD_TEXT = {
    ("ddof", 1): ("unbiased_variance", "unbiased variance (divides by M - 1); batch norm normalizes "
                  "with the biased batch variance (divide by M: np.var's default ddof=0)"),
    ("eps", "outside"): ("eps_outside_sqrt", "eps outside the square root: divide by "
                         "sqrt(var + eps), not sqrt(var) + eps"),
    ("eps", "none"): ("eps_missing", "eps missing: divide by sqrt(var + eps), not sqrt(var)"),
    ("eps", "nosqrt"): ("sqrt_missing", "square root missing: divide by sqrt(var + eps), not var + eps"),
    ("center", False): ("mean_not_subtracted", "the batch mean is not subtracted"),
    ("affine", "swapped"): ("gamma_beta_swapped", "gamma and beta swapped: out = gamma * xhat + beta"),
    ("affine", "no_gamma"): ("gamma_missing", "gamma not applied: out = gamma * xhat + beta"),
    ("affine", "no_beta"): ("beta_missing", "beta not added: out = gamma * xhat + beta"),
    ("affine", "none"): ("gamma_missing", "neither gamma nor beta applied: out = gamma * xhat + beta"),
}


def _forward_variant(case: _Case, axes="channel", ddof=0, eps="inside", center=True, affine="ok"):
    x = case.x.astype(np.float64)
    red = _axes(x.ndim, axes)
    if red is None:
        return None
    mean = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, ddof=ddof, keepdims=True)
    xc = x - mean if center else x
    denom = {"inside": np.sqrt(var + case.eps), "outside": np.sqrt(var) + case.eps,
             "none": np.sqrt(var), "nosqrt": var + case.eps}[eps]
    with np.errstate(divide="ignore", invalid="ignore"):
        xhat = xc / denom
    g = case.gamma.astype(np.float64).reshape(_cshape(x))
    b = case.beta.astype(np.float64).reshape(_cshape(x))
    return {"ok": g * xhat + b, "swapped": b * xhat + g, "no_gamma": xhat + b,
            "no_beta": g * xhat, "none": xhat}[affine]


def _variants(options: dict, max_wrong: int = 3):
    """Every combination of up to ``max_wrong`` wrong options, fewest first."""
    names = list(options)
    yield {}
    for k in range(1, max_wrong + 1):
        for chosen in itertools.combinations(names, k):
            for values in itertools.product(*(options[n][1] for n in chosen)):
                yield dict(zip(chosen, values, strict=True))


def _describe_forward(variant: dict) -> list[tuple[str, str]]:
    parts = []
    for opt, val in variant.items():
        if opt == "axes":
            parts.append(("wrong_axes", f"statistics {_AXES_TEXT[val]}; batch norm reduces over every "
                                        "axis but axis 1: (0,) for (N, D), (0, 2, 3) for (N, C, H, W)"))
        else:
            parts.append(_FWD_TEXT[opt, val])
    return parts


def _diagnose_forward(outs: list, cases: list[_Case]) -> list[tuple[str, str]] | None:
    """The fewest mistakes whose outputs match ``outs`` on every case, or None."""
    for variant in _variants(_FWD_OPTIONS):
        if not variant:
            continue
        cands = [_forward_variant(c, **variant) for c in cases]
        if any(cand is None for cand in cands):
            continue
        if all(_close(o, cand, **F64) for o, cand in zip(outs, cands, strict=True)):
            return _describe_forward(variant)
    return None


def _first_output(ret):
    return ret[0] if isinstance(ret, (tuple, list)) else ret


# ------------------------------------------------------------------------------------------ forward

def check_forward(fn: Callable, *, seed: int = 0, verbose: bool = True) -> Result:
    """Grade a training-mode forward pass ``fn(x, gamma, beta, eps) -> out`` (or ``(out, cache)``)."""
    from .functional import batchnorm_forward

    def body() -> Result:
        f64, f32 = _cases(seed)
        outs = []
        for case in f64:
            out = _first_output(_call(fn, case.x.copy(), case.gamma.copy(), case.beta.copy(), case.eps,
                                      where=case.shape_text))
            out = np.asarray(out)
            if out.shape != case.x.shape:
                return _wrong([("wrong_shape", f"output has shape {out.shape} for {case.shape_text}; "
                                               f"it must have x's shape")])
            outs.append(out)
        refs = [batchnorm_forward(c.x, c.gamma, c.beta, c.eps)[0] for c in f64]
        if not all(_close(o, r, **F64) for o, r in zip(outs, refs, strict=True)):
            parts = _diagnose_forward(outs, f64)
            if parts is not None:
                return _wrong(parts)
            bad = next(c for o, r, c in zip(outs, refs, f64, strict=True) if not _close(o, r, **F64))
            err = next(_max_err(o, r) for o, r in zip(outs, refs, strict=True) if not _close(o, r, **F64))
            return Result("wrong", f"wrong: output differs from batch norm's (max error {err:.3g} on "
                                   f"{bad.shape_text}) and matches none of the common mistakes checked "
                                   f"(variance ddof, eps placement, reduction axes, gamma/beta)")
        for case in f32:
            out = np.asarray(_first_output(_call(fn, case.x.copy(), case.gamma.copy(), case.beta.copy(),
                                                 case.eps, where=case.shape_text)))
            ref = batchnorm_forward(case.x.astype(np.float64), case.gamma.astype(np.float64),
                                    case.beta.astype(np.float64), case.eps)[0]
            if out.shape != ref.shape:
                return _wrong([("wrong_shape", f"output has shape {out.shape} for {case.shape_text}")])
            if not _close(out, ref, rtol=1e-3, atol=2e-2):
                err = _max_err(out, ref)
                err_text = "NaN or inf" if not np.isfinite(err) else f"max error {err:.3g}"
                return _wrong([("one_pass_variance",
                                f"right in float64 but inaccurate in float32 with a large mean ({err_text} "
                                f"on {case.shape_text}): the symptom of the one-pass variance "
                                f"E[x^2] - E[x]^2, which cancels catastrophically; compute the mean "
                                f"first, then the mean of (x - mean)^2")])
            if out.dtype != case.x.dtype:
                return _wrong([("wrong_dtype", f"returns {out.dtype} for {case.x.dtype} input; keep the "
                                               f"input's dtype")])
        n = len(f64) + len(f32)
        return Result("correct", f"correct ({n} cases: (N, D) and (N, C, H, W); float64 and float32; "
                                 f"tiny, ordinary and large means)")

    return _graded("check_forward", body, verbose)


# ----------------------------------------------------------------------------------------- backward

def _dx_variants(dout, case: _Case) -> dict[str, np.ndarray]:
    """dx for the correct formula and for each known mistake, in float64."""
    x = case.x.astype(np.float64)
    red = _axes(x.ndim, "channel")
    m = x.size // x.shape[1]
    mean = x.mean(axis=red, keepdims=True)
    inv = 1.0 / np.sqrt(x.var(axis=red, keepdims=True) + case.eps)
    xhat = (x - mean) * inv
    g = case.gamma.astype(np.float64).reshape(_cshape(x))
    s1 = dout.sum(axis=red, keepdims=True)
    s2 = (dout * xhat).sum(axis=red, keepdims=True)
    correct = g * inv * (dout - s1 / m - xhat * s2 / m)
    n = x.shape[0]
    b1, b2 = dout.sum(axis=0, keepdims=True), (dout * xhat).sum(axis=0, keepdims=True)
    return {
        "correct": correct,
        "gamma_missing_from_dx": correct / g,
        "dx_no_mean_path": g * inv * (dout - xhat * s2 / m),
        "dx_no_variance_path": g * inv * (dout - s1 / m),
        "dx_stats_constant": g * inv * dout,
        "dx_divides_by_n": g * inv * (dout - s1 / n - xhat * s2 / n),
        "dx_batch_axis_only": g * inv * (dout - b1 / n - xhat * b2 / n),
        "dx_sign": -correct,
    }


_DX_TEXT = {
    "gamma_missing_from_dx": "gamma missing from dx: every path to x goes through out = gamma * xhat "
                             "+ beta, so dx carries a factor gamma",
    "dx_no_mean_path": "dx ignores the path through the batch mean (the -sum(dout)/M term is missing)",
    "dx_no_variance_path": "dx ignores the path through the batch variance (the "
                           "-xhat * sum(dout * xhat)/M term is missing)",
    "dx_stats_constant": "dx treats the batch mean and variance as constants (dx = gamma * dout / std); "
                         "they depend on x",
    "dx_divides_by_n": "dx divides by N, the batch size, instead of M = N*H*W, the number of values "
                       "per channel",
    "dx_batch_axis_only": "dx sums over axis 0 only; for (N, C, H, W) sum over axes (0, 2, 3) and "
                          "divide by M = N*H*W",
    "dx_sign": "dx has the wrong sign",
}


_PARAM_AXES = ("channel", "batch", "example", "all", "spatial", "axis1")


def _param_grad_variant(dout, case: _Case, term: str, mode: str):
    """sum of dout * xhat ('dgamma'), dout ('dbeta') or dout * x ('dgamma_x') over the axes of ``mode``."""
    x = case.x.astype(np.float64)
    red = _axes(x.ndim, "channel")
    axes = _axes(x.ndim, mode)
    if axes is None:
        return None
    xhat = (x - x.mean(axis=red, keepdims=True)) / np.sqrt(x.var(axis=red, keepdims=True) + case.eps)
    t = {"dgamma": dout * xhat, "dbeta": dout, "dgamma_x": dout * x}[term]
    return t.sum(axis=axes)


def _squeeze_c(a, c: int):
    a = np.asarray(a)
    return a.reshape(c) if a.size == c and a.ndim >= 1 and max(a.shape) == c else a


def _same_values(got, cand) -> bool:
    got, cand = np.asarray(got), np.asarray(cand)
    return got.size == cand.size and _close(got.reshape(-1), cand.reshape(-1), **F64)


def _diagnose_param(name: str, got: list, dout: list, cases: list[_Case]) -> list[tuple[str, str]]:
    """Which (term, axes) the reader's dgamma or dbeta matches on every case (called when it is wrong)."""
    want = "dgamma" if name == "dgamma" else "dbeta"
    for term in (want, "dbeta" if want == "dgamma" else "dgamma", "dgamma_x"):
        for mode in _PARAM_AXES:
            if term == want and mode == "channel":
                continue
            cands = [_param_grad_variant(d, c, term, mode) for d, c in zip(dout, cases, strict=True)]
            if any(c is None for c in cands):
                continue
            if not all(_same_values(g, c) for g, c in zip(got, cands, strict=True)):
                continue
            if term == want:
                return [(f"{name}_wrong_axes", f"{name} summed {_AXES_TEXT[mode]}; sum over every axis "
                                               f"but axis 1: (0,) for (N, D), (0, 2, 3) for (N, C, H, W)")]
            if term == "dgamma_x":
                return [("dgamma_uses_x", "dgamma uses x instead of xhat: dgamma = sum(dout * xhat)")]
            return [("dgamma_dbeta_swapped", "dgamma and dbeta swapped: dgamma = sum(dout * xhat), "
                                             "dbeta = sum(dout)")]
    return []


def check_backward(fn: Callable, forward: Callable | None = None, *, seed: int = 0,
                   verbose: bool = True) -> Result:
    """Grade a backward pass ``fn(dout, cache) -> (dx, dgamma, dbeta)``, staged or closed form.

    ``cache = forward(x, gamma, beta, eps)[1]``; ``forward`` defaults to ``bnutils.batchnorm_forward``.
    """
    from .functional import batchnorm_backward_fast, batchnorm_forward
    fwd = forward or batchnorm_forward

    def body() -> Result:
        f64, f32 = _cases(seed)
        rng = np.random.default_rng(seed + 1)
        douts = [rng.standard_normal(c.x.shape) for c in f64]
        got = []
        for case, dout in zip(f64, douts, strict=True):
            ret = _call(fwd, case.x.copy(), case.gamma.copy(), case.beta.copy(), case.eps,
                        where="in forward, " + case.shape_text)
            if not isinstance(ret, (tuple, list)) or len(ret) != 2:
                return Result("error", "your forward must return (out, cache) for the backward to use")
            res = _call(fn, dout.copy(), ret[1], where=case.shape_text)
            if not isinstance(res, (tuple, list)) or len(res) != 3:
                return Result("error", f"backward must return (dx, dgamma, dbeta), got {type(res).__name__}")
            got.append(tuple(np.asarray(r) for r in res))
        refs = []
        for case, dout in zip(f64, douts, strict=True):
            cache = batchnorm_forward(case.x, case.gamma, case.beta, case.eps)[1]
            refs.append(batchnorm_backward_fast(dout, cache))
        parts: list[tuple[str, str]] = []
        # dx
        dxs = [g[0] for g in got]
        for case, dx in zip(f64, dxs, strict=True):
            if dx.shape != case.x.shape:
                return _wrong([("wrong_shape", f"dx has shape {dx.shape} for {case.shape_text}; it "
                                               f"must have x's shape")])
        if not all(_close(dx, r[0], **F64) for dx, r in zip(dxs, refs, strict=True)):
            variants = [_dx_variants(d, c) for d, c in zip(douts, f64, strict=True)]
            match = next((k for k in variants[0] if k != "correct" and all(
                _close(dx, v[k], **F64) for dx, v in zip(dxs, variants, strict=True))), None)
            if match:
                parts.append((match, _DX_TEXT[match]))
            else:
                err = max(_max_err(dx, r[0]) for dx, r in zip(dxs, refs, strict=True))
                parts.append(("dx_wrong", f"dx differs from the reference (max error {err:.3g}) and "
                                          f"matches none of the common mistakes checked"))
        for i, name in ((1, "dgamma"), (2, "dbeta")):
            vals = [g[i] for g in got]
            vals = [_squeeze_c(v, c.x.shape[1]) for v, c in zip(vals, f64, strict=True)]
            ok = all(_close(v, r[i], **F64) for v, r in zip(vals, refs, strict=True))
            if not ok:
                diag = _diagnose_param(name, vals, douts, f64)
                if not diag:
                    err = max(_max_err(v, r[i]) for v, r in zip(vals, refs, strict=True))
                    diag = [(f"{name}_wrong", f"{name} differs from the reference (max error {err:.3g}) "
                                              f"and matches none of the common mistakes checked")]
                parts += diag
        if parts:
            return _wrong(parts)
        for case in f32:  # numerics: float32 gradients close to the float64 ones
            dout = rng.standard_normal(case.x.shape).astype(np.float32)
            ret = _call(fwd, case.x.copy(), case.gamma.copy(), case.beta.copy(), case.eps,
                        where="in forward, " + case.shape_text)
            res = _call(fn, dout.copy(), ret[1], where=case.shape_text)
            c64 = batchnorm_forward(case.x.astype(np.float64), case.gamma.astype(np.float64),
                                    case.beta.astype(np.float64), case.eps)[1]
            ref = batchnorm_backward_fast(dout.astype(np.float64), c64)
            scale = [1.0, np.sqrt(case.x.size), np.sqrt(case.x.size)]
            for r, want, s, nm in zip(res, ref, scale, ("dx", "dgamma", "dbeta"), strict=True):
                r = _squeeze_c(r, case.x.shape[1]) if nm != "dx" else np.asarray(r)
                if not _close(r, want, rtol=1e-3, atol=2e-2 * s):
                    return _wrong([("float32_inaccurate", f"{nm} right in float64 but inaccurate in "
                                    f"float32 (max error {_max_err(r, want):.3g} on {case.shape_text})")])
        return Result("correct", f"correct (dx, dgamma, dbeta on {len(f64) + len(f32)} cases: (N, D) and "
                                 f"(N, C, H, W); float64 and float32; tiny, ordinary and large means)")

    return _graded("check_backward", body, verbose)


# ------------------------------------------------------------------------------------ running stats

_RS_OPTIONS = {
    "momentum": ("torch", ("flipped", "ignored", "frozen")),
    "var": ("unbiased", ("biased", "std")),
    "axes": ("channel", ("batch", "example", "all")),
}
_RS_TEXT = {
    ("momentum", "flipped"): ("momentum_flipped", "momentum convention flipped: PyTorch's is new = "
                              "(1 - momentum) * old + momentum * batch (Keras' momentum is 1 - PyTorch's)"),
    ("momentum", "ignored"): ("momentum_ignored", "the batch statistics replace the running ones: new = "
                              "(1 - momentum) * old + momentum * batch"),
    ("momentum", "frozen"): ("not_updated", "the running statistics are not updated"),
    ("var", "biased"): ("running_var_not_bessel_corrected", "running variance not Bessel-corrected: "
                        "PyTorch averages the unbiased batch variance var * M / (M - 1) (and normalizes "
                        "the batch with the biased one)"),
    ("var", "std"): ("running_var_is_std", "the running variance is updated with the batch standard "
                     "deviation instead of the variance"),
}


def _running_variant(rm, rv, x, mom, momentum="torch", var="unbiased", axes="channel"):
    x = x.astype(np.float64)
    red = _axes(x.ndim, axes)
    bm = x.mean(axis=red)
    bv = x.var(axis=red, ddof=1 if var == "unbiased" else 0)
    if var == "std":
        bv = np.sqrt(x.var(axis=red, ddof=0))
    if axes != "channel":  # a per-channel running statistic needs one value per channel
        if bm.size != rm.size:
            return None
        bm, bv = bm.reshape(rm.shape), bv.reshape(rm.shape)
    a = {"torch": mom, "flipped": 1 - mom, "ignored": 1.0, "frozen": 0.0}[momentum]
    return (1 - a) * rm + a * bm, (1 - a) * rv + a * bv


def _rs_cases(seed: int):
    rng = np.random.default_rng(seed + 2)
    cases = []
    for shape, mom in (((16, 5), 0.1), ((6, 3, 4, 5), 0.3), ((10, 4), 0.3)):
        c = shape[1]
        x = _make_case(rng, shape, np.float64, 2.0, 1.5, 1e-5, "").x
        cases.append((rng.standard_normal(c), rng.uniform(0.5, 2.0, c), x, mom))
    return cases


def _diagnose_running(news: list, cases: list) -> list[tuple[str, str]] | None:
    for variant in _variants(_RS_OPTIONS):
        if not variant:
            continue
        cands = [_running_variant(rm, rv, x, mom, **variant) for rm, rv, x, mom in cases]
        if any(c is None for c in cands):
            continue
        if all(_close(n[0], c[0], **F64) and _close(n[1], c[1], **F64)
               for n, c in zip(news, cands, strict=True)):
            parts = []
            for opt, val in variant.items():
                if opt == "axes":
                    parts.append(("wrong_axes", f"batch statistics {_AXES_TEXT[val]}; reduce over every "
                                                f"axis except the channel axis 1"))
                else:
                    parts.append(_RS_TEXT[opt, val])
            return parts
    return None


def check_running_stats(fn: Callable, *, seed: int = 0, verbose: bool = True) -> Result:
    """Grade ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)`` (PyTorch convention)."""

    def body() -> Result:
        cases = _rs_cases(seed)
        news = []
        for rm, rv, x, mom in cases:
            rm_arg, rv_arg = rm.copy(), rv.copy()
            ret = _call(fn, rm_arg, rv_arg, x.copy(), mom, where=f"batch of shape {x.shape}")
            if ret is None:  # updated in place
                ret = (rm_arg, rv_arg)
            if not isinstance(ret, (tuple, list)) or len(ret) != 2:
                return Result("error", "must return (new_mean, new_var) (or update the arrays in place "
                                       "and return None)")
            new = tuple(_squeeze_c(r, rm.size) for r in ret)
            for r in new:
                if r.shape != rm.shape:
                    return _wrong([("wrong_shape", f"returned statistics of shape {r.shape} for a batch "
                                                   f"of shape {x.shape}; expected {rm.shape}, one per "
                                                   f"channel")])
            news.append(new)
        refs = [_running_variant(rm, rv, x, mom) for rm, rv, x, mom in cases]
        if all(_close(n[0], r[0], **F64) and _close(n[1], r[1], **F64)
               for n, r in zip(news, refs, strict=True)):
            return Result("correct", f"correct ({len(cases)} batches, (N, D) and (N, C, H, W), "
                                     f"momentum 0.1 and 0.3, PyTorch convention)")
        parts = _diagnose_running(news, cases)
        if parts is None:
            return Result("wrong", "wrong: the running statistics differ from PyTorch's update and match "
                                   "none of the common mistakes checked (momentum convention, Bessel "
                                   "correction, reduction axes)")
        return _wrong(parts)

    return _graded("check_running_stats", body, verbose)


# -------------------------------------------------------------------------------------------- layer

def _layer_cases(seed: int, kind: str):
    rng = np.random.default_rng(seed + 3)
    shapes = [(16, 5), (10, 4)] if kind == "1d" else [(6, 3, 4, 5), (5, 4, 3, 3)]
    c = shapes[0][1]
    # one channel count so one layer sees every batch: reshape the second to the first's C
    shapes[1] = (shapes[1][0], c) + shapes[1][2:]
    xs = [_make_case(rng, s, np.float64, 2.0, 1.5, 1e-5, "").x for s in shapes]
    x_small = _make_case(rng, shapes[0], np.float64, 1e-3, 3e-2, 1e-5, "").x  # eps matters here
    x_eval = _make_case(rng, (7,) + shapes[0][1:], np.float64, 1.0, 2.0, 1e-5, "").x
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    douts = [rng.standard_normal(x.shape) for x in xs]
    return c, xs, x_small, x_eval, gamma, beta, douts


def check_layer(cls: type, kind: str | None = None, *, seed: int = 0, verbose: bool = True) -> Result:
    """Grade a ``torch.nn.Module`` class against ``torch.nn.BatchNorm1d`` (kind "1d") or ``2d``."""
    import torch
    from torch import nn

    kind = kind or ("2d" if "2d" in getattr(cls, "__name__", "").lower() else "1d")
    if kind not in ("1d", "2d"):
        raise ValueError(f"kind must be '1d' or '2d', got {kind!r}")
    ref_cls = nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d
    t = torch.float64

    def body() -> Result:
        c, xs, x_small, x_eval, gamma, beta, douts = _layer_cases(seed, kind)
        layer = _call(cls, c, where=f"constructing {getattr(cls, '__name__', cls)}({c})")
        ref = ref_cls(c)
        keys, ref_keys = set(layer.state_dict()), set(ref.state_dict())
        missing = sorted(ref_keys - keys)
        if {"running_mean", "running_var"} & set(missing):
            return _wrong([("missing_buffers", f"state_dict lacks {missing}: register the running "
                                               f"statistics with self.register_buffer(...) so that "
                                               f"state_dict, .to() and .double() see them")])
        if {"weight", "bias"} & set(missing):
            return _wrong([("state_dict_keys", f"state_dict lacks {missing}: gamma and beta must be "
                                               f"nn.Parameters named weight and bias")])
        init = {k: layer.state_dict()[k] for k in ("weight", "bias", "running_mean", "running_var")}
        want = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        bad_init = [k for k, v in init.items() if not torch.all(v.detach() == want[k])]
        if bad_init:
            return _wrong([("initial_values", "initial values differ from torch's (weight 1, bias 0, "
                                              f"running_mean 0, running_var 1): {', '.join(bad_init)}")])
        layer, ref = layer.to(t), ref.to(t)
        with torch.no_grad():
            for m in (layer, ref):
                m.weight.copy_(torch.as_tensor(gamma))
                m.bias.copy_(torch.as_tensor(beta))
        layer.train()
        stats = [(np.zeros(c), np.ones(c))]
        for step, (x, dout) in enumerate(zip(xs, douts, strict=True)):
            outs, grads = [], []
            for m in (layer, ref):
                xt = torch.tensor(x, dtype=t, requires_grad=True)
                for p in (m.weight, m.bias):
                    p.grad = None
                out = _call(m, xt, where=f"training-mode forward on x of shape {tuple(x.shape)}") \
                    if m is layer else m(xt)
                (out * torch.as_tensor(dout)).sum().backward()
                outs.append(out.detach().numpy())
                grads.append((xt.grad.numpy(), _np(m.weight.grad), _np(m.bias.grad)))
            case = _Case(x, gamma, beta, 1e-5, "")
            if not _close(outs[0], outs[1], **F64):
                parts = _diagnose_forward([outs[0]], [case])
                return _wrong(parts or [("forward_wrong", f"training output differs from torch's (max error "
                                                          f"{_max_err(outs[0], outs[1]):.3g})")],
                              "in training mode")
            if any(g is None for g in grads[0]):
                return _wrong([("no_gradient", "no gradient reaches x, weight or bias")])
            parts = []
            if not _close(grads[0][0], grads[1][0], **F64):
                variants = _dx_variants(dout, case)
                match = next((k for k in variants if k != "correct" and _close(grads[0][0], variants[k],
                                                                                **F64)), None)
                parts.append((match, _DX_TEXT[match]) if match else
                             ("dx_wrong", f"input gradient differs from torch's (max error "
                                          f"{_max_err(grads[0][0], grads[1][0]):.3g})"))
            for i, name in ((1, "dgamma"), (2, "dbeta")):
                if not _close(grads[0][i], grads[1][i], **F64):
                    parts += _diagnose_param(name, [grads[0][i]], [dout], [case]) or [
                        (f"{name}_wrong", f"{name} differs from torch's")]
            if parts:
                return _wrong(parts, "in the gradients")
            rm, rv = _np(layer.running_mean), _np(layer.running_var)
            prev = stats[-1]
            if not (_close(rm, _np(ref.running_mean), **F64) and _close(rv, _np(ref.running_var), **F64)):
                parts = _diagnose_running([(rm, rv)], [(prev[0], prev[1], x, 0.1)])
                return _wrong(parts or [("running_wrong", "running statistics differ from torch's")],
                              f"in the running statistics after step {step + 1}")
            stats.append((rm, rv))
            nbt = layer.state_dict().get("num_batches_tracked")
            if nbt is None or int(nbt) != step + 1:
                count = None if nbt is None else int(nbt)
                return _wrong([("num_batches_tracked", f"num_batches_tracked is {count} after {step + 1} "
                                                      f"training steps; torch counts them")])
        # eval mode
        layer.eval(), ref.eval()
        before = (_np(layer.running_mean).copy(), _np(layer.running_var).copy())
        for xe in (x_eval, x_eval[:1]):
            with torch.no_grad():
                got = _call(layer, torch.tensor(xe, dtype=t), where=f"eval-mode forward on {xe.shape}")
                want = ref(torch.tensor(xe, dtype=t))
            got = got.numpy()
            if not _close(got, want.numpy(), **F64):
                batch = _forward_variant(_Case(xe, gamma, beta, 1e-5, "")) if xe.shape[0] > 1 else None
                if batch is not None and _close(got, batch, **F64):
                    return _wrong([("eval_uses_batch_stats", "eval mode normalizes with the batch "
                                                             "statistics; it must use the running ones")])
                err = _max_err(got, want.numpy())
                return _wrong([("eval_wrong", f"eval-mode output differs from torch's (max error "
                                              f"{err:.3g} on x of shape {xe.shape})")])
        if not (np.array_equal(before[0], _np(layer.running_mean))
                and np.array_equal(before[1], _np(layer.running_var))):
            return _wrong([("eval_updates_stats", "eval mode changes the running statistics; they must only "
                                                  "be updated in training mode")])
        # the constructor's eps and momentum, on a batch where eps matters
        custom = _call(cls, c, 0.01, 0.3, where=f"constructing {getattr(cls, '__name__', cls)}({c}, "
                                               f"eps=0.01, momentum=0.3) with positional arguments") \
            .to(t).train()
        ref2 = ref_cls(c, eps=0.01, momentum=0.3).to(t).train()
        xt = torch.tensor(x_small, dtype=t)
        with torch.no_grad():
            a, b = _call(custom, xt, where="training-mode forward"), ref2(xt)
        same_stats = _close(_np(custom.running_mean), _np(ref2.running_mean), **F64)
        if not (_close(a.numpy(), b.numpy(), **F64) and same_stats):
            return _wrong([("constructor_args_ignored", "cls(num_features, 0.01, 0.3) does not behave like "
                                                        "torch's with eps=0.01, momentum=0.3: the eps or "
                                                        "momentum argument is ignored")])
        # float32 with a large mean
        rng = np.random.default_rng(seed + 4)
        shape = (64, c) if kind == "1d" else (16, c, 4, 4)
        x32 = _make_case(rng, shape, np.float32, 1e4, 1.0, 1e-5, "").x
        m32 = cls(c).train()
        with torch.no_grad():
            got = _call(m32, torch.tensor(x32), where="float32 training-mode forward").numpy()
        want = _forward_variant(_Case(x32, np.ones(c), np.zeros(c), 1e-5, ""))
        if not _close(got, want, rtol=1e-3, atol=2e-2):
            return _wrong([("one_pass_variance", f"right in float64 but inaccurate in float32 with a large "
                                                 f"mean (|mean| ~ 1e4, std ~ 1; max error "
                                                 f"{_max_err(got, want):.3g}): the symptom of the one-pass "
                                                 f"variance E[x^2] - E[x]^2; use (x - mean)^2")])
        return Result("correct", f"correct (matches torch.nn.BatchNorm{kind} on outputs, gradients, buffers, "
                                 f"state_dict keys, eval mode and float32 with a large mean)")

    return _graded("check_layer", body, verbose)


def _np(t):
    return None if t is None else t.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------- fold

_FOLD_MISTAKES = {
    "eps_missing": "eps missing: scale = gamma / sqrt(running_var + eps)",
    "eps_outside_sqrt": "eps outside the square root: scale = gamma / sqrt(running_var + eps)",
    "sqrt_missing": "square root missing: scale = gamma / sqrt(running_var + eps)",
    "bias_not_scaled": "the layer's own bias is not scaled: new bias = scale * b + beta - scale * "
                       "running_mean",
    "bias_dropped": "the layer's own bias is dropped: new bias = scale * b + beta - scale * running_mean",
    "mean_not_subtracted": "running_mean missing from the new bias: new bias = scale * (b - running_mean) "
                           "+ beta",
    "gamma_missing": "gamma missing from the scale: scale = gamma / sqrt(running_var + eps)",
    "beta_missing": "beta missing from the new bias",
    "scaled_input_axis": "the weight is scaled along its input axis; scale each output row "
                         "(W * scale[:, None] for Linear, per output channel for Conv)",
}


def _fold_variant(layer, bn, mistake: str | None):
    import torch
    f = torch.float64
    var, mean, eps = bn.running_var.to(f), bn.running_mean.to(f), bn.eps
    g, b = bn.weight.detach().to(f), bn.bias.detach().to(f)
    if mistake == "gamma_missing":
        g = torch.ones_like(g)
    if mistake == "beta_missing":
        b = torch.zeros_like(b)
    denom = {"eps_missing": var.sqrt(), "eps_outside_sqrt": var.sqrt() + eps,
             "sqrt_missing": var + eps}.get(mistake, (var + eps).sqrt())
    scale = g / denom
    shift = b if mistake == "mean_not_subtracted" else b - mean * scale
    w = layer.weight.detach().to(f)
    if mistake == "scaled_input_axis":
        if w.shape[0] != w.shape[1]:
            return None
        w = w * scale.view((1, -1) + (1,) * (w.dim() - 2))
    else:
        w = w * scale.view((-1,) + (1,) * (w.dim() - 1))
    lb = torch.zeros_like(shift) if layer.bias is None else layer.bias.detach().to(f)
    if mistake == "bias_dropped":
        if layer.bias is None:
            return None
        bias = shift
    elif mistake == "bias_not_scaled":
        if layer.bias is None:
            return None
        bias = lb + shift
    else:
        bias = lb * scale + shift
    return w, bias


def _apply(layer, w, bias, x):
    import torch.nn.functional as F
    from torch import nn
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, bias)
    return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _fold_cases(seed: int, dtype):
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(seed + 5)
    cases = []
    specs = [("linear", 6, 4, True, 1e-5), ("linear", 4, 4, False, 1e-3), ("linear", 4, 4, True, 1e-3),
             ("conv", 3, 5, True, 1e-5), ("conv", 4, 4, False, 1e-3)]
    for kind, cin, cout, bias, eps in specs:
        if kind == "linear":
            layer, bn, xshape = nn.Linear(cin, cout, bias=bias), nn.BatchNorm1d(cout, eps=eps), (7, cin)
        else:
            layer = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            bn, xshape = nn.BatchNorm2d(cout, eps=eps), (3, cin, 5, 5)
        layer, bn = layer.to(dtype), bn.to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=dtype))
            if bias:
                layer.bias.copy_(torch.randn(cout, generator=gen, dtype=dtype))
            bn.weight.copy_(torch.rand(cout, generator=gen, dtype=dtype) * 1.5 + 0.5)
            bn.bias.copy_(torch.randn(cout, generator=gen, dtype=dtype))
            bn.running_mean.copy_(torch.randn(cout, generator=gen, dtype=dtype) * 2)
            bn.running_var.copy_(torch.rand(cout, generator=gen, dtype=dtype) * 0.5 + 0.01)
        bn.eval()
        cases.append((layer, bn, torch.randn(xshape, generator=gen, dtype=dtype)))
    return cases


def check_fold(fn: Callable, *, seed: int = 0, verbose: bool = True) -> Result:
    """Grade ``fn(layer, bn) -> new_layer`` equal to ``bn(layer(x))`` in eval mode (Linear and Conv2d)."""
    import torch

    def body() -> Result:
        outs = []
        cases = _fold_cases(seed, torch.float64)
        for layer, bn, x in cases:
            snap = copy.deepcopy((layer.state_dict(), bn.state_dict()))
            where = f"{type(layer).__name__} {'with' if layer.bias is not None else 'without'} bias"
            new = _call(fn, layer, bn, where=where)
            if not callable(new):
                return Result("error", f"must return a layer (an nn.Module), got {type(new).__name__}")
            for before, after in zip(snap, (layer.state_dict(), bn.state_dict()), strict=True):
                if any(not torch.equal(before[k], after[k]) for k in before):
                    return _wrong([("modifies_input", "the layer or bn passed in was modified; build a "
                                                      "new layer (copy.deepcopy) and leave them unchanged")])
            if getattr(new, "bias", 0) is None:
                return _wrong([("no_bias", f"the folded layer has no bias ({where}); BN's shift must go "
                                           f"into a bias")])
            with torch.no_grad():
                outs.append(_call(new, x, where=f"calling the folded layer ({where})").to(torch.float64))
        with torch.no_grad():
            refs = [bn(layer(x)) for layer, bn, x in cases]
        if all(_close(o.numpy(), r.numpy(), **F64) for o, r in zip(outs, refs, strict=True)):
            for layer, bn, x in _fold_cases(seed, torch.float32):
                new = _call(fn, layer, bn, where="float32 layer")
                with torch.no_grad():
                    got, want = new(x), bn(layer(x))
                if got.dtype != torch.float32:
                    return _wrong([("wrong_dtype", f"the folded layer returns {got.dtype} for a float32 "
                                                   f"layer; cast the new weight and bias back")])
                if not _close(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4):
                    return _wrong([("float32_inaccurate", "right in float64 but inaccurate in float32")])
            return Result("correct", f"correct ({len(cases)} Linear and Conv2d layers with and without bias, "
                                     f"float64 and float32)")
        for mistake in _FOLD_MISTAKES:
            matched, usable = True, 0
            for (layer, bn, x), o in zip(cases, outs, strict=True):
                v = _fold_variant(layer, bn, mistake)
                if v is None:
                    continue
                usable += 1
                with torch.no_grad():
                    if not _close(o.numpy(), _apply(layer, *v, x.to(torch.float64)).numpy(), **F64):
                        matched = False
                        break
            if matched and usable:
                return _wrong([(mistake, _FOLD_MISTAKES[mistake])])
        err = max(_max_err(o.numpy(), r.numpy()) for o, r in zip(outs, refs, strict=True))
        return Result("wrong", f"wrong: the folded layer differs from bn(layer(x)) (max error {err:.3g}) and "
                               f"matches none of the common mistakes checked")

    return _graded("check_fold", body, verbose)
