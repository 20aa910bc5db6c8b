"""PNG of a :class:`radflash.bench.report.BenchReport`: latency vs batch size, and where the time goes.

Left: end-to-end latency per image (median of the timed loop / B) against batch size, one line
per backend, the reference dashed. Right: mean time per image of each stage at the largest batch
size, stacked, for every backend and the reference (means, so the stacks add up to ≤ e2e).
"""

from __future__ import annotations

from pathlib import Path

from radflash.bench.report import E2E, STAGES, BenchReport

COLORS = {"decode": "#8c564b", "preprocess": "#9467bd", "encode": "#1f77b4", "head": "#ff7f0e", "maps": "#2ca02c"}


def plot_report(report: BenchReport, path: str | Path) -> Path:
    from radflash.util.plotting import pyplot, save_figure

    plt = pyplot()

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    c = report.config
    fig.suptitle(f"radflash bench · {c['model']} S={c['image_size']} T={c['prompts']} · {c['dtype']} on "
                 f"{c['device']} · {report.machine.get('gpu') or report.machine.get('cpu')}", fontsize=10)

    batches = sorted({r.batch_size for r in report.rows})
    for backend in report.backends:
        rows = [report.row(backend, b, E2E) for b in batches]
        pts = [(r.batch_size, r.radflash.median_ms / r.batch_size) for r in rows if r is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=f"radflash {backend}")
    ref = [(b, r.reference.median_ms / b) for b in batches
           if (r := next((x for x in report.rows if x.batch_size == b and x.stage == E2E), None)) and r.reference]
    if ref:
        ax1.plot(*zip(*ref), marker="s", linestyle="--", color="black", label="reference (transformers fp32)")
    ax1.set_ylim(bottom=0)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(batches, [str(b) for b in batches])
    ax1.set_xlabel("batch size B")
    ax1.set_ylabel("e2e latency per image (ms, median / B)")
    stages = [s for s in STAGES if any(r.stage == s for r in report.rows)]  # no maps for CARZero
    ax1.set_title(" → ".join(stages), fontsize=9)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)

    big = batches[-1] if batches else 1
    bars: list[tuple[str, dict[str, float], float]] = []
    for backend in report.backends:
        stages = {s: r.radflash.mean_ms / big for s in STAGES if (r := report.row(backend, big, s))}
        e2e = report.row(backend, big, E2E)
        if stages and e2e:
            bars.append((backend, stages, e2e.radflash.mean_ms / big))
    first = report.backends[0] if report.backends else None
    if first is not None:
        ref_stages = {s: r.reference.mean_ms / big for s in STAGES if (r := report.row(first, big, s)) and r.reference}
        e2e = report.row(first, big, E2E)
        if ref_stages and e2e and e2e.reference:
            bars.append(("reference", ref_stages, e2e.reference.mean_ms / big))
    labelled: set[str] = set()
    for i, (_, stages, total) in enumerate(bars):
        bottom = 0.0
        for s in STAGES:
            if s in stages:
                ax2.bar(i, stages[s], bottom=bottom, color=COLORS[s], width=0.6,
                        label=None if s in labelled else s)
                labelled.add(s)
                bottom += stages[s]
        ax2.text(i, total, f"{total:.3g} ms", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax2.set_ylabel(f"mean time per image at B={big} (ms)")
    ax2.set_title("stage breakdown (label: e2e per image)", fontsize=9)
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if bars:
        ax2.set_ylim(0, 1.12 * max(b[2] for b in bars))
    ax2.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=110)
