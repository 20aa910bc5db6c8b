"""``radflash calibrate``: INT8 quantisation of the encoder and per-finding score calibration."""

from __future__ import annotations

from pathlib import Path

import click


def _model(positional: str | None, option: str | None) -> str | None:
    if positional is not None and option is not None:
        raise click.UsageError("give the model either as MODEL or as --model, not both")
    return positional if positional is not None else option


def _one_source(images: object, phantoms: object, first: str) -> None:
    if (images is None) == (phantoms is None):
        raise click.UsageError(f"give exactly one of {first} or --phantoms")


_model_arg = click.argument("model", required=False, type=click.Path(exists=True))
_model_opt = click.option("--model", "model_opt", type=click.Path(exists=True), default=None,
                          help="Checkpoint folder or .safetensors file (default: the embedded demo model).")


@click.group()
def calibrate() -> None:
    """Quantise the image encoder to INT8, or fit score temperatures and thresholds."""


@calibrate.command("quantize")
@_model_arg
@_model_opt
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of representative images (PNG/JPEG/TIFF/.npy/DICOM).")
@click.option("--phantoms", type=click.IntRange(min=2), default=None, help="Use N synthetic phantoms instead.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="model.int8.onnx")
@click.option("--holdout", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images held out of calibration for the accuracy report.")
@click.option("--method", type=click.Choice(("auto", "modelopt", "onnxruntime")), default="auto", show_default=True,
              help="auto: NVIDIA ModelOpt where installed, else onnxruntime.quantization.")
@click.option("--auroc-phantoms", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also report the macro AUROC drop on this many fresh phantoms.")
def quantize(model: str | None, model_opt: str | None, images_dir: str | None, phantoms: int | None, out: Path,
             holdout: int, method: str, auroc_phantoms: int) -> None:
    """Write an INT8 Q/DQ ONNX graph of the image encoder, calibrated on representative images."""
    from radflash.calibration.quantize import quantize_int8

    _one_source(images_dir, phantoms, "--images")
    report = quantize_int8(_model(model, model_opt), out, images_dir=images_dir, phantoms=phantoms, holdout=holdout,
                           method=method, auroc_phantoms=auroc_phantoms)
    click.echo(report.summary())


@calibrate.command("scores")
@_model_arg
@_model_opt
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV: a 'path' column (relative to the CSV) and one 0/1 column per finding (blank = unknown).")
@click.option("--phantoms", type=click.IntRange(min=2), default=None, help="Fit on N labelled phantoms instead.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint to write (folder).")
@click.option("--rule", type=click.Choice(("youden", "f1")), default="youden", show_default=True,
              help="Threshold rule: maximise Youden's J (TPR − FPR) or F1.")
@click.option("--no-plot", is_flag=True, help="Skip the reliability-diagram PNG.")
def scores(model: str | None, model_opt: str | None, labels_csv: str | None, phantoms: int | None, out: Path,
           rule: str, no_plot: bool) -> None:
    """Fit per-finding temperature and threshold; store them in the checkpoint's calibration."""
    from radflash.calibration.scores import calibrate_scores

    _one_source(labels_csv, phantoms, "--labels")
    if not no_plot:  # fail before fitting, not after
        from radflash.util.plotting import require_plotting

        require_plotting("the reliability diagram (or pass --no-plot)")
    report = calibrate_scores(_model(model, model_opt), out, labels_csv=labels_csv, phantoms=phantoms, rule=rule,
                              plot=not no_plot)
    click.echo(report.summary())
