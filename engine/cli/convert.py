"""``radflash convert``: bring released weights into radflash's checkpoint format."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def convert() -> None:
    """Convert released model weights (local copies only; nothing is downloaded)."""


@convert.command("radzero")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--model-id", default=None, help="Name stored in the checkpoint (default: radzero:<folder>).")
def radzero(src: Path, dst: Path, model_id: str | None) -> None:
    """Convert the released RadZero Hugging Face folder SRC into a radflash checkpoint DST.

    SRC holds config.json, model.safetensors, tokenizer.json and preprocessor_config.json.
    DST is a folder, or a single file if it ends in .safetensors.
    """
    from radflash.checkpoints.converters.radzero import convert_radzero

    out = convert_radzero(src, dst, model_id=model_id)
    click.echo(f"wrote {out}")
