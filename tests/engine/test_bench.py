"""``radflash bench``: the CLI end to end on the tiny model, the report's properties, the reference path."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from radflash.api import DEMO_MODEL, RadFlashModel
from radflash.bench import E2E, SCHEMA, SCORE, STAGES, encoder_flops
from radflash.checkpoint import save_checkpoint
from radflash.cli import cli
from radflash.config import ModelConfig, TextConfig, VisionConfig, preset
from radflash.convert import released_to_native
from radflash.factory import random_checkpoint
from radflash.timing import StageClock, Stats, percentile

pytest.importorskip("transformers", reason="the reference path needs transformers (the 'bench' extra)")

ROW_KEYS = {"backend", "batch_size", "stage", "images", "radflash", "reference", "ratio", "images_per_s",
            "reference_images_per_s", "limit"}
STATS_KEYS = {"n", "mean_ms", "median_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "samples_ms"}


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
    assert "TFLOP/s" in out and "GB/s" in out  # physical limits printed beside the results


def test_json_schema(bench_run) -> None:
    _, paths = bench_run
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == SCHEMA
    assert {"machine", "config", "peaks", "formulas", "rows", "memory", "skipped"} <= set(data)
    assert {"cpu", "cpu_cores_usable", "versions", "gpu", "date"} <= set(data["machine"])
    assert data["machine"]["versions"]["torch"]
    assert data["config"]["batch_sizes"] == [1, 2] and data["config"]["iterations"] == 3
    assert data["peaks"]["matmul_flops_per_s"] > 0 and data["peaks"]["copy_bytes_per_s"] > 0
    assert {"encode", "head", "maps"} <= set(data["formulas"])
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert set(row["radflash"]) == STATS_KEYS and set(row["reference"]) == STATS_KEYS
        assert len(row["radflash"]["samples_ms"]) == row["radflash"]["n"]
        assert math.isclose(row["ratio"], row["reference"]["median_ms"] / row["radflash"]["median_ms"])
        assert row["images_per_s"] > 0
    for mem in data["memory"]:
        assert mem["cpu_peak_rss_mb"] > 0 and mem["cuda_max_allocated_mb"] is None


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
    from radflash.reference import ReferenceRadZero

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
    from radflash.reference import native_to_released

    ckpt = random_checkpoint(SMALL)
    released = native_to_released(ckpt.state_dict, SMALL)
    pre = {"crop_size": {"height": 70, "width": 70}, "image_mean": list(SMALL.mean), "image_std": list(SMALL.std)}
    back, cfg = released_to_native(dict(released), {"vision_config": {"num_attention_heads": 4}}, pre)
    assert cfg == dataclasses.replace(SMALL, text=dataclasses.replace(SMALL.text, max_length=cfg.text.max_length))
    assert set(back) == set(ckpt.state_dict)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back[k], v), k


# ---- timing and formulas -----------------------------------------------------------------------------
def test_percentiles_match_numpy() -> None:
    xs = list(np.random.rand(37))
    for q in (50, 95, 99):
        assert math.isclose(percentile(xs, q), float(np.percentile(xs, q)))
    st = Stats.from_seconds([0.001, 0.003, 0.002])
    assert (st.median_ms, st.min_ms, st.max_ms) == pytest.approx((2.0, 1.0, 3.0))


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
