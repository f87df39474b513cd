"""The book's plot style: inline figures are 2x PNGs shown at the figure's size, text/plain unchanged."""
import base64
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from bnutils.plotting import set_style  # noqa: E402


def png_size(data: bytes | str) -> tuple[int, int]:
    if isinstance(data, str):  # IPython hands PNGs to the notebook base64-encoded
        data = base64.b64decode(data)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    yield shell
    InteractiveShell.clear_instance()


def test_inline_figures_are_drawn_at_twice_their_size_with_the_same_text(shell):
    set_style()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot([0, 1], [0, 1], label="line")
    ax.set_xlabel("x")
    ax.legend()
    data, metadata = shell.display_formatter.format(fig)
    plt.close(fig)
    assert data["text/plain"] == "<Figure size 750x420 with 1 Axes>"  # what nbval compares: unchanged
    width, height = png_size(data["image/png"])
    shown = metadata["image/png"]  # the size the page shows it at (myst-nb's <img width height>)
    assert (width // 2, height // 2) == (shown["width"], shown["height"])
    # shown at the figure's own size in pixels, give or take what bbox 'tight' trims or adds
    assert abs(shown["width"] - 750) < 40 and abs(shown["height"] - 420) < 40, shown


def test_retina_survives_the_inline_backend_activating_later(shell):
    """A notebook may call setup_notebook() before its first pyplot import; activating the inline
    backend then re-selects the figure formats, which must still be 2x."""
    from matplotlib_inline import backend_inline

    set_style()
    backend_inline.configure_inline_support.current_backend = "unset"  # as in a fresh kernel
    backend_inline.configure_inline_support(shell, "inline")
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot([0, 1], [1, 0])
    data, metadata = shell.display_formatter.format(fig)
    plt.close(fig)
    assert data["text/plain"] == "<Figure size 700x400 with 1 Axes>"
    width, _ = png_size(data["image/png"])
    assert width // 2 == metadata["image/png"]["width"]


def test_style_keeps_figure_size_and_dpi():
    set_style()
    assert tuple(matplotlib.rcParams["figure.figsize"]) == (7.0, 4.0)
    assert matplotlib.rcParams["figure.dpi"] == 100
    assert matplotlib.rcParams["axes.labelsize"] >= 12 and matplotlib.rcParams["xtick.labelsize"] >= 11
