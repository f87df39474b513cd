"""Helpers for the book's notebooks that must also work outside the book's environment."""
from __future__ import annotations


def glue(name: str, text: str) -> None:
    """Store a rounded string under ``name`` for ``{glue:text}`name``` in the prose.

    Pass an already formatted string (``glue("acc", f"{acc:.1%}")``): nbval compares the
    stored record, and a raw float would print all its noisy digits. Where myst-nb is not
    installed (a bare Colab session) this does nothing, so the notebook still runs.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(text, str):
        raise TypeError(f"glue stores formatted strings; got {type(text).__name__}. "
                        f"Format it first, e.g. glue({name!r}, f'{{value:.3f}}')")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, text, display=False)
