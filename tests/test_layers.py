"""bnutils.BatchNorm1d/2d/3d and BatchNormFunction against torch.nn.BatchNorm1d/2d and gradcheck."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnutils as bn
from bnutils.layers import BatchNormFunction, _column_sum_compiled, _per_channel_sum

KINDS = {  # name -> (bnutils class, torch class, number of spatial dims)
    "1d": (bn.BatchNorm1d, torch.nn.BatchNorm1d, 0),
    "1d-seq": (bn.BatchNorm1d, torch.nn.BatchNorm1d, 1),
    "2d": (bn.BatchNorm2d, torch.nn.BatchNorm2d, 2),
    "3d": (bn.BatchNorm3d, torch.nn.BatchNorm3d, 3),
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}



def assert_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * (1 + max |expected|): relative to the scale of the tensor."""
    if expected is None:
        assert actual is None, what
        return
    assert actual is not None, what
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = 1 + (expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    n_spatial = KINDS[kind][2]
    n = draw(st.integers(1, 6))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=n_spatial, max_size=n_spatial)))
    if n * int(torch.tensor(spatial).prod()) < 2:  # training needs > 1 value per channel
        n += 1
    return {
        "kind": kind,
        "shape": (n, draw(st.integers(1, 5))) + spatial,
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "momentum": draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        "steps": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "loc": draw(st.floats(-20, 20)),
        "scale": draw(st.floats(0.5, 5)),
    }


def make_pair(cfg, dtype):
    """A torch module with random affine parameters and a bnutils module loaded from its state dict."""
    ours_cls, torch_cls, _ = KINDS[cfg["kind"]]
    kw = {"eps": cfg["eps"], "momentum": cfg["momentum"], "affine": cfg["affine"],
          "track_running_stats": cfg["track"], "dtype": dtype}
    c = cfg["shape"][1]
    ref = torch_cls(c, **kw)
    ours = ours_cls(c, **kw)
    if cfg["affine"]:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2).mul_(torch.randint(0, 2, (c,), dtype=dtype) * 2 - 1)
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())  # torch -> bnutils
    return ours, ref


def step_results(module, x, g):
    """Forward x through module, backpropagate g; return every quantity to compare, by name."""
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(g)
    res = {"output": y.detach(), "input gradient": x.grad,
           "running_mean": module.running_mean, "running_var": module.running_var}
    if module.affine:
        res["weight gradient"], res["bias gradient"] = module.weight.grad, module.bias.grad
    nbt = module.num_batches_tracked
    return res, None if nbt is None else nbt.item()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_step(ours, ref, truth, x, g, tol, what):
    """One training or eval step of both modules on the same x and upstream gradient g; compare all.

    Without ``truth`` (float64) ours must match torch to ``tol``. With ``truth`` (a float64 torch
    module in the same state, for float32) ours must match torch loosely, or, where the problem is
    ill-conditioned (say two nearly equal values per channel), be no further from the float64 truth
    than torch's own float32 result is.
    """
    res_o, nbt_o = step_results(ours, x, g)
    res_r, nbt_r = step_results(ref, x, g)
    assert nbt_o == nbt_r, f"{what} num_batches_tracked"
    res_t = step_results(truth, x.double(), g.double())[0] if truth is not None else None
    assert res_o.keys() == res_r.keys()
    for key, expected in res_r.items():
        actual = res_o[key]
        if expected is None or actual is None:
            assert actual is None and expected is None, f"{what} {key}"
            continue
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{what} {key}"
        err, scale = max_err(actual, expected), 1 + expected.double().abs().max().item()
        if err <= tol * scale:
            continue
        assert res_t is not None, f"{what} {key}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"
        err_ours, err_torch = max_err(actual, res_t[key]), max_err(expected, res_t[key])
        assert err_ours <= 2 * err_torch + tol * scale, (
            f"{what} {key}: error vs float64 {err_ours:.3g}, torch float32's {err_torch:.3g}")


