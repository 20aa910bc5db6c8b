"""``radflash bench``: the CLI end to end on the tiny model, the report's properties, the reference path."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from radflash.api import DEMO_MODEL, RadFlashModel
from radflash.bench.harness import encoder_flops
from radflash.bench.report import E2E, SCHEMA, SCORE, STAGES
from radflash.checkpoints.converters.radzero import released_to_native
from radflash.checkpoints.factory import random_checkpoint
from radflash.checkpoints.format import save_checkpoint
from radflash.cli import cli
from radflash.models.config import ModelConfig, TextConfig, VisionConfig, preset
from radflash.util.timing import StageClock, Stats, percentile
from tests.engine.bench.imports import radflash_imports

pytest.importorskip("transformers", reason="the reference path needs transformers (the 'bench' extra)")

ROW_KEYS = {"backend", "dtype", "batch_size", "stage", "images", "radflash", "reference", "ratio", "images_per_s",
            "reference_images_per_s", "limit"}
STATS_KEYS = {"n", "mean_ms", "median_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "samples_ms"}
TAILS = {"p95_ms", "p99_ms"}  # left out at the 3 iterations of the CLI run (p95 needs ≥ 20 samples)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (DEMO_MODEL / "model.safetensors").exists():
        return DEMO_MODEL
    return save_checkpoint(random_checkpoint("tiny", seed=0), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def bench_run(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "bench.json", "plot": out / "bench.png", "markdown": out / "bench.md"}
    args = ["bench", "--model", str(model_path), "--device", "cpu", "--iterations", "3", "--warmup", "1",
            "--batch-sizes", "1,2", "--archive-files", "2", "--threads", "1"]
    for flag, path in paths.items():
        args += [f"--{flag}", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result, paths


def test_cli_prints_a_table_with_ratios(bench_run) -> None:
    result, _ = bench_run
    out = result.output
    assert "ratio ref/rf" in out and "machine:" in out and "measured peaks:" in out
    for stage in ("preprocess", "encode", "head", "maps", E2E):
        assert stage in out
    assert out.count("×") >= 10  # every timed line carries reference time / radflash time
    assert "p95 ms" not in out and "p99 ms" not in out and "p95/p99 not shown: at most 3 samples" in out
    assert "TFLOP/s" in out and "GB/s" in out  # physical limits printed beside the results


def test_json_schema(bench_run) -> None:
    _, paths = bench_run
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == SCHEMA
    assert {"machine", "config", "peaks", "formulas", "rows", "memory", "skipped"} <= set(data)
    assert {"cpu", "cpu_cores_usable", "versions", "gpu", "date"} <= set(data["machine"])
    assert data["machine"]["versions"]["torch"]
    assert data["config"]["batch_sizes"] == [1, 2] and data["config"]["iterations"] == 3
    assert "vlcabs" not in data["config"]["reference"]  # the reference head is its own code
    assert data["peaks"]["matmul_flops_per_s"] > 0 and data["peaks"]["copy_bytes_per_s"] > 0
    assert {"encode", "head", "maps"} <= set(data["formulas"])
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        if row["backend"] == "openvino-standalone":  # the peer has no reference ratio (test_openvino_peer_row)
            continue
        assert set(row["radflash"]) == STATS_KEYS - TAILS and set(row["reference"]) == STATS_KEYS - TAILS
        assert len(row["radflash"]["samples_ms"]) == row["radflash"]["n"]
        assert math.isclose(row["ratio"], row["reference"]["median_ms"] / row["radflash"]["median_ms"])
        assert row["images_per_s"] > 0
    for mem in data["memory"]:
        assert mem["cpu_peak_rss_mb"] > 0 and mem["cuda_max_allocated_mb"] is None


def test_encoder_rows_carry_their_precision_and_gemm_fraction(bench_run) -> None:
    """Every encode row: backend and dtype in the JSON, and its fraction = achieved FLOP/s over the GEMM rate
    measured in its own precision in the same run; the OpenVINO standalone peer is timed in the same run."""
    _, paths = bench_run
    data = json.loads(paths["json"].read_text())
    rates = data["config"]["gemm_rates"]
    assert rates["fp32"] > 0
    encode = [r for r in data["rows"] if r["stage"] == "encode"]
    per_image = {r["limit"]["amount"] / r["batch_size"] for r in encode}
    assert len({round(x) for x in per_image}) == 1  # one FLOP count per image (the formula's test is below)
    for row in encode:
        prec = row["dtype"].removeprefix("default=")
        achieved = row["limit"]["amount"] / (row["radflash"]["median_ms"] / 1e3)
        assert row["limit"]["achieved_per_s"] == pytest.approx(achieved, rel=1e-9)
        assert row["limit"]["fraction"] == pytest.approx(achieved / rates[prec], rel=1e-9)
    assert {r["dtype"] for r in encode if r["backend"] == "eager"} == {"fp32"}
    try:
        import openvino  # noqa: F401
    except ImportError:
        return
    peer = [r for r in encode if r["backend"] == "openvino-standalone"]
    assert [r["batch_size"] for r in peer] == [1, 2] and all(r["dtype"].startswith("default=") for r in peer)


def test_stage_times_are_positive_and_sum_to_at_most_e2e(bench_run) -> None:
    _, paths = bench_run
    rows = json.loads(paths["json"].read_text())["rows"]
    for batch in (1, 2):
        group = {r["stage"]: r for r in rows if r["batch_size"] == batch and r["backend"] == "eager"}
        assert {"preprocess", "encode", "head", "maps", E2E} <= set(group)
        assert set(group) <= {*STAGES, E2E, SCORE}
        stages = [group[s] for s in STAGES if s in group]
        for side in ("radflash", "reference"):
            for r in [*stages, group[E2E]]:
                assert r[side]["min_ms"] > 0, (r["stage"], side)
            e2e = group[E2E][side]
            # stages are consecutive segments of the same timed iteration: per sample and on average
            for i, total in enumerate(e2e["samples_ms"]):
                assert sum(r[side]["samples_ms"][i] for r in stages) <= total + 1e-6
            assert sum(r[side]["mean_ms"] for r in stages) <= e2e["mean_ms"] + 1e-6


def test_png_and_markdown_are_written(bench_run) -> None:
    _, paths = bench_run
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = paths["markdown"].read_text()
    assert md.startswith("## ") and "| backend | B | stage |" in md and "versions:" in md


def test_bad_flags_are_one_line_errors(model_path: Path) -> None:
    runner = CliRunner()
    for args in (["--batch-sizes", "0,x"], ["--batch-sizes", "1,-2"], ["--batch-sizes", ""],
                 ["--model", "no-such-model"], ["--iterations", "0"]):
        result = runner.invoke(cli, ["bench", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["bench", "--model", str(model_path), "--device", "cpu", "--image-size", "100",
                                 "--iterations", "1", "--no-reference", "--archive-files", "0"])
    assert result.exit_code == 1 and "multiple of the patch size" in result.output


def test_bad_batch_sizes_in_a_real_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "radflash", "bench", "--batch-sizes", "0,x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: Invalid value for '--batch-sizes': expected comma-separated integers ≥ 1 such as 1,8,32; got '0,x'"]


# ---- the reference path --------------------------------------------------------------------------
SMALL = ModelConfig(
    vision=VisionConfig(hidden=48, layers=2, heads=4, mlp=96, pos_grid=4),
    text=TextConfig(vocab=300, hidden=48, layers=2, heads=4, mlp=96, max_positions=130, max_length=64),
    image_size=70,  # 5×5 patches on a 4×4 position table: exercises the transformers-4.39 interpolation
    mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3),
)


def test_reference_logits_equal_radflash() -> None:
    """What makes the ratios meaningful: same weights, same logits (the CLI run covers the tiny preset)."""
    from radflash.bench.reference import ReferenceRadZero

    cfg = SMALL
    model = RadFlashModel(random_checkpoint(cfg), device="cpu", dtype=torch.float32)
    ref = ReferenceRadZero.from_model(model)
    prompts = ["There is pleural effusion", "There is no pneumothorax of the left lung", "cardiomegaly"]
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    ours = model.score(tokens=model.encode_images(pixels=pixels), prompts=prompts).logits
    theirs = ref.logits(pixels, prompts)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert ours.std() > 0.05  # non-degenerate logits (random weights everywhere)


def test_native_to_released_inverts_the_converter() -> None:
    from radflash.bench.reference import native_to_released

    ckpt = random_checkpoint(SMALL)
    released = native_to_released(ckpt.state_dict, SMALL)
    pre = {"crop_size": {"height": 70, "width": 70}, "image_mean": list(SMALL.mean), "image_std": list(SMALL.std)}
    back, cfg = released_to_native(dict(released), {"vision_config": {"num_attention_heads": 4}}, pre)
    assert cfg == dataclasses.replace(SMALL, text=dataclasses.replace(SMALL.text, max_length=cfg.text.max_length))
    assert set(back) == set(ckpt.state_dict)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back[k], v), k


# ---- the reference head: independent code, equal results ---------------------------------------------
def spec_head64(tokens: torch.Tensor, text: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's formulas, literally, in float64: s = ⟨t̂, v̂⟩/τ, a = softmax(s), g = Σ a v̂, logit = ⟨t̂, ĝ⟩/τ."""
    v = torch.nn.functional.layer_norm(tokens.double(), (tokens.shape[-1],), weight.double(), bias.double(), eps)
    v = v / v.norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    s = torch.einsum("td,bnd->btn", t, v) / tau
    g = torch.einsum("btn,bnd->btd", torch.softmax(s, dim=-1), v)
    g = g / g.norm(dim=-1, keepdim=True)
    return torch.einsum("btd,td->bt", g, t) / tau, s[..., 1:]


