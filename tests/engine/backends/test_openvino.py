"""The OpenVINO backend against eager float32 on fresh random inputs, for both model families.

Bounds (max |backend − eager fp32| / max |eager fp32|, random tiny models at 56² (RadZero, 17 tokens)
and 64² (CARZero, 17 tokens)): fp32 1e-4 (same float32 maths, other summation order: measured
≤ 1e-6); bf16 from the format: one bf16 rounding of every GEMM operand (u = 2⁻⁸) carried through
the layers, bounded by √layers · 8u relative to the token scale (measured 4-5e-3 on the tiny towers,
6e-3 on base). Eager bf16 (a bf16 copy of the tower) gets the same bound.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.backends import make_backend
from radflash.checkpoints.factory import random_checkpoint
from radflash.devices import native_precisions
from radflash.errors import BackendUnavailable, MissingDependency
from radflash.models.config import preset

pytest.importorskip("openvino")

FAMILIES = {"radzero": ("tiny", 56), "carzero": ("carzero-tiny", 64)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def bf16_bound(model: RadFlashModel) -> float:
    layers = model.config.vision.layers + getattr(model.config, "align_layers", 0)
    return 8 * 2.0**-8 * math.sqrt(layers)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request: pytest.FixtureRequest) -> RadFlashModel:
    name, size = FAMILIES[request.param]
    cfg = dataclasses.replace(preset(name), image_size=size)
    return RadFlashModel(random_checkpoint(cfg, seed=11), device="cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def eager(model: RadFlashModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.module.image_tokens(x)


def pixels(model: RadFlashModel, b: int) -> torch.Tensor:
    s = model.config.image_size
    return torch.randn(b, 3, s, s)


def test_fp32_matches_eager_and_the_second_load_converts_nothing(model: RadFlashModel, cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.backends import openvino as ovb

    first = make_backend("openvino", model, precision="fp32", batch_size=1)
    assert first.hint == "LATENCY" and first.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert first.ir_path.parent == cache / "openvino" / "ir" and first.ir_path.exists()
    for b in (1, 3):  # dynamic batch
        x = pixels(model, b)
        got = first.encode(x)
        assert got.shape == eager(model, x).shape and got.dtype == torch.float32
        assert rel_err(got, eager(model, x)) < 1e-4
    blobs = set((cache / "openvino" / "compiled").rglob("*.blob"))
    assert blobs  # OpenVINO wrote its compiled blob into CACHE_DIR

    monkeypatch.setattr(ovb, "convert", lambda *a, **k: pytest.fail("a cached model must not be converted again"))
    second = make_backend("openvino", model, precision="fp32", batch_size=1)
    assert second.loaded_from_cache and set((cache / "openvino" / "compiled").rglob("*.blob")) == blobs
    x = pixels(model, 2)
    assert rel_err(second.encode(x), eager(model, x)) < 1e-4


def test_bf16_and_throughput_split_match_eager_within_the_bf16_bound(model: RadFlashModel, cache: Path) -> None:
    x = pixels(model, 5)
    ref = eager(model, x)
    ov = make_backend("openvino", model, precision="bf16", batch_size=8)
    assert ov.hint == "THROUGHPUT" and ov.config["INFERENCE_PRECISION_HINT"] == "bf16"
    got = ov.encode(x)  # split over the parallel infer requests when there are several
    assert rel_err(got, ref) < bf16_bound(model)
    if "bf16" in native_precisions():
        assert ov.runs_in == "bf16" and rel_err(got, ref) > 1e-5  # really ran in bf16 (fp32 agrees to ~1e-7)
    else:  # OpenVINO does not emulate bf16: it runs f32 (an AVX2-only CPU), and says so
        assert ov.runs_in == "f32" and rel_err(got, ref) < 1e-4
    # each image comes back in its own row: the split never mixes or reorders images
    for i in (0, 4):
        assert rel_err(got[i], ov.encode(x[i:i + 1])[0]) < bf16_bound(model)
    eager_bf16 = make_backend("eager", model, precision="bf16")
    assert rel_err(eager_bf16.encode(x), ref) < bf16_bound(model)
    assert next(model.module.parameters()).dtype == torch.float32  # the bf16 copy left the model alone


def test_model_precision_follows_dtype_and_heads_stay_float32(cache: Path) -> None:
    """dtype="bfloat16" on the CPU: the encoder runs bf16, the module (text, head) stays float32, and the
    probabilities stay within the documented agreement bound of a float32 model with the same weights."""
    from radflash.backends.auto import AGREEMENT

    ckpt = random_checkpoint(dataclasses.replace(preset("tiny"), image_size=56), seed=5)
    m = RadFlashModel(ckpt, device="cpu", dtype="bfloat16", backend="openvino")
    fp32 = RadFlashModel(ckpt, device="cpu")
    assert m.dtype == torch.float32 and m.precision == "bf16" and m.backend_name == "openvino"
    assert fp32.precision == "fp32" and next(m.module.parameters()).dtype == torch.float32
    images = torch.rand(3, 80, 72)
    got, want = m.score(images), fp32.score(images)
    assert got.logits.dtype == torch.float32
    assert float((got.probs - want.probs).abs().max()) <= AGREEMENT


def test_missing_openvino_is_one_line_naming_the_extra(model: RadFlashModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependency) as info:
        make_backend("openvino", model, precision="fp32")
    assert "\n" not in str(info.value) and "pip install 'radflash[openvino]'" in str(info.value)


def test_int8_without_a_calibrated_model_says_how_to_make_one(model: RadFlashModel, cache: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="calibrate quantize --backend openvino"):
        make_backend("openvino", model, precision="int8")
    broken = tmp_path / "broken.xml"  # read for its rest precision before compiling: still one error naming it
    broken.write_text("<net name='truncated'")
    with pytest.raises(BackendUnavailable, match=r"could not compile broken\.xml"):
        make_backend("openvino", model, precision="int8", model_path=broken)


TELEMETRY_PROBE = r"""
import json, os, socket, sys
attempts = []
def refuse(self, address, *a, **k):
    attempts.append(repr(address))
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)
import dataclasses, numpy as np, torch
from radflash.api import RadFlashModel
from radflash.checkpoints.factory import random_checkpoint
from radflash.models.config import preset
from radflash.backends import make_backend
from radflash.calibration.quantize import quantize_openvino
cfg = dataclasses.replace(preset("tiny"), image_size=56)
m = RadFlashModel(random_checkpoint(cfg, seed=2), device="cpu")
make_backend("openvino", m, precision="fp32").encode(torch.randn(1, 3, 56, 56))
quantize_openvino(m, sys.argv[1], phantoms=6, holdout=2)
print(json.dumps({"attempts": attempts, "telemetry": repr(sys.modules.get("openvino_telemetry"))}))
"""


@pytest.mark.slow
def test_telemetry_stays_off_nothing_leaves_the_machine(tmp_path: Path) -> None:
    """Convert, compile and NNCF-quantise in a fresh process whose sockets refuse to connect, with an empty HOME
    (no opt-out file): no connection is attempted and OpenVINO's telemetry package is never loaded."""
    pytest.importorskip("nncf")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RADFLASH_CACHE": str(tmp_path / "cache")}
    env.pop("CI", None)  # the telemetry package stays quiet on CI by itself: test the user's case
    (tmp_path / "home").mkdir()
    res = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, str(tmp_path / "int8.xml")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"attempts": [], "telemetry": "None"}
    assert not (tmp_path / "home" / "intel").exists()  # no consent or client-id file written either
