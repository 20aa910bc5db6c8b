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
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radflash.calibration import list_images, openvino_attention, phantom_samples, read_image
from radflash.calibration.openvino_attention import Variant
from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.calibration")

METHODS = ("auto", "modelopt", "onnxruntime")
AUROC_TARGET = 0.01
# interleaved timed calls per INT8 variant when choosing attention's precision; the fastest call counts:
# other jobs on the machine only ever add time, and a median of 3 picked the slower IR under load (2026-12-07)
TIMED_ROUNDS = 5


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
        _measure_auroc(report, model, int8, auroc_phantoms, seed=auroc_seed)
    return report


def _measure_auroc(report: QuantReport, model: RadFlashModel, int8: Any, n: int, *, seed: int) -> None:
    """Add the phantom macro AUROC of float32 and of the INT8 backend to ``report`` (or why not)."""
    try:
        report.auroc_fp32, report.auroc_int8 = auroc_fp32_vs(model, int8, n, seed=seed)
        report.auroc_images = n
    except InputError as exc:
        report.notes.append(f"AUROC not measured: {exc}")


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


# ---- OpenVINO: NNCF post-training quantisation --------------------------------------------------------
def quantize_openvino(
    model: RadFlashModel | str | Path | None,
    out: str | Path | None = None,
    *,
    images_dir: str | Path | None = None,
    phantoms: int | None = None,
    holdout: int = 8,
    seed: int = 0,
    auroc_phantoms: int = 0,
    auroc_seed: int = 1,
) -> QuantReport:
    """Write an INT8 OpenVINO IR of the image tower (NNCF PTQ) and its agreement report beside it.

    NNCF's transformer recipe: ``ModelType.TRANSFORMER`` (attention's MatMuls between activations and
    the softmax/LayerNorm/GELU inputs stay float), the ``MIXED`` preset (symmetric weights, asymmetric
    activations: GELU outputs are one-sided) and SmoothQuant on the MatMuls (α = 0.95, NNCF's value
    for transformers), which moves activation outliers into the weights before quantising. The
    calibration images come from ``images_dir`` or ``phantoms`` (default: 16 demo phantoms) through
    the model's own preprocessing; the last ``holdout`` are kept out for the report: token error and
    max |Δprob| against eager float32 on the model's default prompts (the bound ``auto`` applies),
    and with ``auroc_phantoms`` the macro AUROC drop on fresh phantoms.

    NNCF leaves attention's softmax·V in float; :mod:`radflash.calibration.openvino_attention` makes a
    second IR with that product in int8 too (ranges from the same calibration images) and a third
    that also quantises Q, K and V once on their projection's output, and the IR kept is the fastest
    of those that meet ``auto``'s agreement bound on the held-out images, timed here with its
    unquantised ops in bf16 (where native) and in f32 (the report gives each); the kept IR names the
    faster of those in its ``rt_info`` (:data:`radflash.backends.openvino.REST_PRECISION`), which the
    backend compiles it with. ``out`` defaults to
    :func:`radflash.backends.openvino.int8_model_path` (beside the checkpoint; the cache for the
    embedded demo), where the openvino backend looks for it.
    """
    from radflash.api import as_model
    from radflash.backends.auto import AGREEMENT
    from radflash.backends.openvino import (
        REST_PRECISION,
        OpenVINOBackend,
        import_openvino,
        int8_model_path,
        load_ir,
    )
    from radflash.util.optional import require

    ov = import_openvino()  # telemetry off before NNCF is imported (it sends usage events otherwise)
    require("nncf", extra="openvino", purpose="INT8 quantisation for OpenVINO")  # before the slow steps
    model = as_model(model, device="cpu", dtype="float32")
    if images_dir is None and phantoms is None:
        phantoms = 16
    images, _ = _collect(model, images_dir, phantoms, seed)
    if len(images) < 2:
        raise InputError("need at least 2 images (calibration + held-out)")
    holdout = max(1, min(holdout, len(images) // 2))
    calib_px, held_px = _pixels(model, images[:-holdout]), _pixels(model, images[-holdout:])
    out = Path(out) if out is not None else int8_model_path(model)
    if out.suffix != ".xml":
        raise InputError(f"{out}: an OpenVINO model is written as NAME.xml (+ NAME.bin)")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ov_model = ov.Core().read_model(str(load_ir(model, ov)))
    calib = [calib_px[i:i + 1].numpy() for i in range(calib_px.shape[0])]
    attentions = openvino_attention.decompose(ov_model)
    bounds = openvino_attention.ranges(ov_model, calib, ov)
    quantized = nncf_quantize(ov_model, calib)
    candidates = {"float": quantized}
    if attentions:
        candidates["int8"] = quantized.clone()
        openvino_attention.quantize_products(candidates["int8"], bounds)
        shared = candidates["int8"].clone()
        if openvino_attention.share_qkv_range(shared):
            candidates["int8-shared"] = shared
    with torch.inference_mode():
        ref = model.module.image_tokens(held_px).float()
    variants, paths, tokens = _try_variants(model, candidates, out, held_px, ref, ov)
    keep = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:  # whatever happens, no temporary IR is left beside the checkpoint
        chosen = openvino_attention.choose(variants, AGREEMENT)
        kept = candidates[chosen.attention]
        kept.set_rt_info(chosen.rest, list(REST_PRECISION))  # the backend compiles the IR the way it ran fastest here
        ov.save_model(kept, str(keep), compress_to_fp16=False)  # a new file: the variants' files may still be mapped
        keep.with_suffix(".bin").replace(out.with_suffix(".bin"))  # the .bin first: a reader never sees a new
        keep.replace(out)  # .xml beside an old .bin
    finally:
        _remove_ir(keep, *paths.values())
    seconds = time.perf_counter() - start
    err = (tokens[(chosen.attention, chosen.rest)] - ref).abs()
    report = QuantReport(out, "openvino-nncf", calib_px.shape[0], held_px.shape[0], float(err.max()),
                         float(err.mean()), float(ref.abs().max()), seconds)
    report.notes.append(f"max |Δprob| vs float32 on the held-out images: {chosen.max_abs_dprob:.4f}")
    report.notes.append(_attention_line(variants, chosen))
    if auroc_phantoms:
        int8 = OpenVINOBackend(model, precision="int8", model_path=out)
        _measure_auroc(report, model, int8, auroc_phantoms, seed=auroc_seed)
    write_report(report, out.with_suffix(".json"), model=model, max_abs_dprob=chosen.max_abs_dprob,
                 attention={"chosen": chosen.attention, "rest": chosen.rest, "variants": [asdict(v) for v in variants]})
    return report


def nncf_quantize(ov_model: Any, calib: Sequence[np.ndarray]) -> Any:
    """NNCF's post-training quantisation of an OpenVINO model with radflash's recipe (see :func:`quantize_openvino`)."""
    from radflash.util.optional import require

    nncf = require("nncf", extra="openvino", purpose="INT8 quantisation for OpenVINO")
    try:
        return nncf.quantize(
            ov_model, nncf.Dataset(list(calib)), subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=0.95)),
        )
    except Exception as exc:  # NNCF raises many types: one user-facing error
        raise BackendUnavailable(f"NNCF quantisation failed ({type(exc).__name__}: {exc})") from exc


