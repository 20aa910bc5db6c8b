"""Every backend available here vs eager on random images; bucket padding; the auto rule; TensorRT logic.

Tolerances (max |backend − eager| / max |eager|, random tiny model at 56² = 17 tokens):
compile 1e-4 (inductor reorders fp32 reductions), onnxruntime fp32 1e-3 (the export bound),
onnxruntime int8 0.15 with mean error ≤ 6% of the mean |token| (8-bit activations through 6
layers of a random, unstructured model; measured 3.4%).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.backends import choose_auto, make_backend
from radflash.backends.buckets import bucket_for, pad_to, plan, run_bucketed
from radflash.backends.tensorrt import build_engine, engine_cache_key, network_plan
from radflash.config import preset
from radflash.errors import BackendUnavailable, InputError
from radflash.factory import random_checkpoint

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
    assert backend.onnx_path.parent == cache / "onnx" and f"{SIZE}px-fp32-ort" in backend.onnx_path.name
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


def test_onnxruntime_int8_needs_a_graph(model: RadFlashModel) -> None:
    pytest.importorskip("onnxruntime")
    with pytest.raises(InputError, match="calibrate quantize"):
        make_backend("onnxruntime", model, precision="int8")


def test_onnxruntime_int8_matches_eager_loosely(model: RadFlashModel, cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    from radflash.calibration.quantize import quantize_onnxruntime
    from radflash.export import export_onnx

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


# ---- the auto rule --------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "dtype", "has", "expected"), [
    ("cuda", torch.bfloat16, {"tensorrt", "onnxruntime"}, "tensorrt"),
    ("cuda", torch.bfloat16, {"onnxruntime"}, "compile"),
    ("cpu", torch.float32, {"onnxruntime"}, "onnxruntime"),
    ("cpu", torch.float32, set(), "eager"),
    ("cpu", torch.bfloat16, {"onnxruntime"}, "eager"),
])
def test_auto_rule(device: str, dtype: torch.dtype, has: set[str], expected: str,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash.backends as backends

    monkeypatch.setattr(backends, "_importable", lambda name: name in has)
    name, reason = choose_auto(SimpleNamespace(device=torch.device(device), dtype=dtype))
    assert name == expected and reason


def test_auto_logs_its_choice(model: RadFlashModel, caplog: pytest.LogCaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash.backends as backends

    monkeypatch.setattr(backends, "_importable", lambda name: False)
    with caplog.at_level(logging.INFO, logger="radflash.backends"):
        backend = make_backend("auto", model, precision="fp16")  # options the choice does not take are dropped
    assert backend.name == "eager"
    assert "backend auto → eager because" in caplog.text


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
