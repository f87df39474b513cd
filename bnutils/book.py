"""Helpers for the book's notebooks that must also work outside the book's environment."""
from __future__ import annotations

from numbers import Real


def _as_tolerance(tol) -> dict | None:
    """``tol`` as the mapping the verification reads: a number is an absolute tolerance."""
    from .nbval_tolerance import validate_tolerance

    if tol is None:
        return None
    if isinstance(tol, Real) and not isinstance(tol, bool):
        tol = {"atol": float(tol)}
    return validate_tolerance(tol, "glue tol")


def glue(name: str, text: str, tol=None) -> None:
    """Store a rounded string under ``name`` for ``{glue:text}`name``` in the prose.

    Pass an already formatted string (``glue("acc", f"{acc:.1%}")``): nbval compares the
    stored record, and a raw float would print all its noisy digits. Where myst-nb is not
    installed (a bare Colab session) this does nothing, so the notebook still runs.

    ``tol`` states how far a re-run on another CPU may move each number in ``text``: a number is
    an absolute tolerance in the units shown (``glue("acc", "80.0%", tol=2)``: within 2 points),
    or a mapping with ``atol``, ``rtol``, ``orders`` (see ``bnutils.nbval_tolerance``). Leave it
    out for values that are deterministic by construction: they are compared exactly.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(text, str):
        raise TypeError(f"glue stores formatted strings; got {type(text).__name__}. "
                        f"Format it first, e.g. glue({name!r}, f'{{value:.3f}}')")
    tolerance = _as_tolerance(tol)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    if tolerance is None:
        myst_glue(name, text, display=False)
        return
    # myst-nb's glue record, with the tolerance beside it in the output's metadata.
    from IPython.display import display
    from myst_nb.ext.glue import GLUE_PREFIX

    from .nbval_tolerance import GLUE_KEY, TOLERANCE_KEY

    display({GLUE_PREFIX + "text/plain": repr(text)}, raw=True,
            metadata={GLUE_KEY: {"name": name, "mime_prefix": GLUE_PREFIX}, TOLERANCE_KEY: tolerance})
