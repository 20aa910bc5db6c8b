"""Pixel maps: Triton kernel (forced, interpreted on CPU) and torch reference vs a float64 bilinear."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from radflash.kernels import MapResult, set_kernel_backend, upsample_maps, upsample_maps_ref
from tests.tolerances import Tol, tolerance

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors: see tests/conftest.py
maps_mod = importlib.import_module("radflash.kernels.maps")

# (h, w) → (H, W): odd upsampling factors, non-square, downsampling, identity, a 1-pixel grid.
SIZES = [((7, 5), (23, 19)), ((37, 37), (61, 53)), ((37, 37), (20, 17)), ((9, 11), (9, 11)), ((1, 3), (5, 4))]
BILINEAR_TERMS = 4  # each output pixel is a weighted sum of 2×2 grid values


def value_magnitude(sim: torch.Tensor) -> float:
    """Size of the error-carrying intermediates of one upsampled value, in units of roundoff.

    The source coordinate (o + ½)·n_in/n_out − ½ reaches n_in and is rounded like any value, so the
    interpolation weights are off by about u·n_in, multiplied by a neighbour difference ≤ 2·max|sim|
    (measured: the float32 torch reference reaches ~0.6 of this at a 37×37 grid).
    """
    n_in = max(sim.shape[-2:]) if sim.dim() >= 4 else sim.shape[-1]
    return float(sim.double().abs().max()) * (1 + 2 * n_in)


def prob_tol(sim: torch.Tensor, prob_dtype: torch.dtype = torch.float32) -> Tol:
    """Bound on |prob − sigmoid(bilinear_f64(sim))|: the upsampling runs in float32 (its error scaled
    by sigmoid′ ≤ ¼), then the probability (≤ 1) is stored in ``prob_dtype``."""
    return tolerance(prob_dtype, terms=BILINEAR_TERMS, accumulate=torch.float32,
                     magnitude=1.0 + value_magnitude(sim) / 4)


def boundary(sim: torch.Tensor) -> float:
    """Masks may differ from the float64 reference only this close to the threshold."""
    return prob_tol(sim).bound(1.0)


def interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Bilinear weights (align_corners=False) written out: src = (o + ½)·n_in/n_out − ½, clamped at 0."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, i1] += src - i0
    return m


def upsample_f64(sim: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return interp_matrix(size[0], sim.shape[-2]) @ sim.double() @ interp_matrix(size[1], sim.shape[-1]).T


def check_peaks(res: MapResult, up: torch.Tensor, sim: torch.Tensor) -> None:
    """The peak must be a maximiser; where the maximum is unique (beyond rounding) it must be the one."""
    flat = up.flatten(2)
    w = up.shape[-1]
    mx = flat.amax(-1)
    slack = tolerance(torch.float32, terms=BILINEAR_TERMS, magnitude=value_magnitude(sim)).atol
    got = res.peak[..., 0] * w + res.peak[..., 1]
    assert res.peak.dtype == torch.int64 and res.peak.shape == (*up.shape[:2], 2)
    assert (flat.gather(-1, got[..., None])[..., 0] >= mx - slack).all()
    unique = (flat >= (mx - slack)[..., None]).sum(-1) == 1
    assert torch.equal(got[unique], flat.argmax(-1)[unique])
    assert res.peak_prob.dtype == torch.float32
    assert (res.peak_prob.double() - torch.sigmoid(mx)).abs().max() <= prob_tol(sim).bound(1.0)


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Poison every kernel output (NaN / 255 / −1) so unwritten elements show, and log what was allocated."""
    log: list[tuple[tuple[int, ...], torch.dtype]] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        log.append((tuple(shape), dtype))
        fill = float("nan") if dtype.is_floating_point else (255 if dtype == torch.uint8 else -1)
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(maps_mod, "_alloc", alloc)
    return log


def run_both(sim: torch.Tensor, size: tuple[int, int], **kw) -> tuple[MapResult, MapResult]:
    with set_kernel_backend("triton"):
        got = upsample_maps(sim, size, **kw)
    return got, upsample_maps_ref(sim, size, **kw)


