"""Every backend available here vs eager on random images; bucket padding; auto's measured choice; TensorRT.

Tolerances (max |backend − eager| / max |eager|, random tiny model at 56² = 17 tokens):
compile 1e-4 (inductor reorders fp32 reductions), onnxruntime fp32 1e-3 (the export bound),
onnxruntime int8 0.15 with mean error ≤ 6% of the mean |token| (8-bit activations through 6
layers of a random, unstructured model; measured 3.4%).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.backends import make_backend
from radflash.backends.buckets import bucket_for, pad_to, plan, run_bucketed
from radflash.backends.tensorrt import build_engine, engine_cache_key, network_plan
from radflash.checkpoints.factory import random_checkpoint
from radflash.errors import BackendUnavailable, InputError
from radflash.models.config import preset

SIZE = 56  # 4×4 patches + CLS: keeps CPU compile and export fast


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def model() -> RadFlashModel:
    cfg = dataclasses.replace(preset("tiny"), image_size=SIZE)
    return RadFlashModel(random_checkpoint(cfg, seed=3), device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("radflash-cache")


def pixels(b: int) -> torch.Tensor:
    return torch.randn(b, 3, SIZE, SIZE)


def eager(model: RadFlashModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.module.image_tokens(x)


# ---- buckets ------------------------------------------------------------------------------------
def test_bucket_plan() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 17, 64)] == [1, 2, 4, 8, 32, 64]
    assert plan(3) == [(0, 3, 4)]
    assert plan(130) == [(0, 64, 64), (64, 128, 64), (128, 130, 2)]
    assert plan(7, (2, 8)) == [(0, 7, 8)]
    with pytest.raises(InputError):
        bucket_for(65)
    assert pad_to(torch.ones(3, 2), 4)[3].abs().sum() == 0


def test_run_bucketed_keeps_rows_and_shapes() -> None:
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x * 2

    x = torch.randn(11, 5)
    torch.testing.assert_close(run_bucketed(fn, x, (1, 4)), x * 2)
    assert seen == [4, 4, 4]  # 4 + 4 + (3 padded to 4)


# ---- parity with eager ---------------------------------------------------------------------------
def test_eager_backend_is_the_module(model: RadFlashModel) -> None:
    x = pixels(2)
    torch.testing.assert_close(model.encode_images(pixels=x), eager(model, x))


@pytest.mark.slow
def test_compile_matches_eager_and_padding_never_mixes_images(model: RadFlashModel) -> None:
    backend = make_backend("compile", model, buckets=(4,))  # one bucket: one CPU compile (~40 s)
    x = pixels(3)  # padded to 4; single images below are padded with 3 zero images
    with torch.inference_mode():
        together = backend.encode(x)
        alone = torch.cat([backend.encode(x[i:i + 1]) for i in range(3)])
        shuffled = backend.encode(x.flip(0)).flip(0)
    ref = eager(model, x)
    assert together.shape == ref.shape
    assert rel_err(together, ref) < 1e-4
    # image i gives the same tokens alone (+3 padding rows) and among others, in any position
    assert rel_err(alone, together) < 1e-4
    assert rel_err(shuffled, together) < 1e-4


def test_onnxruntime_fp32_matches_eager_and_caches(model: RadFlashModel, cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RADFLASH_CACHE", str(cache))
    backend = make_backend("onnxruntime", model)
    assert backend.onnx_path.parent == cache / "onnx" and f"{SIZE}px-fp32-opset" in backend.onnx_path.name
    stamp = backend.onnx_path.stat().st_mtime_ns
    for b in (1, 5):  # dynamic batch axis: no padding needed
        x = pixels(b)
        got = backend.encode(x)
        assert got.shape == (b, 17, 192) and got.dtype == model.dtype
        assert rel_err(got, eager(model, x)) < 1e-3
    again = make_backend("onnxruntime", model)  # cached graph reused, not re-exported
    assert again.onnx_path == backend.onnx_path and again.onnx_path.stat().st_mtime_ns == stamp
    # through the public API too
    model.set_backend("onnxruntime")
    try:
        x = pixels(2)
        assert rel_err(model.encode_images(pixels=x), eager(model, x)) < 1e-3
    finally:
        model.set_backend("eager")


def test_onnxruntime_int8_without_a_graph_is_quantised_dynamically(model: RadFlashModel, cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No calibrated graph: the cached fp32 graph quantised dynamically (int8 weights, per-batch activation
    scales); same loose bound as the calibrated graph below."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RADFLASH_CACHE", str(cache))
    backend = make_backend("onnxruntime", model, precision="int8")
    assert "-int8dyn-" in backend.onnx_path.name and backend.onnx_path.parent == cache / "onnx"
    x = pixels(3)
    got, ref = backend.encode(x), eager(model, x)
    assert rel_err(got, ref) < 0.15 and 0 < float((got - ref).abs().mean() / ref.abs().mean()) < 0.06


def test_onnxruntime_int8_matches_eager_loosely(model: RadFlashModel, cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    from radflash.backends.export import export_onnx
    from radflash.calibration.quantize import quantize_onnxruntime

    monkeypatch.setenv("RADFLASH_CACHE", str(cache))
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, validate=False)
    # smooth, image-like calibration inputs, preprocessed like real ones
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    calib = [(0.5 + 0.4 * torch.sin(4 * xx + i) * torch.cos(3 * yy)).clamp(0, 1) for i in range(8)]
    quantize_onnxruntime(fp32, tmp_path / "int8.onnx", model.preprocess(calib))
    backend = make_backend("onnxruntime", model, precision="int8", onnx_path=tmp_path / "int8.onnx")
    held = model.preprocess([(0.5 + 0.4 * torch.cos(5 * xx + i) * torch.sin(2 * yy)).clamp(0, 1) for i in range(3)])
    got, ref = backend.encode(held), eager(model, held)
    assert rel_err(got, ref) < 0.15
    assert float((got - ref).abs().mean() / ref.abs().mean()) < 0.06


def test_unknown_and_unavailable_backends(model: RadFlashModel) -> None:
    with pytest.raises(InputError, match="unknown backend"):
        make_backend("jax", model)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
            make_backend("tensorrt", model)


# ---- auto: measured, cached, recorded ------------------------------------------------------------
class FakeOrt:
    """Stands in for the ONNX Runtime (or, named so, the OpenVINO) backend: eager's numbers under another name
    (no export needed); ``noise[label]`` > 0 makes that candidate disagree with float32 (the agreement check
    must refuse it); ``builds`` records each build's (label, batch_size)."""

    name = "onnxruntime"
    noise: ClassVar[dict[str, float]] = {}
    builds: ClassVar[list[tuple[str, int | None]]] = []

    def __init__(self, model: RadFlashModel, precision: str = "fp32", name: str = "onnxruntime",
                 batch_size: int | None = None) -> None:
        self.module = model.module
        self.precision = precision
        self.name = name
        self.batch_size = batch_size
        FakeOrt.builds.append((f"{name}/{precision}", batch_size))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.module.image_tokens(pixels)
        label = f"{self.name}/{self.precision}"
        noise = self.noise.get(f"{label}@{self.batch_size}", self.noise.get(label, 0.0))  # "@8": built for batch 8
        return tokens + noise * tokens.abs().max() * torch.randn_like(tokens)


