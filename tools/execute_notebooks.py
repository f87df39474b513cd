"""Re-execute chapter notebooks top to bottom, in place, in this environment.

Usage: python tools/execute_notebooks.py [chapters/NN_slug.ipynb ...]   (default: all chapters)
Prints each notebook's wall time; fails (exit 1) if a cell raises or a notebook exceeds its budget.
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


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    import matplotlib.pyplot  # noqa: F401  (warm the font cache outside the kernel)

    paths = [Path(p) for p in (argv or sorted(glob.glob("chapters/*.ipynb")))]
    total, over = 0.0, []
    for path in paths:
        seconds = execute(path)
        total += seconds
        flag = "  OVER BUDGET" if seconds > BUDGET_SECONDS else ""
        print(f"{seconds:6.1f} s  {path}{flag}", flush=True)
        if seconds > BUDGET_SECONDS:
            over.append(path)
    print(f"{total:6.1f} s  total ({len(paths)} notebooks)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