@pytest.fixture(scope="module")
def small_pair():
    from radflash.bench.reference import ReferenceRadZero

    model = RadFlashModel(random_checkpoint(SMALL, seed=11), device="cpu", dtype=torch.float32)
    return model, ReferenceRadZero.from_model(model)


@pytest.mark.parametrize(("b", "t", "n"), [(1, 1, 17), (3, 5, 26), (2, 14, 37)])  # B = T = 1: no squeeze slips
def test_reference_head_equals_radflash_head(small_pair, b: int, t: int, n: int) -> None:
    model, ref = small_pair
    d = SMALL.vision.hidden
    tokens = 2 * torch.randn(b, n, d) + torch.randn(d)  # a shared offset per channel: the LayerNorm matters
    with torch.inference_mode():
        text = model.module.head_norm(torch.randn(t, d))  # prompts come through the shared LayerNorm
        ours, our_maps = model.module.head(tokens, text, return_maps=True)
        theirs, their_maps = ref.head(tokens, text, return_maps=True)
    norm = model.module.head_norm
    truth, truth_maps = spec_head64(tokens, text, norm.weight, norm.bias, norm.eps, model.tau)
    # fp32 error bound: unit-vector dot products over D terms carry ≲ D·eps each (×4 for the LayerNorm and
    # the normalisations); s scales it by 1/τ, and the softmax passes an error δs on to the logit ≲ δs/τ.
    eps, tau = torch.finfo(torch.float32).eps, model.tau
    maps_tol, logit_tol = 4 * d * eps / tau, 4 * d * eps / tau**2
    assert theirs.shape == ours.shape == (b, t) and their_maps.shape == our_maps.shape == (b, t, n - 1)
    for got, want, tol in ((ours, truth, logit_tol), (theirs, truth, logit_tol), (our_maps, truth_maps, maps_tol),
                           (their_maps, truth_maps, maps_tol)):
        assert float((got.double() - want).abs().max()) <= tol
    assert float((theirs - ours).abs().max()) <= 2 * logit_tol
    if b * t > 1:
        assert float(truth.std()) > 100 * logit_tol  # the logits vary far beyond the tolerance


