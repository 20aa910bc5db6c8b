"""Image-encoder backends: one protocol, picked by name, imported lazily.

The encoder (ViT + align layers) is ≥95% of the work, so it is the part that gets compiled and
run in lower precision; everything else (text, head, maps) is shared by all backends and stays in
the module's dtype (float32 on the CPU).

Each backend runs in a precision (``fp32``/``bf16``/``fp16``/``int8``: ``precision=``, default the
model's, from ``dtype=`` at load). ``make_backend("auto", model, batch_size=B)``, or any backend with
precision ``auto``, measures instead of assuming (:mod:`radflash.backends.auto`): on the CPU it times
every (runtime, precision) pair that is installed, that this CPU runs natively and that the fixed
half of the request allows, at batch B, checks each against float32 on a probe batch and keeps the
fastest that agrees, cached per model, machine and versions; on CUDA it follows a fixed rule
(TensorRT if importable, else ``torch.compile``). The backend it returns carries ``selection``: the
choice, each candidate's time and agreement, the reason and whether the decision came from the cache
(written to the score manifest).
"""

from __future__ import annotations

import importlib
import importlib.util
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
    "openvino": "radflash.backends.openvino:OpenVINOBackend",
}
# backends whose precision follows the model's unless told otherwise (TensorRT keeps its own default)
_PRECISION_FROM_MODEL = ("eager", "compile", "onnxruntime", "openvino")
BACKENDS = ("auto", *_REGISTRY)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _select(model: RadFlashModel, backend: str, precision: str,
            batch_size: int | None) -> tuple[EncoderBackend, dict[str, Any]]:
    """What ``auto`` resolves to, built, and the record of the decision (:func:`radflash.backends.auto.select`)."""
    from radflash.backends import auto

    def build(name: str, precision: str | None = None, **opts: Any) -> EncoderBackend:
        if precision is not None:
            opts["precision"] = precision
        if name == "openvino" and batch_size is not None:
            opts.setdefault("batch_size", batch_size)
        return _build(name, model, opts)

    return auto.select(model, batch_size=batch_size, build=build, importable=_importable, backend=backend,
                       precision=precision)


def make_backend(name: str, model: RadFlashModel, **opts: Any) -> EncoderBackend:
    """Build backend ``name`` (``auto``, ``eager``, ``compile``, ``onnxruntime``, ``tensorrt``, ``openvino``).

    ``opts`` go to the backend's constructor (e.g. ``precision=``, ``onnx_path=``, ``buckets=``);
    ``precision`` defaults to the model's. With ``auto`` as the name or the precision, the choice is
    measured (``batch_size=``: the batch the run will use, which decides the measurement) and the
    other options are ignored, since each candidate is built with its defaults.
    A missing optional dependency raises :class:`BackendUnavailable` with an install hint.
    """
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    precision = opts.pop("precision", None)
    if name in _PRECISION_FROM_MODEL or name == "auto":
        precision = precision or model.precision
    if name == "auto" or precision == "auto":
        from radflash.backends.auto import summary

        backend, selection = _select(model, name, precision or "auto", opts.get("batch_size"))
        backend.selection = selection  # type: ignore[attr-defined]  # read by the score manifest
        log.info("backend %s", summary(selection))
        return backend
    if name != "openvino":  # only OpenVINO sets itself up for the run's batch (its performance hint)
        opts.pop("batch_size", None)
    if precision is not None:
        opts["precision"] = precision
    return _build(name, model, opts)


def _class(name: str) -> type:
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _build(name: str, model: RadFlashModel, opts: dict[str, Any]) -> EncoderBackend:
    return _class(name)(model, **opts)


__all__ = ["BACKENDS", "BackendUnavailable", "EagerBackend", "EncoderBackend", "make_backend"]
