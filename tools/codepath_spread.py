"""Measure how far a chapter's outputs move when its kernels take other CPU code paths.

Usage: python tools/codepath_spread.py chapters/NN_slug.ipynb [--variants avx2,default,threads2]

Executes a copy of the notebook once per variant (environment variables that change which vector
instructions torch and MKL use, or the thread count) and compares every output with the stored one
the way `make verify` does. For each output that differs it prints the largest absolute and
relative change of its numbers and whether the stored tolerance covers it. Use it to choose a
tolerance (CONTRIBUTING.md: "Choosing a tolerance") and to see which cells are deterministic.
The stored notebook is not modified.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbval.plugin import coalesce_streams, transform_streams_for_comparison

from bnutils.nbval_tolerance import (
    TOLERANCE_KEY,
    compare_outputs,
    flatten_outputs,
    parse_number,
    split_numbers,
)

VARIANTS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
    "threads2": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2"},
}
SKIP = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
        "image/png", "image/jpeg")


def execute_copy(path: Path, env: dict[str, str]) -> tuple[nbformat.NotebookNode, float]:
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, kernel_name="python3", timeout=600,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def numeric_change(ref: str, test: str) -> tuple[float, float] | None:
    """Largest absolute and relative change of the numbers, or None if the text differs."""
    (ref_skel, ref_nums), (test_skel, test_nums) = split_numbers(ref), split_numbers(test)
    if ref_skel != test_skel or len(ref_nums) != len(test_nums):
        return None
    worst_abs = worst_rel = 0.0
    for r, t in zip(ref_nums, test_nums, strict=True):
        a, b = parse_number(r), parse_number(t)
        worst_abs = max(worst_abs, abs(a - b))
        worst_rel = max(worst_rel, abs(a - b) / abs(a) if a else (0.0 if a == b else float("inf")))
    return worst_abs, worst_rel


def report(stored: nbformat.NotebookNode, run: nbformat.NotebookNode) -> int:
    failures = 0
    for index, (ref_cell, test_cell) in enumerate(zip(stored.cells, run.cells, strict=True)):
        if ref_cell.cell_type != "code" or "nbval-ignore-output" in ref_cell.metadata.get("tags", []):
            continue
        ref = transform_streams_for_comparison(coalesce_streams(copy.deepcopy(ref_cell.outputs)))
        test = transform_streams_for_comparison(coalesce_streams(copy.deepcopy(test_cell.outputs)))
        problems = compare_outputs(ref, test, ref_cell.metadata, skip=SKIP)
        ref_flat, test_flat = flatten_outputs(ref, None, SKIP), flatten_outputs(test, None, SKIP)
        for key in ref_flat:
            for (r, _), (t, _) in zip(ref_flat[key], test_flat.get(key, []), strict=False):
                if r == t or not isinstance(r, str):
                    continue
                change = numeric_change(r, t)
                what = ("text differs" if change is None
                        else f"max |d| {change[0]:.3g}, max rel {change[1]:.3g}")
                shown = r.replace("\n", " ")[:40]
                print(f"  cell {index:3d} {key.rsplit('/', 1)[-1]:10s} {shown!r:44s} {what}")
        if problems:
            failures += 1
            tol = ref_cell.metadata.get(TOLERANCE_KEY)
            first = problems[0].splitlines()[0]
            print(f"  cell {index:3d} FAILS verification (cell tolerance {tol}): {first}")
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--variants", default="avx2,default,threads2")
    args = parser.parse_args(argv)
    import matplotlib.pyplot  # noqa: F401  (font cache outside the kernel)

    total_failures = 0
    for path in args.notebooks:
        stored = nbformat.read(path, as_version=4)
        for name in args.variants.split(","):
            run, seconds = execute_copy(path, VARIANTS[name])
            print(f"{path} [{name}: {' '.join(f'{k}={v}' for k, v in VARIANTS[name].items()) or 'as is'}]"
                  f" {seconds:.1f} s")
            total_failures += report(stored, run)
    print(f"{total_failures} cell(s) would fail verification")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