def test_reference_module_imports_no_radflash_head_code() -> None:
    """By inspection: reference.py may use radflash's config and errors (and the API as a type), nothing else."""
    import ast

    import radflash.bench.reference as reference

    tree, used = radflash_imports(reference)  # radflash module → imported at run time
    allowed = ("radflash.errors", "radflash.models.config")  # plain data: exceptions and config sizes

    def module(name: str) -> str:  # "radflash.errors.InputError" → "radflash.errors"
        return next((a for a in allowed if name == a or name.startswith(f"{a}.")), name)

    forbidden = [m for m in used if module(m) not in allowed
                 and (m.startswith(("radflash.kernels", "radflash.models", "radflash.backends"))
                      or m.rsplit(".", 1)[-1] in {"kernels", "vlcabs", "vlcabs_ref", "upsample_maps"})]
    assert not forbidden
    runtime = {module(m) for m, at_runtime in used.items() if at_runtime}
    assert runtime <= set(allowed), runtime
    dynamic = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.startswith(("radflash.kernels", "radflash.models"))]
    assert not dynamic  # no importlib detour either


def test_reference_head_runs_without_radflash_kernels(small_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import radflash.kernels

    vlcabs_module = importlib.import_module("radflash.kernels.vlcabs_head")  # the attribute is the function
    radzero = importlib.import_module("radflash.models.radzero")

    def trap(*args, **kwargs):
        raise AssertionError("the reference head called radflash's head code")

    for mod, name in ((radflash.kernels, "vlcabs_ref"), (radflash.kernels, "vlcabs"), (vlcabs_module, "vlcabs_ref"),
                      (vlcabs_module, "vlcabs"), (radzero, "vlcabs"), (radzero, "vlcabs_ref")):
        monkeypatch.setattr(mod, name, trap)
    _, ref = small_pair
    logits, maps = ref.head(torch.randn(2, 17, SMALL.vision.hidden), torch.randn(3, SMALL.vision.hidden),
                            return_maps=True)
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 16) and torch.isfinite(logits).all()


