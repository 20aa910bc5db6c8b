"""``radflash calibrate``: INT8 quantisation of the encoder and per-finding score calibration."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radflash.cli.options import Decorator, model_argument, stack


def _inputs(source: str, dest: str, source_type: click.ParamType, source_help: str, *, phantoms_help: str,
            out_type: click.ParamType, out_help: str, optional: Callable[[dict[str, Any]], bool] | None = None
            ) -> Decorator:
    """What both subcommands take: the model, one data source (``source`` or ``--phantoms N``) and ``--out``.

    The "exactly one source" check runs before the MODEL/--model one, and before anything heavy is
    imported, so a mistyped call fails at once. ``optional(kwargs)`` says when the source and ``--out``
    may both be left out (``quantize --backend openvino``: demo phantoms, written beside the checkpoint).
    """
    def one_source(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def command(**kwargs: Any) -> Any:
            relaxed = optional is not None and optional(kwargs)
            if (kwargs[dest] is not None and kwargs["phantoms"] is not None) or (
                    not relaxed and kwargs[dest] is None and kwargs["phantoms"] is None):
                raise click.UsageError(f"give exactly one of {source} or --phantoms")
            if kwargs["out"] is None and not relaxed:
                raise click.UsageError("missing option --out")
            return f(**kwargs)
        return command

    options = stack(
        model_argument(positional=True),  # MODEL positionally: the historical spelling, kept working
        click.option(source, dest, type=source_type, default=None, help=source_help),
        click.option("--phantoms", type=click.IntRange(min=2), default=None, help=phantoms_help),
        click.option("--out", type=out_type, default=None, help=out_help),
    )
    return stack(one_source, options)


@click.group()
def calibrate() -> None:
    """Quantise the image encoder to INT8, or fit score temperatures and thresholds."""


@calibrate.command("quantize")
@_inputs("--images", "images_dir", click.Path(exists=True, file_okay=False),
         "Folder of representative images (PNG/JPEG/TIFF/.npy/DICOM).",
         phantoms_help="Use N synthetic phantoms instead (openvino without either: 16 demo phantoms).",
         out_type=click.Path(dir_okay=False, path_type=Path),
         out_help="model.int8.onnx (onnxruntime), or NAME.xml (openvino; default: beside the checkpoint, where "
                  "the openvino backend looks for it).",
         optional=lambda kwargs: kwargs.get("backend") == "openvino")
@click.option("--backend", type=click.Choice(("onnxruntime", "openvino")), default="onnxruntime", show_default=True,
              help="Runtime the INT8 encoder is for: a Q/DQ ONNX graph, or an OpenVINO IR quantised by NNCF "
                   "(pip install 'radflash[openvino]'; attention's products in int8 too where that agrees with "
                   "float32 and is faster here: the report gives each variant).")
@click.option("--holdout", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images held out of calibration for the accuracy report.")
@click.option("--method", type=click.Choice(("auto", "modelopt", "onnxruntime")), default="auto", show_default=True,
              help="auto: NVIDIA ModelOpt where installed, else onnxruntime.quantization.")
@click.option("--auroc-phantoms", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also report the macro AUROC drop on this many fresh phantoms.")
def quantize(model_path: str | None, images_dir: str | None, phantoms: int | None, out: Path | None,
             backend: str, holdout: int, method: str, auroc_phantoms: int) -> None:
    """Write an INT8 image encoder calibrated on representative images (ONNX Q/DQ graph or OpenVINO IR),
    with its agreement report against float32."""
    from radflash.errors import RadflashError

    try:
        if backend == "openvino":
            from radflash.calibration.quantize import quantize_openvino

            report = quantize_openvino(model_path, out, images_dir=images_dir, phantoms=phantoms, holdout=holdout,
                                       auroc_phantoms=auroc_phantoms)
        else:
            from radflash.calibration.quantize import quantize_int8

            report = quantize_int8(model_path, out, images_dir=images_dir, phantoms=phantoms, holdout=holdout,
                                   method=method, auroc_phantoms=auroc_phantoms)
    except RadflashError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    click.echo(report.summary())


@calibrate.command("scores")
@_inputs("--labels", "labels_csv", click.Path(exists=True, dir_okay=False),
         "CSV: a 'path' column (relative to the CSV) and one 0/1 column per finding (blank = unknown).",
         phantoms_help="Fit on N labelled phantoms instead.",
         out_type=click.Path(path_type=Path), out_help="Checkpoint to write (folder).")
@click.option("--rule", type=click.Choice(("youden", "f1")), default="youden", show_default=True,
              help="Threshold rule: maximise Youden's J (TPR − FPR) or F1.")
@click.option("--no-plot", is_flag=True, help="Skip the reliability-diagram PNG.")
def scores(model_path: str | None, labels_csv: str | None, phantoms: int | None, out: Path, rule: str,
           no_plot: bool) -> None:
    """Fit per-finding temperature and threshold; store them in the checkpoint's calibration."""
    from radflash.calibration.scores import calibrate_scores

    if not no_plot:  # fail before fitting, not after
        from radflash.util.plotting import require_plotting

        require_plotting("the reliability diagram (or pass --no-plot)")
    report = calibrate_scores(model_path, out, labels_csv=labels_csv, phantoms=phantoms, rule=rule,
                              plot=not no_plot)
    click.echo(report.summary())
