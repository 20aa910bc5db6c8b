"""Export the image tower (``RadZero.image_tokens``) to ONNX with a dynamic batch axis, and check it.

The graph is exported with the dynamo exporter (``torch.onnx.export(dynamo=True)``; the legacy
TorchScript tracer cannot follow the position-table interpolation) at a fixed image size, in
fp32/fp16/bf16, and validated against eager PyTorch fp32 with ONNX Runtime right after export, at
two batch sizes (1 and 3: the batch axis really is dynamic). Error bounds are relative to the token
scale max|tokens|: fp32 ≤ 1e-3, fp16 ≤ 1e-2 (10-bit mantissa through 14 layers), bf16 ≤ 5e-2
(7-bit mantissa). ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 graph is only
validated where the CUDA provider is present (it is meant for TensorRT).

Graphs the onnxruntime backend builds itself are cached under :func:`cache_dir`, named by
:func:`onnx_cache_key`: model sha256, image size, precision, opset and the radflash, torch, onnx and
onnxruntime versions. Each of them changes the graph (exporter, operator set) or what may run it, so a
graph made under other versions is exported afresh instead of being reused silently.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.export")

PRECISIONS = ("fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |onnx − eager fp32| / max |eager fp32 tokens|
BOUNDS = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2, "int8": 1e-1}
INPUT, OUTPUT = "pixels", "tokens"
DEFAULT_OPSET = 18  # what TensorRT 10's ONNX parser and ONNX Runtime ≥1.14 both accept


@dataclass(frozen=True)
class Validation:
    batches: tuple[int, ...]
    max_abs: float  # max |onnx − eager| over all tokens
    mean_abs: float
    token_scale: float  # max |eager tokens|
    bound: float  # allowed max_abs / token_scale
    provider: str

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.token_scale, 1e-12)

    @property
    def ok(self) -> bool:
        return self.rel <= self.bound

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"validation {verdict} on {self.provider} (batches {list(self.batches)}): max abs error "
                f"{self.max_abs:.3g} = {self.rel:.2e} of token scale {self.token_scale:.3g} (bound {self.bound:g}); "
                f"mean abs error {self.mean_abs:.3g}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    precision: str
    image_size: int
    opset: int
    max_batch: int
    seconds: float
    validation: Validation | None
    note: str = ""


class _ImageTower(torch.nn.Module):
    """``image_tokens`` as a module's ``forward`` (what the exporters trace)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.model = module

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_tokens(pixels)


