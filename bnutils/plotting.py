"""One plotting style for the whole book: colour-blind-safe palette, readable sizes, sharp figures."""
from __future__ import annotations

import matplotlib as mpl
import seaborn as sns

PALETTE = sns.color_palette("colorblind")
"""Colour-blind-safe colours; PALETTE[0] is used for 'without BN', PALETTE[1] for 'with BN'."""

NO_BN_COLOR, BN_COLOR = PALETTE[0], PALETTE[1]

INLINE_FORMAT = "retina"
"""Inline figures in a notebook are PNGs at twice ``figure.dpi`` (sharp on high-DPI screens), shown
at the figure's size: the PNG's output metadata gives its width and height in CSS pixels. The
figure's size and dpi, and so its text/plain ``<Figure size WxH with N Axes>``, stay the same."""


def set_style() -> None:
    """Apply the book's matplotlib/seaborn style (idempotent).

    Sizes stay readable when a 7-inch figure is shrunk to a phone's width (about half size); in a
    notebook (IPython with the inline backend) figures are drawn at 2x for high-DPI screens.
    """
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update({
        "figure.figsize": (7.0, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 100,
        "font.size": 12,
        "axes.titlesize": 13,
        "axes.labelsize": 12,
        "xtick.labelsize": 11,
        "ytick.labelsize": 11,
        "legend.fontsize": 11,
        "legend.title_fontsize": 11,
        "figure.constrained_layout.use": True,
    })
    _inline_retina()


def _inline_retina() -> None:
    """In an IPython kernel, display figures as 2x PNGs (no-op outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
        from matplotlib_inline.config import InlineBackend
    except ImportError:
        return
    # The backend's own setting too: when pyplot is first imported *after* this call, activating
    # the inline backend re-selects the formats from InlineBackend.figure_formats.
    InlineBackend.instance(parent=shell).figure_formats = {INLINE_FORMAT}
    set_matplotlib_formats(INLINE_FORMAT)
