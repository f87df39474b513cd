"""Notebook hygiene: what nbval cannot see (layout, execution order, house rules)."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
BIB_KEYS = set(re.findall(r"@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text()))


def toc_files(node) -> list[str]:
    """Every 'file:' entry of the table of contents, recursively."""
    found = []
    if isinstance(node, dict):
        if "file" in node:
            found.append(node["file"])
        for value in node.values():
            found += toc_files(value)
    elif isinstance(node, list):
        for item in node:
            found += toc_files(item)
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def glued_names(nb: dict) -> set[str]:
    names = set()
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                names.add(name)
    return names


ids = [p.name for p in NOTEBOOKS]


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found in chapters/"


def test_every_toc_entry_exists():
    for entry in toc_files(TOC):
        assert any((ROOT / (entry + ext)).exists() for ext in ("", ".md", ".ipynb")), entry


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_in_toc(path):
    assert f"chapters/{path.stem}" in toc_files(TOC)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_executed_top_to_bottom_in_one_run(path):
    counts = [c["execution_count"] for c in code_cells(load(path))]
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_errors_or_stderr_stored(path):
    for cell in code_cells(load(path)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", "".join(cell["source"])[:80]
            assert out.get("name") != "stderr", "".join(out.get("text", ""))[:200]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_kernel_is_python3(path):
    assert load(path)["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_first_code_cell_sets_up_the_session(path):
    first = "".join(code_cells(load(path))[0]["source"])
    assert "setup_notebook(" in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_house_rules_in_code(path):
    for cell in code_cells(load(path)):
        src = "".join(cell["source"])
        assert not re.search(r"sys\.path\.(append|insert)", src), "install bnutils instead"
        assert not re.search(r"urlretrieve|requests\.get|download=True|get_dataset\(", src)
        assert "cuda" not in src.replace("# cuda", ""), "the book runs on CPU"


COLLAPSED = {"hide-input", "remove-input", "hide-cell", "remove-cell"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_visible_code_fits_the_page(path):
    """Issue 12: the code a reader sees unasked (cells not collapsed), blank lines included, is
    at most 150 lines per chapter, 40 per cell and 88 characters per line; machinery is collapsed."""
    visible = [c for c in code_cells(load(path))
               if not COLLAPSED & set(c["metadata"].get("tags", []))]
    lines = ["".join(c["source"]).splitlines() for c in visible]
    assert sum(map(len, lines)) <= 150, f"{sum(map(len, lines))} visible code lines"
    longest = max(lines, key=len, default=[])
    assert len(longest) <= 40, f"a visible cell of {len(longest)} lines: {longest[:1]}"
    wide = [line for cell in lines for line in cell if len(line) > 88]
    assert not wide, f"{len(wide)} visible code lines over 88 characters: {wide[:1]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_chapter_structure(path):
    """Learning goals, takeaways, >= 2 exercises with solutions, citations and glued prose."""
    nb = load(path)
    md = markdown(nb)
    assert re.search(r"learning goals", md, re.I), "learning goals missing"
    assert re.search(r"takeaways", md, re.I), "key takeaways missing"
    exercises = re.findall(r"```\{exercise\}", md)
    solutions = re.findall(r"```\{solution(-start)?\}", md)
    assert len(exercises) >= 2, "fewer than 2 exercises"
    assert len(solutions) >= len(exercises), "an exercise without a solution"
    assert "{cite" in md, "no citations"
    assert "{glue" in md, "prose uses no glued numbers"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_glue_references_resolve(path):
    """Every {glue}`key` used in the prose was glued by the stored outputs of this notebook."""
    nb = load(path)
    used = set(re.findall(r"\{glue(?::\w+)?\}`([^`]+)`", markdown(nb)))
    used = {u.split(":")[0] for u in used}  # {glue:text}`key:format` not used, but be safe
    missing = used - glued_names(nb)
    assert not missing, f"glue keys used in prose but never glued: {sorted(missing)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_citations_are_in_bibliography(path):
    keys = set()
    for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", markdown(load(path))):
        keys |= {k.strip() for k in group.split(",")}
    assert keys <= BIB_KEYS, f"not in references.bib: {sorted(keys - BIB_KEYS)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_timing_output_is_compared(path):
    """Cells that print wall-clock times must be excluded from nbval's comparison."""
    for cell in code_cells(load(path)):
        src = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags", [])
        if re.search(r"perf_counter|timeit|time\.time\(", src) and cell.get("outputs"):
            assert "nbval-ignore-output" in tags or "nbval-skip" in tags, src[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_typed_verdict_titles_match_glued_verdicts(path):
    """A verdict word typed in an admonition title must agree with what the chapter computed and glued.

    Titles may glue the word instead ({glue:text}`chN_verdict_x`); typed words are compared as a multiset
    with the glued ``chN_verdict_*`` values of the same notebook, so a re-run that flips a verdict fails here.
    """
    nb = load(path)
    typed = sorted(re.findall(r"\{admonition\} Verdict: (confirmed|qualified|contradicted)\b", markdown(nb)))
    if not typed:
        return
    glued = []
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name", "")
            if "_verdict_" in name:
                glued.append(out["data"]["application/papermill.record/text/plain"].strip("'\""))
    assert not Counter(typed) - Counter(glued), f"typed {typed} vs glued {sorted(glued)}"


GLOSSARY_TERMS = {line.strip().lower() for line in
                  (ROOT / "glossary.md").read_text().split("```{glossary}")[1].split("```")[0].splitlines()
                  if line and not line.startswith((" ", ":"))}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_chapter_links_its_terms_to_the_glossary(path):
    roles = re.findall(r"\{term\}`([^`]*)`", markdown(load(path)))
    assert roles, "link the chapter's first use of glossary terms with {term}`...`"
    for role in roles:
        target = re.search(r"<([^>]*)>$", role)
        term = (target.group(1) if target else role).strip().lower()
        assert term in GLOSSARY_TERMS, f"{term!r} is not a term in glossary.md"


PLACEHOLDERS = {"", "none", "nan", "n/a", "-", "\u2014", "\u2013", "[]", "()", "{}", "null"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_glued_values_are_not_placeholders(path):
    """Prose must follow the result: a glued "none" or "—" dropped into a sentence written for another
    outcome ("seed(s) none drifted apart") reads as a claim the numbers do not make. Where a result can
    be empty, build the whole sentence (or clause) from the result in code and glue that."""
    for cell in code_cells(load(path)):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                value = out["data"]["application/papermill.record/text/plain"].strip("'\"").strip()
                assert value.lower() not in PLACEHOLDERS, f"glue {name!r} is a placeholder: {value!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_tolerances_are_stated_with_a_reason(path):
    """Every cell tolerance is valid and says why (the spread it was chosen from)."""
    from bnutils.nbval_tolerance import validate_tolerance

    for cell in code_cells(load(path)):
        tol = cell.get("metadata", {}).get("tolerance")
        if tol is not None:
            validate_tolerance(tol, f"cell {''.join(cell['source'])[:40]!r}")
            assert len(tol.get("why", "")) > 10, "say why: the measured spread this tolerance covers"
