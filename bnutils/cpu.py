"""Pin the CPU code paths of NumPy and torch, so that stored outputs reproduce on other x86-64 CPUs.

NumPy, OpenBLAS, torch's ATen kernels, MKL and oneDNN choose vectorized code by the CPU they run
on (AVX2, AVX-512, ...). Other instructions sum in another order, results differ in the last bits,
and training amplifies that into different accuracies: measured here, the same chapter cell gave
0.86 or 0.76 mean test accuracy on one AVX-512 machine depending on the code path alone. So the
book caps every library at AVX2 (x86-64-v3, which every x86-64 server CPU of the last decade has)
and asks MKL for its conditional-numerical-reproducibility mode at that level.

These are environment variables that the libraries read when they load: ``import bnutils`` sets
them (before it imports NumPy or torch), which is why it is the first import of every chapter;
processes started afterwards (the workers of ``run_distributed``) inherit them. A value already set wins;
``BNUTILS_NATIVE_CPU=1`` leaves the environment alone (for speed measurements of the machine's
best code paths). On other architectures nothing is set.
"""
from __future__ import annotations

import os
import platform

CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels (elementwise, reductions, BN)
    "MKL_CBWR": "AVX2",  # torch's matrix products: MKL's reproducible AVX2 code path
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # torch's convolutions (oneDNN)
    "OPENBLAS_CORETYPE": "Haswell",  # NumPy's matrix products (OpenBLAS, the AVX2 kernels)
    "NPY_DISABLE_CPU_FEATURES": "AVX512F X86_V4 AVX512_ICL AVX512_SPR",  # NumPy's own SIMD loops
}
"""The variables ``pin_cpu_code_paths`` sets (x86-64 only), with their values."""


def pin_cpu_code_paths(environ=os.environ) -> list[str]:
    """Set the variables of ``CPU_ENV`` in ``environ`` unless already set; return the names set.

    Does nothing off x86-64 or when ``BNUTILS_NATIVE_CPU`` is "1". Effective for a library only
    if it loads afterwards (in this process or a child process): call it before importing NumPy
    or torch, as ``import bnutils`` does.
    """
    if environ.get("BNUTILS_NATIVE_CPU") == "1" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    added = [k for k in CPU_ENV if k not in environ]
    for k in added:
        environ[k] = CPU_ENV[k]
    return added


# Importing this module (bnutils' first import) pins the code paths for this process and its children.
pin_cpu_code_paths()
