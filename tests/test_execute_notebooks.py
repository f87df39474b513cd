"""tools/execute_notebooks.py leaves the tree clean when nothing changed: no timestamp-only rewrites."""
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool():
    path = ROOT / "tools" / "execute_notebooks.py"
    spec = importlib.util.spec_from_file_location("execute_notebooks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook(path: Path, source: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell(source)]
    nb.cells[1].metadata["tags"] = ["keep-me"]
    nbformat.write(nb, path)
    return path


@pytest.mark.timeout(120)
def test_second_run_with_the_same_outputs_does_not_touch_the_file(tmp_path):
    execute = tool().execute
    path = notebook(tmp_path / "nb.ipynb", "print(6 * 7)")
    _, changed = execute(path)
    assert changed, "the first run adds outputs"
    first = path.read_text()
    cells = json.loads(first)["cells"]
    assert cells[1]["outputs"][0]["text"] == ["42\n"]
    assert cells[1]["metadata"] == {"tags": ["keep-me"]}, "no execution timestamps in cell metadata"
    mtime = path.stat().st_mtime_ns
    _, changed = execute(path)
    assert not changed and path.read_text() == first and path.stat().st_mtime_ns == mtime


@pytest.mark.timeout(120)
def test_changed_output_is_written_and_old_timestamps_are_dropped(tmp_path):
    execute = tool().execute
    path = notebook(tmp_path / "nb.ipynb", "print(1 + 1)")
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00.000000Z"}
    nbformat.write(nb, path)
    _, changed = execute(path)
    assert changed
    cell = json.loads(path.read_text())["cells"][1]
    assert cell["outputs"][0]["text"] == ["2\n"] and "execution" not in cell["metadata"]
