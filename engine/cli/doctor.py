"""``radflash doctor``: print what this install can do on this machine (radflash.bench.doctor)."""

from __future__ import annotations

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text, for scripts.")
def doctor(as_json: bool) -> None:
    """Decoders per transfer syntax, CPU, dtypes and backends, GPU/CUDA/Triton, extras, caches, services."""
    from radflash.bench.doctor import collect, render_json, render_text

    report = collect()
    click.echo(render_json(report) if as_json else render_text(report))
