"""TensorRT backend: an engine built from the exported ONNX graph, run on torch CUDA tensors.

Version rule (checked by :func:`network_plan`): TensorRT ≥ 11 only builds *strongly typed*
networks, where every tensor's type comes from the ONNX graph, so the graph is exported in the
target precision (fp16/bf16, or an INT8 Q/DQ graph). TensorRT 10 builds a weakly typed network
from the fp32 graph and lowers precision through builder flags (FP16/BF16/INT8).

Engines are cached under ``~/.cache/radflash/tensorrt`` keyed by model hash + precision + image
size + batch profile + TensorRT version + GPU name (:func:`engine_cache_key`): a plan is only valid
for the TensorRT build and GPU that made it. One optimisation profile covers batch 1..max with
``opt`` the batch the kernels are tuned for. Execution uses ``execute_async_v3`` on the caller's
current torch stream with ``set_tensor_address`` on torch tensors (no copies, no extra syncs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.backends")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
INSTALL_HINT = "pip install tensorrt (TensorRT 10 or 11, with a CUDA GPU)"
_WEAK_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8",)}


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"the tensorrt backend needs TensorRT: {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):  # the PyPI placeholder package installs without the bindings
        raise BackendUnavailable(f"`import tensorrt` found no TensorRT bindings (a stub package?): {INSTALL_HINT}")
    return tensorrt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


@dataclass(frozen=True)
class NetworkPlan:
    strongly_typed: bool
    flags: tuple[str, ...]  # trt.BuilderFlag names to set (weakly typed networks only)
    onnx_precision: str  # precision the ONNX graph must be exported in

    def describe(self) -> str:
        if self.strongly_typed:
            return f"strongly typed network, precision from the {self.onnx_precision} ONNX graph"
        return f"weakly typed network from the fp32 graph, builder flags {list(self.flags) or 'none'}"


def network_plan(trt: Any, precision: str) -> NetworkPlan:
    """How to build ``precision`` with this TensorRT: strongly typed (≥ 11) or builder flags (10)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown TensorRT precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    major = trt_major(trt)
    if major < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: radflash needs 10 or newer")
    if major >= 11:
        return NetworkPlan(True, (), precision)
    return NetworkPlan(False, _WEAK_FLAGS[precision], "int8" if precision == "int8" else "fp32")


def engine_cache_key(*, model_key: str, precision: str, image_size: int, min_batch: int, opt_batch: int,
                     max_batch: int, trt_version: str, gpu_name: str) -> str:
    """File name of a cached plan: everything that makes a plan invalid elsewhere is in it."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return (f"{model_key[:16]}-{image_size}px-{precision}-b{min_batch}-{opt_batch}-{max_batch}"
            f"-trt{trt_version}-{gpu}.plan")


def build_engine(onnx_path: str | Path, out: str | Path, *, precision: str, image_size: int, min_batch: int = 1,
                 opt_batch: int = 16, max_batch: int = 64, workspace_gib: float | None = None,
                 trt: Any = None, input_name: str = "pixels") -> Path:
    """Parse ``onnx_path``, build a serialized engine with one batch profile, write it to ``out``."""
    trt = trt or import_tensorrt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(f"need 1 ≤ min ≤ opt ≤ max batch, got {min_batch}/{opt_batch}/{max_batch}")
    plan = network_plan(trt, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT cannot parse the ONNX graph ({errors})")
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    profile.set_shape(input_name, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    log.info("TensorRT %s: building %s (%s), batch %d/%d/%d", trt.__version__, out, plan.describe(),
             min_batch, opt_batch, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)
    return out


def default_precision(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def build_for_model(model: RadFlashModel, out: str | Path | None = None, *, precision: str = "fp16",
                    max_batch: int = 64, opt_batch: int = 16, onnx_path: str | Path | None = None,
                    trt: Any = None) -> Path:
    """Engine for ``model`` at ``out`` (default: the engine cache), exporting the ONNX graph as needed."""
    from radflash.backends.export import cache_dir, export_onnx, model_key

    trt = trt or import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU; none is visible to torch")
    opt_batch = min(opt_batch, max_batch)
    size = model.config.image_size
    plan = network_plan(trt, precision)
    if out is None:
        gpu = torch.cuda.get_device_name(model.device if model.device.type == "cuda" else 0)
        out = cache_dir() / "tensorrt" / engine_cache_key(
            model_key=model_key(model), precision=precision, image_size=size, min_batch=1, opt_batch=opt_batch,
            max_batch=max_batch, trt_version=str(trt.__version__), gpu_name=gpu)
        if Path(out).exists():
            return Path(out)
    if onnx_path is None:
        if plan.onnx_precision == "int8":
            raise InputError("an int8 engine needs onnx_path= a Q/DQ graph from `radflash calibrate quantize`")
        onnx_path = cache_dir() / "onnx" / f"{model_key(model)[:16]}-{size}px-{plan.onnx_precision}-trt.onnx"
        if not onnx_path.exists():
            export_onnx(model, onnx_path, precision=plan.onnx_precision, max_batch=max_batch)
    return build_engine(onnx_path, out, precision=precision, image_size=size, opt_batch=opt_batch,
                        max_batch=max_batch, trt=trt)


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dt]


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model: RadFlashModel, *, precision: str | None = None, max_batch: int = 64,
                 opt_batch: int = 16, plan_path: str | Path | None = None,
                 onnx_path: str | Path | None = None) -> None:
        trt = self.trt = import_tensorrt()
        if model.device.type != "cuda":
            raise BackendUnavailable(f"the tensorrt backend needs the model on CUDA (it is on {model.device})")
        self.device = model.device
        self.dtype = model.dtype
        self.precision = precision or default_precision(model.dtype)
        self.max_batch = max_batch
        if plan_path is None or not Path(plan_path).exists():
            plan_path = build_for_model(model, plan_path, precision=self.precision, max_batch=max_batch,
                                        opt_batch=opt_batch, onnx_path=onnx_path, trt=trt)
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{self.plan_path}: TensorRT could not load this plan (other TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        log.info("tensorrt backend: %s (%s)", self.plan_path, self.precision)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        outs = [self._run(pixels[i:i + self.max_batch]) for i in range(0, pixels.shape[0], self.max_batch)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(self.dtype)

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(device=self.device, dtype=self.in_dtype).contiguous()
        ctx = self.context
        ctx.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(self.output_name)), device=self.device, dtype=self.out_dtype)
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        ctx.set_tensor_address(self.output_name, out.data_ptr())
        # the caller's stream: x and out come from torch's caching allocator on this same stream,
        # so their memory cannot be reused before the engine has finished with it
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return out