# ---- timing and formulas -----------------------------------------------------------------------------
def test_percentiles_match_numpy() -> None:
    xs = list(np.random.rand(37))
    for q in (50, 95, 99):
        assert math.isclose(percentile(xs, q), float(np.percentile(xs, q)))
    st = Stats.from_seconds([0.001, 0.003, 0.002])
    assert (st.median_ms, st.min_ms, st.max_ms) == pytest.approx((2.0, 1.0, 3.0))


@pytest.mark.parametrize("n", [1, 3, 19, 20, 57, 99, 100, 131])
def test_tail_percentiles_only_with_enough_samples(n: int) -> None:
    seconds = (0.001 + 0.01 * np.random.rand(n)).tolist()
    ms = 1e3 * np.asarray(seconds)
    st = Stats.from_seconds(seconds)
    d = st.to_dict()
    for q, need, attr in ((95, 20, "p95_ms"), (99, 100, "p99_ms")):
        if n >= need:
            assert getattr(st, attr) == pytest.approx(float(np.percentile(ms, q)), rel=1e-12) and attr in d
        else:
            assert getattr(st, attr) is None and attr not in d  # left out: not NaN, not a relabelled maximum
    assert "NaN" not in json.dumps(d) and d["median_ms"] == pytest.approx(float(np.median(ms)), rel=1e-12)


@pytest.mark.parametrize(("n", "shown"), [(3, []), (20, ["p95 ms"]), (100, ["p95 ms", "p99 ms"])])
def test_table_shows_a_tail_column_only_when_a_row_supports_it(n: int, shown: list[str]) -> None:
    from radflash.bench.report import HEADERS, BenchReport, Row, headers, table_rows

    many = Stats.from_seconds((0.001 + 0.001 * np.random.rand(n)).tolist())
    few = Stats.from_seconds([0.002, 0.003])  # a score row: always too few
    rows = [Row("eager", 1, E2E, 1, many, None, None, 1.0, None), Row("eager", 1, SCORE, 4, few, None, None, 1.0, None)]
    report = BenchReport(machine={}, config={}, peaks=None, rows=rows)
    cols = headers(report)
    assert [h for h in cols if h.startswith("p9")] == shown and [h for h in HEADERS if h in cols] == cols
    body = table_rows(report)
    assert all(len(r) == len(cols) for r in body)
    for h in shown:
        assert body[0][cols.index(h)] != "—" and body[1][cols.index(h)] == "—"


