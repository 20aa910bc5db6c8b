"""Reliability diagrams (predicted probability vs observed frequency), before/after calibration."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def reliability_bins(probs: Any, labels: Any, *, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: mean predicted probability, observed positive rate, count (NaN where empty)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / count
        freq = np.bincount(idx, weights=y, minlength=bins) / count
    return conf, freq, count


def expected_calibration_error(probs: Any, labels: Any, *, bins: int = 10) -> float:
    conf, freq, count = reliability_bins(probs, labels, bins=bins)
    seen = count > 0
    return float(np.sum(count[seen] * np.abs(conf[seen] - freq[seen])) / max(count.sum(), 1))


def plot_reliability(curves: Mapping[str, tuple[Any, Any]], path: str | Path, *, bins: int = 10,
                     title: str = "") -> Path:
    """One PNG with a reliability curve per entry of ``curves`` (label → (probs, labels)), ECE in the legend."""
    from radflash.util.plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8, label="perfect")
    for label, (p, y) in curves.items():
        conf, freq, count = reliability_bins(p, y, bins=bins)
        seen = count > 0
        ece = expected_calibration_error(p, y, bins=bins)
        ax.plot(conf[seen], freq[seen], marker="o", ms=3, label=f"{label} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed positive rate",
           title=title or "reliability")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=120)