def check_config(cfg, dtype):
    torch.default_generator.manual_seed(cfg["seed"])  # (torch.manual_seed is slow: CUDA lazy init)
    ours, ref = make_pair(cfg, dtype)
    truth = None
    if dtype != torch.float64:
        truth = KINDS[cfg["kind"]][1](cfg["shape"][1], eps=cfg["eps"], momentum=cfg["momentum"],
                                      affine=cfg["affine"], track_running_stats=cfg["track"],
                                      dtype=torch.float64)
        truth.load_state_dict(ref.state_dict())
    tol = TOL[dtype]
    shape = cfg["shape"]
    for step in range(cfg["steps"]):
        x = cfg["loc"] + cfg["scale"] * torch.randn(shape, dtype=dtype)
        run_step(ours, ref, truth, x, torch.randn(shape, dtype=dtype), tol, f"train step {step}")
        if truth is not None:  # keep the float64 truth in the float32 modules' state
            truth.load_state_dict(ref.state_dict())
    for m in (ours, ref, truth):
        if m is not None:
            m.eval()
    x = cfg["loc"] + cfg["scale"] * torch.randn(shape, dtype=dtype)
    run_step(ours, ref, truth, x, torch.randn(shape, dtype=dtype), tol, "eval")
    # bnutils -> torch: a fresh torch module loaded from our state dict behaves identically.
    fresh = KINDS[cfg["kind"]][1](shape[1], eps=cfg["eps"], momentum=cfg["momentum"], affine=cfg["affine"],
                                  track_running_stats=cfg["track"], dtype=dtype).eval()
    fresh.load_state_dict(ours.state_dict())
    assert list(fresh.state_dict()) == list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert_close(ours(x), fresh(x), tol, "eval after bnutils -> torch state dict")


@given(configs())
def test_matches_torch_float64(cfg):
    check_config(cfg, torch.float64)


@given(configs())
def test_matches_torch_float32(cfg):
    check_config(cfg, torch.float32)


