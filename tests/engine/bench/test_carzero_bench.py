"""``radflash bench`` on a CARZero model: the released-code reference, its equality with radflash, the report.

The reference (:mod:`radflash.bench.carzero_reference`) is what the ratios are measured against, so
it must compute the same S as radflash from the same weights while sharing none of its model code,
and the report must describe a family without maps honestly (no maps stage, a FLOP limit for the
fusion head that counts what the head multiplies).
"""

from __future__ import annotations

import ast
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from radflash.api import RadFlashModel
from radflash.bench.harness import carzero_head_flops
from radflash.bench.report import CARZERO_HEAD, E2E, SCORE, STAGES
from radflash.checkpoints.factory import random_checkpoint
from radflash.checkpoints.format import save_checkpoint
from radflash.cli import cli
from radflash.errors import InputError
from radflash.models.config import preset
from tests.engine.bench.imports import radflash_imports
from tests.tolerances import normwise_error, tolerance

pytest.importorskip("transformers", reason="the reference path needs transformers (the 'bench' extra)")

CFG = preset("carzero-tiny")
PROMPTS = [
    "There is cardiomegaly",
    "Cardiomegaly",  # one word: the cleaning empties it to [CLS][SEP]
    "1. Small left pleural effusion. 2. Mild bibasilar atelectasis.\nNo pneumothorax",
    "There is xylophone quixotic opacity",  # words outside the vocabulary: several ## pieces each
    " ".join(["xylophone quixotic zebra"] * 12),  # > 97 pieces: truncated mid-word
]
# Two independent fp32 implementations (transformers towers + nn.MultiheadAttention vs radflash's
# fused-qkv towers + cached-K/V cross-attention) through ~8 layers: observed ≈ 2e-6 of max |S|. A wrong
# weight mapping, a missed cleaning or aggregation step, or a padding mask changes S by ≥ 1e-2.
S_BOUND = 1e-5


@pytest.fixture(scope="module")
def pair():
    from radflash.bench.carzero_reference import ReferenceCARZero

    model = RadFlashModel(random_checkpoint(CFG, seed=5), device="cpu", dtype=torch.float32)
    return model, ReferenceCARZero.from_model(model)


# ---- the reference computes radflash's S -------------------------------------------------------------
def test_reference_scores_equal_radflash(pair) -> None:
    """Per-image (released) and per-pair loops both give radflash's batched, cached-K/V S."""
    from radflash.bench.carzero_reference import LOOPS

    model, ref = pair
    pixels = torch.randn(3, 3, CFG.image_size, CFG.image_size)
    with torch.inference_mode():
        ours, maps = model.module.head(model.encode_images(pixels=pixels), model.encode_text(PROMPTS))
    assert maps is None and ours.shape == (3, len(PROMPTS))
    assert float(ours.std()) > 1000 * S_BOUND * float(ours.abs().max())  # S varies: the check can fail
    by_loop = {loop: ref.logits(pixels, PROMPTS, loop=loop) for loop in LOOPS}
    for loop, theirs in by_loop.items():
        assert theirs.shape == ours.shape and theirs.dtype == torch.float32, loop
        assert normwise_error(theirs, ours) <= S_BOUND, loop
    # the two loops run the same modules on the same rows, batched differently: rounding only
    tol = tolerance(torch.float32, terms=1 + CFG.text.max_length)
    assert float((by_loop["pair"] - by_loop["image"]).abs().max()) <= tol.bound(float(ours.abs().max()))


def test_reference_text_side_is_the_released_one(pair) -> None:
    """Prompts padded to 97 like the released tokenizer call; zero word columns after [SEP]; t = mean of all 97."""
    _, ref = pair
    ids, mask = ref.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), CFG.text.max_length)
    assert mask[1].sum() == 2 and mask[-1].sum() == CFG.text.max_length  # emptied prompt; truncated prompt
    text = ref.text_features(PROMPTS)
    assert text.words.shape == (len(PROMPTS), CFG.text.hidden, CFG.text.max_length)
    assert text.words[1, :, 2:].abs().max() == 0  # [CLS], [SEP], then zeros
    torch.testing.assert_close(text.sent, text.words.mean(dim=2), rtol=1e-6, atol=1e-6)
    assert ref.text_features(PROMPTS) is text  # cached per prompt list


