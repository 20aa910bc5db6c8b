"""OpenVINO backend: the image tower converted once, compiled for the CPU in the precision asked for.

Conversion: ``torch.export`` of ``image_tokens`` (dynamic batch; TorchScript tracing, OpenVINO's
default path for a module, cannot follow the position-table interpolation), then
``openvino.convert_model`` of the exported program, with the spatial dims fixed to the model's image
size. The IR is saved under ``<cache>/openvino/`` named by :func:`ir_cache_key` (model hash, image
size, radflash/torch/openvino versions), so a second load reads the IR instead of converting.

Compilation: ``INFERENCE_PRECISION_HINT`` from the precision (fp32 → ``f32``, bf16 → ``bf16``, fp16 →
``f16``; an INT8 model keeps its quantised MatMuls in int8 and runs the rest in the precision its IR
names (:data:`REST_PRECISION`: what ``calibrate quantize`` measured fastest on the machine that made
it), else in bf16 where the CPU has native bf16, else f32), ``INFERENCE_NUM_THREADS`` from torch's
thread count, and the performance hint from the run: ``LATENCY`` at batch 1, ``THROUGHPUT`` for batch
jobs, where a batch is split over the compiled model's optimal number of infer requests run in parallel.
The compiled blob is cached by OpenVINO itself in ``CACHE_DIR`` (``<cache>/openvino/compiled``), keyed
by OpenVINO on the IR, the config, the device and its own version.

INT8: an IR quantised by NNCF (:mod:`radflash.calibration.quantize`, ``radflash calibrate quantize
--backend openvino``), found beside the checkpoint (``openvino/image_tower.int8.xml``) or, for models
without a writable folder (the embedded demo), in the cache (:func:`int8_model_path`).

Telemetry: OpenVINO's model converter and NNCF send usage events to Google Analytics unless the user
opted out (``openvino_telemetry``). :func:`telemetry_off` blocks that package before either is
imported (both fall back to their own stubs), so nothing leaves the machine
(``tests/engine/backends/test_openvino.py`` checks it with the network blocked).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.backends")

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
INT8_NAME = "image_tower.int8"  # <name>.xml/.bin (+ .json: the agreement report) beside the checkpoint
# rt_info key of an INT8 IR: the precision ("bf16" or "f32") its unquantised ops ran fastest in when it was made
REST_PRECISION = ("radflash", "rest_precision")
_TELEMETRY = ("openvino_telemetry", "openvino_telemetry.backend")


def telemetry_off() -> None:
    """Make ``import openvino_telemetry`` fail, so OpenVINO's converter and NNCF use their no-op stubs.

    Where the package was imported already (by the caller's own code), its sender is replaced by a
    no-op instead: the only place that opens a connection.
    """
    loaded = sys.modules.get("openvino_telemetry")
    if loaded is None:
        for name in _TELEMETRY:
            sys.modules[name] = None  # type: ignore[assignment]  # import of a None entry raises ImportError
        return
    sender = sys.modules.get("openvino_telemetry.utils.sender")
    if sender is not None:
        sender.TelemetrySender.send = lambda self, *args, **kwargs: None


def import_openvino() -> ModuleType:
    """``openvino`` with telemetry off, or one line naming the extra."""
    from radflash.util.optional import require

    telemetry_off()
    return require("openvino", extra="openvino", purpose="the openvino backend")


def _safe(version: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", version or "none")


def ir_cache_key(*, model_key: str, image_size: int, radflash_version: str, torch_version: str,
                 openvino_version: str) -> str:
    """File stem of a cached IR: everything that changes the converted graph is in it."""
    return (f"{model_key[:16]}-{image_size}px-rf{_safe(radflash_version)}-torch{_safe(torch_version)}"
            f"-ov{_safe(openvino_version)}")


def openvino_dir() -> Path:
    from radflash.backends.export import cache_dir

    return cache_dir() / "openvino"


def ir_cache_path(model: RadFlashModel, ov: ModuleType | None = None) -> Path:
    from radflash import __version__
    from radflash.backends.export import model_key
    from radflash.util.sysinfo import package_version

    version = package_version("openvino") or (ov or import_openvino()).get_version()
    stem = ir_cache_key(model_key=model_key(model), image_size=model.config.image_size, radflash_version=__version__,
                        torch_version=torch.__version__, openvino_version=version)
    return openvino_dir() / "ir" / f"{stem}.xml"


def int8_model_path(model: RadFlashModel) -> Path:
    """Where the NNCF INT8 IR of ``model`` lives: beside a checkpoint folder, else in the cache by model hash."""
    from radflash.backends.export import model_key

    ckpt = getattr(model, "checkpoint_path", None)
    if ckpt is not None and Path(ckpt).is_dir() and not _embedded(Path(ckpt)):
        return Path(ckpt) / "openvino" / f"{INT8_NAME}.xml"
    return openvino_dir() / "int8" / f"{model_key(model)[:16]}-{model.config.image_size}px.xml"


def _embedded(path: Path) -> bool:
    """A checkpoint inside the installed radflash package (the embedded demo): never written to."""
    package = Path(__file__).resolve().parents[1]
    try:
        return path.resolve().is_relative_to(package)
    except OSError:
        return False


def export_program(model: RadFlashModel, max_batch: int = 64) -> torch.export.ExportedProgram:
    """``image_tokens`` as a float32 ExportedProgram with a dynamic batch axis (what OpenVINO converts)."""
    import copy

    from radflash.backends.export import _ImageTower

    size = model.config.image_size
    with torch.inference_mode(False):
        tower = _ImageTower(copy.deepcopy(model.module).to(device="cpu", dtype=torch.float32)).eval()
        example = torch.zeros(2, 3, size, size)  # 2: a batch of 1 would be specialised
        batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
        with torch.no_grad():
            return torch.export.export(tower, (example,), dynamic_shapes={"pixels": {0: batch}})


def convert(model: RadFlashModel, ov: ModuleType | None = None) -> Any:
    """The image tower as an ``openvino.Model`` (float32, batch dynamic, spatial dims static)."""
    ov = ov or import_openvino()
    size = model.config.image_size
    try:
        ov_model = ov.convert_model(export_program(model))
        ov_model.reshape([-1, 3, size, size])
    except Exception as exc:  # torch.export and the converter raise many types: one user-facing error
        raise BackendUnavailable(f"OpenVINO conversion of the image tower failed "
                                 f"({type(exc).__name__}: {exc})") from exc
    return ov_model


def load_ir(model: RadFlashModel, ov: ModuleType) -> Path:
    """The cached IR's path, converting and saving it on first use (atomic: concurrent runs never read half a file).

    Callers compile or read the IR from this path, never the converted object: the compiled-blob cache is
    keyed by the model it is given, and a graph read from disk hashes the same on every load.
    """
    import os

    path = ir_cache_path(model, ov)
    if path.exists() and path.with_suffix(".bin").exists():
        log.debug("openvino backend: IR from cache %s", path)
        return path
    log.info("openvino backend: converting the image tower to %s (once per model)", path)
    ov_model = convert(model, ov)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
    tmp.replace(path)
    return path


def compile_config(precision: str, *, threads: int, hint: str, cache: Path | None,
                   native: tuple[str, ...] | None = None, rest: str | None = None) -> dict[str, Any]:
    """The CPU plugin's properties for a precision, thread count and performance hint. ``rest``: what an
    INT8 model's unquantised ops run in (``"f32"``, or ``"bf16"`` where native); default bf16 where native."""
    from radflash.devices import native_precisions

    if precision == "int8":
        rest = "bf16" if rest != "f32" and "bf16" in (native or native_precisions()) else "f32"
    else:
        rest = HINTS[precision]
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": rest, "INFERENCE_NUM_THREADS": int(threads),
                              "PERFORMANCE_HINT": hint}
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