def test_bench_auto_prints_its_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench --backend auto`` times eager vs ONNX Runtime at the largest batch and says so (fake clock)."""
    import radflash.backends as backends
    from radflash.backends import auto
    from radflash.bench.harness import bench
    from radflash.bench.report import summary_lines

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path))
    monkeypatch.setattr(backends, "_importable", lambda name: name == "onnxruntime")
    real_build = backends._build

    class FakeOrt:
        name, precision = "onnxruntime", "fp32"

        def __init__(self, model: RadFlashModel) -> None:
            self.encode = model.module.image_tokens

    monkeypatch.setattr(backends, "_build", lambda name, m, o: FakeOrt(m) if name == "onnxruntime"
                        else real_build(name, m, o))
    timed: list[tuple[str, int]] = []
    eager_s = float(np.random.uniform(0.01, 0.1))

    def fake_time(backend, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
        timed.append((backend.name, pixels.shape[0]))
        return (eager_s if backend.name == "eager" else eager_s / 2), backend.encode(pixels)

    monkeypatch.setattr(auto, "time_encode", fake_time)
    cfg = dataclasses.replace(preset("tiny"), image_size=56)
    model = RadFlashModel(random_checkpoint(cfg, seed=2), device="cpu")
    report = bench(model=model, device="cpu", backends=["auto"], batch_sizes=[1, 3], prompts=2, iterations=1,
                   warmup=0, include_reference=False, archive_files=0)
    assert {b for _, b in timed} == {3}  # measured at the largest batch size only
    sel = report.config["auto_selection"]
    assert sel["chosen"] == "onnxruntime"  # ms are recorded rounded to 4 decimals: half a unit in the last place
    eager = sel["candidates"]["eager/fp32"]  # 2× behind on its warm-up alone (> FAR × SCREEN): never timed
    assert eager["screen_ms"] == pytest.approx(1e3 * eager_s, abs=5e-5) and eager["screened_on"] == "warm-up"
    line = next(x for x in summary_lines(report) if x.startswith("backend auto → onnxruntime/fp32"))
    assert f"eager/fp32 {1e3 * eager_s:.4g} ms" in line and "per batch of 3" in line and "2.00× eager/fp32" in line


def test_stage_clock_segments_partition_the_iteration() -> None:
    clock = StageClock(torch.device("cpu"))
    clock.start()
    for name in ("a", "b", "a"):
        sum(range(20_000))
        clock.mark(name)
    out = clock.stop()
    assert set(out) == {"a", "b", "total"} and min(out.values()) > 0
    assert out["a"] + out["b"] <= out["total"] + 1e-9


def test_encoder_flops_formula_matches_the_spec() -> None:
    # the spec: ≈ 0.35 TFLOP per 518² image for the 14 ViT layers of RadZero
    assert encoder_flops(preset("base"), 518) == pytest.approx(0.35e12, rel=0.02)


def test_encoder_flop_formulas_match_torch_flop_counter() -> None:
    """The whole tower and its attention part against PyTorch's own FLOP counter on a random model at a random
    size: the patch convolution, the weight GEMMs (addmm) and attention (SDPA in its math form: two bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from radflash.bench.harness import encoder_attention_flops

    cfg = preset("tiny")
    size = cfg.vision.patch * int(torch.randint(4, 9, ()))
    cfg = dataclasses.replace(cfg, image_size=size)
    model = RadFlashModel(random_checkpoint(cfg, seed=int(torch.randint(0, 2**31, ()))), device="cpu")
    b = int(torch.randint(1, 4, ()))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel is not counted
        model.module.image_tokens(torch.randn(b, 3, size, size))
    counts = {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"convolution", "addmm", "bmm"}
    assert counts["bmm"] == b * encoder_attention_flops(cfg, size)
    assert sum(counts.values()) == b * encoder_flops(cfg, size)


def test_int8_rate_is_the_faster_int8_kernel() -> None:
    """int8's rate is the best int8 GEMM kernel here, each kernel also listed: torch._int_mm has no fast kernel on an
    AVX2-only CPU (2 GOP/s on a Zen 3, where ONNX Runtime's MLAS ran ~2x fp32), so it alone would make every INT8
    row's fraction meaningless there. The ONNX Runtime kernel computes the product it is timed as."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from radflash.bench.harness import INT8_DYNAMIC, INT8_INT_MM, INT8_ONNXRUNTIME, gemm_rates, onnxruntime_int8_matmul

    rates = gemm_rates(["fp32", "int8"], torch.device("cpu"), n=64, iterations=1, rounds=1)
    assert list(rates) == ["fp32", "int8", INT8_INT_MM, INT8_ONNXRUNTIME, INT8_DYNAMIC]
    assert rates["int8"] == max(rates[INT8_INT_MM], rates[INT8_ONNXRUNTIME])
    a = torch.randint(0, 256, (7, 48), dtype=torch.uint8).numpy()
    # 7-bit weights, as ONNX Runtime's reduce_range makes them: AVX2's u8×s8 pair sums saturate at int16 otherwise
    w = torch.randint(-64, 64, (48, 40), dtype=torch.int8).numpy()
    got = onnxruntime_int8_matmul(w)(a)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))


def test_a_probe_without_a_fast_kernel_is_timed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GEMM probe whose first call is slower than SLOW_PROBE_S (emulated bf16 on an AVX2-only CPU, ~2 s at
    n = 1024) keeps that call's rate and is not called again; fast probes get their rounds."""
    import radflash.util.timing as timing
    from radflash.bench import harness

    slow = float(torch.empty(()).uniform_(1.5, 4.0)) * harness.SLOW_PROBE_S
    fast = float(torch.empty(()).uniform_(0.05, 0.5)) * harness.SLOW_PROBE_S
    calls: list[float] = []

    def fake_time_fn(fn, *, device, iterations, warmup):
        seconds = slow if fn() == "bf16" else fast
        calls.extend([seconds] * (iterations + warmup))
        return [seconds] * iterations

    monkeypatch.setattr(timing, "time_fn", fake_time_fn)
    monkeypatch.setattr(torch, "matmul", lambda a, b: "bf16" if a.dtype == torch.bfloat16 else "fp32")
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: "bf16" if a.dtype == torch.bfloat16 else "fp32")
    rates = harness.gemm_rates(["fp32", "bf16"], torch.device("cpu"), n=1024, iterations=4, rounds=3)
    assert rates == {"fp32": pytest.approx(2 * 1024**3 / fast), "bf16": pytest.approx(2 * 1024**3 / slow)}
    assert calls.count(slow) == 1 and calls.count(fast) == 3 * (1 + 4)


