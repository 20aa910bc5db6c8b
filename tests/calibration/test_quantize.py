"""INT8 quantisation: Q/DQ graph from representative images, run by the onnxruntime backend, accuracy report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from radflash.checkpoints.factory import random_checkpoint
from radflash.cli import cli
from radflash.models.config import preset


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radflash.checkpoints.format import save_checkpoint

    cfg = dataclasses.replace(preset("tiny"), image_size=56)
    return save_checkpoint(random_checkpoint(cfg, seed=7), tmp_path_factory.mktemp("q") / "tiny")


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:96, :80] / 96
    rng = np.random.default_rng(0)
    for i in range(n):
        img = 0.5 + 0.35 * np.sin(5 * xx + i) * np.cos(3 * yy) + 0.03 * rng.standard_normal(xx.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_quantize_cli_writes_an_int8_graph_the_backend_runs(ckpt_dir: Path, tmp_path: Path) -> None:
    import onnx
    import torch

    import radflash
    from radflash.backends import make_backend

    out = tmp_path / "model.int8.onnx"
    res = CliRunner().invoke(cli, ["calibrate", "quantize", str(ckpt_dir), "--images", str(_images(tmp_path / "i", 10)),
                                   "--out", str(out), "--holdout", "3", "--method", "onnxruntime"])
    assert res.exit_code == 0, res.output
    assert "7 calibration images" in res.output and "3 held-out images" in res.output
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    model = radflash.load(ckpt_dir, device="cpu")
    backend = make_backend("onnxruntime", model, precision="int8", onnx_path=out)
    from radflash.calibration import read_image

    held = _images(tmp_path / "held", 13)  # same distribution as the calibration set, unseen indices
    x = model.preprocess([read_image(held / f"{i:02d}.png") for i in (11, 12)])
    with torch.inference_mode():
        ref = model.module.image_tokens(x)
    got = backend.encode(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().mean() / ref.abs().mean()) < 0.05


def test_quantize_cli_usage_errors(ckpt_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(cli, ["calibrate", "quantize", str(ckpt_dir), "--out", str(tmp_path / "x.onnx")])
    assert neither.exit_code == 2 and "exactly one" in neither.output
    both = runner.invoke(cli, ["calibrate", "quantize", str(ckpt_dir), "--model", str(ckpt_dir), "--phantoms", "4",
                               "--out", str(tmp_path / "x.onnx")])
    assert both.exit_code == 2


@pytest.mark.slow
def test_int8_auroc_drop_on_the_demo_model(tmp_path: Path) -> None:
    from radflash.api import DEMO_MODEL
    from radflash.calibration.quantize import AUROC_TARGET, quantize_int8

    assert (DEMO_MODEL / "model.safetensors").is_file(), f"the embedded demo model is missing: {DEMO_MODEL}"

    report = quantize_int8(None, tmp_path / "demo.int8.onnx", phantoms=40, holdout=8, method="onnxruntime",
                           auroc_phantoms=96)
    assert report.auroc_drop is not None and report.auroc_drop <= AUROC_TARGET, report.summary()
