"""OpenVINO INT8 through the calibration flow (NNCF PTQ), and every ``auto`` candidate on the demo model's
AUROC: what the choice may cost in accuracy, measured on fresh phantoms against float32."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from radflash.checkpoints.factory import random_checkpoint
from radflash.cli import cli
from radflash.models.config import preset

pytest.importorskip("openvino")
pytest.importorskip("nncf")

FLOAT_AUROC = 0.005  # |macro AUROC − float32's| for the float candidates (issue #29)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_quantize_openvino_writes_beside_the_checkpoint_and_the_backend_finds_it(tmp_path: Path, cache: Path) -> None:
    import radflash
    from radflash.backends import make_backend
    from radflash.backends.export import model_key
    from radflash.checkpoints.format import save_checkpoint

    cfg = dataclasses.replace(preset("tiny"), image_size=56)
    ckpt = save_checkpoint(random_checkpoint(cfg, seed=int(torch.randint(0, 2**16, ()))), tmp_path / "tiny")
    res = CliRunner().invoke(cli, ["calibrate", "quantize", "--backend", "openvino", "--model", str(ckpt),
                                   "--phantoms", "10", "--holdout", "3"])
    assert res.exit_code == 0, res.output
    xml = ckpt / "openvino" / "image_tower.int8.xml"
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and str(xml) in res.output
    assert "7 calibration images" in res.output and "max |Δprob|" in res.output
    model = radflash.load(ckpt, device="cpu")
    report = json.loads(xml.with_suffix(".json").read_text())
    assert report["model_key"] == model_key(model) and report["method"] == "openvino-nncf"
    assert report["holdout_images"] == 3 and 0 <= report["max_abs_dprob"] <= 1
    # attention's P·V: both IRs measured, the faster one within auto's bound kept, and the kept IR is that one
    from radflash.backends.auto import AGREEMENT
    from radflash.backends.openvino import float_attention_share, import_openvino, rest_precision
    from radflash.calibration.openvino_attention import Variant, choose
    from radflash.devices import native_precisions

    # each IR compiled with its unquantised ops in every precision this CPU runs natively (bf16, f32)
    variants = [Variant(**v) for v in report["attention"]["variants"]]
    rests = ["bf16", "f32"] if "bf16" in native_precisions() else ["f32"]
    names = ("float", "int8", "int8-shared")
    assert [(v.attention, v.rest) for v in variants] == [(a, r) for a in names for r in rests]
    assert all(v.seconds > 0 for v in variants)
    chosen = choose(variants, AGREEMENT)
    assert (report["attention"]["chosen"], report["attention"]["rest"]) == (chosen.attention, chosen.rest)
    kept = import_openvino().Core().read_model(str(xml))
    assert float_attention_share(kept) == (0.5 if chosen.attention == "float" else 0.0)
    assert rest_precision(kept) == chosen.rest  # the IR names how it ran fastest here
    assert "attention P·V:" in res.output and not list(xml.parent.glob(".*.tmp.*"))  # no temporary IR left

    backend = make_backend("openvino", model, precision="int8")  # found beside the checkpoint
    assert backend.ir_path == xml and backend.float_attention() == float_attention_share(kept)  # what the bench reads
    assert backend.config["INFERENCE_PRECISION_HINT"] == chosen.rest  # compiled the way it was chosen
    from radflash.synthetic.phantoms import generate_batch

    # held-out images from the calibration's distribution (fresh phantoms, not the ones calibrated on)
    x = model.preprocess([p.image for p in generate_batch(int(torch.randint(10**6, 2**31, ())), 3, 56)])
    with torch.inference_mode():
        ref = model.module.image_tokens(x)
    got = backend.encode(x)
    err = (got - ref).abs()
    # 8-bit activations through 5 layers of a random, unstructured model: the ONNX Runtime INT8 bounds
    assert float(err.max() / ref.abs().max()) < 0.15 and 0 < float(err.mean() / ref.abs().mean()) < 0.06


def test_a_failed_save_of_the_kept_ir_leaves_no_temporary_file(tmp_path: Path, cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept IR is saved again (with its rest precision) under a temporary name, then renamed: when
    that save fails part-way, the error reaches the user and nothing temporary stays beside the checkpoint."""
    import os

    import openvino

    from radflash.checkpoints.format import save_checkpoint

    cfg = dataclasses.replace(preset("tiny"), image_size=56)
    ckpt = save_checkpoint(random_checkpoint(cfg, seed=int(torch.randint(0, 2**16, ()))), tmp_path / "tiny")
    save = openvino.save_model

    def save_then_fail_on_the_kept_one(model, path, *args, **kwargs):
        save(model, path, *args, **kwargs)
        if Path(path).name == f".image_tower.int8.{os.getpid()}.tmp.xml":  # the kept IR, not a variant
            Path(path).with_suffix(".bin").write_bytes(b"cut short")
            raise OSError("No space left on device")

    monkeypatch.setattr(openvino, "save_model", save_then_fail_on_the_kept_one)
    res = CliRunner().invoke(cli, ["calibrate", "quantize", "--backend", "openvino", "--model", str(ckpt),
                                   "--phantoms", "4", "--holdout", "2"])
    assert res.exit_code != 0 and "No space left on device" in (res.output + repr(res.exception))
    folder = ckpt / "openvino"
    assert folder.is_dir() and not list(folder.glob(".*")), sorted(p.name for p in folder.iterdir())
    assert not (folder / "image_tower.int8.xml").exists()  # nothing half-written under the real name


