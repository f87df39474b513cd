"""Speed of batch norm: NumPy staged vs closed-form backward; bnutils' torch layer vs torch's kernel.

Run from the repository root:  .venv/bin/python benchmarks/bench_batchnorm.py  [--threads 1]

Every variant of a case is timed side by side in one run (round-robin, so load drift from other
processes hits all alike) and reported as the median over the repeats, with its ratio to the
baseline and as a fraction of the machine's memory bandwidth (bytes a pass must move / time,
against a large array copy measured in the same run). A second table shows CPU cliffs: ways of
writing the same per-channel reduction that differ by an order of magnitude. Timings on a shared
machine are noisy; compare within a run, and rerun when the machine is quiet.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

import bnutils as bn
from bnutils import bench

CASES = [(4096, 1024), (64, 64, 32, 32)]  # the same number of elements: 16 MiB in float32
COPY_BYTES = 1 << 30  # the bandwidth reference: a copy of 1 GiB, far larger than the last-level cache


def fmt_ms(t: bench.Timing) -> str:
    return f"{t.ms:.2f}"


def fmt_iqr(t: bench.Timing) -> str:
    return f"{t.q1 * 1e3:.1f}-{t.q3 * 1e3:.1f}"


def paired_ratio(samples: list[float], base: list[float]) -> float:
    """Median over rounds of (variant time / baseline time in the same round): the two calls of a
    round ran back to back, so a load change on a shared machine hits both alike."""
    return float(np.median(np.asarray(samples) / np.asarray(base)))


def torch_variants(shape, compile_: bool):
    """fwd+bwd closures: torch's F.batch_norm, bnutils eager, and (optionally) both compiled."""
    c = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(shape, generator=gen)).requires_grad_()
    g = torch.randn(shape, generator=gen)
    ours_cls, torch_cls = (bn.BatchNorm1d, torch.nn.BatchNorm1d) if len(shape) < 4 else \
        (bn.BatchNorm2d, torch.nn.BatchNorm2d)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)

    def native():  # training mode with running statistics: the same work the modules do
        out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        return torch.autograd.grad(out, (x, w, b), g)

    def module_step(module, params):
        def step():  # autograd.grad, not .backward(): no gradient accumulation pass in the timing
            return torch.autograd.grad(module(x), (x, params.weight, params.bias), g)
        return step

    ours = ours_cls(c)
    variants = {"torch F.batch_norm (eager)": native, "bnutils (eager)": module_step(ours, ours)}
    checks = {}
    if compile_:
        ours_c = torch.compile(ours_cls(c))
        torch_c = torch.compile(torch_cls(c))
        variants["bnutils (torch.compile)"] = module_step(ours_c, ours_c._orig_mod)
        variants["torch.nn.BatchNorm (torch.compile)"] = module_step(torch_c, torch_c._orig_mod)
        ref = native()
        for name in ("bnutils (eager)", "bnutils (torch.compile)"):
            got = variants[name]()  # the first call of a compiled module compiles it
            checks[name] = max(((a - r).abs().max() / r.abs().max()).item()
                               for a, r in zip(got, ref, strict=True))
    return variants, checks


def numpy_variants(shape):
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
    c = shape[1]
    _, cache = bn.batchnorm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32))
    dout = rng.standard_normal(shape).astype(np.float32)
    staged, fast = bn.batchnorm_backward(dout, cache), bn.batchnorm_backward_fast(dout, cache)
    err = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(staged, fast, strict=True))
    return {"NumPy staged backward": lambda: bn.batchnorm_backward(dout, cache),
            "NumPy closed-form backward": lambda: bn.batchnorm_backward_fast(dout, cache)}, err


def main_table(shape, bandwidth, repeats, compile_):
    tv, checks = torch_variants(shape, compile_)
    nv, np_err = numpy_variants(shape)
    samples = bench.time_rounds({**nv, **tv}, repeats=repeats, warmup=3)
    timings = {name: bench.Timing.from_samples(s) for name, s in samples.items()}
    nbytes = {"backward": bench.bn_bytes_moved(shape, 4, "backward"),
              "forward+backward": bench.bn_bytes_moved(shape, 4, "forward+backward")}
    base_np, base_t = "NumPy closed-form backward", "torch F.batch_norm (eager)"
    rows = []
    for name, t in timings.items():
        pass_ = "backward" if name.startswith("NumPy") else "forward+backward"
        base = base_np if name.startswith("NumPy") else base_t
        frac = bench.bandwidth_fraction(nbytes[pass_], t.median, bandwidth)
        rows.append([name, pass_, fmt_ms(t), fmt_iqr(t), f"{t.min * 1e3:.2f}",
                     f"{paired_ratio(samples[name], samples[base]):.2f}x",
                     f"{t.median / timings[base].median:.2f}x", f"{t.min / timings[base].min:.2f}x",
                     f"{nbytes[pass_] / 2**20:.0f}", f"{nbytes[pass_] / t.median / 1e9:.1f}", f"{frac:.0%}"])
    headers = ["variant", "pass", "median ms", "IQR ms", "min ms", "paired ratio", "ratio of medians",
               "ratio of mins", "MiB moved", "GB/s", "of copy BW"]
    print(f"\n## {shape} float32  (ratios: NumPy vs NumPy closed-form; torch vs torch F.batch_norm eager)")
    print(bench.format_table(rows, headers))
    print(f"checks, max |difference| / max |reference| over (dx, dgamma, dbeta): staged vs closed-form "
          f"{np_err:.1e}" + "".join(f"; {k} vs torch {v:.1e}" for k, v in checks.items()))
    return timings