def test_reference_formula_is_torch_bilinear() -> None:
    """The test's float64 bilinear is PyTorch's align_corners=False rule, so the spec is what we test."""
    for (h, w), size in SIZES:
        sim = torch.randn(1, 2, h, w, dtype=torch.float64)
        tol = tolerance(torch.float64, terms=BILINEAR_TERMS, magnitude=value_magnitude(sim))
        tol.assert_close(upsample_f64(sim, size), F.interpolate(sim, size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("grid", "size"), SIZES, ids=[f"{g[0]}x{g[1]}-{s[0]}x{s[1]}" for g, s in SIZES])
def test_probs(grid, size, prob_dtype, allocations) -> None:
    sim = torch.randn(2, 3, *grid) * 3
    got, ref = run_both(sim, size, output="prob", prob_dtype=prob_dtype)
    expected = torch.sigmoid(upsample_f64(sim, size))
    tol = prob_tol(sim, prob_dtype).bound(1.0)
    for res in (got, ref):
        assert res.masks is None
        assert res.probs.shape == (2, 3, *size) and res.probs.dtype == prob_dtype
        assert torch.isfinite(res.probs).all()
        assert (res.probs.double() - expected).abs().max() <= tol
        check_peaks(res, upsample_f64(sim, size), sim)


def test_both_is_prob_and_mask_in_one_pass(allocations) -> None:
    sim = torch.randn(2, 3, 9, 7) * 2
    thr = torch.tensor([0.2, 0.5, 0.9])
    for k in range(2):  # Triton, then the torch reference: each "both" equals its own two single passes
        both = run_both(sim, (31, 26), output="both", threshold=thr)[k]
        prob = run_both(sim, (31, 26), output="prob")[k]
        mask = run_both(sim, (31, 26), output="mask", threshold=thr)[k]
        assert torch.equal(both.probs, prob.probs) and torch.equal(both.masks, mask.masks)
        assert torch.equal(both.peak, prob.peak) and torch.equal(both.peak_prob, mask.peak_prob)


@pytest.mark.parametrize(("grid", "size"), SIZES[:3], ids=[f"{g[0]}x{g[1]}-{s[0]}x{s[1]}" for g, s in SIZES[:3]])
def test_masks_per_prompt_threshold(grid, size, allocations) -> None:
    sim = torch.randn(2, 3, *grid) * 2
    thr = torch.tensor([0.3, 0.5, 0.8])
    got, ref = run_both(sim, size, output="mask", threshold=thr)
    prob = torch.sigmoid(upsample_f64(sim, size))
    expected = prob > thr.double().view(1, 3, 1, 1)
    decided = (prob - thr.double().view(1, 3, 1, 1)).abs() > boundary(sim)
    for res in (got, ref):
        assert res.probs is None and res.masks.dtype == torch.uint8 and res.masks.shape == (2, 3, *size)
        assert ((res.masks == 0) | (res.masks == 1)).all()  # 255 = never written
        assert torch.equal(res.masks.bool()[decided], expected[decided])
        check_peaks(res, upsample_f64(sim, size), sim)
    # "mask" must not materialise a float map: the only float allocation is the tiny per-row-block peak.
    h, w = size
    assert not [s for s, dt in allocations if dt.is_floating_point and math.prod(s) >= h * w]


def test_scalar_threshold_and_flat_grid(allocations) -> None:
    sim = torch.randn(2, 4, 7 * 5)
    got, ref = run_both(sim, (12, 9), output="mask", threshold=0.6, grid=(7, 5))
    prob = torch.sigmoid(upsample_f64(sim.view(2, 4, 7, 5), (12, 9)))
    decided = (prob - 0.6).abs() > boundary(sim)
    assert torch.equal(got.masks.bool()[decided], (prob > 0.6)[decided])
    assert torch.equal(got.masks, ref.masks) or torch.equal(got.masks.bool()[decided], ref.masks.bool()[decided])


def test_none_writes_only_peaks(allocations) -> None:
    sim = torch.randn(3, 2, 37, 37)
    got, ref = run_both(sim, (61, 53), output="none")
    assert got.probs is None and got.masks is None and ref.probs is None and ref.masks is None
    up = upsample_f64(sim, (61, 53))
    check_peaks(got, up, sim)
    check_peaks(ref, up, sim)
    assert not [s for s, dt in allocations if math.prod(s) >= 61 * 53]


def test_peak_ties_go_to_first_pixel(allocations) -> None:
    """An all-zero map is all exact ties: torch.argmax's rule (first in row-major order) gives (0, 0).

    (Any other constant c is not: (1 − λ)·c + λ·c rounds differently from pixel to pixel.)
    """
    sim = torch.zeros(1, 2, 5, 6)
    sim[0, 1, 3, 4] = 2.0  # a unique peak region for the second prompt
    got, ref = run_both(sim, (40, 33), output="none")
    assert got.peak[0, 0].tolist() == [0, 0] == ref.peak[0, 0].tolist()
    check_peaks(got, upsample_f64(sim, (40, 33)), sim)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_similarities(dtype, allocations) -> None:
    """vlcabs returns maps in the tokens' dtype; the kernel upcasts them at load."""
    sim = (torch.randn(1, 2, 9, 7) * 3).to(dtype)
    got, ref = run_both(sim, (17, 22), output="prob", prob_dtype=torch.float32)
    expected = torch.sigmoid(upsample_f64(sim, (17, 22)))
    for res in (got, ref):
        assert (res.probs.double() - expected).abs().max() <= prob_tol(sim).bound(1.0)
        check_peaks(res, upsample_f64(sim, (17, 22)), sim)


@pytest.mark.slow
def test_large_output(allocations) -> None:
    """A multi-tile width (BLOCK_X < W) exercises the column loop and the cross-tile tie rule."""
    sim = torch.randn(1, 2, 37, 37)
    got, _ = run_both(sim, (300, 517), output="mask", threshold=0.5)
    prob = torch.sigmoid(upsample_f64(sim, (300, 517)))
    decided = (prob - 0.5).abs() > boundary(sim)
    assert torch.equal(got.masks.bool()[decided], (prob > 0.5)[decided])
    check_peaks(got, upsample_f64(sim, (300, 517)), sim)


def test_rejects_bad_arguments() -> None:
    sim = torch.randn(1, 3, 4, 4)
    with set_kernel_backend("triton"):
        with pytest.raises(ValueError, match="output"):
            upsample_maps(sim, (8, 8), output="probs")
        with pytest.raises(ValueError, match="thresholds"):
            upsample_maps(sim, (8, 8), output="mask", threshold=torch.tensor([0.5, 0.5]))
        with pytest.raises(ValueError, match="grid"):
            upsample_maps(sim.flatten(2), (8, 8), grid=(3, 5))
        with pytest.raises(TypeError, match="prob_dtype"):
            upsample_maps(sim, (8, 8), prob_dtype=torch.int8)


def test_op_registration() -> None:
    sim = torch.randn(2, 3, 5, 4)
    thr = torch.full((3,), 0.5)
    for flags in ((True, False), (False, True), (False, False)):
        torch.library.opcheck(torch.ops.radflash.upsample_maps.default, (sim, 9, 7, thr, torch.float16, *flags),
                              test_utils=("test_schema", "test_faketensor"))
