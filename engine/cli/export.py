"""``radflash export``: the image tower as ONNX or a TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import click

from radflash.cli.options import model_argument

# MODEL may come before OUT (the historical spelling, kept working) or as --model.
_model_and_out = model_argument(positional=True, followed_by="out")
_max_batch = click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
                          help="Largest batch the graph/engine accepts.")


@click.group()
def export() -> None:
    """Export the image encoder for ONNX Runtime or TensorRT."""


@export.command("onnx")
@_model_and_out
@click.option("--image-size", type=click.IntRange(min=14), default=None,
              help="Input side in pixels (default: the model's).")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16")), default="fp32", show_default=True)
@_max_batch
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs eager check.")
def onnx(model_path: str | None, out: Path, image_size: int | None, precision: str, max_batch: int,
         opset: int, no_validate: bool) -> None:
    """Write the image tower as ONNX to OUT (dynamic batch axis) and validate it against eager PyTorch."""
    from radflash.backends.export import export_onnx

    result = export_onnx(model_path, out, image_size=image_size, precision=precision, max_batch=max_batch, opset=opset,
                         validate=not no_validate)
    click.echo(f"wrote {result.path} ({result.precision}, {result.image_size} px, opset {result.opset}, "
               f"{result.seconds:.1f} s)")
    if result.validation is not None:
        click.echo(result.validation.summary())
    elif result.note:
        click.echo(result.note)


@export.command("tensorrt")
@_model_and_out
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16", "int8")), default="fp16", show_default=True)
@_max_batch
@click.option("--opt-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Batch the engine is tuned for.")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Build from this ONNX graph (required for int8: a Q/DQ graph from `calibrate quantize`).")
def tensorrt(model_path: str | None, out: Path, precision: str, max_batch: int, opt_batch: int,
             onnx_path: str | None) -> None:
    """Build a TensorRT engine (plan) for the image tower and write it to OUT."""
    from radflash.backends.export import export_tensorrt

    path = export_tensorrt(model_path, out, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                           onnx_path=onnx_path)
    click.echo(f"wrote {path}")