def cliffs_table(repeats):
    """Per-channel reductions of a (4096, 1024) float32 array written different ways, vs a copy."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=gen)
    y = torch.randn(4096, 1024, generator=gen)
    xt = x.t().contiguous()
    x4 = torch.randn(64, 64, 32, 32, generator=gen)
    out = torch.empty_like(x)
    ones = torch.ones(4096)
    xg = x.clone().requires_grad_()
    w, b = torch.ones(1024, requires_grad=True), torch.zeros(1024, requires_grad=True)
    fwd = F.batch_norm(xg, None, None, w, b, training=True)
    x4g = x4.clone().requires_grad_()
    w4, b4 = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    fwd4 = F.batch_norm(x4g, None, None, w4, b4, training=True)
    g4 = torch.randn(x4.shape, generator=gen)
    ops = {
        "out.copy_(x)  [reference: read 16 MiB + write 16 MiB]": lambda: out.copy_(x),
        "x * y  (fresh output tensor)": lambda: x * y,
        "torch.mul(x, y, out=out)  (reused output)": lambda: torch.mul(x, y, out=out),
        "x.sum(0)": lambda: x.sum(0),
        "x.t().contiguous().sum(1)  [layout (D, N), pre-transposed]": lambda: xt.sum(1),
        "ones @ x  (matrix-vector product)": lambda: ones @ x,
        "x.sum(0, dtype=torch.float64)": lambda: x.sum(0, dtype=torch.float64),
        "torch.var_mean(x, 0)": lambda: torch.var_mean(x, 0),
        "torch.linalg.vector_norm(x, dim=0)": lambda: torch.linalg.vector_norm(x, dim=0),
        "(x * y).sum(0)": lambda: (x * y).sum(0),
        "torch.linalg.vecdot(x, y, dim=0)": lambda: torch.linalg.vecdot(x, y, dim=0),
        "torch.einsum('nd,nd->d', x, y)": lambda: torch.einsum("nd,nd->d", x, y),
        "x4.sum((0, 2, 3))  [(64, 64, 32, 32)]": lambda: x4.sum((0, 2, 3)),
        "torch.var_mean(x4, (0, 2, 3))": lambda: torch.var_mean(x4, (0, 2, 3)),
        "F.batch_norm forward only (training)": lambda: F.batch_norm(x, None, None, training=True),
        "F.batch_norm backward only": lambda: torch.autograd.grad(fwd, (xg, w, b), y, retain_graph=True),
        "F.batch_norm forward only (training)  [(64, 64, 32, 32)]":
            lambda: F.batch_norm(x4, None, None, training=True),
        "F.batch_norm backward only  [(64, 64, 32, 32)]":
            lambda: torch.autograd.grad(fwd4, (x4g, w4, b4), g4, retain_graph=True),
    }
    timings = bench.time_interleaved(ops, repeats=repeats, warmup=2)
    ref = timings["out.copy_(x)  [reference: read 16 MiB + write 16 MiB]"]
    rows = [[name, fmt_ms(t), f"{t.median / ref.median:.1f}x"] for name, t in timings.items()]
    print("\n## CPU cliffs: the same reductions written different ways, float32 (4096, 1024) unless noted")
    print(bench.format_table(rows, ["operation", "median ms", "vs copy"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and BLAS threads (default 1, as the book)")
    parser.add_argument("--repeats", type=int, default=40, help="timed repeats per variant (default 40)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-cliffs", action="store_true", help="skip the table of reduction cliffs")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        load0 = os.getloadavg()[0]
        print(f"torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}; "
              f"{os.cpu_count()} CPUs, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
              f"torch threads = {torch.get_num_threads()}; load average at start {load0:.2f}")
        bw = bench.copy_bandwidth(COPY_BYTES, repeats=10)
        bw_cache = bench.copy_bandwidth(16 * 2**20, repeats=20)
        print(f"memory bandwidth (copy of {COPY_BYTES / 2**30:.0f} GiB, read + write counted): "
              f"{bw / 1e9:.1f} GB/s; copy of 16 MiB (cache-resident, for context): {bw_cache / 1e9:.1f} GB/s")
        print("bytes moved = the minimum a pass must move for tensors that do not stay in cache: "
              "backward 5 tensor transfers, forward+backward 8 (bnutils.bench.TENSOR_PASSES); "
              "'of copy BW' > 100% means the working set partly stayed in cache")
        for shape in CASES:
            main_table(shape, bw, args.repeats, not args.no_compile)
        if not args.no_cliffs:
            cliffs_table(max(5, args.repeats // 2))
        print(f"\nload average at end {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs); timings are noisy "
              "when the machine is shared: compare within a run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
