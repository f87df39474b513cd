"""Re-execute chapter notebooks top to bottom, in place, in this environment.

Usage: python tools/execute_notebooks.py [chapters/NN_slug.ipynb ...]   (default: all chapters)
Prints each notebook's wall time; fails (exit 1) if a cell raises or a notebook exceeds its budget.

A notebook is written only if its content changed, and without volatile metadata (nbclient's
per-cell execution timestamps, widget state), so re-executing a chapter whose outputs are the same
leaves the working tree clean.
"""
from __future__ import annotations

import glob
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BUDGET_SECONDS = 60  # BOOK.md: each notebook <= 60 s on a 2-core machine
KERNEL = "python3"
VOLATILE_CELL_METADATA = ("execution",)  # iopub/shell timestamps of the last run
VOLATILE_NOTEBOOK_METADATA = ("widgets",)


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop metadata that changes on every run without the content changing (in place)."""
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
    return nb


def serialize(nb: nbformat.NotebookNode) -> str:
    """The file text nbformat.write would produce."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def execute(path: Path) -> tuple[float, bool]:
    """Execute ``path`` in place; returns (seconds, whether the file was rewritten)."""
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=600, record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    after = serialize(strip_volatile(nb))
    changed = after != before
    if changed:
        path.write_text(after, encoding="utf-8")
    return elapsed, changed


def main(argv: list[str]) -> int:
    import matplotlib.pyplot  # noqa: F401  (warm the font cache outside the kernel)

    paths = [Path(p) for p in (argv or sorted(glob.glob("chapters/*.ipynb")))]
    total, over = 0.0, []
    for path in paths:
        seconds, changed = execute(path)
        total += seconds
        flag = "  OVER BUDGET" if seconds > BUDGET_SECONDS else ""
        state = "written" if changed else "unchanged"
        print(f"{seconds:6.1f} s  {path}  ({state}){flag}", flush=True)
        if seconds > BUDGET_SECONDS:
            over.append(path)
    print(f"{total:6.1f} s  total ({len(paths)} notebooks)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