def function_inputs(shape, affine, seed, eps):
    """float64 (x, gamma, beta) or (x,) that require grad, and f(*inputs) = BN's output."""
    gen = torch.Generator().manual_seed(seed)
    x = (3 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    c = shape[1]
    w = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_() if affine else None

    def f(x, w=None, b=None):
        return BatchNormFunction.apply(x, w, b, eps)[0]

    return ((x, w, b) if affine else (x,)), f


@pytest.mark.parametrize("cls, shape", [(bn.BatchNorm1d, (5, 3)), (bn.BatchNorm1d, (4, 3, 6)),
                                        (bn.BatchNorm2d, (3, 2, 4, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_function(cls, shape, affine):
    """The manual backward against finite differences (float64), with and without gamma/beta."""
    inputs, f = function_inputs(shape, affine, seed=1, eps=1e-5)
    assert torch.autograd.gradcheck(f, inputs)


def test_function_returns_batch_statistics():
    x = torch.randn(7, 3, 2, dtype=torch.float64)
    out, mean, var = BatchNormFunction.apply(x, None, None, 1e-3)
    torch.testing.assert_close(mean, x.mean((0, 2)))
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False))
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (3, 2, 2, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck_function(shape, affine):
    """Double backward (create_graph=True) against finite differences of the backward (float64)."""
    inputs, f = function_inputs(shape, affine, seed=2, eps=1e-3)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


def gradient_penalty_step(layer, x, proj, head):
    """WGAN-GP style penalty (|d critic / dx| - 1)^2 for the critic sum(head * layer(tanh(x @ proj))): BN's
    output feeds the loss directly, so the gradient flowing into BN needs no grad itself.
    Returns x.grad and the layer's parameter gradients."""
    x = x.clone().requires_grad_()
    critic = (layer(torch.tanh(x @ proj)) * head).sum()
    (gx,) = torch.autograd.grad(critic, x, create_graph=True)
    penalty = ((gx.norm(2, dim=1) - 1) ** 2).mean()
    penalty.backward()
    return x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_penalty_matches_torch(dtype):
    """With a once-differentiable backward the penalty's gradient through BN was silently dropped."""
    gen = torch.Generator().manual_seed(0)
    x = 1 + 2 * torch.randn(16, 5, generator=gen, dtype=dtype)
    proj = torch.randn(5, 4, generator=gen, dtype=dtype)
    head = torch.randn(16, 4, generator=gen, dtype=dtype)  # per-sample critic weights
    ours, ref = bn.BatchNorm1d(4, dtype=dtype), torch.nn.BatchNorm1d(4, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2, generator=gen)
        ref.bias.normal_(generator=gen)
    ours.load_state_dict(ref.state_dict())
    got, expected = gradient_penalty_step(ours, x, proj, head), gradient_penalty_step(ref, x, proj, head)
    for name, a, e in zip(("x.grad", "weight.grad", "bias.grad"), got, expected, strict=True):
        assert_close(a, e, TOL[dtype] * 10, name)
    assert expected[0].abs().sum() > 1  # the penalty really depends on x through BN


def test_second_derivative_is_not_dropped():
    """allow_unused=True used to return None for d(dx)/dx: the gradient had no graph."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = BatchNormFunction.apply(x, None, None, 1e-5)[0]
    (gx,) = torch.autograd.grad((out * torch.arange(18.0).view(6, 3)).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x, allow_unused=True)
    xr = x.detach().clone().requires_grad_()
    outr = torch.nn.functional.batch_norm(xr, None, None, training=True, eps=1e-5)
    (gxr,) = torch.autograd.grad((outr * torch.arange(18.0).view(6, 3)).sum(), xr, create_graph=True)
    (ggxr,) = torch.autograd.grad(gxr.pow(2).sum(), xr)
    assert ggx is not None
    torch.testing.assert_close(ggx, ggxr)


# --- batched gradients: vmap over the backward (no out= writes in it) -------------------------------


def bn_fn(x, w, b):
    return BatchNormFunction.apply(x, w, b, 1e-5)[0]


def test_gradcheck_batched_grad():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(bn_fn, (x, w, b), check_batched_grad=True)


def test_is_grads_batched_and_vectorized_jacobian_match_torch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)

    def ref(x, w, b):
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)

    jac = torch.autograd.functional.jacobian(bn_fn, (x, w, b), vectorize=True)
    jac_ref = torch.autograd.functional.jacobian(ref, (x, w, b), vectorize=True)
    for j, jr in zip(jac, jac_ref, strict=True):
        torch.testing.assert_close(j, jr)
    xg = x.clone().requires_grad_()
    grads = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64)
    (batched,) = torch.autograd.grad(bn_fn(xg, w, b), xg, grads, is_grads_batched=True)
    for k in range(7):
        (one,) = torch.autograd.grad(bn_fn(xg, w, b), xg, grads[k])
        torch.testing.assert_close(batched[k], one)


def test_float32_large_mean_stays_accurate():
    """Corrected two-pass statistics: float32 data with mean/std = 1e5 matches the float64 result."""
    gen = torch.Generator().manual_seed(0)
    x = (1e5 + torch.randn(2000, 4, generator=gen)).float()
    g = torch.randn(2000, 4, generator=gen) + (x.double() - 1e5).float()  # correlated with xhat
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x32, w32 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    out32, _, var32 = BatchNormFunction.apply(x32, w32, None, 1e-5)
    out64, _, var64 = BatchNormFunction.apply(x64, w64, None, 1e-5)
    (out32 * g).sum().backward()
    (out64 * g.double()).sum().backward()
    assert ((var32.double() - var64) / var64).abs().max() < 1e-5
    assert (out32.double() - out64).abs().max() < 2e-5
    assert (x32.grad.double() - x64.grad).abs().max() < 1e-5 * x64.grad.abs().max()
    assert (w32.grad.double() - w64.grad).abs().max() < 1e-4 * w64.grad.abs().max()
    # A one-pass E[x^2] - E[x]^2 in float32 would be useless here: it is dominated by rounding.
    one_pass = (x * x).mean(0) - x.mean(0) ** 2
    assert ((one_pass.double() - var64) / var64).abs().max() > 0.5


@given(n=st.integers(1, 200), c=st.integers(1, 5), loc=st.sampled_from([0.0, 3.0, 1e5]),
       layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
       seed=st.integers(0, 2**31 - 1))
def test_blocked_column_sum_matches_float64(n, c, loc, layout, seed):
    """The two-level column sum that compiled (N, C) inputs take: every row counted once (blocks,
    a remainder shorter than a block, batches too small to block), as accurate as float32 allows."""
    gen = torch.Generator().manual_seed(seed)
    t = loc + torch.randn(n, c, generator=gen)
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "expanded":  # stride 0 along dim 0, as the gradient of a sum arrives
        t = t[:1].expand(n, c)
    got = _column_sum_compiled(t)
    ref = t.double().sum(0)
    assert got.shape == (c,) and got.dtype == t.dtype
    assert (got.double() - ref).abs().max() <= 1e-6 * t.double().abs().sum(0).max()
    exact = _column_sum_compiled(t.double())  # float64: equal to the plain sum up to reordering
    assert (exact - ref).abs().max() <= 1e-13 * t.double().abs().sum(0).max()


def test_eager_per_channel_sum_is_the_plain_sum():
    """Outside torch.compile the statistics are torch's own sum, bit for bit: the blocked sum must
    not change eager results (the book's stored outputs depend on them)."""
    gen = torch.Generator().manual_seed(0)
    for shape, dims in [((300, 7), (0,)), ((5, 3, 8), (0, 2)), ((4, 3, 5, 5), (0, 2, 3))]:
        t = 3 + torch.randn(shape, generator=gen)
        assert torch.equal(_per_channel_sum(t, dims), t.sum(dims))


def test_cumulative_moving_average():
    """momentum=None: running_mean is the plain average of the batch means seen so far."""
    layer = bn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    means, variances = [], []
    for k in range(4):
        x = k + torch.randn(10, 3, dtype=torch.float64)
        layer(x)
        means.append(x.mean(0))
        variances.append(x.var(0))  # unbiased
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack(variances).mean(0))
    assert layer.num_batches_tracked.item() == 4


def test_no_running_stats_uses_batch_statistics_in_eval():
    layer = bn.BatchNorm2d(2, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    x = torch.randn(3, 2, 4, 4)
    y = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_track_running_stats_switched_off_after_construction():
    """torch's behaviour: training leaves existing buffers alone; eval then uses them."""
    ours, ref = bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (ours, ref):
        m.track_running_stats = False
        m(torch.arange(12.0).reshape(4, 3))
        assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_mean, torch.zeros(3))
    x = torch.randn(2, 3)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    """Half-precision input with float32 parameters, as torch allows: computed in float32."""
    x = (2 + torch.randn(16, 3, 5)).to(dtype)
    ours, ref = bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    yo, yr = ours(x), ref(x)
    assert yo.dtype == dtype
    torch.testing.assert_close(yo.float(), yr.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-3, rtol=1e-3)


def test_empty_batch_like_torch():
    ours, ref = bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (ours, ref):
        assert m(torch.randn(0, 3)).shape == (0, 3)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1


def test_drop_in_inside_a_trained_network():
    """Swap torch's BN for ours in a small CNN: three SGD steps give the same parameters."""
    def net(bn2d, bn1d):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), bn2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(4 * 6 * 6, 8), bn1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()

    ours, ref = net(bn.BatchNorm2d, bn.BatchNorm1d), net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
    gen = torch.Generator().manual_seed(3)
    for model in (ours, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gen.manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 2, (8,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                                {"eps": 1e-3, "momentum": 0.3, "bias": False}])
def test_repr_parameters_and_buffers_match_torch(kw):
    pairs = [(bn.BatchNorm1d, torch.nn.BatchNorm1d), (bn.BatchNorm2d, torch.nn.BatchNorm2d),
             (bn.BatchNorm3d, torch.nn.BatchNorm3d)]
    for ours_cls, torch_cls in pairs:
        ours, ref = ours_cls(5, **kw), torch_cls(5, **kw)
        assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value) and ours.state_dict()[key].dtype == value.dtype


def test_reset_parameters_and_running_stats():
    layer = bn.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(2)
        layer.bias.fill_(1)
    layer(torch.randn(4, 3))
    layer.reset_running_stats()
    assert torch.equal(layer.running_var, torch.ones(3)) and layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.weight, torch.full((3,), 2.0))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


def test_old_state_dict_without_num_batches_tracked_loads():
    sd = torch.nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    layer = bn.BatchNorm1d(3)
    layer.load_state_dict(sd)
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_meta_device_then_old_checkpoint_with_assign(momentum):
    """Built on meta, loaded (assign=True) from a checkpoint without num_batches_tracked: the counter
    becomes tensor(0) on the CPU, as torch substitutes, so training and saving work."""
    sd = torch.nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    x = torch.randn(8, 3)
    results = []
    for cls in (bn.BatchNorm1d, torch.nn.BatchNorm1d):
        layer = cls(3, momentum=momentum, device="meta")
        layer.load_state_dict(sd, assign=True)
        assert layer.num_batches_tracked.device.type == "cpu" and layer.num_batches_tracked.item() == 0
        out = layer(x)
        assert all(t.device.type == "cpu" for t in layer.state_dict().values())
        results.append((out, layer.state_dict()))
    (out, state), (out_ref, state_ref) = results
    torch.testing.assert_close(out, out_ref)
    for key, value in state_ref.items():
        torch.testing.assert_close(state[key], value)


def test_device_and_dtype_arguments():
    layer = bn.BatchNorm2d(4, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == layer.running_mean.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long


# --- errors: the same messages as torch where torch has one -----------------------------------------


def raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


@pytest.mark.parametrize("ours_cls, torch_cls, shape", [
    (bn.BatchNorm1d, torch.nn.BatchNorm1d, (1, 3)), (bn.BatchNorm1d, torch.nn.BatchNorm1d, (1, 3, 1)),
    (bn.BatchNorm2d, torch.nn.BatchNorm2d, (1, 3, 1, 1))])
def test_one_value_per_channel_same_error_as_torch(ours_cls, torch_cls, shape):
    ours, ref = ours_cls(3), torch_cls(3)
    e_ours, e_ref = raised(lambda: ours(torch.ones(shape))), raised(lambda: ref(torch.ones(shape)))
    assert type(e_ours) is type(e_ref) is ValueError
    assert str(e_ours) == str(e_ref)
    assert "Expected more than 1 value per channel when training" in str(e_ours)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()  # torch counts it anyway
    ours.eval()
    assert ours(torch.ones(shape)).shape == shape  # a batch of one is fine in eval mode


@pytest.mark.parametrize("ours_cls, torch_cls, shape", [
    (bn.BatchNorm1d, torch.nn.BatchNorm1d, (2, 3, 4, 4)), (bn.BatchNorm1d, torch.nn.BatchNorm1d, (3,)),
    (bn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4)),
    (bn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4, 4, 4)),
    (bn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 4, 4)),
    (bn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2, 2))])