class OpenVINOBackend:
    name = "openvino"

    def __init__(self, model: RadFlashModel, *, precision: str | None = None, threads: int | None = None,
                 hint: str | None = None, batch_size: int | None = None, model_path: str | Path | None = None,
                 cache: bool = True, config: dict[str, Any] | None = None) -> None:
        """``precision`` default: the model's; ``hint`` (``LATENCY``/``THROUGHPUT``) default: from
        ``batch_size`` (1 or unknown: latency); ``model_path``: an IR to run instead of the converted
        tower (INT8 default: :func:`int8_model_path`); ``config`` overrides the compile properties
        (``{}`` with ``cache=False`` compiles with OpenVINO's own defaults: the bench's standalone peer).
        """
        ov = import_openvino()
        precision = precision or model.precision
        if precision not in PRECISIONS:
            raise InputError(f"unknown openvino precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if model.device.type != "cpu":
            raise BackendUnavailable("the openvino backend runs on the CPU; this model is on "
                                     f"{model.device} (use --device cpu)")
        self.precision = precision
        self._float_attention: float | None = None
        self.out_dtype = model.dtype
        self.image_size = model.config.image_size
        if model_path is None and precision == "int8":
            model_path = int8_model_path(model)
            if not model_path.exists():
                raise BackendUnavailable(f"no INT8 OpenVINO model for {model.model_id} ({model_path}): make one "
                                         f"with `radflash calibrate quantize --backend openvino`")
        core = ov.Core()
        if model_path is not None:
            self.ir_path = Path(model_path)
            if not self.ir_path.exists():
                raise InputError(f"{self.ir_path}: no such OpenVINO model")
        else:
            self.ir_path = load_ir(model, ov)
        self.threads = int(threads or torch.get_num_threads())
        self.hint = (hint or ("LATENCY" if (batch_size or 1) == 1 else "THROUGHPUT")).upper()
        compiled_dir = openvino_dir() / "compiled" if cache else None
        try:
            # an INT8 IR may name the precision its unquantised ops ran fastest in (calibrate quantize measured it)
            if config is None:
                rest = rest_precision(core.read_model(str(self.ir_path))) if precision == "int8" else None
                config = compile_config(precision, threads=self.threads, hint=self.hint, cache=compiled_dir, rest=rest)
            self.config = dict(config)
            self.compiled = core.compile_model(str(self.ir_path), "CPU", self.config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendUnavailable(f"OpenVINO could not compile {self.ir_path.name} for the CPU ({exc})") from exc
        self.loaded_from_cache = bool(_property(self.compiled, "LOADED_FROM_CACHE", False))
        # what the CPU plugin compiled the float ops in: it runs f32 where a bf16/f16 hint has no native kernels
        hint_type = _property(self.compiled, "INFERENCE_PRECISION_HINT", None)
        self.runs_in = None if hint_type is None else hint_type.get_type_name()
        if precision in ("bf16", "fp16") and self.runs_in not in (None, HINTS[precision]):
            log.warning("openvino %s: this CPU has no native %s kernels, so OpenVINO runs %s (no speed-up over "
                        "fp32; `--dtype auto` leaves such candidates out)", precision, precision, self.runs_in)
        self.requests = max(1, int(_property(self.compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS", 1)))
        self._request = self.compiled.create_infer_request()
        self._queue = ov.AsyncInferQueue(self.compiled, self.requests) if self.requests > 1 else None
        log.info("openvino backend: %s (%s, %s, %d threads, %d request(s)%s)", self.ir_path.name, precision,
                 self.hint, self.threads, self.requests, ", compiled blob from cache" if self.loaded_from_cache else "")

    def float_attention(self) -> float:
        """:func:`float_attention_share` of this backend's IR (read from disk once, on the first ask: only the bench
        asks, once per row)."""
        if self._float_attention is None:
            self._float_attention = float_attention_share(import_openvino().Core().read_model(str(self.ir_path)))
        return self._float_attention

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1:] != (3, self.image_size, self.image_size):
            raise InputError(f"the openvino image tower takes (B, 3, {self.image_size}, {self.image_size}) pixels, "
                             f"got {tuple(pixels.shape)}")
        x = pixels.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        b = x.shape[0]
        if self._queue is None or b == 1:
            out = np.array(self._request.infer({0: x})[0], copy=True)  # the request's buffer is reused
        else:
            out = self._parallel(x)
        return torch.from_numpy(out).to(self.out_dtype)

    def _parallel(self, x: np.ndarray) -> np.ndarray:
        """THROUGHPUT: the batch split over the infer requests, which run in parallel streams."""
        step = math.ceil(x.shape[0] / self.requests)
        chunks = [(i, x[i:i + step]) for i in range(0, x.shape[0], step)]
        results: dict[int, np.ndarray] = {}

        def done(request: Any, start: int) -> None:
            results[start] = np.array(request.get_output_tensor(0).data, copy=True)

        self._queue.set_callback(done)
        for start, chunk in chunks:
            self._queue.start_async({0: chunk}, start)
        self._queue.wait_all()
        return np.concatenate([results[start] for start, _ in chunks])


def rest_precision(model: Any) -> str | None:
    """The :data:`REST_PRECISION` an INT8 IR names (None when it names none: an IR made elsewhere)."""
    key = list(REST_PRECISION)
    return str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None


_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Convert", "Slice", "StridedSlice"})


def float_attention_share(model: Any) -> float:
    """The share of attention's activation products (Q·Kᵀ and P·V) an IR leaves out of int8: 1.0 for a
    float IR, 0.5 for NNCF's recipe (FakeQuantize on Q and K of each SDPA), 0.0 when
    :mod:`radflash.calibration.openvino_attention` quantised P·V too. A product counts as int8 when both
    its inputs come through FakeQuantize (the form the CPU plugin folds into an int8 kernel); an SDPA
    node's P·V never does. What the bench holds an INT8 row against depends on it."""
    total = quantised = 0
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "ScaledDotProductAttention":
            total += 2
            quantised += _quantised(op.input_value(0)) and _quantised(op.input_value(1))
        elif kind == "MatMul" and not any(_constant(op.input_value(i)) for i in range(2)):
            total += 1
            quantised += _quantised(op.input_value(0)) and _quantised(op.input_value(1))
    return 1.0 if total == 0 else (total - quantised) / total


def _quantised(value: Any) -> bool:
    """``value`` is a FakeQuantize output, seen through ops that only move or select elements."""
    node = value.get_node()
    while node.get_type_name() in _PASS_THROUGH:
        node = node.input_value(0).get_node()
    return node.get_type_name() == "FakeQuantize"


def _constant(value: Any, depth: int = 6) -> bool:
    """``value`` is computed from constants only (a weight, possibly compressed or fake-quantised)."""
    node = value.get_node()
    if node.get_type_name() == "Constant":
        return True
    if depth == 0 or node.get_input_size() == 0:
        return False
    return all(_constant(node.input_value(i), depth - 1) for i in range(node.get_input_size()))


def _property(compiled: Any, name: str, default: Any) -> Any:
    try:
        return compiled.get_property(name)
    except Exception:  # a property this OpenVINO version or plugin does not report
        return default
