"""``bench()``: latency of every stage of radflash beside the reference of the model's family, in one run.

For each backend and batch size B one timed loop runs the whole path per iteration

    decode (B DICOM files) → preprocess → image encoder → head → maps (upsampling)

with a :class:`radflash.util.timing.StageClock` boundary after each stage. ``e2e`` is that
iteration's total and the stage times are its consecutive segments, so per iteration the
stages sum to at most ``e2e`` (exactly, up to loop overhead) and so do their means.
Families without similarity maps (CARZero: ``supports_maps`` False) have no ``maps`` stage.
The reference path runs the same loop on the same files in the same process, so every row carries
``ratio = reference median / radflash median`` (> 1: radflash is faster). It is picked by family:

- RadZero (:mod:`radflash.bench.reference`): transformers modules, fp32, eager, same weights; the
  RadZero code's own unfused head, sharing no code with radflash's, and plain-torch maps; the
  reference code's pydicom/PIL decode and preprocessing. radflash's head is VL-CABS with maps.
- CARZero (:mod:`radflash.bench.carzero_reference`): transformers ViT and BERT, fp32, eager, same
  weights; the released fusion written out with ``nn.MultiheadAttention`` and scored by the
  released per-image loop, which projects every prompt's keys/values again for every image;
  the released letterbox preprocessing. radflash's head is ``module.head(tokens, text)`` on the
  packed prompt features (t and every layer's prompt keys/values) computed once per prompt set.
``score`` times the whole :func:`radflash.archive.verb.score` verb (in-process decode) on a small
synthetic archive against a serial reference loop over the same files.

Warm-up iterations are excluded; CUDA timings use events and one synchronize per iteration.
p95/p99 are reported only from 20/100 samples on (:data:`radflash.util.timing.MIN_SAMPLES`). ``auto``
is resolved by timing its candidates at the largest batch size; the record is in ``config``.
Physical limits beside the results (formulas in :func:`radflash.bench.report.formulas_for`): the
encoder's achieved FLOP/s as a fraction of a measured matmul rate in the model's dtype; RadZero's
head and maps as bytes/s against a measured copy bandwidth (they are memory-bound); CARZero's head
(the fusion, compute-bound) as FLOP/s against the matmul rate (:func:`carzero_head_flops`).

This module is the measuring; what is timed comes from :mod:`radflash.bench.inputs`, and the
report it fills (types, table, markdown) is :mod:`radflash.bench.report`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radflash.bench.inputs import BenchInputs, bench_prompts, build_archive, image_loader, make_inputs
from radflash.bench.report import E2E, SCORE, STAGES, BenchReport, Limit, MemoryRow, Row, formulas_for
from radflash.errors import BackendUnavailable, InputError
from radflash.util.timing import Peaks, StageClock, Stats, measure_peaks, peak_memory, reset_peak_memory

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.checkpoints.format import Checkpoint


log = logging.getLogger("radflash.bench")


SCORE_RUNS = 3  # whole-archive runs of the score path (each run already covers archive_files images)
INT8_DYNAMIC = "int8-dynamic-linear"  # gemm_rates' key for the dynamically quantised Linear's rate
# A probe call of n = 1024 slower than this (< ~10 G(FL)OP/s) has no fast kernel (bf16 emulated on an AVX2-only CPU:
# ~2 s; torch._int_mm there: ~1 s): it is timed once, not (1 + iterations) × rounds times (~18 s per int8 probe there)
SLOW_PROBE_S = 0.2
INT8_INT_MM = "int8-int-mm"  # gemm_rates' key for torch._int_mm's rate
INT8_ONNXRUNTIME = "int8-onnxruntime"  # gemm_rates' key for ONNX Runtime's MatMulInteger (MLAS) rate


# ---- formulas ---------------------------------------------------------------------------------------
def encoder_flops(cfg: Any, image_size: int) -> float:
    """FLOP per image of the ViT + align layers (:data:`radflash.bench.report.FORMULAS` ``encode``)."""
    v = cfg.vision
    patches = (image_size // v.patch) ** 2
    n, d, m = patches + 1, v.hidden, v.mlp
    layers = v.layers + cfg.align_layers
    return layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d) + 2 * patches * (v.in_chans * v.patch**2) * d


def encoder_attention_flops(cfg: Any, image_size: int) -> float:
    """The part of :func:`encoder_flops` in attention's products of two activations (QKᵀ and the weighted
    sum of V): INT8 recipes (NNCF for OpenVINO, ONNX Runtime's dynamic quantisation) quantise only the
    products with a weight, so this part runs at another precision's rate (:func:`int8_yardsticks`)."""
    v = cfg.vision
    n = (image_size // v.patch) ** 2 + 1
    return (v.layers + cfg.align_layers) * 4 * n * n * v.hidden


def unquantised_precision(runtime: str, backend: Any = None) -> str:
    """What an INT8 model's unquantised ops (attention's activation products) run in: an OpenVINO
    backend's compiled ``INFERENCE_PRECISION_HINT`` when given (its IR's choice), else OpenVINO's
    default (bf16 where native, else fp32); fp32 elsewhere."""
    from radflash.devices import native_precisions

    config = getattr(backend, "config", None)
    hint = config.get("INFERENCE_PRECISION_HINT") if isinstance(config, dict) else None
    if runtime.startswith("openvino") and hint in ("bf16", "f32"):
        return "bf16" if hint == "bf16" else "fp32"
    return "bf16" if runtime.startswith("openvino") and "bf16" in native_precisions() else "fp32"


def int8_yardsticks(cfg: Any, image_size: int, rates: dict[str, float], *, rest: str,
                    float_share: float = 1.0) -> dict[str, float]:
    """Effective FLOP/s an INT8 encoder is held against beside the int8 GEMM rate (``torch._int_mm``):

    - the bound of the mix an INT8 recipe builds: the weight GEMMs and the quantised part of attention's
      activation products (:func:`encoder_attention_flops`) at the int8 rate, the ``float_share`` of
      those products it leaves unquantised (:func:`float_attention`) at ``rest``'s rate (OpenVINO: bf16
      where native, else fp32; ONNX Runtime: fp32); omitted when nothing is left out (it is the int8
      rate then);
    - ``int8 dynamic Linear``: PyTorch's dynamically quantised ``Linear`` (activation quantisation
      included), the yardstick the CPU issue's table used (568 GOP/s on the Zen 4 dev box).
    """
    out: dict[str, float] = {}
    total = encoder_flops(cfg, image_size)
    unquantised = encoder_attention_flops(cfg, image_size) * float_share
    if "int8" in rates and rest in rates and unquantised > 0:
        what = "attention" if float_share == 1 else "P·V" if float_share == 0.5 else f"{float_share:.0%} of attention"
        out[f"int8 GEMMs + {rest} {what}"] = mixed_rate(rates["int8"], rates[rest], unquantised / total)
    if INT8_DYNAMIC in rates:
        out["int8 dynamic Linear"] = rates[INT8_DYNAMIC]
    return out


def mixed_rate(int8: float, rest: float, float_share: float) -> float:
    """The rate of work whose ``float_share`` runs at ``rest`` and the remainder at ``int8`` (time adds up)."""
    return 1 / ((1 - float_share) / int8 + float_share / rest)


def float_attention(backend: Any) -> float:
    """The share of attention's activation products an INT8 encoder leaves out of int8: what its OpenVINO IR
    says (:func:`radflash.backends.openvino.float_attention_share`), else all of them (ONNX Runtime's dynamic
    quantisation quantises MatMuls with a constant weight only)."""
    share = getattr(backend, "float_attention", None)
    return share() if callable(share) else 1.0


def carzero_head_flops(cfg: Any, b: int, t: int) -> int:
    """FLOP of CARZero's batched fusion head for B images and T prompts (``CARZERO_HEAD`` in report.py).

    Counts what :meth:`radflash.models.carzero.CARZero.head` multiplies, matmuls only (LayerNorms,
    softmax and ReLU are a few FLOP per element, < 1%): per pair and direction the query and
    out-projections, attention over K keys (scores and weighted sum), the FFN and the scoring MLP;
    the first layer's query projection once per distinct query (the T prompts of i2t, the B images
    of t2i: its input is shared before the first residual); the image keys/values once per image
    and layer. The prompt keys/values come from the cache and cost nothing here.
    """
    d, fc = cfg.vision.hidden, cfg.fusion
    n = (cfg.image_size // cfg.vision.patch) ** 2 + 1
    widths = [d, *fc.mlp, 1]
    mlp = 2 * sum(a * c for a, c in itertools.pairwise(widths))
    per_pair = sum(fc.layers * (2 * d * d + 4 * k * d + 4 * d * fc.ffn) + (fc.layers - 1) * 2 * d * d + mlp
                   for k in (n, 1 + cfg.text.max_length))
    return b * t * per_pair + (b + t) * 2 * d * d + b * fc.layers * 4 * n * d * d


def head_bytes(b: int, t: int, n: int, d: int, *, e_tok: int, e_txt: int, e_s: int) -> int:
    return b * n * d * e_tok + t * d * e_txt + b * t * 4 + b * t * (n - 1) * e_s


def maps_bytes(b: int, t: int, n_patches: int, h: int, w: int, *, e_s: int, e_out: int) -> int:
    return b * t * n_patches * e_s + b * t * h * w * e_out


def gemm_rates(precisions: Sequence[str], device: torch.device, *, n: int = 1024, iterations: int = 5,
               rounds: int = 3) -> dict[str, float]:
    """Measured square-GEMM rate (2·n³ operations / best time) per encoder precision on this machine.

    The best of ``rounds`` interleaved rounds (each precision timed in turn, ``iterations`` calls after
    a warm-up): a single round once read fp32 at 136 GFLOP/s on the machine where it otherwise reads
    ~190 and eager float32 itself ran at 174, so one slow moment (a frequency ramp, another job) must
    not set the yardstick.

    fp32/bf16/fp16 with ``torch.matmul`` (fp16 is emulated on CPUs without AVX512-FP16/AMX-FP16: its rate
    says so). int8 is the faster of two int8 × int8 → int32 kernels, each also given under its own key:
    ``torch._int_mm`` (:data:`INT8_INT_MM`) and ONNX Runtime's ``MatMulInteger`` (:data:`INT8_ONNXRUNTIME`,
    where installed). Either may be the machine's int8 rate: on Zen 4 (VNNI) ``_int_mm`` ran 862 GOP/s, but
    on an AVX2-only Zen 3 it has no fast kernel (2 GOP/s) while MLAS's AVX2 one runs at ~2x fp32 (380 GOP/s). Beside
    them, :data:`INT8_DYNAMIC`: a dynamically quantised ``Linear`` (it quantises its input on every call:
    the slower yardstick the CPU issue quoted). Each encoder row's fraction is taken
    against the rate of its own precision (INT8 rows also against :func:`int8_yardsticks`).
    """
    from radflash.devices import PRECISION_DTYPES
    from radflash.util.timing import time_fn

    wanted = list(dict.fromkeys(precisions))
    if "int8" in wanted:
        kernels = [INT8_INT_MM] + ([INT8_ONNXRUNTIME, INT8_DYNAMIC] if device.type == "cpu" else [])
        wanted[wanted.index("int8") + 1:wanted.index("int8") + 1] = kernels
    calls: dict[str, Any] = {}
    for prec in wanted:
        if prec == INT8_INT_MM:
            a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
            fn = lambda a=a, b=b: torch._int_mm(a, b)
        elif prec == INT8_ONNXRUNTIME:
            if (fn := _onnxruntime_int_mm(n)) is None:
                continue
        elif prec == INT8_DYNAMIC:
            if (fn := _dynamic_linear(n)) is None:
                continue
        elif prec in PRECISION_DTYPES:
            a = torch.randn(n, n, device=device, dtype=PRECISION_DTYPES[prec])
            b = torch.randn(n, n, device=device, dtype=PRECISION_DTYPES[prec])
            fn = lambda a=a, b=b: a @ b
        else:
            continue
        calls[prec] = fn
    best: dict[str, float] = {}
    for _ in range(max(1, rounds)):
        for prec, fn in list(calls.items()):
            try:
                first = time_fn(fn, device=device, iterations=1, warmup=0)[0]
                if first > SLOW_PROBE_S * (n / 1024) ** 3:  # no fast kernel: one call says so, more only cost time
                    seconds = first
                    del calls[prec]
                else:
                    seconds = min(time_fn(fn, device=device, iterations=iterations, warmup=0))
            except RuntimeError as exc:  # a dtype this build has no kernel for
                log.warning("no %s GEMM rate: %s", prec, exc)
                del calls[prec]
                continue
            best[prec] = min(seconds, best.get(prec, seconds))
    rates = {prec: 2 * n**3 / best[prec] for prec in wanted if prec in best}
    int8_rates = [rates[k] for k in (INT8_INT_MM, INT8_ONNXRUNTIME) if k in rates]
    if int8_rates:
        rates["int8"] = max(int8_rates)
    return {prec: rates[prec] for prec in wanted if prec in rates}


def _onnxruntime_int_mm(n: int) -> Any:
    """A call of ONNX Runtime's ``MatMulInteger`` on n×n operands, or None where onnxruntime is not installed."""
    try:
        import numpy as np
        import onnx  # noqa: F401  (onnxruntime does not depend on it; the probe's graph is built with it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    matmul = onnxruntime_int8_matmul(rng.integers(-64, 64, (n, n), dtype=np.int8))  # 7-bit: exact on AVX2
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return lambda: matmul(a)


def onnxruntime_int8_matmul(weight: Any) -> Any:
    """``a ↦ a @ weight`` (u8 activations × a constant s8 weight → int32) as ONNX Runtime runs it: the MLAS kernel
    its dynamically quantised MatMuls use, on this process's torch thread count. Exact for 7-bit weights; AVX2's
    u8×s8 kernel saturates pair sums at int16 beyond that (hence ONNX Runtime's ``reduce_range``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        initializer=[numpy_helper.from_array(weight, "w")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"a": a})[0]


def _dynamic_linear(n: int) -> Any:
    """A call of an n×n dynamically quantised ``Linear`` on n rows, or None where this torch has none (PyTorch
    deprecates ``torch.ao`` quantisation in favour of torchao)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, on every construction
            layer = torch.ao.nn.quantized.dynamic.Linear(n, n, dtype=torch.qint8)
            layer.set_weight_bias(torch.quantize_per_tensor(torch.randn(n, n), 0.02, 0, torch.qint8), None)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        log.warning("no int8 dynamic Linear rate: %s", exc)
        return None
    x = torch.randn(n, n)
    return lambda: layer(x)


# ---- model ------------------------------------------------------------------------------------------
def _checkpoint(model: str | Path | None, skipped: list[dict[str, str]]) -> Checkpoint:
    from radflash.api import DEMO_MODEL
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import load_checkpoint
    from radflash.models.config import PRESETS

    if model is None:
        if (DEMO_MODEL / "model.safetensors").exists():
            return load_checkpoint(DEMO_MODEL)
        skipped.append({"what": "demo model", "reason": "not built yet; a random 'tiny' model (same shapes) is used"})
        model = "tiny"
    if isinstance(model, str) and model in PRESETS and not Path(model).exists():
        return random_checkpoint(model, seed=0, model_id=f"random-{model}")
    return load_checkpoint(model)


def _resolve_model(model: Any, device: str, image_size: int | None,
                   skipped: list[dict[str, str]]) -> RadFlashModel:
    """A RadFlashModel at ``image_size``: a path, a preset name (random weights), an instance or None."""
    from radflash.api import RadFlashModel
    from radflash.checkpoints.format import Checkpoint

    if isinstance(model, RadFlashModel):
        if image_size is None or image_size == model.config.image_size:
            return model
        ckpt = Checkpoint(config=model.config, state_dict=model.module.state_dict(), tokenizer=model.tokenizer,
                          model_id=model.model_id, prompts=dict(model.default_prompts))
        device, dtype = model.device, model.dtype
    elif model is None or isinstance(model, (str, Path)):
        ckpt, dtype = _checkpoint(model, skipped), None
    else:
        kind = type(model).__name__
        raise InputError(f"model must be a checkpoint path, a preset name or a RadFlashModel, got {kind}")
    if image_size is not None and image_size != ckpt.config.image_size:
        patch = ckpt.config.vision.patch
        if image_size % patch:
            raise InputError(f"image size {image_size} is not a multiple of the patch size {patch}")
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, image_size=image_size))
    return RadFlashModel(ckpt, device=device, dtype=dtype)


def _check_args(backends: Sequence[str], batch_sizes: Sequence[int], prompts: int, iterations: int,
                warmup: int, archive_files: int) -> list[str]:
    from radflash.backends import BACKENDS

    if isinstance(backends, str):
        backends = [backends]
    names = [b for b in BACKENDS if b != "auto"]
    chosen: list[str] = []
    for b in backends:
        if b == "all":
            chosen += names
        elif b in BACKENDS:
            chosen.append(b)
        else:
            raise InputError(f"unknown backend {b!r}; choose from {', '.join([*BACKENDS, 'all'])}")
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be integers ≥ 1, got {list(batch_sizes)}")
    for name, value, low in (("prompts", prompts, 1), ("iterations", iterations, 1), ("warmup", warmup, 0),
                             ("archive_files", archive_files, 0)):
        if value < low:
            raise InputError(f"{name} must be ≥ {low}, got {value}")
    return list(dict.fromkeys(chosen))


# ---- the verb -----------------------------------------------------------------------------------------
def bench(
    *,
    model: str | Path | RadFlashModel | None = None,
    device: str = "auto",
    backends: Sequence[str] = ("eager",),
    batch_sizes: Sequence[int] = (1, 8),
    image_size: int | None = None,
    prompts: int = 14,
    iterations: int = 10,
    warmup: int = 2,
    include_reference: bool = True,
    archive_files: int = 16,
    threads: int | None = None,
    reference_loop: str = "image",
    dtypes: Sequence[str | None] = (None,),
    openvino_standalone: bool | None = None,
    films: int = 0,
) -> BenchReport:
    """Time every stage of radflash (and the reference, side by side) for each backend and batch size.

    Args:
        model: checkpoint path, a preset name (``tiny``/``base``: random weights of that size), a loaded
            :class:`RadFlashModel`, or ``None`` (the demo model; a random tiny one if not built).
        backends: encoder backends (``eager``, ``compile``, ``onnxruntime``, ``tensorrt``, ``all``); ones
            that cannot run here are listed in ``report.skipped`` with the reason.
        image_size: input side S (multiple of the patch); ``None`` = the model's own.
        prompts: number of text prompts T (the defaults first, then generated variants).
        iterations, warmup: timed and excluded iterations per backend and batch size.
        include_reference: also run the transformers reference path (needs transformers) for the ratios.
        archive_files: size of the synthetic DICOM archive for ``decode`` and ``score`` (0: in-memory images).
        reference_loop: CARZero only: the reference's fusion loop, ``image`` (the released code: per image,
            all prompts in one call) or ``pair`` (one call per image and prompt).
        dtypes: encoder precisions to time each backend in (``None``: the model's default; ``auto``: measured,
            see :mod:`radflash.backends.auto`); combinations a backend cannot run are listed in ``skipped``.
        openvino_standalone: also time the exported graph compiled by OpenVINO with its own defaults (no
            radflash pipeline, encoder only) as the peer; ``None``: when openvino is installed.
        films: with N > 0, also write N real-size (3000×2500) films per syntax (explicit LE, RLE, JPEG 2000)
            and measure each stage's core-seconds per image on them, full and ``--fast-decode``, with the
            pipeline limit cores ÷ Σ (:mod:`radflash.bench.pipeline_limit`; ``report.config["stage_costs"]``).
        threads: torch intra-op threads during the run, restored afterwards (``None``: as set). On a CPU
            shared with other jobs use 1: with more threads than free cores every parallel op can stall
            for a scheduler time slice (measured: the reference encoder 1.2 s instead of 40 ms at 2
            threads on 2 cores at load 7).
    """
    names = _check_args(backends, batch_sizes, prompts, iterations, warmup, archive_files)
    if reference_loop not in ("image", "pair"):
        raise InputError(f"reference_loop must be 'image' or 'pair', got {reference_loop!r}")
    if threads is None:
        threads = torch.get_num_threads()
    if threads < 1:
        raise InputError(f"threads must be ≥ 1, got {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench(model, device, names, batch_sizes, image_size, prompts, iterations, warmup,
                      include_reference, archive_files, reference_loop, tuple(dtypes) or (None,),
                      openvino_standalone, films)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process setting, restored


def _bench(model: Any, device: str, names: list[str], batch_sizes: Sequence[int], image_size: int | None,
           prompts: int, iterations: int, warmup: int, include_reference: bool, archive_files: int,
           reference_loop: str = "image", dtypes: tuple[str | None, ...] = (None,),
           openvino_standalone: bool | None = None, films: int = 0) -> BenchReport:
    from radflash.util.sysinfo import machine_info

    batch_sizes = sorted({int(b) for b in batch_sizes})
    skipped: list[dict[str, str]] = []
    rf = _resolve_model(model, device, image_size, skipped)
    original_backend, original_precision = rf.backend_name, rf.precision
    cfg, dev = rf.config, rf.device
    prompt_list = bench_prompts(prompts, list(rf.default_prompts.values()) or ["There is pleural effusion"])
    peaks = measure_peaks(dev, rf.dtype)
    gemm = gemm_rates(_precisions(rf, dtypes), dev) if dev.type == "cpu" else {}
    if reference_loop != "image" and rf.family != "carzero":
        raise InputError(f"reference loop {reference_loop!r} applies to CARZero models only (this is {rf.family!r})")
    reference = _reference(rf, skipped) if include_reference else None
    if reference is not None and rf.family == "carzero":
        reference.loop = reference_loop
    maps = rf.supports_maps
    stages = [s for s in STAGES if maps or s != "maps"]

    with tempfile.TemporaryDirectory(prefix="radflash-bench-") as tmp:
        files = build_archive(Path(tmp) / "archive", archive_files, skipped)
        inputs = make_inputs(files, cfg.image_size)
        report = BenchReport(
            machine=machine_info(dev), peaks=peaks, skipped=skipped, formulas=formulas_for(rf.family),
            config={
                "model": rf.model_id, "family": rf.family, "image_size": cfg.image_size, "patch": cfg.vision.patch,
                "tokens": (cfg.image_size // cfg.vision.patch) ** 2 + 1, "width": cfg.vision.hidden,
                "encoder_layers": cfg.vision.layers + cfg.align_layers, "device": str(dev),
                "dtype": str(rf.dtype).removeprefix("torch."), "backends": names, "batch_sizes": batch_sizes,
                "prompts": prompts, "iterations": iterations, "warmup": warmup, "threads": torch.get_num_threads(),
                "gemm_rates": gemm, "dtypes": [d or "default" for d in dtypes],
                "archive_files": len(files), "map_size": list(inputs.map_size) if maps else None,
                "reference": None if reference is None else REFERENCE_DESCRIPTIONS[rf.family] + (
                    "; timed here with the per-pair loop (one i2t and one t2i call per image and prompt)"
                    if reference_loop == "pair" else ""),
                "e2e": "one timed loop per iteration: " + " → ".join(stages) + "; stages are its segments",
            },
        )
        ref_stages: dict[int, dict[str, Stats]] = {}
        ref_score: dict[int, Stats] = {}
        if reference is not None:
            for b in batch_sizes:
                log.info("reference, batch %d", b)
                reset_ok = reset_peak_memory(dev)
                ref_stages[b] = _loop(_reference_iteration(reference, inputs, prompt_list, cfg), b, dev,
                                      iterations, warmup)
                report.memory.append(MemoryRow("reference", b, peak_memory(dev, reset_ok=reset_ok)))
                if files:
                    ref_score[b] = _time_runs(lambda b=b: _reference_score(reference, files, prompt_list, b),
                                              dev, iterations, warmup if b == batch_sizes[0] else 0)
        score_ok = True
        try:
            for name, dtype in itertools.product(names, dtypes):
                what = name if dtype is None else f"{name} --dtype {dtype}"
                try:
                    # auto is timed at the largest batch size (the throughput setting) and says what it measured
                    measured = name == "auto" or dtype == "auto"
                    rf.set_backend(name, dtype=dtype or original_precision,
                                   **({"batch_size": batch_sizes[-1]} if measured else {}))
                except (BackendUnavailable, InputError, ImportError) as exc:
                    skipped.append({"what": f"backend {what}", "reason": str(exc)})
                    continue
                if measured:
                    report.config.setdefault("auto_selections", {})[what] = rf.backend_selection
                    report.config["auto_selection"] = rf.backend_selection
                if name == "compile" and warmup == 0:
                    warnings.warn("compile backend with warmup=0: the first iteration includes compilation",
                                  stacklevel=2)
                label = rf.backend_name if not measured else f"{name}→{rf.backend_name}"
                prec = rf.precision
                for b in batch_sizes:
                    log.info("radflash %s %s, batch %d", label, prec, b)
                    reset_ok = reset_peak_memory(dev)
                    stages = _loop(_radflash_iteration(rf, inputs, prompt_list), b, dev, iterations, warmup)
                    report.memory.append(MemoryRow(f"{label}/{prec}", b, peak_memory(dev, reset_ok=reset_ok)))
                    for stage, st in stages.items():
                        ref = ref_stages.get(b, {}).get(stage)
                        limit = _limit(stage, st, rf, b, len(prompt_list), inputs, peaks,
                                       *_encode_rates(rf, prec, gemm, rf.backend_name, rf.encoder))
                        report.rows.append(_row(label, b, stage, b, st, ref, limit, dtype=prec))
                    if files and score_ok:
                        try:
                            st = _time_runs(lambda b=b: _radflash_score(rf, files, prompt_list, b),
                                            dev, iterations, warmup if b == batch_sizes[0] else 0)
                        except ImportError as exc:
                            skipped.append({"what": "score", "reason": str(exc)})
                            score_ok = False
                            continue
                        report.rows.append(_row(label, b, SCORE, len(inputs.files), st, ref_score.get(b), None,
                                                dtype=prec))
            if openvino_standalone or (openvino_standalone is None and dev.type == "cpu"
                                       and importlib.util.find_spec("openvino") is not None):
                _openvino_standalone(rf, report, inputs, batch_sizes, iterations, warmup, gemm, skipped)
        finally:
            if (rf.backend_name, rf.precision) != (original_backend, original_precision):
                rf.set_backend(original_backend, dtype=original_precision)
        if films:  # the model's own backend and precision, at the largest batch size (score's setting)
            from radflash.bench.pipeline_limit import stage_costs, write_films

            report.config["stage_costs"] = stage_costs(rf, write_films(Path(tmp) / "films", films),
                                                       batch_size=batch_sizes[-1]).to_dict()
    return report


REFERENCE_DESCRIPTIONS = {
    "radzero": "transformers Dinov2Model + Dinov2Layer + MPNetModel, fp32 eager; the RadZero code's unfused head "
               "(LayerNorm, normalise, bmm/τ, softmax, weighted sum, cosine); F.interpolate maps; pydicom + PIL "
               "decode/preprocess",
    "carzero": "transformers ViTModel + BertModel, fp32 eager, BERT run once per prompt list (Python-loop word "
               "aggregation); the released fusion (nn.MultiheadAttention decoder, 4 pre-norm layers, MLP head) "
               "in the released per-image loop (get_dqn_similarities): per image one i2t call (all prompts as "
               "queries over its 197 tokens) and one t2i call (its CLS over every prompt's 98 rows), every "
               "prompt's keys/values projected again for every image; pydicom + letterbox (area resize, pad, "
               "centre crop) preprocess",
}


def _reference(rf: RadFlashModel, skipped: list[dict[str, str]]):
    """The reference of the model's family (:data:`REFERENCE_DESCRIPTIONS`), or None with the reason."""
    if rf.family == "carzero":
        from radflash.bench.carzero_reference import ReferenceCARZero as reference_cls
    elif rf.family == "radzero":
        from radflash.bench.reference import ReferenceRadZero as reference_cls
    else:
        skipped.append({"what": "reference", "reason": f"no reference implementation for family {rf.family!r}"})
        return None
    try:
        return reference_cls.from_model(rf)
    except BackendUnavailable as exc:
        skipped.append({"what": "reference", "reason": str(exc)})
        return None


def _row(backend: str, b: int, stage: str, images: int, st: Stats, ref: Stats | None, limit: Limit | None,
         dtype: str | None = None) -> Row:
    from radflash.util.timing import images_per_s

    return Row(backend=backend, batch_size=b, stage=stage, images=images, radflash=st, reference=ref,
               ratio=None if ref is None else ref.median_ms / st.median_ms, images_per_s=images_per_s(images, st),
               reference_images_per_s=None if ref is None else images_per_s(images, ref), limit=limit, dtype=dtype)


def _precisions(rf: RadFlashModel, dtypes: Sequence[str | None]) -> list[str]:
    """The precisions whose GEMM rate the run needs: each one asked for, and every native one (what ``auto``
    and the OpenVINO peer may run in)."""
    from radflash.devices import native_precisions, resolve_precision

    asked = [resolve_precision(d, rf.device) for d in dtypes]
    return list(dict.fromkeys(["fp32", *native_precisions(), *(p for p in asked if p != "auto")]))


def _encode_rates(rf: RadFlashModel, prec: str, gemm: dict[str, float], runtime: str,
                  backend: Any) -> tuple[float | None, dict[str, float]]:
    """The GEMM rate an encoder row in ``prec`` is held against, and for INT8 its other yardsticks."""
    if prec != "int8":
        return gemm.get(prec), {}
    rest = unquantised_precision(runtime, backend)
    return gemm.get(prec), int8_yardsticks(rf.config, rf.config.image_size, gemm, rest=rest,
                                           float_share=float_attention(backend))


def _limit(stage: str, st: Stats, rf: RadFlashModel, b: int, t: int, inputs: BenchInputs, peaks: Peaks,
           gemm_rate: float | None = None, yardsticks: dict[str, float] | None = None) -> Limit | None:
    cfg = rf.config
    n, d = (cfg.image_size // cfg.vision.patch) ** 2 + 1, cfg.vision.hidden
    e = torch.finfo(rf.dtype).bits // 8
    if stage == "encode":
        kind, amount, peak = "flop", b * encoder_flops(cfg, cfg.image_size), gemm_rate or peaks.matmul_flops_per_s
    elif stage == "head" and rf.family == "carzero":
        kind, amount, peak = "flop", carzero_head_flops(cfg, b, t), peaks.matmul_flops_per_s
    elif stage == "head" and rf.family == "radzero":
        kind, amount, peak = "bytes", head_bytes(b, t, n, d, e_tok=e, e_txt=e, e_s=e), peaks.copy_bytes_per_s
    elif stage == "maps":
        h, w = inputs.map_size
        kind, amount, peak = "bytes", maps_bytes(b, t, n - 1, h, w, e_s=e, e_out=2), peaks.copy_bytes_per_s
    else:
        return None
    rate = amount / (st.median_ms / 1e3)
    others = {name: rate / r for name, r in (yardsticks or {}).items()} if stage == "encode" else {}
    return Limit(kind=kind, amount=float(amount), achieved_per_s=rate, peak_per_s=peak, fraction=rate / peak,
                 others=others)


# ---- timed loops --------------------------------------------------------------------------------------
def _loop(iteration, b: int, dev: torch.device, iterations: int, warmup: int) -> dict[str, Stats]:
    """Run ``iteration(clock, i, b)`` warmup + iterations times; stage and e2e stats of the timed ones."""
    clock = StageClock(dev)
    for i in range(warmup):
        clock.start()
        iteration(clock, i, b)
        clock.stop()
    samples: dict[str, list[float]] = {}
    for i in range(iterations):
        clock.start()
        iteration(clock, warmup + i, b)
        for stage, s in clock.stop().items():
            samples.setdefault(E2E if stage == "total" else stage, []).append(s)
    return {stage: Stats.from_seconds(v) for stage, v in samples.items()}


def _radflash_iteration(rf: RadFlashModel, inputs: BenchInputs, prompt_list: list[str]):
    """One radflash iteration; the head gets the cached prompt features (CARZero: packed t + prompt K/V)."""
    from radflash.kernels import upsample_maps

    text = rf.encode_text(prompt_list)  # prompt features are fixed per run: cached, not timed
    maps = rf.supports_maps
    grid = rf.grid_for((rf.config.image_size // rf.config.vision.patch) ** 2)
    load = image_loader() if inputs.files else None

    @torch.inference_mode()
    def iteration(clock: StageClock, i: int, b: int) -> None:
        batch = inputs.batch(i, b)
        if load is not None:
            batch = [load(p).pixels for p in batch]
            clock.mark("decode")
        pixels = rf.preprocess(batch)
        clock.mark("preprocess")
        tokens = rf.encode_images(pixels=pixels)
        clock.mark("encode")
        _, sims = rf.module.head(tokens, text, return_maps=maps)
        clock.mark("head")
        if maps:
            upsample_maps(sims.view(b, len(prompt_list), *grid), inputs.map_size, output="prob")
            clock.mark("maps")

    return iteration


def _reference_iteration(ref: Any, inputs: BenchInputs, prompt_list: list[str], cfg: Any):
    """One reference iteration; its text features are cached too (only the head's own work is timed)."""
    text = ref.text_features(prompt_list)
    maps = getattr(ref, "supports_maps", True)
    side = cfg.image_size // cfg.vision.patch

    @torch.inference_mode()
    def iteration(clock: StageClock, i: int, b: int) -> None:
        batch = inputs.batch(i, b)
        if inputs.files:
            batch = [ref.decode(p) for p in batch]
            clock.mark("decode")
        else:
            batch = [(255 * img).astype(np.uint8) for img in batch]
        pixels = ref.preprocess(batch)
        clock.mark("preprocess")
        tokens = ref.image_tokens(pixels)
        clock.mark("encode")
        _, sims = ref.head(tokens, text, return_maps=maps)
        clock.mark("head")
        if maps:
            ref.maps(sims, (side, side), inputs.map_size)
            clock.mark("maps")

    return iteration


def _time_runs(fn, dev: torch.device, iterations: int, warmup: int) -> Stats:
    """Whole-archive runs: one warm-up if any (the first batch size only: the timed loop before it has
    already warmed the model, this pays the score path's one-time imports), then up to SCORE_RUNS runs."""
    from radflash.util.timing import time_fn

    return Stats.from_seconds(time_fn(fn, device=dev, iterations=min(iterations, SCORE_RUNS), warmup=min(warmup, 1)))


def _radflash_score(rf: RadFlashModel, files: list[Path], prompt_list: list[str], b: int) -> None:
    from radflash.archive.verb import score

    run = score(files, None, model=rf, findings=prompt_list, batch_size=b, workers=0, backend=rf.backend_name,
                progress=False)
    if run.scored != len(files):
        raise InputError(f"score path scored {run.scored} of {len(files)} synthetic chest films "
                         f"({run.skipped} skipped, {run.failed} failed)")


@torch.inference_mode()
def _reference_score(ref: Any, files: list[Path], prompt_list: list[str], b: int) -> None:
    """The serial loop a user of the reference code writes: decode → preprocess → encode → logits."""
    text = ref.text_features(prompt_list)
    for start in range(0, len(files), b):
        pixels = ref.preprocess([ref.decode(p) for p in files[start:start + b]])
        ref.head(ref.image_tokens(pixels), text)


def _openvino_standalone(rf: RadFlashModel, report: BenchReport, inputs: BenchInputs, batch_sizes: Sequence[int],
                         iterations: int, warmup: int, gemm: dict[str, float], skipped: list[dict[str, str]]) -> None:
    """The peer: the same exported graph compiled by OpenVINO with its own defaults (no hints, no cache, one
    synchronous request), encoder only, on the same preprocessed images; its rows are ``openvino-standalone``."""
    from radflash.backends.openvino import OpenVINOBackend
    from radflash.util.timing import time_fn

    try:
        peer = OpenVINOBackend(rf, precision="fp32", config={}, cache=False)
    except (BackendUnavailable, InputError, ImportError) as exc:
        skipped.append({"what": "openvino standalone", "reason": str(exc)})
        return
    peer._queue = None  # its defaults: one synchronous infer request per batch
    raw = peer.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
    hint = (raw.get_type_name() if hasattr(raw, "get_type_name") else str(raw)).lower()
    prec = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16",
            "float16": "fp16"}.get(hint, hint)
    report.config["openvino_standalone"] = {"inference_precision": prec, "config": "OpenVINO CPU defaults"}
    for b in batch_sizes:
        batch = inputs.batch(0, b)
        pixels = rf.preprocess([image_loader()(p).pixels for p in batch] if inputs.files else batch)
        st = Stats.from_seconds(time_fn(lambda px=pixels: peer.encode(px), device=rf.device, iterations=iterations,
                                        warmup=max(warmup, 1)))
        limit = (_limit("encode", st, rf, b, 1, inputs, report.peaks, *_encode_rates(rf, prec, gemm, "openvino", peer))
                 if report.peaks else None)
        report.rows.append(_row("openvino-standalone", b, "encode", b, st, None, limit, dtype=f"default={prec}"))
