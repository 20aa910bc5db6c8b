"""The compile backend on CUDA: torch.compile + one CUDA graph per batch bucket, against eager and float64.

Batches of 1, 3, 4 and 6 images hit buckets 1 and 4 (3 is padded to 4, 6 runs as 4 + 2 padded to
4): two compiled graphs, then none more when the same buckets come back. Every output (kept across
later replays, so an overwritten static output would show) must be within ``numerics.bound`` of
eager's own error in the same dtype against the float64 CPU model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from radflash.api import RadFlashModel
from radflash.backends import make_backend
from radflash.checkpoints.factory import random_checkpoint
from radflash.models.config import preset
from tests.gpu.numerics import EPS, bound, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZE = 224  # 16×16 patches + CLS; the tiny preset keeps each bucket's compile to seconds
BUCKETS = (1, 4)
FIRST = (1, 3, 4, 6)
AGAIN = (6, 1, 2, 4, 3)


def test_compile_cuda_graphs_per_bucket(cuda: torch.device) -> None:
    ckpt = random_checkpoint(dataclasses.replace(preset("tiny"), image_size=SIZE), seed=0)
    dt = torch.bfloat16  # what `auto` picks on CUDA, and where CUDA graphs matter
    model = RadFlashModel(ckpt, device=cuda, dtype=dt)
    torch._dynamo.reset()
    counters.clear()
    backend = make_backend("compile", model, buckets=BUCKETS)
    assert backend.cuda_graphs and backend.mode == "reduce-overhead"

    pixels = torch.randn(max(FIRST), 3, SIZE, SIZE, dtype=torch.float64)
    with torch.inference_mode():
        first = [backend.encode(pixels[:b].to(cuda)) for b in FIRST]
        graphs = counters["stats"]["unique_graphs"]
        again = [backend.encode(pixels[:b].to(cuda)) for b in AGAIN]
    assert graphs == len(BUCKETS), f"{graphs} graphs compiled for buckets {BUCKETS}"
    assert counters["stats"]["unique_graphs"] == graphs, "a bucket seen before was compiled again"
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs (see its perf hints)"

    # The outputs do come from replayed graphs: an un-cloned output dies at the next replay.
    chunk = pixels[:4].to(device=cuda, dtype=dt)
    with torch.inference_mode():
        torch.compiler.cudagraph_mark_step_begin()
        stale = backend._fn(chunk)
        torch.compiler.cudagraph_mark_step_begin()
        backend._fn(chunk)
        with pytest.raises(RuntimeError, match="overwritten by a subsequent run"):
            stale.float().sum().item()

    ref_model = RadFlashModel(ckpt, device="cpu", dtype=torch.float64)
    with torch.inference_mode():
        exp = ref_model.module.image_tokens(pixels)
        eager = model.module.image_tokens(pixels.to(device=cuda, dtype=dt))
    width = ref_model.config.vision.hidden
    for b, got in [*zip(FIRST, first), *zip(AGAIN, again)]:
        assert got.shape == (b, *exp.shape[1:]) and got.dtype == dt and got.device == cuda
        tol = bound(max_err(eager[:b], exp[:b]), exp[:b], EPS[dt], width)
        assert max_err(got, exp[:b]) <= tol, f"batch {b}"
    # A replay of the same bucket on the same input is deterministic.
    assert torch.equal(first[FIRST.index(3)], again[AGAIN.index(3)])