def test_inter_area_is_the_box_average() -> None:
    """Shrinking by whole factors averages blocks (cv2 INTER_AREA), rounded to uint8."""
    from radflash.bench.carzero_reference import inter_area

    img = np.random.randint(0, 256, (40, 36), dtype=np.uint8)
    want = img.reshape(10, 4, 12, 3).astype(np.float64).mean(axis=(1, 3))
    got = inter_area(img, 10, 12)
    assert got.dtype == np.uint8 and got.shape == (10, 12)
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-4  # round-to-nearest of the exact mean


@pytest.mark.parametrize("shape", [(300, 230), (230, 301), (80, 50)])  # taller, wider, enlarged (< letterbox)
def test_reference_preprocessing_matches_radflash_geometry(pair, shape: tuple[int, int]) -> None:
    """Same letterbox, padding and crop as radflash's; only the reference's uint8 rounding differs."""
    model, ref = pair
    img = np.random.randint(0, 256, shape, dtype=np.uint8)
    theirs = ref.preprocess([img])
    ours = model.preprocess([img])
    assert theirs.shape == ours.shape == (1, 3, CFG.image_size, CFG.image_size)
    # the reference rounds the resized image to 8 bits (as cv2 does): half a grey level, over std
    bound = (0.5 / 255 + 1e-5) / min(CFG.std)
    assert float((theirs - ours).abs().max()) <= bound  # a grid shifted by one pixel on noise is off by ~100×


# ---- independence -------------------------------------------------------------------------------------
def test_carzero_reference_imports_no_radflash_model_code() -> None:
    """By inspection: radflash's config, errors and the RadZero reference's DICOM decode only (the API as a type)."""
    import radflash.bench.carzero_reference as reference

    tree, used = radflash_imports(reference)  # radflash module → imported at run time
    allowed = ("radflash.errors", "radflash.models.config", "radflash.bench.reference")

    def module(name: str) -> str:
        return next((a for a in allowed if name == a or name.startswith(f"{a}.")), name)

    forbidden = [m for m in used if module(m) not in allowed
                 and (m.startswith(("radflash.kernels", "radflash.models", "radflash.backends", "radflash.tokenizer",
                                    "radflash.preprocess"))
                      or m.rsplit(".", 1)[-1] in {"kernels", "fusion", "carzero", "bert", "cross_attention"})]
    assert not forbidden
    runtime = {module(m) for m, at_runtime in used.items() if at_runtime}
    assert runtime <= set(allowed), runtime
    dynamic = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and n.value.startswith(("radflash.kernels", "radflash.models", "radflash.tokenizer"))]
    assert not dynamic  # no importlib detour either


