"""What every picture shares: matplotlib without a screen, and PNG files written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from artifacts.atomic import commit_file, temp_path_for

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A figure not tied to any GUI backend (the machines have no screen; pyplot's global state is not used)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # the serve image, say, leaves matplotlib out
        raise ImportError(f"pictures need matplotlib ({error}): pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` atomically: a reader never sees half a PNG, a failed draw leaves the old one."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: pictures are written as PNG; name the file .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        figure.savefig(temp, format="png", dpi=DPI)
        commit_file(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