def _try_variants(model: RadFlashModel, candidates: dict[str, Any], out: Path, held_px: torch.Tensor, ref: torch.Tensor,
                  ov: Any) -> tuple[list[Variant], dict[str, Path], dict[tuple[str, str], torch.Tensor]]:
    """Save each candidate IR beside ``out`` (temporary names) and measure it compiled with its unquantised ops
    in each precision this CPU runs natively (bf16 where it can, and f32: which is faster depends on the CPU and
    the batch, measured 2026-12-07 on Zen 4 at batch 1: f32 5% faster for int8-shared, equal at batch 8): max
    |Δprob| against float32 on the held-out images, then the fastest of :data:`TIMED_ROUNDS` interleaved calls
    on one of them (the agreement batch is each one's warm-up). Also returns each one's held-out tokens. The
    caller removes them."""
    from radflash.backends.openvino import OpenVINOBackend, compile_config
    from radflash.devices import native_precisions

    prompts = list(model.default_prompts.values()) or ["There is pleural effusion"]
    with torch.inference_mode():
        ref_probs = model.score(tokens=ref, prompts=prompts).probs
    rests = ("bf16", "f32") if "bf16" in native_precisions() else ("f32",)
    threads = torch.get_num_threads()
    paths = {name: out.with_name(f".{out.stem}.{name}.{os.getpid()}.tmp.xml") for name in candidates}
    backends, dprob, tokens = {}, {}, {}
    try:
        for name, candidate in candidates.items():
            ov.save_model(candidate, str(paths[name]), compress_to_fp16=False)
            for rest in rests:
                config = compile_config("int8", threads=threads, hint="LATENCY", cache=None, rest=rest)
                key = (name, rest)
                backends[key] = OpenVINOBackend(model, precision="int8", model_path=paths[name], cache=False,
                                                config=config)
                with torch.inference_mode():
                    tokens[key] = backends[key].encode(held_px).float()
                    dprob[key] = float((model.score(tokens=tokens[key], prompts=prompts).probs - ref_probs).abs().max())
        times: dict[tuple[str, str], list[float]] = {key: [] for key in backends}
        for _ in range(TIMED_ROUNDS):
            for key, backend in backends.items():
                tic = time.perf_counter()
                backend.encode(held_px[:1])
                times[key].append(time.perf_counter() - tic)
    except BaseException:
        _remove_ir(*paths.values())
        raise
    variants = [Variant(name, dprob[(name, rest)], min(times[(name, rest)]), rest) for name, rest in backends]
    return variants, paths, tokens