def test_reference_runs_without_radflash_model_code(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trap radflash's fusion, kernels, cleaning and letterbox: the reference never reaches them."""
    import radflash.kernels
    import radflash.preprocess
    import radflash.tokenizer
    from radflash.models import carzero, fusion

    def trap(*args, **kwargs):
        raise AssertionError("the reference called radflash's own code")

    for name in ("cross_attention", "cross_attention_ref"):
        monkeypatch.setattr(radflash.kernels, name, trap, raising=False)
        monkeypatch.setattr(fusion, name, trap, raising=False)  # where the fusion looks them up
    for obj, name in ((fusion.Fusion, "decode"), (fusion.Fusion, "memory_kv"), (carzero.CARZero, "head"),
                      (carzero.CARZero, "text_features"), (radflash.tokenizer, "clean_carzero"),
                      (radflash.preprocess, "letterbox"), (radflash.preprocess, "area_resize")):
        monkeypatch.setattr(obj, name, trap)
    _, ref = pair
    ref._text_cache.clear()
    pixels = ref.preprocess([np.random.randint(0, 256, (90, 70), dtype=np.uint8)] * 2)
    scores = ref.logits(pixels, PROMPTS[:3])
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


# ---- the head's FLOP count --------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's own SDPA formula (q·kᵀ and the weighted sum) for the CPU SDPA op its FLOP counter leaves out."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@pytest.mark.parametrize(("b", "t"), [(1, 1), (3, 5), (2, 7)])
def test_carzero_head_flops_count_what_the_head_multiplies(pair, b: int, t: int) -> None:
    """torch's FLOP counter over radflash's CARZero head equals :func:`carzero_head_flops` exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = pair
    text = model.encode_text([f"There is finding number {k}" for k in range(t)])
    tokens = model.encode_images(pixels=torch.randn(b, 3, CFG.image_size, CFG.image_size))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.module.head(tokens, text)
    assert counter.get_total_flops() == carzero_head_flops(CFG, b, t)


def test_carzero_head_flops_at_the_published_size() -> None:
    """B = 8, T = 14 at ViT-B/16 224 + the 768-wide 4-layer fusion, counted by hand from the spec's shapes."""
    cfg = preset("carzero")
    d, f, n, k_text, layers = 768, 1024, 197, 98, 4
    mlp = 2 * (768 * 1024 + 1024 * 512 + 512 * 256 + 256 * 1)
    per_pair = sum(layers * (2 * d * d + 4 * k * d + 4 * d * f) + (layers - 1) * 2 * d * d + mlp for k in (n, k_text))
    assert carzero_head_flops(cfg, 8, 14) == 8 * 14 * per_pair + (8 + 14) * 2 * d * d + 8 * layers * 4 * n * d * d


# ---- the CLI end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("carzero-bench")
    path = save_checkpoint(random_checkpoint(CFG, seed=0, model_id="carzero-tiny-random"), out / "model")
    args = ["bench", "--model", str(path), "--device", "cpu", "--prompts", "3", "--iterations", "2", "--warmup", "0",
            "--batch-sizes", "1,2", "--archive-files", "2", "--threads", "1", "--json", str(out / "bench.json"),
            "--markdown", str(out / "bench.md"), "--no-openvino-standalone"]  # the peer: test_bench.py
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_cli_reports_head_rows_with_ratios_and_no_maps(bench_run) -> None:
    result, data, md = bench_run
    out = " ".join(result.output.split())  # the console wraps long lines
    assert "ratio ref/rf" in out and "no maps (the family has none)" in out and "maps at" not in out
    stages = {r["stage"] for r in data["rows"]}
    assert stages == {"decode", "preprocess", "encode", "head", E2E, SCORE}
    assert data["config"]["family"] == "carzero" and data["config"]["map_size"] is None
    assert "maps" not in data["config"]["e2e"] and "get_dqn_similarities" in data["config"]["reference"]
    assert "Dinov2" not in data["config"]["reference"] and "VL-CABS" not in data["config"]["reference"]
    assert data["formulas"]["head"] == CARZERO_HEAD and "maps" not in data["formulas"]
    assert "| eager | 1 | head |" in md
    for row in data["rows"]:  # every line has the reference beside it
        assert row["reference"] is not None and row["ratio"] > 0
        assert math.isclose(row["ratio"], row["reference"]["median_ms"] / row["radflash"]["median_ms"])
    heads = [r for r in data["rows"] if r["stage"] == "head"]
    assert [r["batch_size"] for r in heads] == [1, 2]
    for r in heads:  # the fusion's FLOP, not a RadZero bytes formula
        assert r["limit"]["kind"] == "flop" and r["limit"]["amount"] == carzero_head_flops(CFG, r["batch_size"], 3)
        assert math.isclose(r["limit"]["achieved_per_s"], r["limit"]["amount"] / (r["radflash"]["median_ms"] / 1e3))


def test_cli_stages_sum_to_at_most_e2e(bench_run) -> None:
    _, data, _ = bench_run
    for batch in (1, 2):
        group = {r["stage"]: r for r in data["rows"] if r["batch_size"] == batch}
        stages = [group[s] for s in STAGES if s in group]
        for side in ("radflash", "reference"):
            for i, total in enumerate(group[E2E][side]["samples_ms"]):
                assert sum(r[side]["samples_ms"][i] for r in stages) <= total + 1e-6


def test_reference_loop_pair_times_the_per_pair_loop(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.bench.carzero_reference import ReferenceCARZero
    from radflash.bench.harness import bench

    loops: list[str | None] = []
    real_head = ReferenceCARZero.head

    def spy(self, tokens, text, *, return_maps=False, loop=None):
        loops.append(loop or self.loop)
        return real_head(self, tokens, text, return_maps=return_maps, loop=loop)

    monkeypatch.setattr(ReferenceCARZero, "head", spy)
    path = save_checkpoint(random_checkpoint(CFG, seed=0, model_id="cz"), tmp_path / "model")
    report = bench(model=path, device="cpu", prompts=2, iterations=1, warmup=0, batch_sizes=(1,), archive_files=0,
                   threads=1, reference_loop="pair")
    assert loops and set(loops) == {"pair"}
    assert "per-pair loop" in report.config["reference"]
    with pytest.raises(InputError, match="applies to CARZero models only"):
        bench(model="tiny", device="cpu", prompts=1, iterations=1, warmup=0, batch_sizes=(1,), archive_files=0,
              reference_loop="pair")
