"""CARZero on CUDA (fp32, fp16, bf16) against the same weights in float64 on CPU.

A random-weights CARZero at the published sizes (ViT-B/16 at 224, BERT-base, the 4-layer fusion):
S on the GPU, where the fusion's cross-attention runs the Triton kernel, must be within
``numerics.bound`` of the error the CPU (plain torch, no kernel) makes in the same dtype, with
K = the model width. T = 190 prompts exercises the shape the cached prompt keys/values are for.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.checkpoints.factory import random_checkpoint
from tests.gpu.numerics import DTYPES, EPS, bound, fp32_math, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [f"There is finding number {i} in the left lower lobe" for i in range(190)]


@pytest.fixture(scope="module")
def ckpt():
    return random_checkpoint("carzero", seed=0)


def scores(model: RadFlashModel, images: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model.score(images, PROMPTS).logits


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_carzero_on_cuda_matches_float64(dtype: str, cuda: torch.device, ckpt, monkeypatch) -> None:
    dt = DTYPES[dtype]
    images = list(torch.rand(4, 300, 256, dtype=torch.float64))
    ref = scores(RadFlashModel(ckpt, device="cpu", dtype=torch.float64), images)
    cpu = scores(RadFlashModel(ckpt, device="cpu", dtype=dt), images)
    kernel = importlib.import_module("radflash.kernels.attention")
    fallbacks = []
    real_ref = kernel.cross_attention_ref
    monkeypatch.setattr(kernel, "cross_attention_ref", lambda *a: fallbacks.append(1) or real_ref(*a))
    with fp32_math(tf32=False):
        gpu = scores(RadFlashModel(ckpt, device=cuda, dtype=dt), images)
        torch.cuda.synchronize(cuda)
    assert not fallbacks, "CUDA scoring fell back to the plain-torch cross-attention instead of the kernel"
    err, err_cpu = max_err(gpu, ref), max_err(cpu, ref)
    tol = bound(err_cpu, ref, EPS[dt], ckpt.config.vision.hidden)
    assert torch.isfinite(gpu).all() and err <= tol, f"GPU error {err:.3g} > {tol:.3g} (CPU {dtype} {err_cpu:.3g})"
