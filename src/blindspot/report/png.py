"""The one way the report layer makes a matplotlib figure, writes it as PNG and embeds a PNG in HTML.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state, safe in threads and without a
display) at 110 dpi.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from blindspot.errors import PathLike
from blindspot.fileio import atomic_write_bytes
from blindspot.validate import printable

__all__ = ["DPI", "new_figure", "png_bytes", "png_data_uri", "save_png"]

DPI = 110


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A ``width`` × ``height`` inch :class:`~matplotlib.figure.Figure` (matplotlib is imported on first use)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def png_bytes(fig) -> bytes:
    """``fig`` encoded as PNG. Text holding bytes that are not UTF-8 (file names on some file systems, carried as
    surrogate escapes) is drawn as ``\\xNN`` instead of failing."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        s = text.get_text()
        if printable(s) != s:
            text.set_text(printable(s))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig, path: PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, png_bytes(fig))


def save_empty(fig, path: PathLike, text: str = "no examples") -> Path:
    """Save ``fig`` as a placeholder that says ``text`` (a grid of examples with nothing to show)."""
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return save_png(fig, path)


def png_data_uri(path: PathLike) -> str:
    """A PNG file as a ``data:`` URI, for a self-contained HTML page."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
