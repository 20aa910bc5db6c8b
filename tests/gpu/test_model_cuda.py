"""The whole model on CUDA (fp32 and bf16) against the same weights in float64 on CPU.

Models: the embedded demo (``radflash.load()``) and a random-weights RadZero **base** (width 768,
12 + 2 vision layers, 12-layer MPNet) at 224² so that its float64 CPU reference stays cheap. Each
GPU result must be within ``numerics.bound`` of the error the CPU makes in the same dtype on the
same images (tokens, logits, pixel maps), with K = the model width: one GEMM reduction's rounding.
fp32 runs pin IEEE fp32 (torch's CUDA default would use TF32 convolutions): this checks the maths;
bf16 is the reduced-precision path that production takes on GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

import radflash
from radflash.api import RadFlashModel
from radflash.checkpoints.factory import random_checkpoint
from radflash.models.config import preset
from tests.gpu.numerics import DTYPES, EPS, bilinear_f64, bound, fp32_math, max_err
from tests.references import head_f64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

IMAGE = (301, 257)  # decoded film size (odd, non-square); maps are drawn back at this size
MAP_PROMPTS = 3


@pytest.fixture(scope="module")
def builders() -> dict[str, Callable[[torch.device | str, torch.dtype], RadFlashModel]]:
    """model kind → (device, dtype) → a model with exactly the same weights."""
    base = random_checkpoint(dataclasses.replace(preset("base"), image_size=224), seed=0)

    def demo(device: torch.device | str, dtype: torch.dtype) -> RadFlashModel:
        try:
            return radflash.load(device=device, dtype=dtype)
        except (radflash.RadflashError, OSError) as exc:  # the demo may be being retrained right now
            pytest.skip(f"embedded demo model does not load: {exc}")

    return {"demo": demo, "base": lambda device, dtype: RadFlashModel(base, device=device, dtype=dtype)}


def run(model: RadFlashModel, images: list[torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        tokens = model.encode_images(images)
        logits = model.score(prompts=prompts, tokens=tokens).logits
        maps = model.similarity_maps(prompts=prompts[:MAP_PROMPTS], tokens=tokens, size=IMAGE)
    return {"tokens": tokens, "logits": logits, "probs": maps.probs}


def reference(model: RadFlashModel, images: list[torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
    """Float64 CPU tokens, then the head and maps from the spec's formulas (not radflash's kernels)."""
    norm = model.module.head_norm
    with torch.inference_mode():
        tokens = model.encode_images(images)
        text = model.encode_text(prompts)
    logits, s, _ = head_f64(tokens, text, model.tau, norm.weight, norm.bias, norm.eps)
    grid = model.grid_for(tokens.shape[1] - 1)
    probs = torch.sigmoid(bilinear_f64(s[:, :MAP_PROMPTS].reshape(len(images), MAP_PROMPTS, *grid), IMAGE))
    return {"tokens": tokens, "logits": logits, "probs": probs}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["demo", "base"])
def test_model_on_cuda_matches_float64(kind: str, dtype: str, cuda: torch.device, builders: dict) -> None:
    dt = DTYPES[dtype]
    images = list(torch.rand(3, *IMAGE, dtype=torch.float64))
    ref_model = builders[kind]("cpu", torch.float64)
    prompts = list(ref_model.default_prompts.values())
    ref = reference(ref_model, images, prompts)
    with torch.inference_mode():  # the model's own float64 head agrees with the formulas (no kernel involved)
        own = ref_model.score(prompts=prompts, tokens=ref["tokens"]).logits
    assert max_err(own, ref["logits"]) <= bound(0.0, ref["logits"], EPS[torch.float32], ref_model.config.vision.hidden)

    cpu = run(builders[kind]("cpu", dt), images, prompts)
    with fp32_math(tf32=False):
        gpu_model = builders[kind](cuda, dt)
        assert gpu_model.device == cuda and gpu_model.dtype == dt
        gpu = run(gpu_model, images, prompts)
        torch.cuda.synchronize(cuda)
    width = ref_model.config.vision.hidden
    for name, exp in ref.items():
        got = gpu[name]
        assert got.device == cuda and got.shape == exp.shape, name
        assert torch.isfinite(got.float()).all(), name
        err, err_cpu = max_err(got, exp), max_err(cpu[name], exp)
        tol = bound(err_cpu, exp, EPS[dt], width)
        assert err <= tol, f"{name}: GPU error {err:.3g} > {tol:.3g} (CPU {dtype} error {err_cpu:.3g})"
