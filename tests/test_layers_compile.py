"""bnutils.BatchNorm1d under torch.compile (inductor), in a subprocess on the CPU's native code paths.

Issue 11: a compiled training loop at (4096, 1024) float32 was reported to abort with heap
corruption (``malloc(): unaligned tcache chunk detected``, ``double free or corruption``) on
AVX-512 code paths. A crash kills the process, so the loop runs in a child process: the test
fails with the child's stderr instead of taking pytest down with it. The child runs with
ATEN_CPU_CAPABILITY unset (torch and inductor then use the best instructions the CPU has) and
checks the compiled module against the same module run eagerly.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import bnutils as bn

    torch.set_num_threads(int(sys.argv[1]))
    steps, shape = 40, (4096, 1024)
    gen = torch.Generator().manual_seed(0)
    eager = bn.BatchNorm1d(shape[1])
    compiled_module = bn.BatchNorm1d(shape[1])
    compiled = torch.compile(compiled_module)  # inductor, the default backend
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_module)]
    worst = 0.0
    for step in range(steps):
        x = 3 + 2 * torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        grads = []
        for module, opt in zip((eager, compiled), opts):
            xi = x.clone().requires_grad_()
            opt.zero_grad()
            module(xi).backward(g)
            opt.step()
            grads.append(xi.grad)
        worst = max(worst, ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item())
    # max |difference| relative to 1 + max |value| (40 SGD steps: rounding differences accumulate)
    diffs = {name: ((a - b).abs().max() / (1 + a.abs().max())).item()
             for (name, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values())}
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "steps": steps,
                      "input_grad_rel_diff": worst, "state_diffs": diffs}))
""")


def best_capability() -> str:
    """The code path torch picks on this CPU when nothing pins it (as torch names it)."""
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    return "AVX2" if torch.cpu._is_avx2_supported() else "DEFAULT"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_training_loop_on_native_code_paths(tmp_path, threads):
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"compiled loop died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["capability"] == best_capability()
    assert res["input_grad_rel_diff"] < 1e-4
    for name, diff in res["state_diffs"].items():
        assert diff < 1e-4, f"{name}: {diff:.3g}"
