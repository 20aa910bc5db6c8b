"""``--backend auto``: time the candidates on this machine, for this model, and keep the faster.

Which encoder backend is faster depends on the model size, the batch size and the machine (on the
2-core dev box ONNX Runtime was 2.1× eager for the base encoder at batch 1 but 0.82× for the demo at
batch 8), so no constant can decide it. On CPU, for a float32 model with onnxruntime installed,
:func:`select` builds both candidates, runs one warm-up batch each and then alternates timed batches
at the run's batch size (alternating spreads any load from other jobs over both), and keeps
ONNX Runtime only when its median is at least :data:`MIN_GAIN` faster: below that the difference is
within the noise of a shared CPU, and eager is the simpler path. The encoder's work does not depend
on pixel values, so a seeded random batch times the same as real images.

The decision is cached in ``<cache_dir>/backend-auto.json`` under a hash of everything that could
change it (:func:`selection_key`: model hash, image size, batch size, device, dtype, CPU model and
cores, torch threads, radflash/torch/onnx/onnxruntime versions), so the measurement is paid once.
On CUDA the rule stays fixed (TensorRT if importable, else ``torch.compile``): building either
candidate costs minutes, far more than a timing could save, so it is logged as a rule, not measured.
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
CACHE_SCHEMA = 1
DEFAULT_BATCH = 8  # used when the caller does not say which batch size the run will use
WARMUP = 1
ITERATIONS = 3  # timed batches per candidate (fewer when BUDGET_S runs out; at least one)
BUDGET_S = 20.0  # timed seconds per candidate: bounds the one-off cost for big models on slow CPUs
MIN_GAIN = 1.05  # ONNX Runtime must be ≥ 5% faster than eager to be chosen (run-to-run noise is ~2-4%)


def selection_key(model: RadFlashModel, *, batch_size: int, image_size: int) -> dict[str, Any]:
    """Every input the timing depends on: a change in any of them means measuring again."""
    from radflash import __version__
    from radflash.backends.export import DEFAULT_OPSET, model_key
    from radflash.util.sysinfo import cpu_model, package_version, usable_cores

    return {
        "model": model_key(model), "image_size": int(image_size), "batch_size": int(batch_size),
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "cpu": cpu_model(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
        "radflash": __version__, "torch": torch.__version__, "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "opset": DEFAULT_OPSET,
    }


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


# ---- timing ---------------------------------------------------------------------------------------
def time_encode(backend: EncoderBackend, pixels: torch.Tensor) -> float:
    """Seconds for one ``encode`` of ``pixels``, synchronised on CUDA (tests replace this with a fake clock)."""
    from radflash.util.timing import synchronize

    synchronize(pixels.device)
    start = time.perf_counter()
    backend.encode(pixels)
    synchronize(pixels.device)
    return time.perf_counter() - start


def measure(candidates: Mapping[str, EncoderBackend], pixels: torch.Tensor, *, warmup: int = WARMUP,
            iterations: int = ITERATIONS, budget_s: float = BUDGET_S) -> dict[str, list[float]]:
    """Seconds per batch of each candidate: ``warmup`` untimed calls each, then timed calls in turn.

    Rounds alternate between candidates so that a burst of load from other jobs hits both; a round
    that takes a candidate past ``budget_s`` of timed work is the last one (at least one always runs).
    """
    if iterations < 1:
        raise InputError(f"iterations must be ≥ 1, got {iterations}")
    with torch.inference_mode():
        for backend in candidates.values():
            for _ in range(warmup):
                time_encode(backend, pixels)
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(iterations):
            for name, backend in candidates.items():
                samples[name].append(time_encode(backend, pixels))
            if any(sum(s) >= budget_s for s in samples.values()):
                break
    return samples


# ---- the decision ---------------------------------------------------------------------------------
def _record(chosen: str, reason: str, *, measured: bool, batch_size: int | None, image_size: int,
            candidates: dict[str, Any] | None = None, key: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"requested": "auto", "chosen": chosen, "reason": reason, "measured": measured, "cached": False,
            "batch_size": batch_size, "image_size": image_size, "candidates": candidates or {},
            "key": key, "cache_file": None}


def summary(selection: Mapping[str, Any]) -> str:
    """One line for logs and terminal tables: the choice, each candidate's time and why."""
    parts = [f"auto → {selection['chosen']}"]
    timed = {n: c for n, c in selection.get("candidates", {}).items() if c.get("ms_per_batch") is not None}
    if timed:
        times = ", ".join(f"{n} {c['ms_per_batch']:.4g} ms" for n, c in timed.items())
        parts.append(f"({times} per batch of {selection['batch_size']}{'; cached' if selection['cached'] else ''})")
    parts.append(f"because {selection['reason']}")
    return " ".join(parts)


