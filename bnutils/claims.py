"""Read the numbers other chapters glued, so a summary can quote them without retyping them."""
from __future__ import annotations

import ast
import json
from pathlib import Path

_RECORD = "application/papermill.record/text/plain"


def read_glue(notebook: str | Path) -> dict[str, str]:
    """All glued strings stored in an executed notebook, as {key: text}.

    myst-nb stores ``glue(key, "text")`` as a display_data output whose metadata names the key
    and whose data holds ``repr(text)``. Raises FileNotFoundError for a missing notebook and
    ValueError for a file that is not a notebook.
    """
    path = Path(notebook)
    try:
        nb = json.loads(path.read_text())
        cells = nb["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a Jupyter notebook (JSON with 'cells')") from err
    found: dict[str, str] = {}
    for cell in cells:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is None:
                continue
            text = out.get("data", {}).get(_RECORD)
            if text is None:
                continue
            value = ast.literal_eval(text)
            found[name] = value if isinstance(value, str) else str(value)
    return found


def read_all_glue(folder: str | Path = ".") -> dict[str, str]:
    """Glued strings of every notebook in ``folder`` (keys are chapter-prefixed, so they merge)."""
    merged: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.ipynb")):
        for key, value in read_glue(path).items():
            if key in merged and merged[key] != value:
                raise ValueError(f"glue key {key!r} has different values in two notebooks")
            merged[key] = value
    return merged
