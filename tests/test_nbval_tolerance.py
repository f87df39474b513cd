"""The verification's comparator (bnutils.nbval_tolerance): exact by default, within stated tolerances."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnutils import glue
from bnutils.nbval_tolerance import (
    compare_outputs,
    compare_text,
    numbers_close,
    split_numbers,
    validate_tolerance,
)


def stream(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def glue_record(name, text, tol=None):
    meta = {"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}}
    if tol is not None:
        meta["tolerance"] = tol
    return {"output_type": "display_data", "metadata": meta,
            "data": {"application/papermill.record/text/plain": repr(text)}}


# ---------------------------------------------------------------- numbers in text
def test_split_numbers_finds_printed_numbers_and_leaves_words_alone():
    skeleton, numbers = split_numbers("acc 80.0% at lr 1e-3, 6,352 steps; float32 x86_64 2026-12 \u22120.5")
    assert numbers == ["80.0", "1e-3", "6,352", "2026", "12", "\u22120.5"]
    assert "float32" in skeleton and "x86_64" in skeleton


def test_equal_text_matches_without_a_tolerance():
    assert compare_text("loss 0.123", "loss 0.123", None) is None


def test_any_difference_fails_without_a_tolerance():
    assert compare_text("loss 0.123", "loss 0.124", None) is not None


def test_within_and_outside_an_absolute_tolerance():
    tol = {"atol": 0.5}
    assert compare_text("acc 80.0%", "acc 80.4%", tol) is None
    assert "outside the tolerance" in compare_text("acc 80.0%", "acc 80.6%", tol)


def test_relative_tolerance_scales_with_the_stored_value():
    tol = {"rtol": 0.1}
    assert compare_text("6,352 steps", "6,900 steps", tol) is None
    assert compare_text("6,352 steps", "7,100 steps", tol) is not None


def test_orders_compare_round_off_magnitudes_by_decade():
    tol = {"orders": 1}
    assert compare_text("error 1.0e-06", "error 1.3e-06", tol) is None
    assert compare_text("error 1.0e-06", "error 9.0e-06", tol) is None
    assert compare_text("error 1.0e-06", "error 3.0e-04", tol) is not None
    assert compare_text("error 1.0e-06", "error -1.0e-06", tol) is not None  # sign flip


def test_words_around_the_numbers_must_match_exactly():
    tol = {"atol": 100}
    assert "text around" in compare_text("verdict: confirmed (1.0)", "verdict: qualified (1.0)", tol)


def test_realigned_columns_still_match():
    ref = " lr   acc\n0.1   9.9\n1.0  80.0\n"
    test = " lr   acc\n0.1  10.0\n1.0  80.1\n"
    assert compare_text(ref, test, {"atol": 0.2}) is None


def test_a_different_count_of_numbers_fails():
    assert compare_text("seeds 1, 2, 3", "seeds 1, 2", {"atol": 10}) is not None


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=6),
       st.floats(0.01, 10))
def test_numbers_within_tolerance_pass_and_beyond_fail(values, atol):
    ref = " ".join(f"{v:.3f}" for v in values)
    shifted_in = " ".join(f"{v + atol / 2:.3f}" for v in values)
    shifted_out = " ".join(f"{v + 2 * atol + 0.01:.3f}" for v in values)
    assert compare_text(ref, ref, {"atol": atol}) is None
    assert compare_text(ref, shifted_in, {"atol": atol}) is None
    assert compare_text(ref, shifted_out, {"atol": atol}) is not None


def test_numbers_close_is_exact_at_zero_tolerance():
    assert numbers_close(1.0, 1.0, {"atol": 0})
    assert not numbers_close(1.0, 1.0000001, {"atol": 0})


@pytest.mark.parametrize("bad, message", [
    ([0.1], "mapping"),
    ({"abs": 0.1}, "unknown keys"),
    ({"atol": -1}, ">= 0"),
    ({"atol": "0.1"}, ">= 0"),
    ({"why": "no number"}, "at least one"),
])
def test_bad_tolerances_are_rejected_with_what_was_expected(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        validate_tolerance(bad)


# ---------------------------------------------------------------- whole cells
def test_cell_tolerance_applies_to_printed_output():
    meta = {"tolerance": {"atol": 0.01, "why": "seed sd 0.004"}}
    assert compare_outputs([stream("0.500\n")], [stream("0.505\n")], meta) == []
    assert compare_outputs([stream("0.500\n")], [stream("0.520\n")], meta) != []
    assert compare_outputs([stream("0.500\n")], [stream("0.505\n")], {}) != []


def test_glue_records_use_their_own_tolerance_not_the_cells():
    meta = {"tolerance": {"atol": 1.0}}
    exact = [glue_record("n", "0.5")]
    assert compare_outputs(exact, [glue_record("n", "0.6")], meta) != []
    tolerant = [glue_record("acc", "80.0%", {"atol": 2.0})]
    assert compare_outputs(tolerant, [glue_record("acc", "81.5%")], {}) == []
    assert compare_outputs(tolerant, [glue_record("acc", "83.0%")], {}) != []


def test_the_stored_side_states_the_tolerance():
    # A tolerance only on the new output does not loosen the comparison.
    ref = [glue_record("acc", "80.0%")]
    assert compare_outputs(ref, [glue_record("acc", "81.0%", {"atol": 5.0})], {}) != []


def test_mismatched_structure_fails():
    ref = [stream("a 1\n"), glue_record("x", "1")]
    assert "output fields differ" in compare_outputs(ref, [stream("a 1\n")], {"tolerance": {"atol": 9}})[0]
    two = [glue_record("x", "1"), glue_record("y", "2")]
    assert "outputs where" in compare_outputs(two, [glue_record("x", "1")], {})[0]


def test_figures_text_is_compared_and_images_are_not():
    fig = {"output_type": "display_data", "metadata": {},
           "data": {"image/png": "AAAA", "text/plain": "<Figure size 800x400 with 2 Axes>"}}
    other_png = {**fig, "data": {**fig["data"], "image/png": "BBBB"}}
    assert compare_outputs([fig], [other_png], {}) == []
    other_axes = {**fig, "data": {**fig["data"], "text/plain": "<Figure size 800x400 with 3 Axes>"}}
    assert compare_outputs([fig], [other_axes], {}) != []


# ---------------------------------------------------------------- glue(tol=...)
def test_glue_validates_its_tolerance():
    with pytest.raises(ValueError, match=">= 0"):
        glue("x", "1.0", tol=-1)
    with pytest.raises(TypeError, match="mapping"):
        glue("x", "1.0", tol="0.1")


# ---------------------------------------------------------------- end to end, through nbval
NOTEBOOK_CODE = "print(f'{0.5 + 0.004:.3f}')\nimport bnutils\nbnutils.glue('v', f'{0.504:.3f}', tol=0.01)"


def run_nbval(tmp_path, stored_print, stored_glue, cell_tolerance):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(NOTEBOOK_CODE, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored_print + "\n"),
                    nbformat.from_dict(glue_record("v", stored_glue, {"atol": 0.01}))]
    if cell_tolerance is not None:
        cell.metadata["tolerance"] = cell_tolerance
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval", "--nbval-current-env",
                           "-p", "no:cacheprovider", "-p", "bnutils.nbval_tolerance", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_nbval_uses_the_tolerances_end_to_end(tmp_path):
    ok = run_nbval(tmp_path, "0.500", "0.500", {"atol": 0.01})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    no_cell_tol = run_nbval(tmp_path, "0.500", "0.500", None)
    assert no_cell_tol.returncode == 1 and "no tolerance stated" in no_cell_tol.stdout
    glue_outside = run_nbval(tmp_path, "0.500", "0.520", {"atol": 0.01})
    assert glue_outside.returncode == 1 and "outside the tolerance" in glue_outside.stdout, textwrap.shorten(
        glue_outside.stdout, 2000)


# ---------------------------------------------------------------- teeth, on the stored chapters
CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?![\w])")


def scale_numbers(text: str, factor: float) -> str:
    """Every number in ``text`` times ``factor``, printed with as many decimals as before."""
    def scaled(m):
        decimals = len(m.group(2) or "")
        mantissa = float(m.group(1) + ("." + m.group(2) if m.group(2) else "")) * factor
        body = f"{mantissa:.{decimals}f}"
        return body + (f"e{m.group(3)}" if m.group(3) else "")
    return NUMBER.sub(scaled, text)


def bump_last_digit(text: str) -> str:
    """``text`` with the last digit of its last number changed."""
    last = [m for m in re.finditer(r"\d", text)][-1]
    new = "1" if text[last.start()] != "1" else "2"
    return text[:last.start()] + new + text[last.end():]


def stored_cells(path):
    from nbval.plugin import coalesce_streams, transform_streams_for_comparison

    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and "nbval-ignore-output" not in cell.metadata.get("tags", []):
            yield cell, transform_streams_for_comparison(coalesce_streams(copy.deepcopy(cell.outputs)))


def mutate_glue(outputs, change):
    mutated = copy.deepcopy(outputs)
    for out in mutated:
        if "scrapbook" in out.get("metadata", {}):
            key = "application/papermill.record/text/plain"
            out["data"][key] = change(out["data"][key])
    return mutated


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_glued_numbers_scaled_by_a_quarter_are_caught(path):
    """Multiplying every glued number by 1.25 must fail verification: tolerances are not blankets."""
    caught = glued = 0
    for cell, outputs in stored_cells(path):
        if any("scrapbook" in out.get("metadata", {}) for out in outputs):
            mutated = mutate_glue(outputs, lambda s: scale_numbers(s, 1.25))
            if mutated != outputs:
                glued += 1
                caught += bool(compare_outputs(outputs, mutated, cell.metadata))
    if glued:
        assert caught, f"no cell of {path.name} notices its glued numbers scaled by 1.25"


def test_a_changed_last_digit_of_chapter_1_is_caught():
    """Chapter 1 is closed-form float64: every glued number is compared exactly."""
    path = next(p for p in CHAPTERS if p.name.startswith("01_"))
    checked = 0
    for cell, outputs in stored_cells(path):
        for i, out in enumerate(outputs):
            if "scrapbook" in out.get("metadata", {}) and re.search(r"\d", str(out["data"])):
                mutated = copy.deepcopy(outputs)
                key = "application/papermill.record/text/plain"
                mutated[i]["data"][key] = bump_last_digit(mutated[i]["data"][key])
                assert compare_outputs(outputs, mutated, cell.metadata), out["metadata"]["scrapbook"]["name"]
                checked += 1
    assert checked > 10
