"""Image-encoder backends: one protocol, picked by name, imported lazily.

The encoder (ViT + align layers) is ≥95% of the work, so it is the part that gets compiled;
everything else (text, head, maps) is shared by all backends.

``make_backend("auto", model)`` picks by a fixed, logged rule (see :func:`choose_auto`):
TensorRT if importable and the model is on CUDA, else ``torch.compile`` (+ CUDA graphs) on CUDA,
else ONNX Runtime on CPU when the model is float32 and onnxruntime is installed (measured faster
than eager on CPU: ``benchmarks/results/backends_cpu.md``), else eager.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from typing import TYPE_CHECKING, Any, Protocol

import torch

from radflash.backends.eager import EagerBackend
from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.backends")


class EncoderBackend(Protocol):
    name: str

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, 1 + N, D) tokens."""


# name → "module:class"; a module is imported only when its backend is asked for.
_REGISTRY = {
    "eager": "radflash.backends.eager:EagerBackend",
    "compile": "radflash.backends.compiled:CompiledBackend",
    "onnxruntime": "radflash.backends.onnxrt:OnnxRuntimeBackend",
    "tensorrt": "radflash.backends.tensorrt:TensorRTBackend",
}
BACKENDS = ("auto", *_REGISTRY)

# Measured on the 2-core CPU dev box (benchmarks/results/backends_cpu.md): ONNX Runtime fp32 beats eager
# on the base encoder at batch 1 (2.1×) and 8 (1.09×) and on tiny at batch 1; only tiny at batch 8 is
# slower (0.82×). The published size decides, so `auto` prefers ONNX Runtime on CPU float32.
CPU_ONNXRUNTIME_FASTER = True


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_auto(model: RadFlashModel) -> tuple[str, str]:
    """The backend ``auto`` resolves to, and why (the rule in the module docstring)."""
    on_cuda = model.device.type == "cuda"
    if on_cuda and _importable("tensorrt"):
        return "tensorrt", "tensorrt is importable and the model is on CUDA"
    if on_cuda:
        return "compile", "the model is on CUDA and tensorrt is not installed (torch.compile + CUDA graphs)"
    if model.dtype != torch.float32:
        return "eager", f"CPU with dtype {model.dtype} (the ONNX Runtime CPU graph is float32)"
    if not _importable("onnxruntime"):
        return "eager", "CPU and onnxruntime is not installed (pip install onnxruntime)"
    if CPU_ONNXRUNTIME_FASTER:
        return "onnxruntime", ("CPU float32: ONNX Runtime measured faster than eager "
                               "(benchmarks/results/backends_cpu.md)")
    return "eager", "CPU: eager measured at least as fast as ONNX Runtime"


def make_backend(name: str, model: RadFlashModel, **opts: Any) -> EncoderBackend:
    """Build backend ``name`` (``auto``, ``eager``, ``compile``, ``onnxruntime``, ``tensorrt``) for ``model``.

    ``opts`` go to the backend's constructor (e.g. ``precision=``, ``onnx_path=``, ``buckets=``).
    A missing optional dependency raises :class:`BackendUnavailable` with an install hint.
    """
    if name == "auto":
        name, reason = choose_auto(model)
        log.info("backend auto → %s because %s", name, reason)
        opts = _accepted(name, opts)
        if name == "onnxruntime":
            try:
                return _build(name, model, opts)
            except BackendUnavailable as exc:  # e.g. export failed for this model: never block inference
                log.warning("backend auto: onnxruntime unavailable (%s); using eager", exc)
                return EagerBackend(model)
    return _build(name, model, opts)


def _class(name: str) -> type:
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _accepted(name: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The options that backend ``name`` takes (``auto`` may land on a backend without them)."""
    params = inspect.signature(_class(name)).parameters
    return {k: v for k, v in opts.items() if k in params}


def _build(name: str, model: RadFlashModel, opts: dict[str, Any]) -> EncoderBackend:
    return _class(name)(model, **opts)


__all__ = ["BACKENDS", "BackendUnavailable", "EagerBackend", "EncoderBackend", "choose_auto", "make_backend"]