def decide(ms: Mapping[str, float]) -> tuple[str, str]:
    """eager vs onnxruntime from median ms per batch (:data:`MIN_GAIN` rule)."""
    eager, ort = ms["eager"], ms["onnxruntime"]
    speedup = eager / ort
    if speedup >= MIN_GAIN:
        return "onnxruntime", f"ONNX Runtime measured {speedup:.2f}× eager here (≥ {MIN_GAIN:g}× needed)"
    if speedup > 1:
        return "eager", f"ONNX Runtime measured only {speedup:.2f}× eager here (< {MIN_GAIN:g}×: within noise)"
    return "eager", f"eager measured {1 / speedup:.2f}× ONNX Runtime here"


def select(model: RadFlashModel, *, batch_size: int | None = None,
           build: Callable[[str], EncoderBackend], importable: Callable[[str], bool]) -> tuple[
               EncoderBackend, dict[str, Any]]:
    """The backend ``auto`` resolves to for ``model`` and the record of how (see the module docstring).

    ``build(name)`` makes a backend; ``importable(module)`` says whether an optional library is installed.
    """
    from radflash.backends.eager import EagerBackend

    size = model.config.image_size
    if model.device.type == "cuda":
        name, why = (("tensorrt", "tensorrt is importable and the model is on CUDA") if importable("tensorrt") else
                     ("compile", "the model is on CUDA and tensorrt is not installed (torch.compile + CUDA graphs)"))
        return build(name), _record(name, f"{why}; fixed rule, not measured (building a candidate takes minutes)",
                                    measured=False, batch_size=batch_size, image_size=size)
    if model.dtype != torch.float32:
        return EagerBackend(model), _record(
            "eager", f"CPU with dtype {str(model.dtype).removeprefix('torch.')} (ONNX Runtime's CPU graph is float32)",
            measured=False, batch_size=batch_size, image_size=size)
    if not importable("onnxruntime"):
        return EagerBackend(model), _record(
            "eager", "onnxruntime is not installed, so there is nothing to compare with (pip install onnxruntime)",
            measured=False, batch_size=batch_size, image_size=size)

    b = int(batch_size or DEFAULT_BATCH)
    if b < 1:
        raise InputError(f"batch size must be ≥ 1, got {b}")
    key = selection_key(model, batch_size=b, image_size=size)
    digest, path = _digest(key), cache_path()
    entries = _read_cache(path)
    hit = entries.get(digest)
    if isinstance(hit, dict) and hit.get("key") == key and hit.get("chosen") in ("eager", "onnxruntime"):
        record = {**hit, "cached": True, "cache_file": str(path)}
        if record["chosen"] == "eager":
            return EagerBackend(model), record
        try:
            return build("onnxruntime"), record
        except (BackendUnavailable, InputError) as exc:  # e.g. the export fails now: auto never blocks inference
            record.update(chosen="eager", reason=f"{record['reason']}, but onnxruntime is unavailable now ({exc})")
            return EagerBackend(model), record

    eager = EagerBackend(model)
    try:
        ort = build("onnxruntime")
    except (BackendUnavailable, InputError) as exc:  # missing onnx/onnxscript, a failed export: eager, and why
        return eager, _record("eager", f"the onnxruntime backend could not be built ({exc})", measured=False,
                              batch_size=b, image_size=size, key=key)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(b, 3, size, size, generator=gen).to(device=model.device, dtype=model.dtype)
    samples = measure({"eager": eager, "onnxruntime": ort}, pixels)
    ms = {n: 1e3 * statistics.median(s) for n, s in samples.items()}
    chosen, reason = decide(ms)
    candidates = {n: {"ms_per_batch": round(ms[n], 4), "iterations": len(samples[n]),
                      "samples_ms": [round(1e3 * x, 4) for x in samples[n]]} for n in samples}
    record = _record(chosen, reason, measured=True, batch_size=b, image_size=size, candidates=candidates, key=key)
    record["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries[digest] = record
    _write_cache(path, entries)
    record["cache_file"] = str(path)
    return (ort if chosen == "onnxruntime" else eager), record