# ---- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$RADFLASH_CACHE``, else ``$XDG_CACHE_HOME/radflash``, else ``~/.cache/radflash``."""
    if os.environ.get("RADFLASH_CACHE"):
        return Path(os.environ["RADFLASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "radflash"


def model_key(model: RadFlashModel) -> str:
    """The checkpoint's sha256, or (in-memory models) a hash of the image tower's weights."""
    if getattr(model, "sha256", ""):
        return model.sha256
    digest = hashlib.sha256()
    for name, t in sorted(model.module.state_dict().items()):
        if name.startswith(("vision.", "align.")):
            digest.update(name.encode())
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _safe(version: str | None) -> str:
    """A version string fit for a file name (``2.13.0+cpu`` stays readable; anything odd becomes ``-``)."""
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", version or "none")


def onnx_cache_key(*, model_key: str, image_size: int, precision: str, opset: int, radflash_version: str,
                   torch_version: str, onnx_version: str | None, ort_version: str | None) -> str:
    """File name of a cached graph: everything that makes a graph stale is in it (see the module docstring)."""
    return (f"{model_key[:16]}-{image_size}px-{precision}-opset{opset}-rf{_safe(radflash_version)}"
            f"-torch{_safe(torch_version)}-onnx{_safe(onnx_version)}-ort{_safe(ort_version)}.onnx")


def onnx_cache_path(model: RadFlashModel, *, image_size: int, precision: str, opset: int = DEFAULT_OPSET) -> Path:
    from radflash import __version__
    from radflash.util.optional import require
    from radflash.util.sysinfo import package_version

    onnxruntime = require("onnxruntime", extra="onnx", purpose="the onnxruntime backend")
    name = onnx_cache_key(model_key=model_key(model), image_size=image_size, precision=precision, opset=opset,
                          radflash_version=__version__, torch_version=torch.__version__,
                          onnx_version=package_version("onnx"), ort_version=onnxruntime.__version__)
    return cache_dir() / "onnx" / name


# ---- export ----------------------------------------------------------------------------------------
def _as_model(model: RadFlashModel | str | Path | None) -> RadFlashModel:
    if model is None or isinstance(model, (str, Path)):
        import radflash

        return radflash.load(model, device="cpu", dtype="float32")
    return model


def export_onnx(
    model: RadFlashModel | str | Path | None,
    out: str | Path,
    *,
    image_size: int | None = None,
    precision: str = "fp32",
    max_batch: int = 64,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
) -> ExportResult:
    """Write ``image_tokens`` as ONNX (input ``pixels`` (B,3,S,S) → output ``tokens`` (B,1+N,D), B dynamic).

    ``model`` is a loaded model, a checkpoint path or ``None`` (the demo model). Raises
    :class:`InputError` when validation exceeds the precision's bound (the file is kept for inspection).
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise InputError(f"max batch must be ≥ 1, got {max_batch}")
    from radflash.util.optional import require

    for package in ("onnx", "onnxscript"):  # torch's dynamo exporter needs both; check before loading the model
        require(package, extra="onnx", purpose="ONNX export")
    model = _as_model(model)
    size = int(image_size or model.config.image_size)
    patch = model.config.vision.patch
    if size % patch:
        raise InputError(f"image size {size} is not a multiple of the patch size {patch}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = TORCH_DTYPES[precision]
    with torch.inference_mode(False):  # a copy made under inference mode would hold inference tensors
        tower = _ImageTower(copy.deepcopy(model.module).to(device="cpu", dtype=dtype)).eval()
    example = torch.zeros(min(2, max_batch), 3, size, size, dtype=dtype)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    chatter = io.StringIO()
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(chatter):
            torch.onnx.export(
                tower, (example,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes={"pixels": {0: batch}},
            )
    except Exception as exc:  # the exporter raises many types; report them as one user-facing error
        tmp.unlink(missing_ok=True)
        raise InputError(f"{out}: ONNX export failed ({type(exc).__name__}: {exc})") from exc
    finally:
        log.debug("%s", chatter.getvalue())
    tmp.replace(out)
    seconds = time.perf_counter() - start
    log.info("exported %s (%s, %d px, opset %d) in %.1f s", out, precision, size, opset, seconds)
    validation, note = None, ""
    if validate:
        try:
            validation = validate_onnx(out, model, image_size=size, precision=precision)
        except BackendUnavailable as exc:
            note = f"not validated: {exc}"
            log.warning("%s: %s", out, note)
        if validation is not None and not validation.ok:
            raise InputError(f"{out}: {validation.summary()}")
    return ExportResult(out, precision, size, opset, max_batch, seconds, validation, note)


# ---- validation ------------------------------------------------------------------------------------
def ort_session(path: str | Path, *, providers: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session (CPU provider unless told otherwise); lazy import with an install hint."""
    from radflash.util.optional import require

    ort = require("onnxruntime", extra="onnx", purpose="ONNX Runtime sessions", note=" (or onnxruntime-gpu)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types are not importable in a stable place
        raise BackendUnavailable(f"{path}: ONNX Runtime cannot load this graph ({exc})") from exc


def run_session(session, pixels: torch.Tensor) -> torch.Tensor:
    """Run an image-tower session on CPU tensors, honouring the graph's input dtype (bf16 via int16 views)."""
    want = session.get_inputs()[0].type
    if "bfloat16" in want:
        feed = pixels.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    elif "float16" in want:
        feed = pixels.to(torch.float16).contiguous().numpy()
    else:
        feed = pixels.to(torch.float32).contiguous().numpy()
    out = session.run(None, {session.get_inputs()[0].name: feed})[0]
    result = torch.from_numpy(out)
    return result.view(torch.bfloat16) if "bfloat16" in session.get_outputs()[0].type else result


def validate_onnx(path: str | Path, model: RadFlashModel, *, image_size: int | None = None,
                  precision: str = "fp32", batches: tuple[int, ...] = (1, 3), seed: int = 0,
                  providers: list[str] | None = None) -> Validation:
    """Compare the graph at ``path`` with eager fp32 ``image_tokens`` on seeded random pixels."""
    size = int(image_size or model.config.image_size)
    if providers is None:
        providers = ["CPUExecutionProvider"]
        if precision == "bf16":
            from radflash.util.optional import require

            ort = require("onnxruntime", extra="onnx", purpose="ONNX graph validation")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ONNX Runtime's CPU provider has no bf16 kernels and no CUDA provider is "
                                         "installed (the bf16 graph is meant for TensorRT)")
            providers = ["CUDAExecutionProvider"]
    session = ort_session(path, providers=providers)
    with torch.inference_mode(False):  # a copy made under inference mode would hold inference tensors
        reference = copy.deepcopy(model.module).to(device="cpu", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    max_abs = scale = 0.0
    total = count = 0.0
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=gen)
        with torch.inference_mode():
            ref = reference.image_tokens(x)
        got = run_session(session, x).float()
        if got.shape != ref.shape:
            raise InputError(f"{path}: graph output {tuple(got.shape)} != eager {tuple(ref.shape)} at batch {b}")
        err = (got - ref).abs()
        max_abs = max(max_abs, float(err.max()))
        total += float(err.sum())
        count += err.numel()
        scale = max(scale, float(ref.abs().max()))
    return Validation(tuple(batches), max_abs, total / count, scale, BOUNDS.get(precision, 1e-3), providers[0])


def export_tensorrt(model: RadFlashModel | str | Path | None, out: str | Path, *, precision: str = "fp16",
                    max_batch: int = 64, opt_batch: int = 16, onnx_path: str | Path | None = None) -> Path:
    """Build a TensorRT plan for the image tower (from ``onnx_path`` or a fresh export) and write it to ``out``."""
    from radflash.backends.tensorrt import build_for_model, import_tensorrt

    trt = import_tensorrt()  # fail before loading the model when TensorRT is absent
    return build_for_model(_as_model(model), out, precision=precision, max_batch=max_batch, opt_batch=opt_batch,
                           onnx_path=onnx_path, trt=trt)