def _remove_ir(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        path.with_suffix(".bin").unlink(missing_ok=True)


def _attention_line(variants: Sequence[Variant], chosen: Variant) -> str:
    """The report's line on attention's P·V precision: each variant's time and agreement, and the pick."""
    parts = [f"{v.attention} ({v.rest} rest) {v.seconds * 1e3:.0f} ms/image, max |Δprob| {v.max_abs_dprob:.4f}"
             for v in variants]
    return f"attention P·V: {'; '.join(parts)} → {chosen.attention} ({chosen.rest} rest)"


def write_report(report: QuantReport, path: Path, *, model: RadFlashModel, max_abs_dprob: float,
                 attention: dict[str, Any] | None = None) -> None:
    """The agreement report beside the quantised model: what it was made from and how far it is from float32."""
    import json

    from radflash import __version__
    from radflash.backends.export import model_key
    from radflash.util.sysinfo import package_version

    data = {
        "model_id": model.model_id, "model_key": model_key(model), "image_size": model.config.image_size,
        "method": report.method, "calibration_images": report.calibration_images,
        "holdout_images": report.holdout_images, "token_max_abs": report.token_max_abs,
        "token_mean_abs": report.token_mean_abs, "token_scale": report.token_scale,
        "token_rel": report.token_max_abs / max(report.token_scale, 1e-12), "max_abs_dprob": max_abs_dprob,
        "auroc_fp32": report.auroc_fp32, "auroc_int8": report.auroc_int8, "auroc_images": report.auroc_images,
        "auroc_drop": report.auroc_drop, "seconds": round(report.seconds, 2), "attention": attention,
        "versions": {"radflash": __version__, "openvino": package_version("openvino"),
                     "nncf": package_version("nncf"), "torch": torch.__version__},
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
