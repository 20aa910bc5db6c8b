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


@convert.command("carzero")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer", required=True, type=click.Path(path_type=Path),
              help="Local copy of the released BERT tokenizer folder (vocab.txt or tokenizer.json).")
@click.option("--model-id", default=None, help="Name stored in the checkpoint (default: carzero:<file stem>).")
@click.option("--preset", "base", default="carzero", show_default=True,
              help="CARZero preset supplying what the weights cannot tell (head counts, image geometry); "
                   "only for non-published sizes.")
def carzero(src: Path, dst: Path, tokenizer: Path, model_id: str | None, base: str) -> None:
    """Convert the released CARZero PyTorch Lightning checkpoint SRC (.ckpt) into a radflash checkpoint DST.

    SRC is read with a restricted unpickler: tensors and plain data only, nothing in the file
    runs. DST is a folder, or a single file if it ends in .safetensors.
    """
    from radflash.checkpoints.converters.carzero import convert_carzero

    out = convert_carzero(src, dst, tokenizer=tokenizer, model_id=model_id, base=base)
    click.echo(f"wrote {out}")
