"""``radflash models`` / ``radflash findings``: listings that need no torch."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List built-in model presets and the embedded demo model."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "assets" / "demo"
    click.echo(f"demo   {'(embedded) ' + str(demo) if demo.exists() else '(not built: see README)'}")
    click.echo("presets: base (published RadZero sizes), tiny (tests and demo)")


@click.command()
def findings() -> None:
    """List the default findings and their prompts."""
    from radflash.findings import default_prompts

    for name, prompt in default_prompts().items():
        click.echo(f"{name:28s} {prompt}")
