"""The compiled cross-attention kernel on CUDA at CARZero's real shapes, against the float64 formula.

Shapes: width 768 = 4 heads × Dh 192 (padded to 256 in the kernel); "i2t" attends every prompt
(Q = T) to one image's 197 tokens (N = B), "t2i" every image (Q = B) to one prompt's 98 tokens
(N = T). Each case checks that the Triton path ran (the torch fallback is patched to fail, the
allocation hook saw the call, the autotuner chose among exactly the pruned configs and did not
retune for another batch size), that no output element was left unwritten (NaN-poisoned
allocation), and that the error against float64 is within ``numerics.bound`` of plain torch's own
error on the same GPU data, at the kernel's operand precision: IEEE fp32 dots for fp32 inputs,
dots in the input dtype (the softmax weights rounded to it) for fp16/bf16, over K-term reductions.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from radflash.kernels import cross_attention, cross_attention_ref
from tests.gpu.numerics import DTYPES, EPS, bound, fp32_math, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ca_mod = importlib.import_module("radflash.kernels.attention")

H, DH = 4, 192  # CARZero's fusion decoder: width 768


def attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v per (n, h) in float64, written out (max-shifted exp, explicit sums)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("nhqk,nkhd->nqhd", e / e.sum(-1, keepdim=True), v)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Fail on the torch fallback; poison the kernel's output with NaN; log the launcher's allocations."""
    log: list[tuple[tuple[int, ...], torch.dtype]] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        log.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def fallback(*args: object, **kwargs: object) -> None:
        raise AssertionError("the plain-torch fallback ran on CUDA tensors: Triton was not used")

    monkeypatch.setattr(ca_mod, "_alloc", alloc)
    monkeypatch.setattr(ca_mod, "cross_attention_ref", fallback)
    return log


def tuned_keys(nq: int, nk: int) -> dict[tuple, object]:
    """Autotuner cache entries for this shape (the key is Q, K, Dh, then the tensors' dtypes)."""
    return {key: c for key, c in ca_mod._cross_attention_kernel_tuned.cache.items() if tuple(key[:3]) == (nq, nk, DH)}


def make_inputs(n: int, nq: int, nk: int, dtype: torch.dtype, layout: str, q_scale: float, dev: torch.device):
    """q, k, v as the decoder may pass them: "fused" (q, k, v views of fused projections, strided),
    "shared_q" (one set of queries expanded over the batch rows, stride 0, and fused k/v views),
    or "contiguous"."""
    if layout == "contiguous":
        q = (torch.randn(n, nq, H, DH, device=dev) * q_scale).to(dtype)
        k = torch.randn(n, nk, H, DH, device=dev).to(dtype)
        return q, k, (torch.randn(n, nk, H, DH, device=dev) + 0.3).to(dtype)
    if layout == "fused":
        q = (torch.randn(n, nq, 3, H, DH, device=dev) * q_scale).to(dtype)[:, :, 0]
    else:
        q = (torch.randn(1, nq, H, DH, device=dev) * q_scale).to(dtype).expand(n, -1, -1, -1)
    kv = torch.randn(n, nk, 2, H, DH, device=dev)
    kv[:, :, 1] += 0.3  # values off zero, so outputs are not all near 0
    kv = kv.to(dtype)
    return q, kv[:, :, 0], kv[:, :, 1]


@pytest.mark.parametrize(
    ("dtype", "n", "nq", "nk", "layout", "q_scale"),
    [
        ("bf16", 64, 200, 197, "shared_q", 1.0),  # i2t: 64 images × 200 prompts, the production dtype
        ("bf16", 14, 256, 98, "fused", 1.0),  # t2i: 14 prompts × 256 images
        ("bf16", 8, 64, 98, "contiguous", 40.0),  # logits of ±100+: exp overflows without the max shift
        ("fp16", 256, 14, 197, "fused", 1.0),  # i2t: 256 images × the 14 findings (one query tile of 16)
        ("fp32", 200, 256, 98, "shared_q", 1.0),  # t2i at full size in fp32 (IEEE dots on the FMA units)
    ],
)
def test_cross_attention_autotuned(dtype: str, n: int, nq: int, nk: int, layout: str, q_scale: float,
                                   cuda: torch.device, launches: list) -> None:
    dt = DTYPES[dtype]
    q, k, v = make_inputs(n, nq, nk, dt, layout, q_scale, cuda)
    tuner = ca_mod._cross_attention_kernel_tuned
    for key in tuned_keys(nq, nk):  # an earlier test may have tuned this shape: tune again here
        del tuner.cache[key]
    tuner.configs_timings = None

    out = cross_attention(q, k, v)
    torch.cuda.synchronize(cuda)

    assert launches == [((n, nq, H, DH), dt)], "the Triton launcher did not allocate (only) the output"
    chosen = tuned_keys(nq, nk)
    assert len(chosen) == 1, f"autotuner cache has {len(chosen)} entries for this shape"
    kept = ca_mod._prune(tuner.configs, {"Q": nq, "q_ptr": q, "DOT_F32": dt == torch.float32}, BLOCK_D=256)
    assert 1 < len(kept) < len(tuner.configs), "pruning kept everything or nothing: nothing was tuned"
    assert next(iter(chosen.values())) in kept
    assert tuner.configs_timings is not None and set(tuner.configs_timings) == set(kept)
    # N is not part of the key: another batch size reuses the tuned config (no second tuning).
    cross_attention(q[: n // 2 + 1], k[: n // 2 + 1], v[: n // 2 + 1])
    assert tuned_keys(nq, nk) == chosen

    exp = attention_f64(q, k, v)
    with fp32_math(tf32=False):  # the baseline in IEEE fp32 (it upcasts half inputs)
        base = cross_attention_ref(q, k, v)  # imported before the fixture patched the module's name
    op_eps = EPS[torch.float32] if dt == torch.float32 else EPS[dt]
    assert out.shape == (n, nq, H, DH) and out.dtype == dt and out.is_contiguous()
    assert torch.isfinite(out.float()).all()
    assert max_err(out, exp) <= bound(max_err(base, exp), exp, op_eps, nk)
