"""bnutils.cpu: the CPU code paths that make stored outputs reproduce across x86-64 CPUs."""
import os
import platform
import subprocess
import sys

import pytest

from bnutils.cpu import CPU_ENV, pin_cpu_code_paths

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_x86 = pytest.mark.skipif(not X86, reason="the pins are for x86-64 CPUs")


@needs_x86
def test_pins_every_variable_and_keeps_values_already_set():
    env = {"MKL_CBWR": "COMPATIBLE"}
    added = pin_cpu_code_paths(env)
    assert set(added) == set(CPU_ENV) - {"MKL_CBWR"}
    assert env["MKL_CBWR"] == "COMPATIBLE"
    assert all(env[k] == CPU_ENV[k] for k in added)


def test_native_opt_out_sets_nothing():
    env = {"BNUTILS_NATIVE_CPU": "1"}
    assert pin_cpu_code_paths(env) == [] and env == {"BNUTILS_NATIVE_CPU": "1"}


def _run(code: str, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in CPU_ENV and k != "BNUTILS_NATIVE_CPU"}
    env.update(extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout.strip()


def _has_avx2() -> bool:
    return "avx2" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


@needs_x86
@pytest.mark.skipif(not _has_avx2(), reason="the CPU has no AVX2")
def test_import_bnutils_first_caps_torch_and_numpy_at_avx2():
    out = _run("import bnutils, torch, numpy as np; "
               "print(torch.backends.cpu.get_cpu_capability(), "
               "'X86_V4' in np.__config__.CONFIG['SIMD Extensions']['found'])")
    assert out == "AVX2 False"


TRAIN = """
import bnutils, torch
bnutils.setup_notebook(seed=0)
assert not torch.backends.mkldnn.enabled
net = bnutils.make_cnn(1, 10, channels=(4, 8), image_size=8, norm="bn", seed=0)
x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
opt = torch.optim.SGD(net.parameters(), lr=0.5)
for _ in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
print(loss.item().hex(), sum(p.double().sum().item() for p in net.parameters()).hex())
"""


@needs_x86
@pytest.mark.skipif(not _has_avx2(), reason="the CPU has no AVX2")
@pytest.mark.timeout(300)
def test_pinned_training_is_bitwise_the_same_as_on_an_avx2_only_cpu():
    # An AVX2-only CPU, emulated for MKL and oneDNN: on a CPU with AVX-512 the pins must already
    # give exactly these results (on an AVX2-only CPU the test is trivially true).
    pinned = _run(TRAIN)
    emulated = _run(TRAIN, MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert pinned == emulated
