"""read_glue recovers exactly what glue stored, from a notebook executed for real."""
import json

import nbformat
import pytest
from nbclient import NotebookClient

from bnutils.claims import read_all_glue, read_glue


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import bnutils\nbnutils.glue('t_a', f'{1/3:.3f}')\n"
        "bnutils.glue('t_b', \"it's 'quoted'\")\nprint('x')")]
    client = NotebookClient(nb, kernel_name="python3", timeout=120)
    client.execute()
    path = folder / "one.ipynb"
    nbformat.write(nb, path)
    return path


def test_read_glue_returns_stored_strings(executed):
    assert read_glue(executed) == {"t_a": "0.333", "t_b": "it's 'quoted'"}


def test_read_all_glue_merges_and_rejects_conflicts(executed, tmp_path):
    data = json.loads(executed.read_text())
    (tmp_path / "a.ipynb").write_text(json.dumps(data))
    for out in data["cells"][0]["outputs"]:
        if out.get("metadata", {}).get("scrapbook", {}).get("name") == "t_a":
            out["data"]["application/papermill.record/text/plain"] = "'0.5'"
    (tmp_path / "b.ipynb").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="t_a"):
        read_all_glue(tmp_path)


def test_not_a_notebook(tmp_path):
    bad = tmp_path / "x.ipynb"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Jupyter notebook"):
        read_glue(bad)
