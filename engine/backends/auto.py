"""``auto``: choose the encoder's runtime and precision together, by measurement on this machine.

Which (runtime, precision) is fastest depends on the model size, the batch size and the CPU (on the
2-core Zen 4 dev box: OpenVINO bf16 2.2× eager fp32 for the base tower at batch 1; ONNX Runtime 2.1×
eager for base but 0.82× for the demo at batch 8; bf16 is ~50× slower than fp32 where it is
emulated), so no constant can decide it. On the CPU :func:`select` builds every candidate of
:data:`CANDIDATES` that

- the request allows: a named backend fixes the runtime, a named dtype the precision (``--backend
  eager --dtype auto`` chooses among eager's precisions; ``--backend auto --dtype bfloat16`` among
  the runtimes' bf16 paths);
- is installed (onnxruntime, openvino) and has what it needs (OpenVINO INT8: a calibrated model,
  ``radflash calibrate quantize --backend openvino``; ONNX Runtime INT8: dynamic quantisation);
- this CPU runs natively (:func:`radflash.devices.native_precisions`: no bf16 without AMX-BF16 or
  AVX512-BF16, no fp16 without AMX-FP16/AVX512-FP16; an emulated candidate is never timed).

``torch.compile`` is a candidate only when asked for by name (``--backend compile --dtype auto``):
its inductor build alone takes longer than the whole measurement budget for the base tower.

The measurement is a successive halving, so that it costs a few seconds per candidate (the base
tower on 2 cores: ~0.65 s a batch of 1 in OpenVINO INT8, ~2.2 s in eager fp32, 7 candidates):

1. **Screen.** Every candidate runs one warm-up batch on seeded phantom radiographs (the probe),
   whose probabilities must agree with eager float32 on the same batch within :data:`AGREEMENT`
   (max |Δprob| over images and the model's default prompts): a candidate that fails is refused,
   whatever its speed. Each candidate that agrees then gets ONE timed batch, in alternating order
   (load from other jobs hits all alike). Its screen time is the faster of the warm-up and that
   call: a runtime's first call carries its set-up (5-50× a steady call for OpenVINO on the tiny
   model) and load from other jobs only ever adds time, so neither can make a candidate look
   faster than it is, while one burst of load on the one timed call must not screen out the
   fastest candidate (it did, with the timed call alone, on the loaded 2-core dev box). One steady
   call ranks candidates that are far apart; a candidate more than :data:`SCREEN`× the fastest
   screen time is ``screened out``: it cannot win, and is not a contender in the final. An eager or
   ONNX Runtime candidate (no first-call set-up to speak of) whose warm-up alone is more than
   :data:`FAR` × :data:`SCREEN`× the fastest warm-up is screened out without a timed call.
2. **Final.** Only the finalists (within :data:`SCREEN`×) get more timed batches, up to
   :data:`ITERATIONS` in all (fewer when :data:`BUDGET_S` runs out, none for a lone finalist):
   the second call only separates close candidates, where noise matters. Before, every candidate got the second call
   (pruning only at 3×): for the base tower at batch 1, about a third of the timed work went to
   candidates already ≥ 1.3× behind.

The screen runs at the run's batch size b, except for large models at b > 2
(:func:`screen_batch`): at ≥ :data:`SCREEN_TOKENS` tokens per image one image fills the GEMMs, so
the per-image ranking at batch 1 is the one at b (the issue's table: same order at batch 1 and 8)
and a screen at batch 1 costs 1/b of one at b. The finalists are then confirmed as the run will use
them: rebuilt for b where the build depends on the batch (OpenVINO: ``LATENCY`` hint at batch 1,
``THROUGHPUT`` otherwise), a warm-up whose first images (the probe's, same seed) are checked
against the float32 reference again, then timed batches; a finalist more than :data:`SCREEN`× the
fastest after its first timed batch is ``pruned``. They run at b where that fits what is left of
:data:`MEASURE_BUDGET_S` after the screen, else at the largest batch that fits (``final_batch``,
:func:`final_batch`; never below the screen's): the per-image ranking holds at any batch for such a
model, and a batch of 8 base images takes ~15 s on a 2-core AVX2-only CPU. A lone finalist has
nothing left to be compared with: its warm-up (the agreement check, which also times it, set-up
included) is all it runs there. Whatever the path, the winner has passed the agreement check on the
probe and was timed as built for the run's batch size.

The finalist with the fastest timed batch at b wins (``ms_per_batch``: the minimum, the estimate
that load from other jobs disturbs least; the median of two calls is their mean), except that the
simplest candidate (eager, listed first) is kept unless the winner is at least :data:`MIN_GAIN`
faster: below that the difference is within the noise of a shared CPU. If the screen left the
simplest candidate out, the winner beat it by ≥ :data:`SCREEN`× there, so the rule is decided. The
record lists every candidate with its status (``timed``: a finalist; ``screened out``; ``pruned``;
``refused``; ``unavailable``; ``left out``), build seconds, warm-up and timed ms and agreement, and
the totals: ``measure_s`` (probe, warm-ups, timed calls and agreement checks) and ``build_s``
(exports, conversions, compiles, the rebuilds for b), so that manifests and :func:`summary` say
what the measurement cost.

The decision is cached in ``<cache_dir>/backend-auto.json`` under a hash of everything that could
change it (:func:`selection_key`: model hash, image size, batch size, the request, CPU model, cores
and flags, torch threads, library versions, the INT8 model's identity, the method's constants), so
the measurement is paid once; it is logged and recorded with every candidate's timing and agreement
(score manifest, segment report, bench JSON). Where OpenVINO is not installed but this CPU has
native bf16 or VNNI (where it was fastest here), ``auto`` says so once, with the install line. On
CUDA the rule stays fixed (TensorRT if importable, else ``torch.compile``): building either
candidate costs minutes, far more than a timing could save, so it is logged as a rule, not
measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from radflash.errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.backends import EncoderBackend

log = logging.getLogger("radflash.backends")

CACHE_FILE = "backend-auto.json"
CACHE_SCHEMA = 2
DEFAULT_BATCH = 8  # used when the caller does not say which batch size the run will use
WARMUP = 1  # the warm-up batch is the agreement probe
ITERATIONS = 2  # timed batches per candidate (fewer when BUDGET_S runs out; at least one)
BUDGET_S = 6.0  # timed seconds per candidate: "a few seconds", bounds the one-off cost on slow CPUs
MIN_GAIN = 1.05  # another candidate must be ≥ 5% faster than the simplest to be chosen (noise is ~2-4%)
SCREEN = 1.3  # a first timed batch this many times the fastest one's is not timed again (cannot win)
SCREEN_BATCH = 1  # large models are screened at this batch when the run's is larger (screen_batch)
SCREEN_TOKENS = 1024  # tokens per image from which one image fills the GEMMs (base at 518²: 1369)
BATCH_AWARE = ("openvino",)  # runtimes built for a batch size (OpenVINO's hint): rebuilt for the run's batch
STEADY_FIRST_CALL = ("eager", "onnxruntime")  # runtimes whose first call costs about a steady one (see FAR)
FAR = 1.5  # such a candidate whose warm-up is > FAR × SCREEN × every warm-up's fastest is screened out on it
AGREEMENT = 0.02  # max |prob − float32 prob| on the probe batch that any candidate must meet
MEASURE_BUDGET_S = 30.0  # encode seconds for the whole measurement (the CPU issue: "under 30 s in all for base")
PROBE_SEED = 20_260_529

# (runtime, precision), simplest first: the first one that the request allows is the baseline.
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("eager", "fp32"), ("eager", "bf16"), ("eager", "fp16"), ("compile", "fp32"), ("compile", "bf16"),
    ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
    ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "fp16"), ("openvino", "int8"),
)
OPENVINO_HINT = "pip install 'radflash[openvino]'"
_hinted = False  # the OpenVINO install line is logged once per process


def label(backend: str, precision: str) -> str:
    return f"{backend}/{precision}"


def selection_key(model: RadFlashModel, *, batch_size: int, image_size: int, backend: str = "auto",
                  precision: str = "auto") -> dict[str, Any]:
    """Every input the timing depends on: a change in any of them means measuring again."""
    from radflash import __version__
    from radflash.backends.export import DEFAULT_OPSET, model_key
    from radflash.devices import cpu_flags
    from radflash.util.sysinfo import cpu_model, package_version, usable_cores

    relevant = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile",
                "amx_bf16", "amx_int8", "amx_fp16", "fma")
    return {
        "model": model_key(model), "image_size": int(image_size), "batch_size": int(batch_size),
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "request": {"backend": backend, "precision": precision},
        "cpu": cpu_model(), "cpu_flags": sorted(f for f in cpu_flags() if f in relevant),
        "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
        "radflash": __version__, "torch": torch.__version__, "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "openvino": package_version("openvino"), "nncf": package_version("nncf"),
        "opset": DEFAULT_OPSET, "int8_model": _int8_identity(model), "agreement": AGREEMENT,
        "method": {"iterations": ITERATIONS, "screen": SCREEN, "screen_batch": SCREEN_BATCH,
                   "screen_tokens": SCREEN_TOKENS, "min_gain": MIN_GAIN, "budget_s": BUDGET_S, "far": FAR,
                   "measure_budget_s": MEASURE_BUDGET_S,
                   "steady_first_call": list(STEADY_FIRST_CALL)},
    }


def _int8_identity(model: RadFlashModel) -> str | None:
    """The calibrated OpenVINO INT8 model's path, size and mtime: a new calibration means measuring again."""
    try:
        from radflash.backends.openvino import int8_model_path

        path = int8_model_path(model)
        st = path.with_suffix(".bin").stat()
    except (OSError, InputError, AttributeError):
        return None
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_path() -> Path:
    from radflash.backends.export import cache_dir

    return cache_dir() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached decisions; an unreadable or foreign file is ignored (and replaced on the next write)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: ignoring the backend cache (%s)", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(data.get("entries"), dict):
        log.warning("%s: ignoring the backend cache (not a radflash schema-%d file)", path, CACHE_SCHEMA)
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Atomic replace, so concurrent runs never read half a file; a read-only cache only costs a re-measure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"schema": CACHE_SCHEMA, "entries": entries}, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("%s: could not save the backend choice (%s); it will be measured again next time", path, exc)


