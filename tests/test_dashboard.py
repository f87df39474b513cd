"""bnutils.dashboard against independent computations: update:data ratios of a hand-written SGD
loop, saturation and activations/gradients of a manual forward/backward, histogram counts, the
trajectory left unchanged by the probes, shapes with and without BN, the figure, and bad input."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bnutils as bn  # noqa: E402
from bnutils.dashboard import (  # noqa: E402
    DashboardRecord,
    capture_activation_grads,
    plot_dashboard,
    record_training,
    std_ratio,
)

G = torch.Generator().manual_seed(0)
X = torch.randn(48, 5, generator=G) * 2
Y = torch.randint(0, 3, (48,), generator=G)


def tiny(norm="none", seed=0, scale=3.0):
    # a large init scale so that some tanh units saturate
    return bn.make_mlp(5, 8, 3, 2, activation="tanh", norm=norm, init="he", init_scale=scale, seed=seed)


def test_update_ratio_equals_std_of_lr_grad_over_std_param_by_hand():
    lr, steps, bs = 0.05, 5, 16
    net, ref = tiny(), tiny()
    rec = record_training(net, X, Y, steps=steps, lr=lr, batch_size=bs, seed=3, probe=16)
    # a hand-written SGD loop with the same batches as bnutils.train (its shuffle generator)
    gen = torch.Generator().manual_seed(3)
    per_epoch = len(X) // bs
    expected = []
    for s in range(steps):
        if s % per_epoch == 0:
            perm = torch.randperm(len(X), generator=gen)
        idx = perm[(s % per_epoch) * bs:(s % per_epoch + 1) * bs]
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(X[idx]), Y[idx]).backward()
        row = []
        for layer in (ref.fc1, ref.fc2, ref.out):
            g = (lr * layer.weight.grad).double().numpy()
            w = layer.weight.detach().double().numpy()
            row.append(g.std() / w.std())
        expected.append(row)
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    np.testing.assert_allclose(rec.update_ratio, np.array(expected), rtol=1e-4)
    assert rec.update_ratio.shape == (steps, 3)
    np.testing.assert_array_equal(rec.update_steps, np.arange(steps))
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_std_ratio():
    u = torch.tensor([1.0, 3.0])
    d = torch.tensor([0.0, 4.0, 8.0, 0.0])
    assert std_ratio(u, d) == pytest.approx(1.0 / np.std([0, 4, 8, 0]))
    assert np.isnan(std_ratio(u, torch.ones(3)))


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_activations_gradients_and_saturation_equal_a_manual_forward_backward(norm):
    net = tiny(norm)
    rec = record_training(net, X, Y, steps=4, lr=0.1, batch_size=16, probe=32, hist_steps=(0, 2, 4),
                          saturation_every=2)
    np.testing.assert_array_equal(rec.saturation_steps, [0, 2, 4])
    assert rec.saturation.shape == (3, 2)
    # at the end of training, by hand: forward in training mode on the probe batch, retain_grad
    xp, yp = X[:32], Y[:32]
    net.train()
    h, outs = xp, []
    for i in (1, 2):
        z = getattr(net, f"fc{i}")(h)
        if norm == "bn":
            bn_ = getattr(net, f"norm{i}")
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn_.eps) * bn_.weight + bn_.bias
        h = torch.tanh(z)
        h.retain_grad()
        outs.append(h)
    torch.nn.functional.cross_entropy(net.out(h), yp).backward()
    for layer, a in enumerate(outs):
        np.testing.assert_allclose(rec.activations[4][layer], a.detach().reshape(-1).numpy(), atol=1e-6)
        np.testing.assert_allclose(rec.gradients[4][layer], a.grad.reshape(-1).numpy(), rtol=1e-4, atol=1e-7)
        direct = float((a.detach().abs() > 0.97).double().mean())
        assert rec.saturation[-1, layer] == pytest.approx(direct)
    assert rec.saturation.max() > 0  # the test has saturated units to count


def test_saturation_per_layer_matches_capture_activations_at_init():
    net = tiny()
    direct = [float((a.abs() > 0.97).double().mean())
              for _, a in bn.capture_activations(net, X[:40], train_mode=True)]
    rec = record_training(net, X, Y, steps=1, lr=0.0, batch_size=16, probe=40)
    np.testing.assert_allclose(rec.saturation[0], direct)
    assert 0 < max(direct) < 1


def test_probes_leave_the_trajectory_unchanged():
    a, b = tiny("bn"), tiny("bn")
    rec = record_training(a, X, Y, steps=6, lr=0.1, batch_size=16, seed=1, probe=20, saturation_every=1)
    hist = bn.train(b, (X, Y), steps=6, lr=0.1, batch_size=16, seed=1, eval_every=None, eval_train=False)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    np.testing.assert_array_equal(rec.train_loss, hist.train_loss)


def test_histogram_counts_sum_to_number_of_values():
    rec = record_training(tiny(), X, Y, steps=3, lr=0.1, batch_size=16, probe=32)
    for kind in ("activations", "gradients"):
        for step in (0, 3):
            counts, edges = rec.histogram(kind, step, bins=17)
            assert counts.shape == (2, 17) and edges.shape == (18,)
            assert (counts.sum(axis=1) == 32 * 8).all()
            assert np.allclose(edges[0], -edges[-1])
    expected = np.histogram(rec.activations[3][1], bins=np.linspace(-1, 1, 11))[0]
    np.testing.assert_array_equal(rec.histogram("activations", bins=10, range=(-1, 1))[0][1], expected)


def test_shapes_with_and_without_bn_and_the_figure():
    Xd, yd, _, _ = bn.digits()
    recs = {}
    for name, norm in (("no BN", "none"), ("BN", "bn")):
        net = bn.make_mlp(64, 20, 10, 3, activation="tanh", norm=norm, seed=0)
        recs[name] = record_training(net, Xd, yd, steps=30, lr=0.1, probe=64)
        r = recs[name]
        assert isinstance(r, DashboardRecord)
        assert r.layer_names == ["act1", "act2", "act3"]
        assert r.weight_layer_names == ["fc1", "fc2", "fc3", "out"]
        assert r.update_ratio.shape == (30, 4) and np.isfinite(r.update_ratio).all()
        assert r.hist_steps == [0, 30]
        assert [len(v) for v in r.activations[30]] == [64 * 20] * 3
        # default: every max(1, steps // 50) = 1 checkpoint
        assert r.saturation_steps.tolist() == list(range(31)) and r.saturation.shape == (31, 3)
    fig = plot_dashboard(recs, smooth=5)
    axes = fig.axes
    assert len(axes) == 8
    assert all(ax.get_title() and ax.get_xlabel() for ax in axes)
    assert axes[6].get_ylabel().startswith("log10")
    guide = [ln for ln in axes[7].get_lines() if ln.get_label() == "1e-3 guide"]
    assert guide and guide[0].get_ydata()[0] == pytest.approx(-3)
    assert fig.axes[1].get_legend() is not None
    plt.close(fig)


def test_capture_activation_grads_restores_state():
    net = tiny("bn")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    out = capture_activation_grads(net, X, Y)
    assert len(out) == 2 and out[0][1].abs().sum() > 0
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_input():
    net = tiny()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        record_training("net", X, Y)
    with pytest.raises(TypeError, match="X must be a NumPy array or a torch tensor"):
        record_training(net, X.tolist(), Y)
    with pytest.raises(ValueError, match="same number of examples"):
        record_training(net, X, Y[:-1])
    with pytest.raises(ValueError, match="X must have shape"):
        record_training(net, X[:, 0], Y)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        record_training(net, X, Y, steps=0)
    with pytest.raises(ValueError, match="probe must be an int >= 2"):
        record_training(net, X, Y, probe=1)
    with pytest.raises(ValueError, match=r"hist_steps must be checkpoints in 0..steps=5"):
        record_training(net, X, Y, steps=5, hist_steps=(0, 6))
    with pytest.raises(ValueError, match="saturation_every must be a positive int"):
        record_training(net, X, Y, steps=5, saturation_every=0)
    with pytest.raises(ValueError, match="no activation layers"):
        record_training(torch.nn.Linear(5, 3), X, Y, steps=2)
    rec = record_training(net, X, Y, steps=2, batch_size=16, probe=8)
    with pytest.raises(ValueError, match="kind must be 'activations' or 'gradients'"):
        rec.histogram("weights")
    with pytest.raises(ValueError, match=r"no activations recorded at step 1; recorded steps: \[0, 2\]"):
        rec.histogram("activations", 1)
    with pytest.raises(TypeError, match="non-empty mapping"):
        plot_dashboard([rec])
    with pytest.raises(TypeError, match="non-empty mapping"):
        plot_dashboard({})
    with pytest.raises(TypeError, match=r"records\['a'\] must be a DashboardRecord"):
        plot_dashboard({"a": rec.update_ratio})