def test_input_dimension_same_error_as_torch(ours_cls, torch_cls, shape):
    x = torch.ones(shape)
    e_ours, e_ref = raised(lambda: ours_cls(3)(x)), raised(lambda: torch_cls(3)(x))
    assert type(e_ours) is type(e_ref) is ValueError
    assert str(e_ours) == str(e_ref)


def test_other_input_errors():
    layer = bn.BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"expected input with 3 channels \(dim 1\)"):
        layer(torch.randn(4, 5))
    with pytest.raises(TypeError, match="floating dtype"):
        layer(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        BatchNormFunction.apply(torch.randn(4, 3), torch.ones(2), None, 1e-5)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got 0.0"):
        BatchNormFunction.apply(torch.randn(4, 3), None, None, 0.0)


@pytest.mark.parametrize("kw, err, words", [
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]"),
    ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a float"),
])
def test_constructor_errors(kw, err, words):
    for cls in (bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d):
        with pytest.raises(err, match=words):
            cls(3, **kw)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("track", [True, False])
def test_eps_checked_in_forward_like_torch(eps, track):
    """torch constructs the module with any eps; a training forward needs eps > 0, and eval with
    running statistics eps >= 0 (so eps=0 works in eval). Same messages."""
    x = torch.randn(4, 3)
    ours, ref = bn.BatchNorm1d(3, eps=eps, track_running_stats=track), \
        torch.nn.BatchNorm1d(3, eps=eps, track_running_stats=track)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        try:
            expected = ref(x)
        except ValueError as e:
            with pytest.raises(ValueError) as info:
                ours(x)
            assert str(info.value) == str(e)
        else:
            torch.testing.assert_close(ours(x), expected)
    assert ours.num_batches_tracked is None or \
        ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("num_features", [0, -2, 2.5, True])
