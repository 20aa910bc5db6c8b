"""INT8 post-training quantisation of the image tower into a Q/DQ ONNX graph.

Representative activations come from real (or phantom) images passed through
:func:`radflash.preprocess.preprocess` (via ``model.preprocess``), never from random noise: the
activation ranges of a ViT depend strongly on the input distribution. NVIDIA ModelOpt is used where
installed (its INT8 ONNX PTQ targets TensorRT); otherwise ``onnxruntime.quantization.quantize_static``
in QDQ format with per-channel symmetric INT8 weights and INT8 activations. Only the GEMM-like ops
(MatMul, Gemm, Conv) are quantised: LayerNorm, softmax and GELU stay in float, where INT8 would cost
accuracy for no speed.

The result is checked on held-out images against eager fp32 (token max/mean error relative to the
token scale) and, when phantoms are available, by the macro AUROC drop on labelled phantoms.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radflash.calibration import list_images, phantom_samples, read_image
from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.calibration")

METHODS = ("auto", "modelopt", "onnxruntime")
AUROC_TARGET = 0.01


@dataclass
class QuantReport:
    path: Path
    method: str
    calibration_images: int
    holdout_images: int
    token_max_abs: float
    token_mean_abs: float
    token_scale: float
    seconds: float
    auroc_fp32: float | None = None
    auroc_int8: float | None = None
    auroc_images: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def auroc_drop(self) -> float | None:
        return None if self.auroc_fp32 is None or self.auroc_int8 is None else self.auroc_fp32 - self.auroc_int8

    def summary(self) -> str:
        lines = [
            f"wrote {self.path} ({self.method}; {self.calibration_images} calibration images, {self.seconds:.1f} s)",
            f"tokens vs fp32 on {self.holdout_images} held-out images: max abs {self.token_max_abs:.3g} "
            f"({self.token_max_abs / max(self.token_scale, 1e-12):.2%} of token scale {self.token_scale:.3g}), "
            f"mean abs {self.token_mean_abs:.3g}",
        ]
        if self.auroc_drop is not None:
            verdict = "OK" if self.auroc_drop <= AUROC_TARGET else f"ABOVE the {AUROC_TARGET} target"
            lines.append(f"macro AUROC on {self.auroc_images} phantoms: fp32 {self.auroc_fp32:.4f}, int8 "
                         f"{self.auroc_int8:.4f}, drop {self.auroc_drop:+.4f} ({verdict})")
        lines.extend(self.notes)
        return "\n".join(lines)


def _pick_method(method: str) -> str:
    import importlib.util

    if method not in METHODS:
        raise InputError(f"unknown quantisation method {method!r}; choose from {', '.join(METHODS)}")
    if method == "auto":
        return "modelopt" if importlib.util.find_spec("modelopt") is not None else "onnxruntime"
    return method


def _pixels(model: RadFlashModel, images: Sequence[np.ndarray]) -> torch.Tensor:
    return model.preprocess(list(images)).to(device="cpu", dtype=torch.float32)


def quantize_onnxruntime(fp32_onnx: Path, out: Path, calib: torch.Tensor, *, batch: int = 4,
                         op_types: Sequence[str] = ("MatMul", "Gemm", "Conv")) -> None:
    from radflash.util.optional import require

    for module in ("onnx", "onnxruntime.quantization"):  # the quantiser edits the graph with onnx
        require(module, extra="onnx", purpose="INT8 quantisation")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._chunks = iter([calib[i:i + batch].numpy() for i in range(0, calib.shape[0], batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._chunks, None)
            return None if chunk is None else {"pixels": chunk}

    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_onnx), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )


def quantize_modelopt(fp32_onnx: Path, out: Path, calib: torch.Tensor) -> None:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise BackendUnavailable("method 'modelopt' needs NVIDIA ModelOpt: pip install nvidia-modelopt[onnx]") from None
    quantize(onnx_path=str(fp32_onnx), quantize_mode="int8", calibration_data={"pixels": calib.numpy()},
             output_path=str(out))


def _collect(model: RadFlashModel, images_dir: str | Path | None, phantoms: int | None, seed: int):
    """(images, phantom samples or None) from exactly one source."""
    if (images_dir is None) == (phantoms is None):
        raise InputError("give exactly one of images_dir= (a folder) or phantoms= (a count)")
    if images_dir is not None:
        return [read_image(p) for p in list_images(images_dir)], None
    samples = phantom_samples(int(phantoms), seed=seed, size=model.config.image_size)
    items = [samples[i] for i in range(len(samples))]
    return [s.image for s in items], items


def quantize_int8(
    model: RadFlashModel | str | Path | None,
    out: str | Path,
    *,
    images_dir: str | Path | None = None,
    phantoms: int | None = None,
    holdout: int = 8,
    method: str = "auto",
    seed: int = 0,
    auroc_phantoms: int = 0,
    auroc_seed: int = 1,
) -> QuantReport:
    """Write an INT8 Q/DQ ONNX graph of the image tower to ``out`` and report its accuracy vs fp32.

    The last ``holdout`` images are held out from calibration and used for the token error.
    ``auroc_phantoms`` > 0 also scores that many fresh phantoms (seed ``auroc_seed``) with fp32 and
    int8 encoders and reports the macro AUROC drop (target ≤ 0.01).
    """
    from radflash.api import as_model
    from radflash.backends.export import export_onnx
    from radflash.backends.onnxrt import OnnxRuntimeBackend

    model = as_model(model, device="cpu", dtype="float32")
    method = _pick_method(method)
    images, _ = _collect(model, images_dir, phantoms, seed)
    if len(images) < 2:
        raise InputError("need at least 2 images (calibration + held-out)")
    holdout = max(1, min(holdout, len(images) // 2))
    calib_px, held_px = _pixels(model, images[:-holdout]), _pixels(model, images[-holdout:])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32, precision="fp32")
        if method == "modelopt":
            quantize_modelopt(fp32, out, calib_px)
        else:
            quantize_onnxruntime(fp32, out, calib_px)
    seconds = time.perf_counter() - start
    int8 = OnnxRuntimeBackend(model, precision="int8", onnx_path=out)
    with torch.inference_mode():
        ref = model.module.image_tokens(held_px.to(model.device, model.dtype)).float().cpu()
        got = int8.encode(held_px).float().cpu()
    err = (got - ref).abs()
    report = QuantReport(out, method, calib_px.shape[0], held_px.shape[0], float(err.max()), float(err.mean()),
                         float(ref.abs().max()), seconds)
    if auroc_phantoms:
        try:
            report.auroc_fp32, report.auroc_int8 = auroc_fp32_vs(model, int8, auroc_phantoms, seed=auroc_seed)
            report.auroc_images = auroc_phantoms
        except InputError as exc:
            report.notes.append(f"AUROC not measured: {exc}")
    return report


def auroc_fp32_vs(model: RadFlashModel, backend: Any, n: int, *, seed: int, batch: int = 16) -> tuple[float, float]:
    """Macro AUROC over the phantom findings (present in ≥1 and absent in ≥1 image) for eager vs ``backend``."""
    try:
        from radflash.training.evaluate import auroc, phantom_eval_prompts
    except ImportError as exc:
        raise InputError(f"phantom evaluation is not available in this build ({exc})") from None
    samples = phantom_samples(n, seed=seed, size=model.config.image_size)
    prompts = phantom_eval_prompts(model)
    names, texts = list(prompts), list(prompts.values())
    eager, other, labels = [], [], []
    with torch.inference_mode():
        for start in range(0, n, batch):
            items = [samples[i] for i in range(start, min(n, start + batch))]
            px = model.preprocess([s.image for s in items])
            eager.append(model.score(tokens=model.module.image_tokens(px), prompts=texts).logits.cpu().numpy())
            other.append(model.score(tokens=backend.encode(px), prompts=texts).logits.cpu().numpy())
            labels.append(np.array([[bool(s.labels.get(k, False)) for k in names] for s in items]))
    z0, z1, y = np.concatenate(eager), np.concatenate(other), np.concatenate(labels)
    cols = [j for j in range(len(names)) if 0 < y[:, j].sum() < len(y)]
    if not cols:
        raise InputError(f"no finding is both present and absent among {n} phantoms")
    return (float(np.mean([auroc(z0[:, j], y[:, j]) for j in cols])),
            float(np.mean([auroc(z1[:, j], y[:, j]) for j in cols])))
