"""The compiled Triton kernels on CUDA at the model's real shapes, against float64 formulas.

Each case checks three things: the Triton path ran (the torch fallback is patched to fail, the
launcher's allocation hook saw the call, and for VL-CABS the autotuner chose a config from the
pruned list), no output element was left unwritten (allocations are poisoned), and the error
against float64 is within ``numerics.bound`` of plain torch's own error on the same GPU data at the
kernel's operand precision (TF32 dots for half inputs, IEEE fp32 for fp32).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from radflash.kernels import upsample_maps, upsample_maps_ref, vlcabs, vlcabs_ref
from tests.gpu.numerics import DTYPES, EPS, bilinear_f64, bound, fp32_math, max_err
from tests.references import head_f64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

vl_mod = importlib.import_module("radflash.kernels.vlcabs_head")
maps_mod = importlib.import_module("radflash.kernels.maps")

TAU = 0.07
D = 768  # RadZero's width; BLOCK_D pads it to 1024


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Fail on any torch fallback; poison kernel outputs (NaN / 255 / −1); log the launchers' allocations."""
    log: list[tuple[tuple[int, ...], torch.dtype]] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        log.append((tuple(shape), dtype))
        fill = float("nan") if dtype.is_floating_point else (255 if dtype == torch.uint8 else -1)
        return torch.full(shape, fill, dtype=dtype, device=device)

    def fallback(*args: object, **kwargs: object) -> None:
        raise AssertionError("the plain-torch fallback ran on CUDA tensors: Triton was not used")

    for mod in (vl_mod, maps_mod):
        monkeypatch.setattr(mod, "_alloc", alloc)
    monkeypatch.setattr(vl_mod, "vlcabs_ref", fallback)
    monkeypatch.setattr(maps_mod, "upsample_maps_ref", fallback)
    return log


# ---------------------------------------------------------------------------------------------- VL-CABS


def tuned_keys(n: int, t: int, ln: bool, maps: bool) -> dict[tuple, object]:
    """Autotuner cache entries for this shape (the key is N, D, T, HAS_LN, HAS_MAPS, then the dtypes)."""
    return {k: c for k, c in vl_mod._vlcabs_kernel_tuned.cache.items() if tuple(k[:5]) == (n, D, t, ln, maps)}


@pytest.mark.parametrize(
    ("dtype", "n", "t", "ln", "maps"),
    [
        ("fp32", 1370, 13, True, True),  # 518²: 37×37 patches + CLS, the findings plus maps
        ("fp32", 5477, 33, False, False),  # 1036²: 74×74 + CLS, pre-normalised tokens
        ("bf16", 1370, 13, True, True),  # the model's production dtype on GPU
        ("bf16", 5477, 257, True, False),  # open vocabulary: partial prompt tiles of 32
        ("fp16", 5477, 13, True, True),
    ],
)
def test_vlcabs_autotuned(dtype: str, n: int, t: int, ln: bool, maps: bool, cuda: torch.device,
                          launches: list) -> None:
    dt = DTYPES[dtype]
    tokens = (torch.randn(2, n, D, device=cuda) * 2 + 0.5).to(dt)
    text = torch.randn(t, D, device=cuda).to(dt)
    kw = {"ln_weight": (1 + 0.3 * torch.randn(D, device=cuda)).to(dt),
          "ln_bias": (0.2 * torch.randn(D, device=cuda)).to(dt)} if ln else {}
    tuner = vl_mod._vlcabs_kernel_tuned
    for key in tuned_keys(n, t, ln, maps):  # an earlier test may have tuned this shape: tune again here
        del tuner.cache[key]
    tuner.configs_timings = None

    logits, s = vlcabs(tokens, text, TAU, return_maps=maps, **kw)
    torch.cuda.synchronize(cuda)

    # The autotuned Triton kernel ran: one new cache entry, chosen among exactly the pruned configs.
    assert launches, "the Triton launcher never allocated its outputs"
    chosen = tuned_keys(n, t, ln, maps)
    assert len(chosen) == 1, f"autotuner cache has {len(chosen)} entries for this shape"
    kept = vl_mod._prune(tuner.configs, {"T": t}, BLOCK_D=1024)
    assert 1 < len(kept) < len(tuner.configs), "pruning kept everything or nothing: nothing was tuned"
    assert next(iter(chosen.values())) in kept
    assert tuner.configs_timings is not None and set(tuner.configs_timings) == set(kept)
    # B is not part of the key: another batch size reuses the tuned config (no second tuning).
    vlcabs(tokens[:1], text, TAU, return_maps=maps, **kw)
    assert tuned_keys(n, t, ln, maps) == chosen

    exp_logits, exp_maps, _ = head_f64(tokens, text, TAU, kw.get("ln_weight"), kw.get("ln_bias"))
    with fp32_math(tf32=dt != torch.float32):  # plain torch at the kernel's operand precision
        ref_logits, ref_maps = vlcabs_ref(tokens, text, TAU, return_maps=maps, **kw)
    op_eps = EPS[torch.float32] if dt == torch.float32 else EPS["tf32"]
    k = max(n, D)  # the longer of the two reductions (similarity over D, pooling over N)
    assert logits.shape == (2, t) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert max_err(logits, exp_logits) <= bound(max_err(ref_logits, exp_logits), exp_logits, op_eps, k)
    if maps:
        assert s.shape == (2, t, n - 1) and s.dtype == dt and torch.isfinite(s.float()).all()
        # plus one rounding of the stored map to the tokens' dtype
        tol = bound(max_err(ref_maps, exp_maps), exp_maps, op_eps, D) + EPS[dt] * float(exp_maps.abs().max())
        assert max_err(s, exp_maps) <= tol
    else:
        assert s is None


