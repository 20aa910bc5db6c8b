"""Training plots (loss curves)."""

from __future__ import annotations

from pathlib import Path


def plot_losses(losses: list[tuple[int, float]], val_losses: list[tuple[int, float]], path: Path) -> Path | None:
    """Loss curve PNG (raw + moving average, validation points); Agg backend, no display needed."""
    if not losses:
        return None
    import numpy as np

    from radflash.util.plotting import pyplot, save_figure

    plt = pyplot()

    steps = np.array([s for s, _ in losses])
    vals = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, vals, color="0.75", lw=0.8, label="train (per step)")
    win = max(1, len(vals) // 50)
    if win > 1:
        smooth = np.convolve(vals, np.ones(win) / win, mode="valid")
        ax.plot(steps[win - 1:], smooth, color="C0", label=f"train ({win}-step mean)")
    if val_losses:
        ax.plot([s for s, _ in val_losses], [v for _, v in val_losses], "o-", color="C3", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (multi-positive NCE + weighted map BCE)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=100)