def test_int8_yardsticks_bound_the_mix_int8_recipes_build() -> None:
    """The mixed bound: weight GEMMs at the int8 rate, attention at the rest precision's; the dynamic Linear's rate
    passed through; nothing without the rates it needs."""
    from radflash.bench.harness import INT8_DYNAMIC, encoder_attention_flops, int8_yardsticks

    cfg = preset("base")
    total, attention = encoder_flops(cfg, 518), encoder_attention_flops(cfg, 518)
    assert 0.2 < attention / total < 0.25  # base at 518²: 81 of 353 GFLOP
    r8, rb, rd = (float(x) for x in torch.empty(3).uniform_(1e11, 1e12))
    got = int8_yardsticks(cfg, 518, {"int8": r8, "bf16": rb, INT8_DYNAMIC: rd}, rest="bf16")
    seconds = (total - attention) / r8 + attention / rb
    assert got == {"int8 GEMMs + bf16 attention": pytest.approx(total / seconds, rel=1e-12),
                   "int8 dynamic Linear": rd}
    assert int8_yardsticks(cfg, 518, {"int8": r8}, rest="bf16") == {}
    # NNCF's recipe (Q·Kᵀ in int8, P·V not): half of attention at the rest rate; all of it in int8: no mix
    half = int8_yardsticks(cfg, 518, {"int8": r8, "bf16": rb}, rest="bf16", float_share=0.5)
    assert half == {"int8 GEMMs + bf16 P·V": pytest.approx(total / ((total - attention / 2) / r8 + attention / 2 / rb),
                                                          rel=1e-12)}
    assert int8_yardsticks(cfg, 518, {"int8": r8, "bf16": rb, INT8_DYNAMIC: rd}, rest="bf16",
                           float_share=0.0) == {"int8 dynamic Linear": rd}


@pytest.mark.parametrize(("runtime", "flags", "expected"), [
    ("openvino", {"avx512f", "avx512_bf16"}, "bf16"), ("openvino-standalone", {"amx_bf16"}, "bf16"),
    ("openvino", {"avx2", "fma"}, "fp32"), ("onnxruntime", {"avx512_bf16"}, "fp32")])
def test_unquantised_precision_follows_openvinos_rule(runtime: str, flags: set[str], expected: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An INT8 model's unquantised ops: bf16 in OpenVINO where the CPU has native bf16 (compile_config's rule)."""
    import radflash.devices as devices
    from radflash.backends.openvino import compile_config
    from radflash.bench.harness import unquantised_precision

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    assert unquantised_precision(runtime) == expected
    if runtime.startswith("openvino"):
        hint = compile_config("int8", threads=1, hint="LATENCY", cache=None)["INFERENCE_PRECISION_HINT"]
        assert {"bf16": "bf16", "f32": "fp32"}[hint] == expected
        # an IR that names its rest precision gets it (bf16 only where native); the bench reads the backend's
        for rest in ("f32", "bf16"):
            config = compile_config("int8", threads=1, hint="LATENCY", cache=None, rest=rest)
            assert config["INFERENCE_PRECISION_HINT"] == ("bf16" if rest == "bf16" and expected == "bf16" else "f32")
            backend = types.SimpleNamespace(config=config)
            assert unquantised_precision(runtime, backend) == {"bf16": "bf16", "f32": "fp32"}[
                config["INFERENCE_PRECISION_HINT"]]
    assert unquantised_precision(runtime, types.SimpleNamespace(config=object())) == expected  # not OpenVINO's
