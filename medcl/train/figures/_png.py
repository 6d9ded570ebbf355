"""Writing a matplotlib figure as a PNG: Agg canvas (no pyplot, no display), written atomically (:func:`medcl.storage.atomic_path`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medcl.storage import atomic_path

__all__ = ["new_figure", "save_png"]


def new_figure(width_in: float, height_in: float, dpi: int) -> Any:
    """A ``matplotlib.figure.Figure`` on an Agg canvas (thread-safe; pyplot's global state is never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` (a ``.png``) atomically: a temp name beside it, then ``os.replace``.

    The size in pixels is the figure's size times its dpi (no ``bbox_inches="tight"``).

    Raises:
        ValueError: ``path`` does not end in ``.png``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path