def test_quantize_needs_out_for_onnxruntime(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["calibrate", "quantize", "--phantoms", "4"])
    assert res.exit_code == 2 and "--out" in res.output


class ReplayFloat32:
    """``auroc_fp32_vs`` makes the same phantoms and float32 tokens again for every candidate (same
    seed, same batches): each is computed once, by the real code, and handed back on later calls."""

    def __init__(self, model) -> None:
        from radflash.calibration import quantize

        self.quantize, self.model = quantize, model
        self.make, self.tower = quantize.phantom_samples, model.module.image_tokens
        self.samples: dict[tuple, list] = {}
        self.tokens: dict[tuple, torch.Tensor] = {}

    def phantom_samples(self, n: int, *, seed: int, size: int) -> list:
        if (n, seed, size) not in self.samples:
            made = self.make(n, seed=seed, size=size)
            self.samples[(n, seed, size)] = [made[i] for i in range(n)]
        return self.samples[(n, seed, size)]

    def image_tokens(self, px: torch.Tensor) -> torch.Tensor:
        import hashlib

        key = (px.dtype, tuple(px.shape), hashlib.blake2b(px.contiguous().numpy().tobytes()).digest())
        if key not in self.tokens:
            self.tokens[key] = self.tower(px)
        return self.tokens[key]

    def install(self, m: pytest.MonkeyPatch) -> None:
        m.setattr(self.quantize, "phantom_samples", self.phantom_samples)
        # through the instance's __dict__, so that undoing it deletes the entry (setattr would leave the
        # original bound method behind, which a later copy of the module would still call)
        m.setitem(vars(self.model.module), "image_tokens", self.image_tokens)


@pytest.mark.slow
def test_every_auto_candidate_keeps_the_demo_models_auroc(tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh phantoms (seed from the test's seed): each candidate's macro AUROC within 0.005 of float32's;
    INT8 within the calibration report's AUROC target."""
    import radflash
    from radflash.backends import make_backend
    from radflash.backends.auto import CANDIDATES
    from radflash.calibration.quantize import AUROC_TARGET, auroc_fp32_vs, quantize_openvino
    from radflash.devices import native_precisions
    from radflash.errors import BackendUnavailable

    model = radflash.load(device="cpu")
    quantize_openvino(model, phantoms=24, holdout=4)  # the demo's INT8 IR, into the private cache
    seed = int(torch.randint(0, 2**31, ()))
    replay = ReplayFloat32(model)
    checked = []
    for name, prec in CANDIDATES:
        if name == "compile" or prec not in native_precisions() or (name, prec) == ("eager", "fp32"):
            continue
        try:
            backend = make_backend(name, model, precision=prec)
        except BackendUnavailable:
            continue
        with monkeypatch.context() as m:  # only while measuring: the backends above trace the real tower
            replay.install(m)
            fp32, other = auroc_fp32_vs(model, backend, 96, seed=seed)
        bound = AUROC_TARGET if prec == "int8" else FLOAT_AUROC
        assert abs(other - fp32) <= bound, (name, prec, fp32, other)
        checked.append(f"{name}/{prec}")
    assert {"openvino/fp32", "openvino/bf16", "openvino/int8"} <= set(checked) or "bf16" not in native_precisions()
