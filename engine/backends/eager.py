"""Plain PyTorch: the reference every other backend is tested against, in float32 or a lower float.

At the module's own dtype the backend is the module itself. In another float precision (``bf16`` or
``fp16`` on the CPU, where the module stays float32 so that the text tower, heads and maps keep
float32 accumulation) it runs a copy of the image tower in that dtype: the weights are converted
once instead of per call (``torch.autocast`` converts every weight on every call: measured 0.13
against 0.17 img/s for a bf16 copy on the base tower here) and the tokens come back in the module's
dtype. int8 is left to the graph runtimes (ONNX Runtime, OpenVINO), whose kernels are built for it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from radflash.devices import PRECISION_DTYPES
from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

# children of a family's module that ``image_tokens`` never touches (the text side): not copied
TEXT_SIDE = ("text", "fusion")


def checked_precision(model: RadFlashModel, precision: str | None, backend: str) -> str:
    """``precision`` (default: the model's), refusing ``auto`` (resolved by radflash.backends) and int8."""
    precision = precision or model.precision
    if precision == "auto":
        raise InputError(f"the {backend} backend needs a resolved precision; 'auto' is chosen by make_backend")
    if precision == "int8":
        raise BackendUnavailable(f"the {backend} backend has no int8 path: use --backend openvino or onnxruntime "
                                 f"(or auto)")
    if precision not in PRECISION_DTYPES:
        raise InputError(f"unknown precision {precision!r} for the {backend} backend")
    return precision


def image_tower(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype`` holding only what ``image_tokens`` needs (the text side is left out).

    A shallow copy with its own parameter/buffer dicts and deep copies of the image-side children:
    converting it never touches the original (``Module.to`` rewrites shared Parameters in place).
    """
    with torch.inference_mode(False):
        tower = copy.copy(module)
        tower._parameters = {k: (None if v is None else torch.nn.Parameter(v.detach().clone(), requires_grad=False))
                             for k, v in module._parameters.items()}
        tower._buffers = {k: (None if v is None else v.detach().clone()) for k, v in module._buffers.items()}
        tower._modules = {k: (None if k in TEXT_SIDE else copy.deepcopy(v)) for k, v in module._modules.items()}
        return tower.to(dtype=dtype).eval().requires_grad_(False)


class EagerBackend:
    name = "eager"

    def __init__(self, model: RadFlashModel, *, precision: str | None = None) -> None:
        self.precision = checked_precision(model, precision, self.name)
        self.out_dtype = model.dtype
        self.dtype = PRECISION_DTYPES[self.precision]
        self.module = model.module if self.dtype == model.dtype else image_tower(model.module, self.dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.image_tokens(pixels.to(self.dtype)).to(self.out_dtype)
