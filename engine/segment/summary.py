"""The rich summary table printed after a segment run (the command line's view of a :class:`SegmentRun`).

Presentation only: the verb returns a :class:`SegmentRun` and the command line renders it with this.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

from radflash.segment.results import SegmentRun


def summary_table(run: SegmentRun):
    """A rich renderable: counts, then one row per prompt (threshold, positives, mean peak)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = run.counts
    head = Text(f"{counts['segmented']} image(s) segmented, {counts['skipped']} skipped, "
                f"{counts['failed']} failed · {len(run.prompts)} prompt(s) · {run.elapsed_s:.1f} s")
    table = Table(title=None, show_lines=False)
    table.add_column("prompt")
    table.add_column("threshold", justify="right")
    table.add_column("positive", justify="right")
    table.add_column("mean max prob", justify="right")
    positives, means = run.positives, run.mean_peaks  # running aggregates: no pass over the images
    n = counts["segmented"]
    for s in run.prompts:
        mean = means[s.name]
        table.add_row(s.name if s.name == s.prompt else f"{s.name}: {s.prompt}", f"{s.threshold:g}",
                      f"{positives[s.name]}/{n}", f"{mean:.3f}" if mean is not None else "–")
    parts: list[Any] = [head, table]
    if run.failures:
        fail = Table(title="skipped / failed", show_lines=False)
        fail.add_column("file")
        fail.add_column("status")
        fail.add_column("reason")
        for f in islice(run.failures, 20):
            fail.add_row(f.source, f.status, f.reason)
        if len(run.failures) > 20:
            fail.add_row(f"… {len(run.failures) - 20} more in report.json", "", "")
        parts.append(fail)
    if run.report_path is not None:
        parts.append(Text(f"report: {run.report_path}"))
    return Group(*parts)
