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

Each candidate runs one warm-up batch at the run's batch size on seeded phantom radiographs (the
probe), whose probabilities must agree with eager float32 on the same batch within
:data:`AGREEMENT` (max |Δprob| over images and the model's default prompts): a candidate that
fails is refused, whatever its speed. Candidates that agree are then timed in alternating rounds
(alternating spreads any load from other jobs over all of them), :data:`ITERATIONS` batches each
(fewer when :data:`BUDGET_S` runs out). A candidate whose first timed batch took :data:`PRUNE`× the
fastest one's is not timed further: it cannot win (warm-ups are not used for this: a runtime's first
call carries its set-up, 5-50× a steady call for OpenVINO on the tiny model). The fastest median
wins, except that the simplest candidate (eager, listed first) is kept unless the winner is at
least :data:`MIN_GAIN` faster: below that the difference is within the noise of a shared CPU.

The decision is cached in ``<cache_dir>/backend-auto.json`` under a hash of everything that could
change it (:func:`selection_key`: model hash, image size, batch size, the request, CPU model, cores
and flags, torch threads, library versions, the INT8 model's identity), so the measurement is paid
once; it is logged and recorded with every candidate's timing and agreement (score manifest, segment
report, bench JSON). Where OpenVINO is not installed but this CPU has native bf16 or VNNI (where it
was fastest here), ``auto`` says so once, with the install line. On CUDA the rule stays fixed
(TensorRT if importable, else ``torch.compile``): building either candidate costs minutes, far more
than a timing could save, so it is logged as a rule, not measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
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
PRUNE = 3.0  # a first timed batch this many times the fastest one's is not timed again
AGREEMENT = 0.02  # max |prob − float32 prob| on the probe batch that any candidate must meet
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
            iterations: int = ITERATIONS, budget_s: float = BUDGET_S, prune: float | None = None,
            on_warmup: Callable[[str, torch.Tensor], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Warm-up then timed calls of each candidate, in alternating rounds.

    ``on_warmup(name, tokens)`` sees each candidate's first output and returns False to refuse it
    (the agreement check); a candidate that took more than ``prune`` × the fastest one in the first
    timed round is not timed again. A round that takes a candidate past ``budget_s`` of timed work is
    its last (at least one timed call each always runs). Returns per candidate ``{"warmup_s", "samples", "status"}``.
    """
    if iterations < 1:
        raise InputError(f"iterations must be ≥ 1, got {iterations}")
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
        for round_ in range(iterations):
            live = [n for n in live if not out[n]["samples"] or sum(out[n]["samples"]) < budget_s]
            if not live:
                break
            for name in live:
                out[name]["samples"].append(time_encode(candidates[name], pixels)[0])
            if round_ == 0 and prune is not None:  # after a full timed round (first calls carry set-up costs)
                fastest = min(out[n]["samples"][0] for n in live)
                for name in [n for n in live if out[n]["samples"][0] > prune * fastest]:
                    out[name]["status"] = "pruned"
                    live.remove(name)
    return out


# ---- the decision ---------------------------------------------------------------------------------
def _record(chosen: str, reason: str, *, measured: bool, batch_size: int | None, image_size: int,
            precision: str | None = None, candidates: dict[str, Any] | None = None,
            key: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"requested": "auto", "chosen": chosen, "precision": precision, "reason": reason, "measured": measured,
            "cached": False, "batch_size": batch_size, "image_size": image_size, "candidates": candidates or {},
            "agreement_bound": AGREEMENT, "key": key, "cache_file": None}


def summary(selection: Mapping[str, Any]) -> str:
    """One line for logs and terminal tables: the choice, each candidate's time and why."""
    chosen = selection["chosen"] + (f"/{selection['precision']}" if selection.get("precision") else "")
    parts = [f"auto → {chosen}"]
    timed = {n: c for n, c in selection.get("candidates", {}).items() if c.get("ms_per_batch") is not None}
    if timed:
        times = ", ".join(f"{n} {c['ms_per_batch']:.4g} ms" for n, c in timed.items())
        parts.append(f"({times} per batch of {selection['batch_size']}{'; cached' if selection['cached'] else ''})")
    parts.append(f"because {selection['reason']}")
    return " ".join(parts)


def decide(ms: Mapping[str, float], baseline: str) -> tuple[str, str]:
    """The fastest of ``ms`` (median ms per batch), unless it is within :data:`MIN_GAIN` of ``baseline``."""
    best = min(ms, key=ms.__getitem__)
    if best == baseline or baseline not in ms:
        others = [n for n in ms if n != best]
        if not others:
            return best, f"{best} is the only candidate that agreed and ran"
        runner = min(others, key=ms.__getitem__)
        return best, f"{best} measured {ms[runner] / ms[best]:.2f}× {runner} (the next fastest) here"
    speedup = ms[baseline] / ms[best]
    if speedup >= MIN_GAIN:
        return best, f"{best} measured {speedup:.2f}× {baseline} here (≥ {MIN_GAIN:g}× needed)"
    return baseline, f"{best} measured only {speedup:.2f}× {baseline} here (< {MIN_GAIN:g}×: within noise)"


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

    built: dict[str, EncoderBackend] = {}
    records: dict[str, dict[str, Any]] = {k: {"status": "left out", "why": v} for k, v in left_out.items()}
    for name, prec in todo:
        try:
            built[label(name, prec)] = build(name, prec)
        except (BackendUnavailable, InputError) as exc:  # missing onnx/onnxscript, a failed export or conversion
            records[label(name, prec)] = {"status": "unavailable", "why": str(exc)}
    if len(built) < 2:
        name, prec = next(iter(built)).split("/") if built else fallback
        why = "; ".join(f"{k}: {r['why']}" for k, r in records.items() if r["status"] == "unavailable")
        rec = _record(name, f"nothing to compare with ({why})", measured=False, batch_size=b, image_size=size,
                      precision=prec, candidates=records, key=key)
        rec["note"] = note
        return (built[label(name, prec)] if built else build(name, prec)), rec

    pixels = probe_pixels(model, b).to(device=model.device, dtype=model.dtype)
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

    results = measure(built, pixels, on_warmup=agrees, prune=PRUNE)
    ms: dict[str, float] = {}
    for name, r in results.items():
        entry: dict[str, Any] = {"status": r["status"], "max_abs_dprob": round(agreement.get(name, float("nan")), 6),
                                 "warmup_ms": [round(1e3 * x, 4) for x in r["warmup_s"]]}
        if r["status"] == "refused":
            entry["why"] = f"max |Δprob| {agreement[name]:.3g} > {AGREEMENT:g} against eager float32"
        if r["samples"]:
            ms[name] = 1e3 * statistics.median(r["samples"])
            entry.update(ms_per_batch=round(ms[name], 4), iterations=len(r["samples"]),
                         samples_ms=[round(1e3 * x, 4) for x in r["samples"]])
        records[name] = entry
    if not ms:
        rec = _record(fallback[0], "no candidate agreed with float32 on the probe batch", measured=True,
                      batch_size=b, image_size=size, precision=fallback[1], candidates=records, key=key)
        return build(*fallback), rec
    baseline = next(label(n, p) for n, p in todo)
    winner, reason = decide(ms, baseline)
    name, prec = winner.split("/")
    record = _record(name, reason, measured=True, batch_size=b, image_size=size, precision=prec,
                     candidates=records, key=key)
    record["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries[digest] = record
    _write_cache(path, entries)
    record["cache_file"] = str(path)
    record["note"] = note
    return built[winner], record
