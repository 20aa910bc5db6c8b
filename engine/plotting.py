"""Headless matplotlib for every PNG radflash writes (loss curves, ROC, reliability, bench plots).

Imported lazily by the plotting functions only, so commands that draw nothing never pay for
matplotlib; the Agg backend works without a display, as on servers and in CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and free ``fig``; returns the path."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