# ---- timing and agreement -------------------------------------------------------------------------
def time_encode(backend: EncoderBackend, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds for one ``encode`` of ``pixels`` and its tokens, synchronised on CUDA (tests fake the clock)."""
    from radflash.util.timing import synchronize

    synchronize(pixels.device)
    start = time.perf_counter()
    tokens = backend.encode(pixels)
    synchronize(pixels.device)
    return time.perf_counter() - start, tokens


def probe_pixels(model: RadFlashModel, b: int) -> torch.Tensor:
    """``b`` seeded phantom radiographs, preprocessed like real images (the encoder's work does not depend on
    pixel values, so they time like real ones, and unlike noise they give meaningful probabilities)."""
    from radflash.synthetic.phantoms import generate_batch

    images = [p.image for p in generate_batch(PROBE_SEED, b, model.config.image_size)]
    return model.preprocess(images)


def probe_prompts(model: RadFlashModel) -> list[str]:
    return list(model.default_prompts.values()) or ["There is pleural effusion", "There is pneumothorax"]


def probabilities(model: RadFlashModel, tokens: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The family's probabilities on ``tokens`` (the head in the module's dtype: float32 on the CPU)."""
    with torch.inference_mode():
        return model.score(tokens=tokens.to(model.dtype), prompts=prompts).probs.float()


def measure(candidates: Mapping[str, EncoderBackend], pixels: torch.Tensor, *, warmup: int = WARMUP,
            iterations: int = ITERATIONS, budget_s: float = BUDGET_S, screen: float | None = None,
            dropped: str = "screened out", on_warmup: Callable[[str, torch.Tensor], bool] | None = None,
            steady: Callable[[str], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Warm-up then timed calls of each candidate, in alternating rounds.

    ``on_warmup(name, tokens)`` sees each candidate's first output and returns False to refuse it
    (the agreement check). After the first timed round each candidate's screen time is the faster of
    its warm-up and that call (a shared CPU's load and a runtime's set-up only ever add time, so the
    faster call is the estimate least disturbed: one burst of load from another job on one call must
    not screen out the fastest candidate, which happened with the timed call alone); a candidate more
    than ``screen`` × the fastest is not timed again (its status becomes ``dropped``): one steady call
    is enough to rank candidates that far apart, the second only separates the close ones. A round
    that takes a candidate past ``budget_s`` of timed work is its last (at least one timed call each
    always runs), and a candidate left alone after the first round is not timed again (the second call
    only separates close candidates). ``iterations=0`` runs the warm-ups only.

    A candidate whose first call costs about a steady one (``steady(name)``: eager and ONNX Runtime,
    :data:`STEADY_FIRST_CALL`; their warm-ups were 0.9–1.11× their timed calls for the base tower
    here, OpenVINO's up to 50× on the tiny model) is screened out on its warm-up alone when that is
    more than :data:`FAR` × ``screen`` × the fastest warm-up: every warm-up is at least its
    candidate's steady time, so the fastest one bounds the fastest candidate from above, and FAR
    leaves room for the first call's extra cost and a burst of load on it. For the base tower on 2
    cores that spares the timed calls of the slow fp32 and bf16 candidates, ~2 s each. Returns per
    candidate ``{"warmup_s", "samples", "screen_s", "status"}`` (``"on_warmup": True`` for those).
    """
    if iterations < 0:
        raise InputError(f"iterations must be ≥ 0, got {iterations}")
    out: dict[str, dict[str, Any]] = {name: {"warmup_s": [], "samples": [], "status": "timed"} for name in candidates}
    with torch.inference_mode():
        for name, backend in candidates.items():
            for i in range(max(warmup, 1 if on_warmup else 0)):
                seconds, tokens = time_encode(backend, pixels)
                out[name]["warmup_s"].append(seconds)
                if i == 0 and on_warmup is not None and not on_warmup(name, tokens):
                    out[name]["status"] = "refused"
                    break
        live = [n for n in candidates if out[n]["status"] == "timed"]
        if screen is not None and steady is not None and iterations and len(live) > 1:
            bound = FAR * screen * min(out[n]["warmup_s"][0] for n in live)
            for name in [n for n in live if steady(n) and out[n]["warmup_s"][0] > bound]:
                out[name].update(status=dropped, screen_s=min(out[name]["warmup_s"]), on_warmup=True)
                live.remove(name)
        for round_ in range(iterations):
            live = [n for n in live if not out[n]["samples"] or sum(out[n]["samples"]) < budget_s]
            if not live or (round_ and len(live) == 1):
                break
            for name in live:
                out[name]["samples"].append(time_encode(candidates[name], pixels)[0])
            if round_ == 0:  # after a full timed round
                for name in live:  # load and set-up only ever add time: the faster call is the better estimate
                    out[name]["screen_s"] = min(out[name]["samples"][0], *out[name]["warmup_s"])
                fastest = min(out[n]["screen_s"] for n in live)
                for name in [n for n in live if screen is not None and out[n]["screen_s"] > screen * fastest]:
                    out[name]["status"] = dropped
                    live.remove(name)
    return out


def final_batch(b: int, s: int, spent_s: float, per_image_s: list[float], *, calls: int) -> int:
    """The batch the finalists are confirmed at: the run's ``b`` where that fits what is left of
    :data:`MEASURE_BUDGET_S` after the screen (``spent_s``), else the largest batch that does, never below
    the screen's ``s``.

    Each finalist runs ``calls`` batches there (its checked warm-up and the timed ones) at about its
    screen time per image (``per_image_s``): a model screened at batch 1 fills the GEMMs with one image
    (:func:`screen_batch`), so its time grows with the batch and the ranking holds at any batch. Without
    the cap the base tower on a 2-core AVX2-only Zen 3 (~2 s an image) spent 200 s confirming three
    finalists at batch 8; on the Zen 4 dev box (~0.55 s an image) a lone finalist still fits at 8.
    """
    cost = calls * sum(per_image_s)
    fits = int(max(MEASURE_BUDGET_S - spent_s, 0.0) // cost) if cost > 0 else b
    return max(s, min(b, fits))


def screen_batch(model: RadFlashModel, b: int, n_candidates: int) -> int:
    """The batch every candidate is screened at: 1 where one image already fills the GEMMs, else the run's.

    At ≥ :data:`SCREEN_TOKENS` tokens per image (the base tower at 518²: 1369) a batch of 1 keeps every
    GEMM at its rate, so candidates rank per image as at batch 8 (the issue's table: same order at 1
    and 8) and a screen at batch 1 costs 1/b of one at the run's batch. A small model does not fill
    the GEMMs at batch 1: per-call overheads (thread-pool dispatch, OpenVINO's request set-up) weigh
    more at 1 than at the run's batch, so its ranking at 1 need not hold at b; it is screened at the
    run's batch, which is cheap for a small model anyway. With two candidates a screen at another
    batch saves little (both may be finalists, and would then pay a warm-up at each batch).
    """
    if b <= 2 or n_candidates <= 2 or model.config.grid ** 2 < SCREEN_TOKENS:
        return b
    return SCREEN_BATCH


# ---- the decision ---------------------------------------------------------------------------------
def _record(chosen: str, reason: str, *, measured: bool, batch_size: int | None, image_size: int,
            precision: str | None = None, candidates: dict[str, Any] | None = None,
            key: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"requested": "auto", "chosen": chosen, "precision": precision, "reason": reason, "measured": measured,
            "cached": False, "batch_size": batch_size, "image_size": image_size, "candidates": candidates or {},
            "agreement_bound": AGREEMENT, "key": key, "cache_file": None}


def summary(selection: Mapping[str, Any]) -> str:
    """One line for logs and terminal tables: the choice, each candidate's time, what measuring cost and why."""
    chosen = selection["chosen"] + (f"/{selection['precision']}" if selection.get("precision") else "")
    parts = [f"auto → {chosen}"]
    candidates = selection.get("candidates", {})
    timed = {n: c for n, c in candidates.items() if c.get("ms_per_batch") is not None}
    if timed:
        times = ", ".join(f"{n} {c['ms_per_batch']:.4g} ms" + (" (warm-up)" if c.get("timed_from") else "")
                          for n, c in timed.items())
        more = [f"{times} per batch of {selection.get('final_batch') or selection['batch_size']}"]
        screened = {n: c["screen_ms"] for n, c in candidates.items() if c.get("screen_ms") is not None
                    and c.get("ms_per_batch") is None}
        if screened:
            more.append(f"screened out at batch {selection.get('screen_batch')}: "
                        + ", ".join(f"{n} {v:.4g} ms" + (" (warm-up)" if candidates[n].get("screened_on") else "")
                                    for n, v in screened.items()))
        if selection.get("measure_s") is not None:
            more.append(f"measured in {selection['measure_s']:.3g} s + {selection.get('build_s', 0):.3g} s of builds")
        if selection["cached"]:
            more.append("cached")
        parts.append(f"({'; '.join(more)})")
    parts.append(f"because {selection['reason']}")
    return " ".join(parts)


def decide(ms: Mapping[str, float], baseline: str, *, screen_ms: Mapping[str, float] | None = None,
           screen_batch: int | None = None) -> tuple[str, str]:
    """The fastest of the finalists ``ms`` (ms per batch at the run's batch), unless it is within
    :data:`MIN_GAIN` of ``baseline``.

    A baseline that is not a finalist lost the screen (``screen_ms``: the screen's estimates, at
    ``screen_batch``) by more than :data:`SCREEN`× (> :data:`MIN_GAIN`) to the fastest candidate: the
    rule is decided, and the reason quotes the screen.
    """
    best = min(ms, key=ms.__getitem__)
    if baseline in ms and best != baseline:
        speedup = ms[baseline] / ms[best]
        if speedup >= MIN_GAIN:
            return best, f"{best} measured {speedup:.2f}× {baseline} here (≥ {MIN_GAIN:g}× needed)"
        return baseline, f"{best} measured only {speedup:.2f}× {baseline} here (< {MIN_GAIN:g}×: within noise)"
    if best != baseline and screen_ms and baseline in screen_ms and best in screen_ms:
        return best, (f"{best} measured {screen_ms[baseline] / screen_ms[best]:.2f}× {baseline} in the screen at "
                      f"batch {screen_batch} (≥ {MIN_GAIN:g}× needed) and was the fastest finalist")
    others = [n for n in ms if n != best]
    if not others:
        rest = [n for n in (screen_ms or {}) if n != best and best in screen_ms]
        if not rest:
            return best, f"{best} is the only candidate that agreed and ran"
        runner = min(rest, key=screen_ms.__getitem__)
        return best, (f"{best} was the only finalist: the next fastest, {runner}, measured "
                      f"{screen_ms[runner] / screen_ms[best]:.2f}× slower in the screen at batch {screen_batch}")
    runner = min(others, key=ms.__getitem__)
    return best, f"{best} measured {ms[runner] / ms[best]:.2f}× {runner} (the next fastest) here"


def candidates_for(backend: str, precision: str, *, native: tuple[str, ...],
                   importable: Callable[[str], bool]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The (runtime, precision) pairs to try for a request, and why each other one is left out."""
    keep: list[tuple[str, str]] = []
    left_out: dict[str, str] = {}
    for name, prec in CANDIDATES:
        if (backend != "auto" and name != backend) or (precision != "auto" and prec != precision):
            continue
        why = None
        if prec not in native:
            why = f"{prec} is not native on this CPU (emulated: never timed)"
        elif name == "compile" and backend != "compile":
            why = "torch.compile builds longer than the whole measurement budget (ask for --backend compile)"
        elif name == "onnxruntime" and not importable("onnxruntime"):
            why = "onnxruntime is not installed (pip install 'radflash[onnx]')"
        elif name == "openvino" and not importable("openvino"):
            why = f"openvino is not installed ({OPENVINO_HINT})"
        if why is None:
            keep.append((name, prec))
        else:
            left_out[label(name, prec)] = why
    return keep, left_out


def _hint_openvino(native: tuple[str, ...], importable: Callable[[str], bool]) -> str | None:
    """Once per process: OpenVINO would likely win here (native bf16 or VNNI) but is not installed."""
    global _hinted
    from radflash.devices import fast_int8

    if importable("openvino") or not ("bf16" in native or fast_int8()):
        return None
    note = (f"OpenVINO is not installed; on this CPU (native {'bf16' if 'bf16' in native else 'VNNI int8'}) it "
            f"was the fastest CPU runtime where measured: {OPENVINO_HINT}")
    if not _hinted:
        log.warning("%s", note)
        _hinted = True
    return note


def select(model: RadFlashModel, *, batch_size: int | None = None,
           build: Callable[..., EncoderBackend], importable: Callable[[str], bool],
           backend: str = "auto", precision: str = "auto") -> tuple[EncoderBackend, dict[str, Any]]:
    """The backend ``auto`` resolves to for ``model`` and the record of how (see the module docstring).

    ``build(name, precision)`` makes a backend; ``importable(module)`` says whether an optional
    library is installed; ``backend``/``precision`` are the request (``auto`` or a fixed name).
    """
    from radflash.devices import native_precisions

    size = model.config.image_size
    if model.device.type == "cuda":
        if backend != "auto":
            return build(backend, model.precision if precision == "auto" else precision), _record(
                backend, "the backend was named and the model is on CUDA (precision by rule)", measured=False,
                batch_size=batch_size, image_size=size, precision=precision)
        name, why = (("tensorrt", "tensorrt is importable and the model is on CUDA") if importable("tensorrt") else
                     ("compile", "the model is on CUDA and tensorrt is not installed (torch.compile + CUDA graphs)"))
        return build(name), _record(name, f"{why}; fixed rule, not measured (building a candidate takes minutes)",
                                    measured=False, batch_size=batch_size, image_size=size)
    if model.dtype != torch.float32:
        prec = str(model.dtype).removeprefix("torch.")
        return build("eager", None), _record(
            "eager", f"CPU with the whole module in {prec} (the candidates are compared against a float32 module)",
            measured=False, batch_size=batch_size, image_size=size, precision=getattr(model, "precision", None))

    native = native_precisions()
    todo, left_out = candidates_for(backend, precision, native=native, importable=importable)
    note = _hint_openvino(native, importable)
    fallback = (backend if backend != "auto" else "eager", precision if precision != "auto" else "fp32")
    if len(todo) < 2:
        name, prec = todo[0] if todo else fallback
        why = ("it is the only candidate for this request on this machine" if todo else
               "no candidate can be timed here (" + "; ".join(f"{k}: {v}" for k, v in left_out.items()) + ")")
        if not todo and fallback[1] not in native:
            log.warning("%s requested on a CPU without native %s: it runs emulated (slow)", fallback[1], fallback[1])
        rec = _record(name, why, measured=False, batch_size=batch_size, image_size=size, precision=prec,
                      candidates={k: {"status": "left out", "why": v} for k, v in left_out.items()})
        rec["note"] = note
        return build(name, prec), rec

    b = int(batch_size or DEFAULT_BATCH)
    if b < 1:
        raise InputError(f"batch size must be ≥ 1, got {b}")
    key = selection_key(model, batch_size=b, image_size=size, backend=backend, precision=precision)
    digest, path = _digest(key), cache_path()
    entries = _read_cache(path)
    hit = entries.get(digest)
    if isinstance(hit, dict) and hit.get("key") == key and (hit.get("chosen"), hit.get("precision")) in todo:
        record = {**hit, "cached": True, "cache_file": str(path), "note": note}
        try:
            return build(record["chosen"], record["precision"]), record
        except (BackendUnavailable, InputError) as exc:  # e.g. the export fails now: auto never blocks inference
            record.update(chosen=fallback[0], precision=fallback[1],
                          reason=f"{record['reason']}, but {label(hit['chosen'], hit['precision'])} is unavailable "
                                 f"now ({exc})")
            return build(*fallback), record

    s = screen_batch(model, b, len(todo))
    built: dict[str, EncoderBackend] = {}
    records: dict[str, dict[str, Any]] = {k: {"status": "left out", "why": v} for k, v in left_out.items()}
    build_s: dict[str, float] = {}

    def make(name: str, prec: str, batch: int) -> EncoderBackend | None:
        """Build a candidate for ``batch`` (only OpenVINO's build depends on it), timed; None if it cannot be built."""
        start = time.perf_counter()
        try:
            return build(name, prec, batch_size=batch) if name in BATCH_AWARE and batch != b else build(name, prec)
        except (BackendUnavailable, InputError) as exc:  # missing onnx/onnxscript, a failed export or conversion
            records[label(name, prec)] = {"status": "unavailable", "why": str(exc)}
            return None
        finally:
            build_s[label(name, prec)] = build_s.get(label(name, prec), 0.0) + time.perf_counter() - start

    for name, prec in todo:
        if (backend_ := make(name, prec, s)) is not None:
            built[label(name, prec)] = backend_
    if len(built) < 2:
        name, prec = next(iter(built)).split("/") if built else fallback
        why = "; ".join(f"{k}: {r['why']}" for k, r in records.items() if r["status"] == "unavailable")
        rec = _record(name, f"nothing to compare with ({why})", measured=False, batch_size=b, image_size=size,
                      precision=prec, candidates=records, key=key)
        rec["note"] = note
        return (built[label(name, prec)] if built else build(name, prec)), rec

    started = time.perf_counter()
    pixels = probe_pixels(model, s).to(device=model.device, dtype=model.dtype)
    prompts = probe_prompts(model)
    reference = label("eager", "fp32")  # listed first: its warm-up output is the reference, computed once
    ref: list[torch.Tensor] = []
    if reference not in built:
        with torch.inference_mode():
            ref.append(probabilities(model, model.module.image_tokens(pixels), prompts))
    agreement: dict[str, float] = {}

    def agrees(name: str, tokens: torch.Tensor) -> bool:
        probs = probabilities(model, tokens, prompts)
        if name == reference:
            ref.append(probs)
        agreement[name] = float((probs - ref[0]).abs().max())
        return agreement[name] <= AGREEMENT

    # stage 1, the screen: every candidate's warm-up (the agreement probe) and one timed batch at s; at s == b
    # the finalists (within SCREEN× the fastest) get the other timed batches in the same call
    results = measure(built, pixels, on_warmup=agrees, screen=SCREEN, iterations=ITERATIONS if s == b else 1,
                      steady=lambda name: name.split("/")[0] in STEADY_FIRST_CALL)
    for name, r in results.items():
        entry: dict[str, Any] = {"status": r["status"], "max_abs_dprob": round(agreement.get(name, float("nan")), 6),
                                 "warmup_ms": [round(1e3 * x, 4) for x in r["warmup_s"]],
                                 "build_s": round(build_s.get(name, 0.0), 3)}
        if r["status"] == "refused":
            entry["why"] = f"max |Δprob| {agreement[name]:.3g} > {AGREEMENT:g} against eager float32"
        if r["samples"]:
            entry["screen_ms"] = round(1e3 * r["screen_s"], 4)
            if s == b:
                entry.update(_timing(r["samples"]))
        elif r.get("on_warmup"):  # far behind on its warm-up: never timed
            entry.update(screen_ms=round(1e3 * r["screen_s"], 4), screened_on="warm-up")
        records[name] = entry
    finalists = [n for n, r in results.items() if r["status"] == "timed"]
    baseline = next(label(n, p) for n, p in todo)
    lost_at = (s, {n: 1e3 * r["screen_s"] for n, r in results.items() if "screen_s" in r})  # where the baseline lost
    final = s  # the batch the winner was timed at
    if s != b and finalists:
        # stage 2: the finalists built as the run will use them (OpenVINO's hint follows the batch), a warm-up
        # at b that also checks the probe images' probabilities again, and timed batches at b
        for name in [n for n in built if n not in finalists]:
            del built[name]  # free the screened-out candidates' weights before building for b
        for name in finalists:
            runtime, prec = name.split("/")
            if runtime in BATCH_AWARE:
                del built[name]
                if (rebuilt := make(runtime, prec, b)) is not None:
                    built[name] = rebuilt
                records[name]["build_s"] = round(build_s[name], 3)
        at_b: dict[str, float] = {}

        def agrees_at_b(name: str, tokens: torch.Tensor) -> bool:
            at_b[name] = float((probabilities(model, tokens[:s], prompts) - ref[0]).abs().max())
            return at_b[name] <= AGREEMENT

        finals = {n: built[n] for n in finalists if n in built}
        iterations = ITERATIONS if len(finals) > 1 else 0
        spent = sum(sum(r["warmup_s"]) + sum(r["samples"]) for r in results.values())
        final = final_batch(b, s, spent, [results[n]["screen_s"] / s for n in finals], calls=1 + iterations)
        confirmed = measure(finals, probe_pixels(model, final).to(device=model.device, dtype=model.dtype),
                            on_warmup=agrees_at_b, screen=SCREEN, dropped="pruned", iterations=iterations)
        for name, r in confirmed.items():
            entry = records[name]
            entry.update(status=r["status"], max_abs_dprob_at_batch=round(at_b[name], 6),
                         warmup_ms=entry["warmup_ms"] + [round(1e3 * x, 4) for x in r["warmup_s"]])
            if r["status"] == "refused":
                entry["why"] = (f"max |Δprob| {at_b[name]:.3g} > {AGREEMENT:g} against eager float32 on the probe "
                                f"images in a batch of {final}")
            if r["samples"]:
                entry.update(_timing(r["samples"]))
            elif r["status"] == "timed":  # the lone finalist: its warm-up at b (set-up included) is its timing
                entry.update(_timing(r["warmup_s"]), iterations=0, timed_from="warm-up")
        if confirmed.get(baseline, {}).get("status") == "pruned":
            lost_at = (final, {n: 1e3 * r["screen_s"] for n, r in confirmed.items() if "screen_s" in r})
    measure_s = time.perf_counter() - started
    # the winner is a finalist that agreed and was timed at b: a candidate the screen left out cannot win
    ms = {n: e["ms_per_batch"] for n, e in records.items() if e["status"] == "timed" and "ms_per_batch" in e}
    extra = {"screen_batch": s, "final_batch": final, "finalists": finalists, "measure_s": round(measure_s, 2),
             "build_s": round(sum(build_s.values()), 2)}
    if not ms:
        rec = _record(fallback[0], "no candidate agreed with float32 on the probe batch", measured=True,
                      batch_size=b, image_size=size, precision=fallback[1], candidates=records, key=key)
        rec.update(extra)
        return build(*fallback), rec
    winner, reason = decide(ms, baseline, screen_ms=lost_at[1], screen_batch=lost_at[0])
    name, prec = winner.split("/")
    record = _record(name, reason, measured=True, batch_size=b, image_size=size, precision=prec,
                     candidates=records, key=key)
    record.update(extra)
    record["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries[digest] = record
    _write_cache(path, entries)
    record["cache_file"] = str(path)
    record["note"] = note
    log.info("auto: measured %d candidates in %.1f s (builds %.1f s; screened at batch %d, finalists %s)",
             len(results), measure_s, record["build_s"], s, ", ".join(finalists))
    return built[winner], record


def _timing(samples: list[float]) -> dict[str, Any]:
    """``ms_per_batch`` is the fastest timed batch: load from other jobs only ever adds time, so on a shared CPU
    the minimum is the estimate it disturbs least (the median of two calls is their mean, and one burst
    on one call moved it by 2× here)."""
    return {"ms_per_batch": round(1e3 * min(samples), 4), "iterations": len(samples),
            "samples_ms": [round(1e3 * x, 4) for x in samples]}
