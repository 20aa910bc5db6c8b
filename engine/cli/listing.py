"""``radflash models`` / ``radflash findings``: listings that need no torch."""

from __future__ import annotations

import click

# what each family gives, for the listing (the registry itself only knows module paths)
FAMILY_NOTES = {
    "radzero": "VL-CABS similarity head: scores, maps (segment, grounding); convert: radflash convert radzero",
    "carzero": "cross-attention alignment: scores only (segment refuses); convert: radflash convert carzero",
}


@click.command()
def models() -> None:
    """List the model families, built-in presets and the embedded demo model."""
    from pathlib import Path

    from radflash.models.config import PRESETS
    from radflash.models.registry import names

    demo = Path(__file__).resolve().parents[1] / "assets" / "demo"
    click.echo(f"demo   {'(embedded) ' + str(demo) if demo.exists() else '(not built: see README)'}")
    click.echo("families:")
    for family in names():
        click.echo(f"  {family:8s} {FAMILY_NOTES.get(family, '')}")
    click.echo("presets (random weights, for tests and benchmarks):")
    for name, cfg in PRESETS.items():
        click.echo(f"  {name:13s} {cfg.architecture}, {cfg.image_size}², width {cfg.vision.hidden}, "
                   f"{cfg.vision.layers}+{cfg.text.layers} layers")


@click.command()
def findings() -> None:
    """List the default findings and their prompts."""
    from radflash.findings import default_prompts

    for name, prompt in default_prompts().items():
        click.echo(f"{name:28s} {prompt}")
