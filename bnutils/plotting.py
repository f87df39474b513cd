"""One plotting style for the whole book: colour-blind-safe palette, readable sizes."""
from __future__ import annotations

import matplotlib as mpl
import seaborn as sns

PALETTE = sns.color_palette("colorblind")
"""Colour-blind-safe colours; PALETTE[0] is used for 'without BN', PALETTE[1] for 'with BN'."""

NO_BN_COLOR, BN_COLOR = PALETTE[0], PALETTE[1]


def set_style() -> None:
    """Apply the book's matplotlib/seaborn style (idempotent)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update({
        "figure.figsize": (7.0, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 100,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "figure.constrained_layout.use": True,
    })
