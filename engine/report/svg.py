"""Inline SVG charts for the report: a probability histogram and a two-bar decision chart.

Charts are static markup drawn here from numpy counts, not in the browser: the report must open
offline from ``file://`` with no chart library, and a histogram of 100,000 probabilities is one
``np.histogram`` call. Every bar is a ``<rect class="bar">`` carrying its count in ``data-count``
and a ``<title>`` tooltip, so the numbers are readable (and testable) without hovering.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

WIDTH, HEIGHT = 320, 120  # drawing area of one histogram, in SVG user units
PAD_L, PAD_B, PAD_T = 34, 18, 6
BINS = 20


class Histogram:
    """Counts of values in ``bins`` equal bins over [0, 1] (clipped; non-finite values left out),
    added one at a time: a report over a stream of any length keeps ``bins`` counts, not the values.
    The counts are those ``np.histogram`` gives for all the values at once."""

    _FLUSH = 4096  # values binned per np.histogram call

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self._counts = np.zeros(bins, dtype=np.int64)
        self._pending: list[float] = []

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray, bins: int = BINS) -> Histogram:
        hist = cls(bins)
        hist._bin(np.asarray(values, dtype=np.float64))
        return hist

    def add(self, value: float) -> None:
        self._pending.append(value)
        if len(self._pending) >= self._FLUSH:
            self._bin(np.asarray(self._pending, dtype=np.float64))
            self._pending.clear()

    def add_array(self, values: np.ndarray) -> None:
        """Bin many values at once (a column of a record batch)."""
        self._bin(np.asarray(values, dtype=np.float64))

    def _bin(self, v: np.ndarray) -> None:
        v = v[np.isfinite(v)]
        self._counts += np.histogram(np.clip(v, 0.0, 1.0), bins=self.bins, range=(0.0, 1.0))[0]

    def counts(self) -> np.ndarray:
        if self._pending:
            self._bin(np.asarray(self._pending, dtype=np.float64))
            self._pending.clear()
        return self._counts.copy()


def histogram_svg(values: Sequence[float] | np.ndarray | Histogram, *, bins: int = BINS,
                  threshold: float | None = None, label: str = "probability", color: str = "#3b6fb6") -> str:
    """Counts of ``values`` (or a :class:`Histogram` of them) in ``bins`` equal bins over [0, 1]; an
    optional threshold as a red line.

    Bar heights are scaled to the fullest bin; a non-empty bin is at least one unit high so a
    single image in a bin stays visible next to a bin of thousands.
    """
    hist = values if isinstance(values, Histogram) else Histogram.of(values, bins)
    counts = hist.counts()
    bins = hist.bins
    edges = np.linspace(0.0, 1.0, bins + 1)  # np.histogram's edges for range (0, 1)
    top = int(counts.max()) if counts.size and counts.max() > 0 else 1
    bar_w = WIDTH / bins
    parts = [_open(f"histogram of {label}: {int(counts.sum())} values")]
    parts.append(_axes(top))
    for i, c in enumerate(counts.tolist()):
        h = 0.0 if c == 0 else max(1.0, HEIGHT * c / top)
        x = PAD_L + i * bar_w
        parts.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{PAD_T + HEIGHT - h:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{h:.1f}" fill="{color}" data-count="{c}"><title>{edges[i]:.2f}–{edges[i + 1]:.2f}: '
                     f'{c}</title></rect>')
    if threshold is not None and np.isfinite(threshold):
        x = PAD_L + WIDTH * float(np.clip(threshold, 0.0, 1.0))
        parts.append(f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + HEIGHT}" '
                     f'stroke="#c62828" stroke-width="1.5" stroke-dasharray="4 2"><title>threshold '
                     f'{threshold:g}</title></line>')
    for tick in (0.0, 0.5, 1.0):
        x = PAD_L + WIDTH * tick
        parts.append(f'<text x="{x:.1f}" y="{PAD_T + HEIGHT + 13}" text-anchor="middle">{tick:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def decision_svg(positive: int, negative: int, unknown: int = 0) -> str:
    """Horizontal bars: images decided positive / negative (/ without a decision) at the threshold."""
    rows = [("positive", positive, "#c62828"), ("negative", negative, "#607d8b")]
    if unknown:
        rows.append(("no decision", unknown, "#bdbdbd"))
    total = max(1, max(n for _, n, _ in rows))
    height = 18 * len(rows) + 4
    parts = [f'<svg class="chart decision" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PAD_L + WIDTH + 40} '
             f'{height}" role="img" aria-label="decisions at the threshold">']
    for i, (name, n, color) in enumerate(rows):
        w = 0.0 if n == 0 else max(1.0, (WIDTH - 40) * n / total)
        y = 2 + 18 * i
        parts.append(f'<text x="{PAD_L + 30}" y="{y + 12}" text-anchor="end">{escape(name)}</text>'
                     f'<rect class="bar" x="{PAD_L + 34}" y="{y}" width="{w:.1f}" height="14" fill="{color}" '
                     f'data-count="{n}"><title>{escape(name)}: {n}</title></rect>'
                     f'<text x="{PAD_L + 38 + w:.1f}" y="{y + 12}">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _open(label: str) -> str:
    return (f'<svg class="chart histogram" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {PAD_L + WIDTH + 4} {PAD_T + HEIGHT + PAD_B}" role="img" aria-label="{escape(label)}">')


def _axes(top: int) -> str:
    y0, x0 = PAD_T + HEIGHT, PAD_L
    return (f'<line x1="{x0}" x2="{x0 + WIDTH}" y1="{y0}" y2="{y0}" stroke="#999"/>'
            f'<line x1="{x0}" x2="{x0}" y1="{PAD_T}" y2="{y0}" stroke="#999"/>'
            f'<text x="{x0 - 4}" y="{PAD_T + 9}" text-anchor="end">{top}</text>'
            f'<text x="{x0 - 4}" y="{y0}" text-anchor="end">0</text>')
