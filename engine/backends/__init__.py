"""Image-encoder backends: one protocol, picked by name, imported lazily.

The encoder (ViT + align layers) is ≥95% of the work, so it is the part that gets compiled;
everything else (text, head, maps) is shared by all backends.

``make_backend("auto", model, batch_size=B)`` measures instead of assuming (:mod:`radflash.backends.auto`):
on CPU it times eager against ONNX Runtime on this machine at batch B and keeps the faster, cached
per model, machine and versions; on CUDA it follows a fixed rule (TensorRT if importable, else
``torch.compile``). The backend it returns carries ``selection``: the choice, each candidate's
time, the reason and whether the decision came from the cache (written to the score manifest).
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
}
BACKENDS = ("auto", *_REGISTRY)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _select(model: RadFlashModel, batch_size: int | None) -> tuple[EncoderBackend, dict[str, Any]]:
    """What ``auto`` resolves to, built, and the record of the decision (:func:`radflash.backends.auto.select`)."""
    from radflash.backends import auto

    def build(name: str) -> EncoderBackend:
        return _build(name, model, {})

    return auto.select(model, batch_size=batch_size, build=build, importable=_importable)


def make_backend(name: str, model: RadFlashModel, **opts: Any) -> EncoderBackend:
    """Build backend ``name`` (``auto``, ``eager``, ``compile``, ``onnxruntime``, ``tensorrt``) for ``model``.

    ``opts`` go to the backend's constructor (e.g. ``precision=``, ``onnx_path=``, ``buckets=``);
    ``auto`` takes only ``batch_size=`` (the batch the run will use, which decides the measurement)
    and ignores the rest, since it builds each candidate with its defaults.
    A missing optional dependency raises :class:`BackendUnavailable` with an install hint.
    """
    if name == "auto":
        from radflash.backends.auto import summary

        backend, selection = _select(model, opts.get("batch_size"))
        backend.selection = selection  # type: ignore[attr-defined]  # read by the score manifest
        log.info("backend %s", summary(selection))
        return backend
    return _build(name, model, opts)


def _class(name: str) -> type:
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _build(name: str, model: RadFlashModel, opts: dict[str, Any]) -> EncoderBackend:
    return _class(name)(model, **opts)


__all__ = ["BACKENDS", "BackendUnavailable", "EagerBackend", "EncoderBackend", "make_backend"]
