"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable

import click

BACKEND_CHOICES = ("auto", "eager", "compile", "onnxruntime", "tensorrt")


def model_option(f: Callable) -> Callable:
    return click.option(
        "--model", "model_path", type=click.Path(exists=True, dir_okay=True, file_okay=True), default=None,
        help="Checkpoint folder or .safetensors file (default: the embedded demo model).",
    )(f)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)


def backend_option(f: Callable) -> Callable:
    return click.option(
        "--backend", type=click.Choice(BACKEND_CHOICES), default="eager", show_default=True,
        help="Image-encoder backend.",
    )(f)


def kernels_option(f: Callable) -> Callable:
    return click.option(
        "--kernels", type=click.Choice(("auto", "triton", "torch")), default="auto", show_default=True,
        help="Head/map kernels: Triton on CUDA (auto), or force one implementation.",
        callback=_apply_kernels, expose_value=False, is_eager=False,
    )(f)


def _apply_kernels(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value != "auto":
        from radflash.kernels import set_kernel_backend

        set_kernel_backend(value)
    return value


def quiet_option(f: Callable) -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary table.")(f)


def batch_size_option(default: int = 16) -> Callable[[Callable], Callable]:
    return click.option("--batch-size", type=click.IntRange(min=1), default=default, show_default=True,
                        help="Images per forward pass.")


def workers_option(f: Callable) -> Callable:
    return click.option(
        "--workers", type=click.IntRange(min=0), default=None,
        help="Decode processes (0 = decode in-process). Default: min(4, CPUs, files).",
    )(f)


def _pixel_budget(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``50000000``, ``50M`` or ``5e7`` → an integer number of pixels (``None`` keeps the default)."""
    if value is None:
        return None
    text = value.strip().upper()
    scale = 1_000_000 if text.endswith("M") else 1
    try:
        pixels = int(float(text.removesuffix("M")) * scale)
    except ValueError:
        raise click.BadParameter(f"expected a pixel count such as 100M or 100000000, got {value!r}") from None
    if pixels < 1:
        raise click.BadParameter(f"must be at least 1 pixel, got {value!r}")
    return pixels


def max_pixels_option(f: Callable) -> Callable:
    return click.option(
        "--max-pixels", callback=_pixel_budget, default=None, metavar="N[M]",
        help="Pixel budget per file (rows × columns × frames): larger files fail from their header, "
             "before decoding. Default 50M (real CR/DX ≤ ~15M).",
    )(f)