def test_bad_num_features(num_features):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bn.BatchNorm1d(num_features)


@pytest.mark.parametrize("make", [
    lambda x: x.contiguous(memory_format=torch.channels_last),
    lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),  # non-contiguous strides
])
def test_memory_layouts(make):
    """channels_last and strided inputs give the same values and gradients as contiguous ones."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, 5, 6, generator=gen, dtype=torch.float64)
    ours, ref = bn.BatchNorm2d(3, dtype=torch.float64), torch.nn.BatchNorm2d(3, dtype=torch.float64)
    xo, xr = make(x).requires_grad_(), x.clone().requires_grad_()
    (gx_o,), (gx_r,) = torch.autograd.grad(ours(xo), xo, make(g)), torch.autograd.grad(ref(xr), xr, g)
    torch.testing.assert_close(gx_o, gx_r)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("ours_cls, torch_cls, shape, fmt", [
    (bn.BatchNorm2d, torch.nn.BatchNorm2d, (0, 3, 4, 5), torch.channels_last),
    (bn.BatchNorm3d, torch.nn.BatchNorm3d, (0, 3, 2, 4, 5), torch.channels_last_3d),
    (bn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4, 5), torch.channels_last)])
def test_channels_last_layout_of_output_and_gradient(ours_cls, torch_cls, shape, fmt):
    """The output and the input gradient keep x's channels_last strides, as torch's, also for an
    empty batch (the input gradient used to come back contiguous)."""
    strides = []
    for cls in (ours_cls, torch_cls):
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        y = cls(3)(x)
        (gx,) = torch.autograd.grad(y, x, torch.randn(shape).contiguous(memory_format=fmt))
        strides.append((y.stride(), gx.stride()))
    assert strides[0] == strides[1]
    assert strides[0][1] == torch.empty(shape).contiguous(memory_format=fmt).stride()


def test_training_under_no_grad_updates_running_stats():
    ours, ref = bn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_frozen_affine_parameters_get_no_gradient():
    layer = bn.BatchNorm1d(3)
    layer.weight.requires_grad_(False)
    x = torch.randn(8, 3, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and x.grad is not None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_traces_under_torch_compile_without_graph_breaks(momentum):
    """dynamo traces the module and the custom Function (manual backward included) in one graph.

    The aot_eager backend runs the traced graphs without generating C++, which keeps this fast;
    the benchmark exercises the default inductor backend.
    """
    torch._dynamo.reset()
    ours, ref = bn.BatchNorm2d(3, momentum=momentum), bn.BatchNorm2d(3, momentum=momentum)
    explained = torch._dynamo.explain(bn.BatchNorm2d(3, momentum=momentum))(torch.randn(4, 3, 2, 2))
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(ours, backend="aot_eager")
    for _ in range(2):
        x = 1 + 2 * torch.randn(4, 3, 5, 5)
        xc, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        (gc,) = torch.autograd.grad(compiled(xc).pow(2).sum(), xc)
        (gr,) = torch.autograd.grad(ref(xr).pow(2).sum(), xr)
        torch.testing.assert_close(gc, gr)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 2