@pytest.fixture
def fake_auto(model: RadFlashModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private cache, onnxruntime 'installed' as :class:`FakeOrt`, a CPU with native bf16, and a clock that
    reads from a script.

    ``clock.script[label]`` is the list of seconds the next calls of that candidate take (``eager/fp32``,
    ``onnxruntime/int8``..., warm-up included); ``clock.calls`` counts every call, ``clock.shapes`` records
    the batches timed. Every call really encodes (the agreement check needs the tokens).
    """
    import radflash.backends as backends
    import radflash.devices as devices
    from radflash.backends import auto

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
    monkeypatch.setattr(backends, "_importable", lambda name: name == "onnxruntime")
    real_build = backends._build
    monkeypatch.setattr(backends, "_build", lambda name, m, opts: FakeOrt(m, name=name, **opts)
                        if name in ("onnxruntime", "openvino") else real_build(name, m, opts))
    clock = SimpleNamespace(script={}, calls={}, shapes=[])

    def fake_time(backend, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
        name = f"{backend.name}/{backend.precision}"
        clock.calls[name] = clock.calls.get(name, 0) + 1
        clock.shapes.append(tuple(pixels.shape))
        return clock.script[name].pop(0), backend.encode(pixels)

    monkeypatch.setattr(auto, "time_encode", fake_time)
    monkeypatch.setattr(FakeOrt, "noise", {})
    monkeypatch.setattr(FakeOrt, "builds", [])
    return clock


def noisy(seconds: float, n: int) -> list[float]:
    """``n`` timings ±1% around ``seconds``."""
    return (seconds * (1 + 0.01 * (2 * torch.rand(n, dtype=torch.float64) - 1))).tolist()


def script_for(eager_s: float, speedup: float, **others: float) -> dict[str, list[float]]:
    """Warm-up + ITERATIONS timings: eager fp32 at eager_s, ONNX Runtime fp32 ``speedup`` × faster, and any
    other candidate (``onnxruntime_int8=3.0``: its speedup over eager fp32)."""
    from radflash.backends.auto import ITERATIONS, WARMUP

    n = WARMUP + ITERATIONS
    script = {"eager/fp32": noisy(eager_s, n), "onnxruntime/fp32": noisy(eager_s / speedup, n)}
    for key, gain in others.items():
        script[key.replace("_", "/")] = noisy(eager_s / gain, n)
    return script


@pytest.mark.parametrize(("speedup", "expected"), [
    (1.7, "onnxruntime"), (2.5, "onnxruntime"), (1.02, "eager"), (2 / 3, "eager"), (1 / 2.2, "eager")])
def test_auto_times_both_and_keeps_the_faster(model: RadFlashModel, fake_auto, speedup: float, expected: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from radflash.backends.auto import FAR, ITERATIONS, SCREEN, WARMUP

    eager_s = float(torch.empty(()).uniform_(0.005, 0.5))
    fake_auto.script = script_for(eager_s, speedup)
    fake_auto.script_copy = {k: list(v) for k, v in fake_auto.script.items()}
    timed = {k: v[WARMUP:] for k, v in fake_auto.script.items()}  # the timed calls (the warm-up is not one)
    batch = int(torch.randint(1, 6, ()))
    with caplog.at_level(logging.INFO, logger="radflash.backends"):
        backend = make_backend("auto", model, batch_size=batch, buckets=(1, 2))  # other options are ignored
    sel = backend.selection
    assert backend.name == expected == sel["chosen"] and sel["precision"] == "fp32"  # the model's (float32) precision
    assert sel["measured"] and not sel["cached"]
    # the screen: one timed batch each; a candidate more than SCREEN× slower than the other is not timed again,
    # and neither is the one left alone (the second call only separates close candidates); both runtimes' first
    # calls cost about a steady one, so a warm-up more than FAR × SCREEN × the other's screens out on its own
    ratio = max(speedup, 1 / speedup)  # ±1% noise: every ratio here is ≥ 5% from SCREEN and FAR × SCREEN
    slower = None if ratio < SCREEN else ("eager/fp32" if speedup > 1 else "onnxruntime/fp32")
    runs = {n: ITERATIONS if slower is None else 0 if n == slower and ratio > FAR * SCREEN else 1 for n in timed}
    assert fake_auto.calls == {n: WARMUP + k for n, k in runs.items()}
    assert set(fake_auto.shapes) == {(batch, 3, SIZE, SIZE)}  # timed at the run's batch size
    for name, samples in timed.items():  # ms are recorded rounded to 4 decimals: half a unit in the last place
        c = sel["candidates"][name]
        assert c["status"] == ("screened out" if name == slower else "timed") and c["max_abs_dprob"] == 0.0
        if runs[name] == 0:  # screened out on its warm-up
            warm = fake_auto.script_copy[name][0]
            assert c["screened_on"] == "warm-up" and c["screen_ms"] == pytest.approx(1e3 * warm, abs=5e-5)
            assert "ms_per_batch" not in c
            continue
        assert c["ms_per_batch"] == pytest.approx(1e3 * min(samples[:runs[name]]), abs=5e-5)  # the fastest call
        assert c["iterations"] == runs[name]
    assert sel["finalists"] == [n for n in timed if n != slower] and sel["screen_batch"] == batch
    assert sel["measure_s"] >= 0 and sel["build_s"] >= 0
    assert sel["batch_size"] == batch and sel["image_size"] == SIZE and sel["reason"]
    # the log line carries both measurements, not just the verdict
    line = next(r.getMessage() for r in caplog.records if "auto →" in r.getMessage())
    assert f"auto → {expected}/fp32" in line and "eager/fp32" in line and "onnxruntime/fp32" in line and " ms" in line


def test_auto_dtype_chooses_runtime_and_precision_together(model: RadFlashModel, fake_auto) -> None:
    """--backend auto --dtype auto: eager fp32/bf16 and ONNX Runtime fp32/int8 all screened, the two within
    SCREEN× of the fastest timed again; the fastest that agrees wins, and the encoder it returns runs in that
    precision."""
    fake_auto.script = script_for(0.05, 2.0, eager_bf16=1.4, onnxruntime_int8=2.5)
    backend = make_backend("auto", model, batch_size=2, precision="auto")
    sel = backend.selection
    assert (sel["chosen"], sel["precision"]) == ("onnxruntime", "int8") == (backend.name, backend.precision)
    status = {k: (c["status"], c["iterations"]) for k, c in sel["candidates"].items() if "iterations" in c}
    # eager bf16: 1.79× the fastest warm-up (±2% noise; < FAR × SCREEN = 1.95, > SCREEN): one timed call to know
    assert status == {"eager/bf16": ("screened out", 1),
                      "onnxruntime/fp32": ("timed", 2), "onnxruntime/int8": ("timed", 2)}
    eager = sel["candidates"]["eager/fp32"]  # 2.5× the fastest warm-up (> FAR × SCREEN): never timed
    assert eager["status"] == "screened out" and eager["screened_on"] == "warm-up"
    assert fake_auto.calls["eager/fp32"] == 1
    assert sel["candidates"]["openvino/bf16"]["status"] == "left out"  # not installed (here: faked absent)
    bf16 = sel["candidates"]["eager/bf16"]["max_abs_dprob"]
    assert 0 < bf16 <= sel["agreement_bound"] == 0.02  # bf16 really ran, and agreed

    # --backend eager --dtype auto: only eager's precisions
    fake_auto.script = script_for(0.05, 1.0, eager_bf16=1.6)
    eager_only = make_backend("eager", model, batch_size=2, precision="auto")
    assert (eager_only.name, eager_only.precision) == ("eager", "bf16")
    assert set(eager_only.selection["candidates"]) <= {"eager/fp32", "eager/bf16", "eager/fp16"}


def test_auto_refuses_a_candidate_that_disagrees(model: RadFlashModel, fake_auto) -> None:
    FakeOrt.noise["onnxruntime/fp32"] = 0.5  # tokens off by half their scale: probabilities move far beyond 0.02
    fake_auto.script = script_for(0.05, 4.0)  # and it would be by far the fastest
    backend = make_backend("auto", model, batch_size=3)
    sel = backend.selection
    assert backend.name == sel["chosen"] == "eager"
    refused = sel["candidates"]["onnxruntime/fp32"]
    assert refused["status"] == "refused" and refused["max_abs_dprob"] > 0.02 and "ms_per_batch" not in refused
    assert fake_auto.calls["onnxruntime/fp32"] == 1 and fake_auto.calls["eager/fp32"] == 1 + 1  # never timed
    # (eager, left alone after the screen, is timed once: a second call would have nothing to separate)


def test_auto_screen_never_lets_a_refused_candidate_win_or_set_the_pace(model: RadFlashModel, fake_auto) -> None:
    """The fastest candidate disagrees: refused on its warm-up, never timed, and not the yardstick of the screen
    (measured against it, every other candidate would be screened out)."""
    from radflash.backends.auto import ITERATIONS, WARMUP

    FakeOrt.noise["onnxruntime/int8"] = 0.5
    fake_auto.script = script_for(0.05, 1.4, eager_bf16=1.2, onnxruntime_int8=10.0)
    backend = make_backend("auto", model, batch_size=2, precision="auto")
    sel = backend.selection
    assert (backend.name, backend.precision) == ("onnxruntime", "fp32") == (sel["chosen"], sel["precision"])
    c = sel["candidates"]
    assert c["onnxruntime/int8"]["status"] == "refused" and "ms_per_batch" not in c["onnxruntime/int8"]
    assert fake_auto.calls == {"onnxruntime/int8": 1, "eager/fp32": WARMUP + 1, "eager/bf16": WARMUP + ITERATIONS,
                               "onnxruntime/fp32": WARMUP + ITERATIONS}
    assert c["eager/fp32"]["status"] == "screened out" and c["eager/bf16"]["status"] == "timed"  # 1.4× vs 1.17×
    assert c[sel["chosen"] + "/" + sel["precision"]]["max_abs_dprob"] <= 0.02


def test_auto_screen_survives_a_burst_of_load_and_only_finalists_win(model: RadFlashModel, fake_auto) -> None:
    """The screen takes the faster of warm-up and first timed call (load only adds time): the fastest candidate
    whose timed call was hit by a burst stays a finalist. A screened-out candidate never wins, even when the
    finalists' later calls are slower than its single one."""
    fake_auto.script = {  # warm-up, screen call, second call (finalists only), seconds per batch of 2
        "eager/fp32": [0.10, 0.10],
        "eager/bf16": [0.07, 0.06],  # 1.5× the fastest screen: out, although 0.06 < every finalist's best below
        "onnxruntime/fp32": [0.045, 0.08, 0.09],  # within 1.3×: a finalist
        "onnxruntime/int8": [0.04, 0.11, 0.10],  # the screen call hit by a burst (2.75×): still the fastest screen
    }
    sel = make_backend("auto", model, batch_size=2, precision="auto").selection
    c = sel["candidates"]
    assert {n: c[n]["status"] for n in fake_auto.script} == {
        "eager/fp32": "screened out", "eager/bf16": "screened out", "onnxruntime/fp32": "timed",
        "onnxruntime/int8": "timed"}
    assert c["onnxruntime/int8"]["screen_ms"] == 40.0 and c["eager/bf16"]["ms_per_batch"] == 60.0
    assert (sel["chosen"], sel["precision"]) == ("onnxruntime", "fp32")  # 80 ms: the fastest finalist
    assert "2.22× eager/fp32 in the screen at batch 2" in sel["reason"]  # 100 / 45 ms: the baseline rule, decided


def test_auto_large_model_screens_at_batch_1_and_confirms_finalists_at_the_run_batch(
        model: RadFlashModel, fake_auto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 8, a model that fills the GEMMs at batch 1 (here: SCREEN_TOKENS lowered to the tiny model's 16):
    seven candidates screened at batch 1; the three within SCREEN× confirmed at batch 8 as the run will use
    them (OpenVINO rebuilt for batch 8: its hint follows the batch), each agreement-checked again on the probe
    images; one disagrees only as built for batch 8 and is refused, one is pruned, the third wins."""
    import radflash.backends as backends
    from radflash.backends import auto

    monkeypatch.setattr(auto, "SCREEN_TOKENS", 16)
    monkeypatch.setattr(backends, "_importable", lambda name: name in ("onnxruntime", "openvino"))
    FakeOrt.noise["openvino/int8@8"] = 0.5
    e = 0.1  # eager fp32 at batch 1; the lists: warm-up and screen at batch 1, then warm-up and timed at 8
    fake_auto.script = {
        "eager/fp32": [e], "eager/bf16": [e / 1.3] * 2, "onnxruntime/fp32": [e / 1.1],  # > 1.95×: on warm-up
        "openvino/fp32": [e / 1.2] * 2,
        "onnxruntime/int8": [e / 1.9, e / 1.9, 0.5, 0.45],  # finalist (1.16×), 1.5× the fastest at 8: pruned
        "openvino/bf16": [e / 2.0, e / 2.0, 0.4, 0.3],  # finalist (1.1×), the fastest at 8, then alone
        "openvino/int8": [e / 2.2, e / 2.2, 0.2],  # the fastest screened; disagrees as built for batch 8
    }
    backend = make_backend("auto", model, batch_size=8, precision="auto")
    sel = backend.selection
    assert (backend.name, backend.precision, backend.batch_size) == ("openvino", "bf16", 8)  # the batch-8 build
    assert (sel["chosen"], sel["precision"], sel["screen_batch"], sel["batch_size"]) == ("openvino", "bf16", 1, 8)
    assert sel["finalists"] == ["onnxruntime/int8", "openvino/bf16", "openvino/int8"]
    assert all(not v for v in fake_auto.script.values())  # every scripted call ran, and no other
    assert [b for b, *_ in fake_auto.shapes[:12]] == [1] * 12 and [b for b, *_ in fake_auto.shapes[12:]] == [8] * 5
    assert sorted(FakeOrt.builds, key=str) == sorted(
        [("onnxruntime/fp32", None), ("onnxruntime/int8", None), ("openvino/fp32", 1), ("openvino/bf16", 1),
         ("openvino/int8", 1), ("openvino/bf16", 8), ("openvino/int8", 8)], key=str)  # only finalists rebuilt
    c = sel["candidates"]
    for name in ("eager/fp32", "eager/bf16", "onnxruntime/fp32", "openvino/fp32"):
        assert c[name]["status"] == "screened out" and c[name]["screen_ms"] > 0 and "ms_per_batch" not in c[name]
    assert c["openvino/int8"]["status"] == "refused" and c["openvino/int8"]["max_abs_dprob"] <= 0.02
    assert c["openvino/int8"]["max_abs_dprob_at_batch"] > 0.02 and "batch of 8" in c["openvino/int8"]["why"]
    assert c["onnxruntime/int8"]["status"] == "pruned" and c["onnxruntime/int8"]["samples_ms"] == [450.0]
    win = c["openvino/bf16"]
    assert win["status"] == "timed" and win["samples_ms"] == [300.0] and win["ms_per_batch"] == 300.0
    assert win["max_abs_dprob"] <= 0.02 and win["max_abs_dprob_at_batch"] <= 0.02 and len(win["warmup_ms"]) == 2
    assert "in the screen at batch 1" in sel["reason"] and "eager/fp32" in sel["reason"]  # the baseline was out
    line = auto.summary(sel)
    assert "screened out at batch 1: eager/fp32 100 ms" in line and "per batch of 8" in line and "measured in" in line


def test_final_batch_fits_what_the_screen_left_of_the_budget() -> None:
    """The run's batch where it fits the measurement budget, else the largest batch that does, never below the
    screen's batch."""
    from radflash.backends.auto import MEASURE_BUDGET_S, final_batch

    left = float(torch.empty(()).uniform_(5.0, 25.0))
    spent = MEASURE_BUDGET_S - left
    per_image = torch.empty(3).uniform_(0.1, 1.0).tolist()
    want = int(left // (3 * sum(per_image)))
    assert final_batch(64, 1, spent, per_image, calls=3) == max(1, min(64, want))
    assert final_batch(8, 1, spent, [left / 100], calls=1) == 8  # a lone fast finalist fits at the run's batch
    assert final_batch(8, 1, MEASURE_BUDGET_S + 5, per_image, calls=3) == 1  # the screen spent it all
    assert final_batch(8, 2, spent, [left], calls=3) == 2


def test_auto_on_a_slow_cpu_confirms_finalists_at_the_batch_the_budget_allows(
        model: RadFlashModel, fake_auto, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 8 on a CPU where the screen at batch 1 already cost 10.25 s and three finalists take 1.95 s an image
    together: confirming each with a warm-up and two timed batches of 8 would cost ~47 s more, so they run at the
    largest batch that fits the 30 s budget (3), still built for the run's batch 8."""
    import radflash.backends as backends
    from radflash.backends import auto

    monkeypatch.setattr(auto, "SCREEN_TOKENS", 16)
    monkeypatch.setattr(backends, "_importable", lambda name: name in ("onnxruntime", "openvino"))
    fake_auto.script = {
        "eager/fp32": [1.25], "onnxruntime/fp32": [1.2],  # > 1.95× the fastest warm-up: out on it
        "eager/bf16": [0.95] * 2, "openvino/fp32": [1.0] * 2,  # > 1.3× the fastest screen: out
        "openvino/int8": [0.6] * 2 + [1.8] * 3, "onnxruntime/int8": [0.65] * 2 + [1.95] * 3,
        "openvino/bf16": [0.7] * 2 + [2.1] * 3,
    }
    backend = make_backend("auto", model, batch_size=8, precision="auto")
    sel = backend.selection
    assert (backend.name, backend.precision, backend.batch_size) == ("openvino", "int8", 8)
    assert (sel["screen_batch"], sel["final_batch"], sel["batch_size"]) == (1, 3, 8)
    assert all(not v for v in fake_auto.script.values())
    assert [b for b, *_ in fake_auto.shapes] == [1] * 12 + [3] * 9
    assert sel["candidates"]["openvino/int8"]["ms_per_batch"] == 1800.0
    assert "per batch of 3" in auto.summary(sel)


def test_auto_lone_finalist_runs_only_its_checked_warm_up_at_the_run_batch(
        model: RadFlashModel, fake_auto, monkeypatch: pytest.MonkeyPatch) -> None:
    """One finalist out of the screen at batch 1 has nothing to be compared with at batch 8: it is rebuilt for 8
    and runs the agreement-checked warm-up there, whose time (set-up included) is its record; no timed call."""
    import radflash.backends as backends
    from radflash.backends import auto

    monkeypatch.setattr(auto, "SCREEN_TOKENS", 16)
    monkeypatch.setattr(backends, "_importable", lambda name: name in ("onnxruntime", "openvino"))
    e = float(torch.empty(()).uniform_(0.05, 0.5))  # eager fp32 at batch 1
    w8 = float(torch.empty(()).uniform_(2.0, 4.0)) * e  # the winner's warm-up at batch 8
    fake_auto.script = {name: [e / gain] * 2 for name, gain in (
        ("eager/bf16", 1.3), ("openvino/fp32", 1.2), ("onnxruntime/int8", 1.8), ("openvino/bf16", 1.9))}
    fake_auto.script.update({"eager/fp32": [e], "onnxruntime/fp32": [e / 1.1]})  # > 1.95× the fastest warm-up
    fake_auto.script["openvino/int8"] = [e / 2.5, e / 2.5, w8]  # 1.32× the next: the only finalist
    backend = make_backend("auto", model, batch_size=8, precision="auto")
    sel = backend.selection
    assert (backend.name, backend.precision, backend.batch_size) == ("openvino", "int8", 8)
    assert sel["finalists"] == ["openvino/int8"] and all(not v for v in fake_auto.script.values())
    assert [b for b, *_ in fake_auto.shapes] == [1] * 12 + [8]  # screen at 1, then one call at 8
    win = sel["candidates"]["openvino/int8"]
    assert win["status"] == "timed" and win["timed_from"] == "warm-up" and win["iterations"] == 0
    assert win["ms_per_batch"] == pytest.approx(1e3 * w8, abs=5e-5) and win["max_abs_dprob_at_batch"] <= 0.02
    assert "2.50× eager/fp32 in the screen at batch 1" in sel["reason"]
    assert "(warm-up)" in auto.summary(sel)


@pytest.mark.parametrize(("grid", "b", "n", "expected"), [
    (37, 1, 7, 1), (37, 2, 7, 2), (37, 8, 7, 1), (37, 8, 2, 8), (14, 8, 7, 8), (32, 8, 3, 1)])
def test_screen_batch(grid: int, b: int, n: int, expected: int) -> None:
    """Batch 1 for a large model (base at 518²: 37² patches) at a large run batch with more than two candidates;
    otherwise the run's batch (the demo at 224²: 14² patches)."""
    from radflash.backends.auto import screen_batch

    assert screen_batch(SimpleNamespace(config=SimpleNamespace(grid=grid)), b, n) == expected


def test_auto_never_times_bf16_without_native_bf16(model: RadFlashModel, fake_auto,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash.devices as devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only EPYC
    fake_auto.script = script_for(0.05, 1.2, onnxruntime_int8=2.0)
    sel = make_backend("auto", model, batch_size=2, precision="auto").selection
    assert not any(k.endswith(("/bf16", "/fp16")) for k in fake_auto.calls)
    assert "not native" in sel["candidates"]["eager/bf16"]["why"] and sel["precision"] != "bf16"
    assert sel["key"]["cpu_flags"] == ["avx2", "fma"]


def test_auto_decision_is_cached_per_key(model: RadFlashModel, fake_auto, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash
    import radflash.devices as devices
    from radflash.backends import auto
    from radflash.backends.auto import CACHE_FILE, summary

    fake_auto.script = script_for(0.02, 3.0)
    first = make_backend("auto", model, batch_size=2).selection
    assert first["chosen"] == "onnxruntime" and not first["cached"]
    assert Path(first["cache_file"]) == tmp_path / "cache" / CACHE_FILE and Path(first["cache_file"]).is_file()
    calls = dict(fake_auto.calls)

    again = make_backend("auto", model, batch_size=2)
    assert again.selection["cached"] and again.name == "onnxruntime" and fake_auto.calls == calls  # not re-timed
    assert again.selection["candidates"] == first["candidates"]
    assert again.selection["measure_s"] == first["measure_s"] and "cached" in summary(again.selection)

    # any part of the key changing means measuring again: the batch size, a version, the CPU's flags,
    # the threads, the request
    changes = [
        lambda: None,  # batch 3 below
        lambda: monkeypatch.setattr(radflash, "__version__", radflash.__version__ + ".post1"),
        lambda: monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "amx_bf16"})),
        lambda: monkeypatch.setattr(torch, "get_num_threads", lambda: 7),
        lambda: monkeypatch.setattr(auto, "SCREEN", 1.5),  # the method itself
        lambda: monkeypatch.setattr(auto, "FAR", 2.0),
    ]
    for i, change in enumerate(changes):
        change()
        fake_auto.script = script_for(0.02, 0.5)
        sel = make_backend("auto", model, batch_size=3 if i == 0 else 2).selection
        assert not sel["cached"] and sel["measured"] and sel["chosen"] == "eager", i
    assert sel["key"]["radflash"].endswith(".post1") and sel["key"]["torch_threads"] == 7
    fake_auto.script = script_for(0.02, 0.5, eager_bf16=0.9, onnxruntime_int8=0.8)
    assert not make_backend("auto", model, batch_size=2, precision="auto").selection["cached"]


def test_auto_survives_a_corrupt_cache(model: RadFlashModel, fake_auto, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    from radflash.backends.auto import CACHE_FILE, CACHE_SCHEMA

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_FILE).write_text("{not json")
    fake_auto.script = script_for(0.01, 2.0)
    with caplog.at_level(logging.WARNING, logger="radflash.backends"):
        sel = make_backend("auto", model, batch_size=1).selection
    assert sel["measured"] and not sel["cached"] and "ignoring the backend cache" in caplog.text
    assert json.loads((tmp_path / "cache" / CACHE_FILE).read_text())["schema"] == CACHE_SCHEMA  # rewritten whole


@pytest.mark.parametrize(("device", "dtype", "has", "expected", "why"), [
    ("cuda", torch.bfloat16, {"tensorrt", "onnxruntime"}, "tensorrt", "tensorrt is importable"),
    ("cuda", torch.bfloat16, {"onnxruntime"}, "compile", "tensorrt is not installed"),
    ("cpu", torch.float32, set(), "eager", "the only candidate"),
    ("cpu", torch.bfloat16, {"onnxruntime"}, "eager", "float32 module"),
])
def test_auto_without_a_measurement_says_why(device: str, dtype: torch.dtype, has: set[str], expected: str,
                                             why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.backends import auto

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "time_encode", lambda *a: pytest.fail("nothing should be timed"))
    fake = SimpleNamespace(device=torch.device(device), dtype=dtype, module=None, precision="fp32",
                           config=SimpleNamespace(image_size=SIZE))
    backend, sel = auto.select(fake, batch_size=4, build=lambda name, *a: SimpleNamespace(name=name),
                               importable=lambda name: name in has, precision="fp32")
    assert backend.name == expected == sel["chosen"] and why in sel["reason"]
    assert not sel["measured"] and not any(c.get("ms_per_batch") for c in sel["candidates"].values())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("error", [BackendUnavailable("onnxscript is not installed"),
                                   InputError("enc.onnx: ONNX export failed (KeyError: 'x')")])
def test_auto_falls_back_to_eager_when_onnxruntime_cannot_be_built(model: RadFlashModel, error: Exception,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.backends import auto
    from radflash.backends.eager import EagerBackend

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path))

    def build(name: str, precision: str | None = None):
        if name == "eager":
            return EagerBackend(model, precision=precision)
        raise error

    backend, sel = auto.select(model, batch_size=2, build=build, importable=lambda name: name == "onnxruntime",
                               precision="fp32")
    assert backend.name == sel["chosen"] == "eager" and str(error) in sel["reason"] and not sel["measured"]
    assert not any(tmp_path.iterdir())  # a failure is not cached as a decision


def test_auto_really_measures_every_installed_candidate(model: RadFlashModel, cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No fakes: every candidate this machine offers built, checked and timed here; the winner encodes like
    eager within its precision's bound."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RADFLASH_CACHE", str(cache))
    backend = make_backend("auto", model, batch_size=2, precision="auto")
    sel = backend.selection
    ran = {k: c for k, c in sel["candidates"].items() if "max_abs_dprob" in c}
    assert sel["measured"] and {"eager/fp32", "onnxruntime/fp32"} <= set(ran)
    assert all(c["max_abs_dprob"] <= 0.02 for c in ran.values() if c["status"] != "refused")
    assert all(c["ms_per_batch"] > 0 for c in ran.values() if c["status"] == "timed")
    assert (backend.name, backend.precision) == (sel["chosen"], sel["precision"])
    x = pixels(2)
    bound = {"fp32": 1e-3, "bf16": 0.05, "fp16": 0.01, "int8": 0.15}[backend.precision]
    with torch.inference_mode():
        assert rel_err(backend.encode(x), eager(model, x)) < bound


def test_score_manifest_records_the_choice(model: RadFlashModel, fake_auto, tmp_path: Path) -> None:
    from radflash.archive.verb import score
    from radflash.synthetic.dicom_archive import write_archive

    write_archive(tmp_path / "archive", 3, seed=int(torch.randint(0, 2**16, ())))
    fake_auto.script = script_for(0.05, 1.5, eager_bf16=1.2, onnxruntime_int8=1.1)
    run = score(tmp_path / "archive", tmp_path / "out", model=model, backend="auto", dtype="auto", batch_size=2,
                workers=0, progress=False)
    written = json.loads(run.manifest_path.read_text())
    sel = written["backend_selection"]
    assert written["backend"] == sel["chosen"] == "onnxruntime" and written["precision"] == sel["precision"] == "fp32"
    assert sel["batch_size"] == 2 and written["dtype"] == "float32"
    timed = {n: (c["status"], c["iterations"]) for n, c in sel["candidates"].items() if "iterations" in c}
    assert timed == {"eager/fp32": ("screened out", 1), "eager/bf16": ("timed", 2), "onnxruntime/fp32": ("timed", 2),
                     "onnxruntime/int8": ("screened out", 1)}  # 1.5× and 1.36× slower than the fastest: out
    assert all(sel["candidates"][n]["max_abs_dprob"] <= 0.02 for n in timed)
    assert sel["measure_s"] >= 0 and sel["build_s"] >= 0 and sel["finalists"] == ["eager/bf16", "onnxruntime/fp32"]
    assert run.scored == 3
    model.set_backend("eager", dtype="float32")


def test_score_cli_shows_the_measurement(fake_auto, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radflash.checkpoints.format import save_checkpoint
    from radflash.cli import cli
    from radflash.synthetic.dicom_archive import write_archive

    cfg = dataclasses.replace(preset("tiny"), image_size=SIZE)
    ckpt = save_checkpoint(random_checkpoint(cfg, seed=4), tmp_path / "ckpt")
    write_archive(tmp_path / "archive", 2, seed=int(torch.randint(0, 2**16, ())))
    fake_auto.script = script_for(0.04, 0.5)  # eager twice as fast
    res = CliRunner().invoke(cli, ["score", str(tmp_path / "archive"), "-o", str(tmp_path / "out"), "--model",
                                   str(ckpt), "--backend", "auto", "--dtype", "float32", "--batch-size", "2",
                                   "--workers", "0"], env={"COLUMNS": "400"})  # one table row per line
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "backend choice" in x)
    assert "auto → eager/fp32 (eager/fp32 " in line and "ms per batch of 2" in line
    assert "screened out at batch 2: onnxruntime/fp32 " in line and " ms (warm-up)" in line  # 2× behind: warm-up only


# ---- TensorRT: everything up to the real library ---------------------------------------------------
class FakeTRT:
    """Records what build_engine asks of TensorRT."""

    def __init__(self, version: str) -> None:
        self.__version__ = version
        self.calls: list[tuple] = []
        rec = self.calls

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None: ...

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.append(("profile", name, lo, opt, hi))

        class Config:
            def set_flag(self, flag):
                rec.append(("flag", flag))

            def add_optimization_profile(self, p):
                rec.append(("add_profile",))

        class Builder:
            def __init__(self, logger) -> None: ...

            def create_network(self, flags):
                rec.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan-bytes"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger) -> None: ...

            def parse_from_file(self, path):
                rec.append(("parse", path))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
        self.BuilderFlag = SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8")


@pytest.mark.parametrize(("version", "precision", "strong", "flags", "graph"), [
    ("10.7.0", "fp16", False, ("FP16",), "fp32"),
    ("10.7.0", "bf16", False, ("BF16",), "fp32"),
    ("10.7.0", "fp32", False, (), "fp32"),
    ("10.7.0", "int8", False, ("INT8",), "int8"),
    ("11.0.0", "fp16", True, (), "fp16"),
    ("11.2.1", "bf16", True, (), "bf16"),
])
def test_network_plan_by_version(version: str, precision: str, strong: bool, flags: tuple, graph: str) -> None:
    plan = network_plan(FakeTRT(version), precision)
    assert (plan.strongly_typed, plan.flags, plan.onnx_precision) == (strong, flags, graph)


def test_network_plan_rejects_old_versions_and_bad_precision() -> None:
    with pytest.raises(BackendUnavailable):
        network_plan(FakeTRT("8.6.1"), "fp16")
    with pytest.raises(InputError):
        network_plan(FakeTRT("10.0.0"), "fp8")


@pytest.mark.parametrize("version", ["10.7.0", "11.0.0"])
def test_build_engine_with_fake_tensorrt(version: str, tmp_path: Path) -> None:
    trt = FakeTRT(version)
    out = build_engine(tmp_path / "g.onnx", tmp_path / "e.plan", precision="fp16", image_size=518, opt_batch=8,
                       max_batch=32, trt=trt)
    assert out.read_bytes() == b"plan-bytes"
    assert ("network", 1 << 5 if version.startswith("11") else 0) in trt.calls
    assert (("flag", "FP16") in trt.calls) == version.startswith("10")
    assert ("profile", "pixels", (1, 3, 518, 518), (8, 3, 518, 518), (32, 3, 518, 518)) in trt.calls
    with pytest.raises(InputError):
        build_engine(tmp_path / "g.onnx", tmp_path / "e.plan", precision="fp16", image_size=518, opt_batch=64,
                     max_batch=32, trt=trt)


def test_engine_cache_key_names_everything_that_invalidates_a_plan() -> None:
    kw = dict(model_key="ab" * 32, precision="fp16", image_size=518, min_batch=1, opt_batch=16, max_batch=64,
              trt_version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3")
    key = engine_cache_key(**kw)
    assert key == "abababababababab-518px-fp16-b1-16-64-trt10.7.0-nvidia-h100-80gb-hbm3.plan"
    for field, value in (("trt_version", "11.0.0"), ("gpu_name", "NVIDIA A100"), ("precision", "bf16"),
                         ("model_key", "cd" * 32), ("max_batch", 32)):
        assert engine_cache_key(**{**kw, field: value}) != key


@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_matches_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorrt")
    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path))
    cfg = dataclasses.replace(preset("tiny"), image_size=SIZE)
    cuda_model = RadFlashModel(random_checkpoint(cfg, seed=3), device="cuda", dtype="float32")
    backend = make_backend("tensorrt", cuda_model, precision="fp32", max_batch=8, opt_batch=4)
    x = torch.randn(3, 3, SIZE, SIZE, device="cuda")
    with torch.inference_mode():
        ref = cuda_model.module.image_tokens(x)
    assert rel_err(backend.encode(x), ref) < 1e-2  # TF32 may be used by TensorRT for fp32 GEMMs
