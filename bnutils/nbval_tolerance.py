"""nbval with stated tolerances: a pytest plugin that makes the notebooks verifiable on any CPU.

nbval re-executes a notebook and compares each output with the stored one, character by
character. Outputs of training or float32 reductions differ in their last digits between CPUs
(other vector instructions sum in another order, and training amplifies that). This plugin keeps
nbval's exact comparison and adds one thing: an output whose *stored* value carries a tolerance
is compared number by number within it. The tolerance is stated next to the value:

- a glue record: ``bnutils.glue("acc", f"{acc:.1%}", tol=2.0)`` stores ``{"tolerance": {"atol": 2.0}}``
  in the output's metadata (``tol`` is in the units of the displayed number: here percentage points);
- any other output of a cell (printed tables, HTML, text/plain): the cell's metadata
  ``"tolerance": {"atol": 0.02, "rtol": 0.05, "orders": 1, "why": "..."}``. Glue records of such a
  cell are compared exactly unless they carry their own tolerance.

Within a tolerance, the text with its numbers taken out (and its spaces, so that re-aligned
columns still match) must be equal, there must be as many numbers, and each pair must
satisfy ``|test - ref| <= atol + rtol * |ref|``, or, where ``orders`` is given, differ by at most
``orders`` in log10 of their magnitudes. Everything without a tolerance is compared exactly.

Use: ``pytest --nbval -p bnutils.nbval_tolerance chapters`` (``make verify`` does).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

TOLERANCE_KEY = "tolerance"
"""Key of the tolerance in a cell's metadata and in a glue output's metadata."""

GLUE_KEY = "scrapbook"  # myst-nb marks its glue outputs with this metadata key
ALLOWED = {"atol", "rtol", "orders", "why"}

# A number as printed: thousands separators (1,234), decimals, exponents. A leading minus (ASCII or
# Unicode) counts only when it does not follow a word character or a digit ("x-1", "2026-12" stay
# text). Word-glued digits (float32, x86_64, 2nd) are text, not numbers.
_NUMBER = re.compile(
    r"(?<![\w.])(?:(?<![\w\d])[-\u2212])?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?(?![\w])"
)
_SPACES = re.compile(r"[ \t]+")


def validate_tolerance(tol: Any, where: str = "tolerance") -> dict:
    """Check a tolerance mapping (``atol``, ``rtol``, ``orders`` >= 0, ``why`` text); return it.

    Raises ``ValueError``/``TypeError`` naming what was expected.
    """
    if not isinstance(tol, Mapping):
        raise TypeError(f"{where} must be a mapping like {{'atol': 0.01}}, got {type(tol).__name__}")
    unknown = set(tol) - ALLOWED
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(ALLOWED)}")
    numeric = {k: v for k, v in tol.items() if k != "why"}
    if not numeric:
        raise ValueError(f"{where} needs at least one of atol, rtol, orders; got {dict(tol)!r}")
    for key, value in numeric.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return dict(tol)


def parse_number(token: str) -> float:
    """The value of a token matched by the number pattern ("1,234.5", "\u22122.0e-06")."""
    return float(token.replace(",", "").replace("\u2212", "-"))


def split_numbers(text: str) -> tuple[str, list[str]]:
    """``text`` with every number replaced by a placeholder and spaces removed, and the numbers."""
    numbers = _NUMBER.findall(text)
    skeleton = _SPACES.sub("", _NUMBER.sub("\x00", text))
    return skeleton, numbers


def numbers_close(ref: float, test: float, tol: Mapping) -> bool:
    """Whether ``test`` is within ``tol`` of the stored ``ref`` (see the module docstring)."""
    if ref == test:
        return True
    if abs(test - ref) <= tol.get("atol", 0.0) + tol.get("rtol", 0.0) * abs(ref):
        return True
    orders = tol.get("orders")
    if orders is not None and ref != 0 and test != 0 and (ref > 0) == (test > 0):
        return abs(math.log10(abs(test)) - math.log10(abs(ref))) <= orders
    return False


def compare_text(ref: str, test: str, tol: Mapping | None) -> str | None:
    """None if ``test`` matches the stored ``ref`` (exactly, or within ``tol``), else why not."""
    if ref == test:
        return None
    if tol is None:
        return "differs (compared exactly: no tolerance stated)"
    ref_skel, ref_nums = split_numbers(ref)
    test_skel, test_nums = split_numbers(test)
    if ref_skel != test_skel:
        return "the text around the numbers differs"
    if len(ref_nums) != len(test_nums):  # pragma: no cover - implied by equal skeletons
        return f"{len(test_nums)} numbers where {len(ref_nums)} were stored"
    for i, (r, t) in enumerate(zip(ref_nums, test_nums, strict=True)):
        if not numbers_close(parse_number(r), parse_number(t), tol):
            return f"number {i + 1}: {t} vs stored {r}, outside the tolerance {dict(tol)}"
    return None


def _tolerance_of_output(output: Mapping, cell_tol: Mapping | None) -> Mapping | None:
    meta = output.get("metadata") or {}
    if GLUE_KEY in meta:  # a glue record: only its own tolerance counts
        own = meta.get(TOLERANCE_KEY)
        return validate_tolerance(own, "glue tolerance") if own is not None else None
    return cell_tol


def flatten_outputs(outputs: Sequence[Mapping], cell_tol: Mapping | None,
                    skip: Sequence[str]) -> dict[str, list[tuple[Any, Mapping | None]]]:
    """Group outputs by key as nbval does (mime types flattened), each value with its tolerance."""
    flat: dict[str, list[tuple[Any, Mapping | None]]] = {}
    for output in outputs:
        tol = _tolerance_of_output(output, cell_tol)
        for key, value in output.items():
            if key in skip:
                continue
            if key == "data":
                for mime, data in value.items():
                    if mime not in skip:
                        flat.setdefault(mime, []).append((data, tol))
            else:
                flat.setdefault(key, []).append((value, tol))
    return flat


def compare_outputs(ref: Sequence[Mapping], test: Sequence[Mapping], cell_metadata: Mapping,
                    skip: Sequence[str] = ("metadata", "traceback", "prompt_number", "output_type",
                                           "name", "execution_count", "image/png", "image/jpeg"),
                    sanitize=lambda s: s) -> list[str]:
    """Compare a cell's outputs with the stored ones; return the problems (empty when they match).

    ``ref`` are the stored outputs, ``test`` the new ones, both after nbval's stream coalescing;
    tolerances are read from the stored side (cell metadata and glue output metadata).
    """
    cell_tol = cell_metadata.get(TOLERANCE_KEY)
    if cell_tol is not None:
        cell_tol = validate_tolerance(cell_tol, "cell metadata 'tolerance'")
    ref_flat = flatten_outputs(ref, cell_tol, skip)
    test_flat = flatten_outputs(test, None, skip)
    problems = []
    if set(ref_flat) != set(test_flat):
        missing, extra = set(ref_flat) - set(test_flat), set(test_flat) - set(ref_flat)
        problems.append(f"output fields differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        return problems
    for key, ref_values in ref_flat.items():
        test_values = test_flat[key]
        if len(ref_values) != len(test_values):
            problems.append(f"{key}: {len(test_values)} outputs where {len(ref_values)} were stored")
            continue
        for (ref_value, tol), (test_value, _) in zip(ref_values, test_values, strict=True):
            ref_value, test_value = sanitize(ref_value), sanitize(test_value)
            if isinstance(ref_value, str) and isinstance(test_value, str):
                why = compare_text(ref_value, test_value, tol)
            else:
                why = None if ref_value == test_value else "differs (not text: compared exactly)"
            if why:
                problems.append(f"{key}: {why}\n--- stored:\n{ref_value}\n--- now:\n{test_value}")
    return problems


# ---------------------------------------------------------------- the pytest plugin
def pytest_configure(config):
    """Replace nbval's output comparison by the tolerance-aware one (nbval's stays for the rest)."""
    try:
        from nbval import plugin as nbval_plugin
    except ImportError:  # nbval not installed: nothing to extend
        return
    cell_class = nbval_plugin.IPyNbCell
    if getattr(cell_class, "_bnbook_tolerant", False):
        return

    def tolerant_compare_outputs(self, test, ref, skip_compare=None):
        skip = skip_compare or self.parent.skip_compare
        test = nbval_plugin.transform_streams_for_comparison(test)
        ref = nbval_plugin.transform_streams_for_comparison(ref)
        problems = compare_outputs(ref, test, self.cell.metadata, skip=skip, sanitize=self.sanitize)
        self.comparison_traceback = problems
        return not problems

    cell_class.compare_outputs = tolerant_compare_outputs
    cell_class._bnbook_tolerant = True
