"""Options shared by several commands, defined once.

Every command takes its model through :func:`model_argument`, and ``score``/``segment`` take their
common inference block through :func:`inference_options`, so a flag's name, default, help text and
error messages cannot drift apart between commands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

BACKEND_CHOICES = ("auto", "eager", "compile", "onnxruntime", "tensorrt", "openvino")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8")  # radflash.devices.DTYPE_CHOICES (no torch here)

MODEL_HELP = "Checkpoint folder or .safetensors file (default: the embedded demo model)."
PRESET_MODEL_HELP = ("Checkpoint folder/.safetensors, or a preset name (tiny, base: random weights of that size). "
                     "Default: the embedded demo model.")
BOTH_MODELS = "give the model either as MODEL or as --model, not both"


def stack(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` as if written one per line in this order (so ``--help`` lists them so)."""
    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


def _merge_kwargs(resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> Decorator:
    """Wrap a command callback so ``resolve`` turns the raw parsed values into the ones it takes.

    Used where two spellings feed one value (MODEL or ``--model``): the check needs both values at
    once, which no single parameter callback sees reliably (click runs them in command-line order).
    ``functools.wraps`` carries the click parameters, name and docstring over to the wrapper.
    """
    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            return f(*args, **resolve(kwargs))
        return command  # type: ignore[return-value]
    return decorate


def _model_or_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Accept an existing path or a preset name; the preset list is read lazily (it imports the models)."""
    from radflash.models.config import PRESETS

    if value is None or value in PRESETS or Path(value).exists():
        return value
    raise click.BadParameter(f"{value!r} is neither a checkpoint path nor a preset ({', '.join(PRESETS)})")


def model_argument(*, positional: bool = False, followed_by: str | None = None, presets: bool = False) -> Decorator:
    """The one way a command takes its model; the callback always receives it as ``model_path``.

    ``--model PATH`` is the canonical spelling everywhere (``None``: the embedded demo model).
    ``positional=True`` also accepts the model as a leading positional MODEL, for the commands that
    took it so before ``--model`` existed (``calibrate``, ``export``: kept for backward
    compatibility); giving both is a usage error. ``followed_by="out"`` is for a required positional
    after the optional MODEL (``export``'s ``[MODEL] OUT``): click cannot put an optional argument
    before a required one, so both are read as one list and split here; the callback receives the
    second as a :class:`~pathlib.Path` under that name. ``presets=True`` also accepts a preset name
    (``bench``: random weights of that size), which is why that option has no ``exists`` check.
    """
    if presets:
        if positional or followed_by is not None:
            raise TypeError("model_argument: presets are only accepted by --model")
        return click.option("--model", "model_path", default=None, callback=_model_or_preset, help=PRESET_MODEL_HELP)
    if not positional:
        if followed_by is not None:
            raise TypeError("model_argument: followed_by needs positional=True")
        return click.option("--model", "model_path", type=click.Path(exists=True), default=None, help=MODEL_HELP)
    option = click.option("--model", "model_option", type=click.Path(exists=True), default=None, help=MODEL_HELP)
    if followed_by is None:
        return stack(click.argument("model", required=False, type=click.Path(exists=True)), option,
                     _merge_kwargs(_model_from_argument))
    split = functools.partial(_model_from_paths, followed_by)
    return stack(click.argument("model_paths", nargs=-1, required=True, metavar=f"[MODEL] {followed_by.upper()}"),
                 option, _merge_kwargs(split))


def _model_from_argument(kwargs: dict[str, Any]) -> dict[str, Any]:
    """MODEL or ``--model`` → ``model_path``."""
    positional, option = kwargs.pop("model"), kwargs.pop("model_option")
    if positional is not None and option is not None:
        raise click.UsageError(BOTH_MODELS)
    return {**kwargs, "model_path": positional if positional is not None else option}


def _model_from_paths(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``[MODEL] OUT`` (plus ``--model``) → ``model_path`` and ``name``; the MODEL is checked here, not by click."""
    paths, option = kwargs.pop("model_paths"), kwargs.pop("model_option")
    if len(paths) == 1:
        return {**kwargs, "model_path": option, name: Path(paths[0])}
    if len(paths) == 2:
        if option is not None:
            raise click.UsageError(BOTH_MODELS)
        if not Path(paths[0]).exists():
            raise click.BadParameter(f"{paths[0]}: no such checkpoint", param_hint="MODEL")
        return {**kwargs, "model_path": paths[0], name: Path(paths[1])}
    raise click.UsageError(f"expected [MODEL] {name.upper()}")


def device_option(f: F) -> F:
    """``--device``: validated by the verbs (an absent ``cuda:N`` fails there, before the model loads)."""
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)


def backend_option(f: F) -> F:
    """``--backend`` for the commands that run one encoder backend (``bench`` takes several: its own flag)."""
    return click.option(
        "--backend", type=click.Choice(BACKEND_CHOICES), default=None,
        help="Image-encoder backend. Default: auto with --dtype auto (runtime and precision measured together), "
             "else eager.",
    )(f)


def dtype_option(f: F) -> F:
    """``--dtype``: the image encoder's precision; ``auto`` measures it (radflash.backends.auto)."""
    return click.option(
        "--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
        help="Image-encoder precision. Default: float32 on CPU, bfloat16 on CUDA. auto: on CPU, the fastest "
             "precision (and, with --backend auto, runtime) measured here whose probabilities agree with "
             "float32 within 0.02; text tower, heads and maps stay float32 on CPU.",
    )(f)


def kernels_option(f: F) -> F:
    """``--kernels``: applied as it is parsed, so the choice holds before any model code runs."""
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


def quiet_option(f: F) -> F:
    """``-q/--quiet``: for scripts and logs that want no progress bar or table."""
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary table.")(f)


def batch_size_option(default: int = 16) -> Decorator:
    """``--batch-size`` with a per-command default (segment's maps need more memory per image)."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=default, show_default=True,
                        help="Images per forward pass.")


def workers_option(f: F) -> F:
    """``--workers``: decode processes; ``None`` lets the pipeline size the pool to the machine and input."""
    return click.option(
        "--workers", type=click.IntRange(min=0), default=None,
        help="Decode processes (0 = decode in-process). Default: one per core (niced beside the encoder) "
             "as memory allows, at most one per file.",
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


def max_pixels_option(f: F) -> F:
    """``--max-pixels``: the decompression-bomb budget, checked from each file's header."""
    return click.option(
        "--max-pixels", callback=_pixel_budget, default=None, metavar="N[M]",
        help="Pixel budget per file (rows × columns × frames): larger files fail from their header, "
             "before decoding. Default 50M (real CR/DX ≤ ~15M).",
    )(f)


def inference_options(*, batch_size: int) -> Decorator:
    """The block ``score`` and ``segment`` share: model, device, backend, dtype, kernels, batch size,
    workers, pixel budget and quiet, in that order; only the batch-size default differs between them.

    The callback receives ``model_path``, ``device``, ``backend``, ``dtype``, ``batch_size``, ``workers``,
    ``max_pixels`` and ``quiet`` (``--kernels`` takes effect while parsing and is not passed).
    """
    return stack(model_argument(), device_option, backend_option, dtype_option, kernels_option,
                 batch_size_option(batch_size), workers_option, max_pixels_option, quiet_option)


LOCAL_RAY = "local"  # what ``--ray`` without an address stands for


def _ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--ray`` alone → :data:`LOCAL_RAY`; ``--ray ADDRESS`` → the address.

    ``--ray`` takes an optional value, so ``--ray ARCHIVE -o OUT`` would read the archive as the
    address; a value that names an existing path is therefore refused with the fix.
    """
    if value is None or value == LOCAL_RAY:
        return value
    if Path(value).exists():
        raise click.BadParameter(f"{value!r} is a path, not a Ray address; put --ray after the inputs "
                                 f"(INPUTS -o OUT --ray) or give an address (--ray auto, --ray ray://HOST:10001)")
    return value


def ray_options(f: F) -> F:
    """``--ray [ADDRESS]`` and the actor pool's size: run the same stages on a Ray cluster."""
    return stack(
        click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL_RAY, default=None,
                     metavar="[ADDRESS]", callback=_ray_address,
                     help="Run on Ray (pip install 'radflash[ray]'): alone, start or join a local Ray; "
                          "with an address (auto, HOST:6379, ray://HOST:10001), join that cluster."),
        click.option("--ray-actors", type=click.IntRange(min=1), default=None,
                     help="Inference actors (default: one per GPU on CUDA, else 1 CPU actor)."),
        click.option("--ray-threads", type=click.IntRange(min=1), default=None,
                     help="Torch threads per CPU actor (default: its CPU share)."),
    )(f)


