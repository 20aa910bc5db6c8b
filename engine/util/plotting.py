"""Headless matplotlib for every PNG radflash writes (loss curves, ROC, reliability, bench plots).

matplotlib is the ``plot`` extra, not a core dependency: it is imported only by the plotting
functions, so commands that draw nothing never need it, and one that does without it installed
stops with a one-line install hint. The Agg backend works without a display (servers, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot(purpose: str = "plots") -> Any:
    """matplotlib.pyplot on the Agg backend; :class:`radflash.errors.MissingDependency` without the extra."""
    from radflash.util.optional import require

    matplotlib = require("matplotlib", extra="plot", purpose=purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", extra="plot", purpose=purpose)


def require_plotting(purpose: str) -> None:
    """Fail now, with the install hint, when a long job (training) would need matplotlib later."""
    pyplot(purpose)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Lay out, write (creating the folder) and free ``fig``; returns the path."""
    plt = pyplot()
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
