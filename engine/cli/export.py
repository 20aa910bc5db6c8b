"""``radflash export``: the image tower as ONNX or a TensorRT engine."""

from __future__ import annotations

from pathlib import Path

import click


def _model_and_out(paths: tuple[str, ...], model_path: str | None) -> tuple[str | None, Path]:
    """``[MODEL] OUT``: the model may be positional or ``--model`` (default: the demo model), not both."""
    if len(paths) == 1:
        return model_path, Path(paths[0])
    if len(paths) == 2:
        if model_path is not None:
            raise click.UsageError("give the model either as MODEL or as --model, not both")
        if not Path(paths[0]).exists():
            raise click.BadParameter(f"{paths[0]}: no such checkpoint", param_hint="MODEL")
        return paths[0], Path(paths[1])
    raise click.UsageError("expected [MODEL] OUT")


_paths = click.argument("paths", nargs=-1, required=True, metavar="[MODEL] OUT")
_model = click.option("--model", "model_path", type=click.Path(exists=True), default=None,
                      help="Checkpoint folder or .safetensors file (default: the embedded demo model).")
_max_batch = click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
                          help="Largest batch the graph/engine accepts.")


@click.group()
def export() -> None:
    """Export the image encoder for ONNX Runtime or TensorRT."""


@export.command("onnx")
@_paths
@_model
@click.option("--image-size", type=click.IntRange(min=14), default=None,
              help="Input side in pixels (default: the model's).")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16")), default="fp32", show_default=True)
@_max_batch
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs eager check.")
def onnx(paths: tuple[str, ...], model_path: str | None, image_size: int | None, precision: str, max_batch: int,
         opset: int, no_validate: bool) -> None:
    """Write the image tower as ONNX to OUT (dynamic batch axis) and validate it against eager PyTorch."""
    from radflash.backends.export import export_onnx

    model, out = _model_and_out(paths, model_path)
    result = export_onnx(model, out, image_size=image_size, precision=precision, max_batch=max_batch, opset=opset,
                         validate=not no_validate)
    click.echo(f"wrote {result.path} ({result.precision}, {result.image_size} px, opset {result.opset}, "
               f"{result.seconds:.1f} s)")
    if result.validation is not None:
        click.echo(result.validation.summary())
    elif result.note:
        click.echo(result.note)


@export.command("tensorrt")
@_paths
@_model
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16", "int8")), default="fp16", show_default=True)
@_max_batch
@click.option("--opt-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Batch the engine is tuned for.")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Build from this ONNX graph (required for int8: a Q/DQ graph from `calibrate quantize`).")
def tensorrt(paths: tuple[str, ...], model_path: str | None, precision: str, max_batch: int, opt_batch: int,
             onnx_path: str | None) -> None:
    """Build a TensorRT engine (plan) for the image tower and write it to OUT."""
    from radflash.backends.export import export_tensorrt

    model, out = _model_and_out(paths, model_path)
    path = export_tensorrt(model, out, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                           onnx_path=onnx_path)
    click.echo(f"wrote {path}")
