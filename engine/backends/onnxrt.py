"""ONNX Runtime backend: the exported image tower (fp32/fp16/bf16, or an INT8 graph).

INT8 runs a calibrated Q/DQ graph when given one (``onnx_path=``, from ``radflash calibrate quantize``);
without one, the cached fp32 graph is quantised dynamically once (``onnxruntime.quantization.
quantize_dynamic``: int8 weights, activations quantised per batch at run time, no calibration data
needed) and cached beside it (``-int8dyn-`` in the name).

The graph has a dynamic batch axis, so no bucket padding is needed; batches larger than
``max_batch`` are split. Without ``onnx_path`` the graph is exported once and cached under
``~/.cache/radflash/onnx`` keyed by model sha256, image size, precision, opset and the radflash,
torch, onnx and onnxruntime versions (:func:`radflash.backends.export.onnx_cache_key`). On CUDA models the
CUDA provider is used when installed (``onnxruntime-gpu``), with I/O bound straight to torch CUDA tensors.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.backends")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: RadFlashModel, *, precision: str = "fp32", onnx_path: str | Path | None = None,
                 providers: list[str] | None = None, threads: int | None = None, max_batch: int = 64) -> None:
        from radflash.util.optional import require

        ort = require("onnxruntime", extra="onnx", purpose="the onnxruntime backend",
                      note=" (or onnxruntime-gpu on CUDA)")
        from radflash.backends.export import export_onnx, onnx_cache_path, ort_session

        if precision not in PRECISIONS:
            raise InputError(f"unknown onnxruntime precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        self.precision = precision
        self.device = model.device
        self.dtype = model.dtype
        self.max_batch = max_batch
        self.image_size = model.config.image_size
        self.tokens_shape = (model.config.grid**2 + 1, model.config.vision.hidden)
        if onnx_path is None and precision == "int8":
            onnx_path = dynamic_int8_graph(model, self.image_size)
        elif onnx_path is None:
            onnx_path = onnx_cache_path(model, image_size=self.image_size, precision=precision)
            if not onnx_path.exists():
                log.info("onnxruntime backend: exporting the image tower to %s (once per model)", onnx_path)
                export_onnx(model, onnx_path, precision=precision)
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.exists():
            raise InputError(f"{self.onnx_path}: no such ONNX file")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" in available:
                    providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                                 "CPUExecutionProvider"]
                else:
                    warnings.warn("onnxruntime has no CUDA provider (pip install onnxruntime-gpu): the encoder "
                                  "runs on CPU", stacklevel=2)
        self.session = ort_session(self.onnx_path, providers=providers, threads=threads)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_type = inp.type
        side = inp.shape[-1]
        if isinstance(side, int):
            self.image_size = side
            self.tokens_shape = ((side // model.config.vision.patch) ** 2 + 1, model.config.vision.hidden)
        log.info("onnxruntime backend: %s (%s) on %s", self.onnx_path, precision, self.session.get_providers()[0])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[-1] != self.image_size:
            raise InputError(f"onnxruntime graph {self.onnx_path.name} takes (B, 3, {self.image_size}, "
                             f"{self.image_size}) pixels, got {tuple(pixels.shape)}")
        outs = [self._run(pixels[i:i + self.max_batch]) for i in range(0, pixels.shape[0], self.max_batch)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(device=self.device, dtype=self.dtype)

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        from radflash.backends.export import run_session

        if not self.on_cuda:
            return run_session(self.session, pixels.detach().cpu())
        return self._run_cuda(pixels)

    def _run_cuda(self, pixels: torch.Tensor) -> torch.Tensor:
        """I/O binding on torch CUDA memory: no host round trip."""
        import numpy as np

        dtype = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}.get(self.input_type)
        if dtype is None:
            raise BackendUnavailable(f"{self.onnx_path.name}: input type {self.input_type} is not bound on CUDA")
        np_type = np.float32 if dtype == torch.float32 else np.float16
        x = pixels.to(device=self.device, dtype=dtype).contiguous()
        out = torch.empty((x.shape[0], *self.tokens_shape), device=self.device, dtype=dtype)
        binding = self.session.io_binding()
        dev = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", dev, np_type, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev, np_type, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out


def dynamic_int8_graph(model: RadFlashModel, image_size: int) -> Path:
    """The cached fp32 graph quantised dynamically (int8 MatMul weights), made once and cached beside it."""
    import os

    from radflash.backends.export import export_onnx, onnx_cache_path
    from radflash.util.optional import require

    fp32 = onnx_cache_path(model, image_size=image_size, precision="fp32")
    out = fp32.with_name(fp32.name.replace("-fp32-", "-int8dyn-"))
    if out.exists():
        return out
    quantization = require("onnxruntime.quantization", extra="onnx", purpose="INT8 quantisation")
    if not fp32.exists():
        log.info("onnxruntime backend: exporting the image tower to %s (once per model)", fp32)
        export_onnx(model, fp32, precision="fp32")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    log.info("onnxruntime backend: quantising %s dynamically to int8 (once per model)", fp32.name)
    try:
        quantization.quantize_dynamic(str(fp32), str(tmp), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["MatMul"])
    except Exception as exc:  # the quantiser raises many types: one user-facing error
        tmp.unlink(missing_ok=True)
        raise BackendUnavailable(f"{fp32.name}: dynamic INT8 quantisation failed "
                                 f"({type(exc).__name__}: {exc})") from exc
    tmp.replace(out)
    return out