def ray_run_options(address: str | None, actors: int | None, threads: int | None) -> Any:
    """The parsed ``--ray*`` flags as :class:`radflash.archive.ray_executor.RayOptions` (None: local run)."""
    if address is None:
        if actors is not None or threads is not None:
            raise click.UsageError("--ray-actors/--ray-threads need --ray")
        return None
    from radflash.archive.ray_executor import RayOptions

    return RayOptions(address=None if address == LOCAL_RAY else address, actors=actors, threads=threads)


REPORT_MODES = ("none", "summary", "full")


def report_options(f: F) -> F:
    """``--report`` and ``--report-maps``: the run's self-contained ``OUT/report.html`` (radflash.report)."""
    return stack(
        click.option("--report", "report_mode", type=click.Choice(REPORT_MODES), default=None,
                     help="OUT/report.html: none; summary (counts, histograms, table: no images of patients); "
                          "full (also the --report-maps gallery). Default: full with --report-maps, else summary."),
        click.option("--report-maps", type=click.IntRange(min=1), default=None, metavar="K",
                     help="Keep the top K images per finding/prompt, with maps, for the report's gallery "
                          "(same pass; the thumbnails are images of patients)."),
    )(f)


def checked_report_mode(mode: str | None, maps: int | None, output: Path | None) -> str | None:
    """The checked ``--report``/``--report-maps`` pair: the mode to write, or None for the default."""
    if maps is not None and mode in ("none", "summary"):
        raise click.UsageError(f"--report-maps draws the gallery of --report full; --report {mode} has none")
    if (mode is not None or maps is not None) and output is None:
        raise click.UsageError("--report/--report-maps write OUT/report.html: give -o OUT")
    return mode