# ---------------------------------------------------------------------------------------------- maps


def check_peaks(peak: torch.Tensor, peak_prob: torch.Tensor, up: torch.Tensor, slack: float) -> None:
    """The peak is a maximiser within ``slack``; where the maximum is unique beyond it, it is the arg-max."""
    flat = up.flatten(2)
    mx = flat.amax(-1)
    got = peak[..., 0] * up.shape[-1] + peak[..., 1]
    assert peak.dtype == torch.int64 and peak.shape == (*up.shape[:2], 2)
    assert (flat.gather(-1, got[..., None])[..., 0] >= mx - slack).all()
    unique = (flat >= (mx - slack)[..., None]).sum(-1) == 1
    assert torch.equal(got[unique], flat.argmax(-1)[unique])
    assert peak_prob.dtype == torch.float32


@pytest.mark.parametrize(
    ("dtype", "grid", "size", "output", "prob_dtype"),
    [
        ("bf16", (37, 37), (2500, 2048), "both", "fp16"),  # a real film from vlcabs' bf16 maps
        ("fp32", (74, 74), (1031, 1283), "prob", "fp32"),
        ("fp16", (37, 37), (517, 389), "mask", "fp16"),
        ("bf16", (74, 74), (2048, 2048), "none", "fp16"),
    ],
)
def test_upsample_maps(dtype: str, grid: tuple[int, int], size: tuple[int, int], output: str, prob_dtype: str,
                       cuda: torch.device, launches: list) -> None:
    sim = (torch.randn(2, 3, *grid, device=cuda) * 3).to(DTYPES[dtype])
    thr = torch.tensor([0.3, 0.5, 0.8], device=cuda)
    pdt = DTYPES[prob_dtype]
    got = upsample_maps(sim, size, output=output, threshold=thr, prob_dtype=pdt)
    torch.cuda.synchronize(cuda)
    assert launches, "the Triton launcher never allocated its outputs"
    h, w = size
    if output == "none":  # nothing map-sized was allocated
        assert not [s for s, _ in launches if math.prod(s) >= h * w]
    ref = upsample_maps_ref(sim, size, output=output, threshold=thr, prob_dtype=pdt)

    up = bilinear_f64(sim, size)
    prob = torch.sigmoid(up)
    amax = float(up.abs().max())
    eps32 = EPS[torch.float32]
    # fp32 interpolation: a 4-term sum (γ₄ ≈ 4·eps relative to max|up|); sigmoid's slope is at most ¼.
    slack = 4 * eps32 * amax
    if output in ("prob", "both"):
        assert got.probs.shape == (2, 3, *size) and got.probs.dtype == pdt
        assert torch.isfinite(got.probs.float()).all()
        tol = bound(max_err(ref.probs, prob), prob, eps32, 4) + EPS[pdt] * float(prob.max())
        assert max_err(got.probs, prob) <= tol
    else:
        assert got.probs is None
    if output in ("mask", "both"):
        assert got.masks.dtype == torch.uint8 and ((got.masks == 0) | (got.masks == 1)).all()  # 255: unwritten
        margin = slack / 4 + 2 * eps32  # prob's fp32 error: interpolation through sigmoid, plus its rounding
        diff = prob - thr.double().view(1, 3, 1, 1)
        decided = diff.abs() > margin
        assert torch.equal(got.masks.bool()[decided], (diff > 0)[decided])
        assert torch.equal(got.masks.bool()[decided], ref.masks.bool()[decided])
    else:
        assert got.masks is None
    check_peaks(got.peak, got.peak_prob, up, slack)
    exp_pp = torch.sigmoid(up.flatten(2).amax(-1))
    assert max_err(got.peak_prob, exp_pp) <= bound(max_err(ref.peak_prob, exp_pp), exp_pp, eps32, 4)
