"""``radflash bench serve``: load a local node over STOW-RS or C-STORE (see :mod:`radflash.serving.bench`).

A subcommand of the ``radflash bench`` group (:mod:`radflash.cli.bench`)."""

from __future__ import annotations

from pathlib import Path

import click


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        out = ()
    if not out or any(not 0 < f <= 2 for f in out):
        raise click.BadParameter(f"expected comma-separated fractions in (0, 2] such as 0.5,0.8,1; got {value!r}")
    return out


@click.command("serve")
@click.option("--transport", type=click.Choice(("stow", "dimse")), default="stow", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Closed loop with N senders.")
@click.option("--rate", "rates", type=click.FloatRange(min=0.01), multiple=True,
              help="Open loop, Poisson arrivals at R instances/s (repeatable: one load each).")
@click.option("--load-fractions", "fractions", default=None, callback=_fractions, metavar="F,F,…",
              help="Open loops at these fractions of the capacity the --concurrency load measures on the batched "
                   "node (e.g. 0.5,0.8,1); the same rates then run at --max-batch 1.")
@click.option("--max-batch", type=click.IntRange(min=2), default=8, show_default=True,
              help="The node's batch bound; every load also runs with --max-batch 1.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=50.0, show_default=True)
@click.option("--window", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds per window; a load ends when its last three windows agree (within 10%, or for an open "
                   "loop within Poisson noise) or its queue keeps growing (overloaded).")
@click.option("--max-windows", type=click.IntRange(min=3), default=8, show_default=True)
@click.option("--model", type=click.Path(exists=True), default=None, help="Checkpoint (default: the demo model).")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the table (.md) and JSON here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG: throughput and latency.")
@click.option("--quiet", is_flag=True, help="No progress (a bar on a terminal, else one line per load on stderr).")
def bench_serve(transport: str, concurrency: int | None, rates: tuple[float, ...], fractions: tuple[float, ...],
                max_batch: int, max_queue_delay_ms: float, window: float, max_windows: int, model: str | None,
                workers: int, out: Path | None, plot_path: Path | None, quiet: bool) -> None:
    """Receive → result-forwarded latency (p50/p90/p95/p99) and throughput of a local serve node."""
    from radflash.serving import bench

    if fractions and concurrency is None:
        raise click.UsageError("--load-fractions needs --concurrency N: its closed loop measures the capacity")
    if concurrency is None and not rates:
        raise click.UsageError("give --concurrency N (closed loop) and/or --rate R (open loop)")
    from radflash.util.progress import progress_bar

    total = bench.load_count(concurrency=concurrency, rates=rates, fractions=fractions)
    bar = progress_bar(total, desc="bench serve", enabled=not quiet, unit="load")

    def on_window(label: str, batch: int, n: int, rate: float, queued: int) -> None:
        if bar is not None:
            bar.update(0, load=f"{label} (max batch {batch})", window=f"{n}/{max_windows}", results_s=rate,
                       queued=queued)

    def on_load(r: bench.LoadResult) -> None:
        if bar is not None:
            bar.update(1)
        elif not quiet:  # off a terminal (a log file): one line per load, so a long run shows it is alive
            click.echo(f"bench serve: {r.label}, max batch {r.max_batch}: {r.state} after {len(r.windows)} "
                       f"window(s), {r.throughput:.2f} results/s, p50 {r.p50:.3f} s, p99 {r.p99:.3f} s", err=True)

    try:
        results = bench.bench_serve(transport=transport, concurrency=concurrency, rates=rates, fractions=fractions,
                                    max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, window=window,
                                    max_windows=max_windows, model=model, workers=workers, on_window=on_window,
                                    on_load=on_load)
    finally:
        if bar is not None:
            bar.close()
    text = bench.table(results, batched=max_batch)
    click.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(bench.as_json(results))
    if plot_path is not None:
        bench.plot(results, plot_path, batched=max_batch)
