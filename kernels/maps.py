"""Fused pixel maps: bilinear upsampling of patch similarities → sigmoid → threshold → arg-max peak.

At full X-ray resolution the maps dwarf everything else (14 prompts × 2500×2048 = 72 M pixels per
image): plain torch writes the upsampled float map, reads it back for the sigmoid, again for the
threshold and again for the arg-max. The kernel reads only the small h×w grid and writes only
what was asked for (fp16 probabilities, uint8 masks, or nothing but the peak).

Semantics (spec "Pixel map"): F.interpolate(mode="bilinear", align_corners=False) from h×w to
H×W, then sigmoid; mask = prob > threshold; peak = arg-max of the upsampled logits with ties
going to the first pixel in row-major order (torch.argmax on the flattened map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radflash.kernels._dispatch import device_of, interpreting, jit, tl, triton, use_triton

__all__ = ["OUTPUTS", "MapResult", "upsample_maps", "upsample_maps_ref"]

OUTPUTS = ("prob", "mask", "both", "none")
_PROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SIM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class MapResult:
    """Per (image, prompt) maps at the output size; ``probs``/``masks`` are None unless asked for."""

    probs: torch.Tensor | None  # (B, T, H, W) prob_dtype
    masks: torch.Tensor | None  # (B, T, H, W) uint8 0/1
    peak: torch.Tensor  # (B, T, 2) int64 (y, x) of the arg-max pixel
    peak_prob: torch.Tensor  # (B, T) float32 sigmoid of the maximum


def upsample_maps_ref(
    sim: torch.Tensor,
    size: tuple[int, int],
    *,
    output: str = "prob",
    threshold: float | torch.Tensor = 0.5,
    prob_dtype: torch.dtype = torch.float16,
    grid: tuple[int, int] | None = None,
) -> MapResult:
    """Plain torch: the CPU path and the baseline of tests and benchmarks (materialises the float map)."""
    sim, thr = _prepare(sim, size, output, threshold, prob_dtype, grid)
    t = sim.shape[1]
    compute = torch.float64 if sim.dtype == torch.float64 else torch.float32
    up = F.interpolate(sim.to(compute), size=tuple(size), mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    idx = flat.argmax(-1)  # documented: first maximal value
    peak_val = flat.gather(-1, idx[..., None])[..., 0]
    peak = torch.stack((idx // size[1], idx % size[1]), dim=-1)
    probs = masks = None
    if output != "none":
        prob = torch.sigmoid(up)
        if output in ("prob", "both"):
            probs = prob.to(prob_dtype)
        if output in ("mask", "both"):
            masks = (prob > thr.to(device=prob.device, dtype=compute).view(1, t, 1, 1)).to(torch.uint8)
    return MapResult(probs, masks, peak, torch.sigmoid(peak_val).float())


def upsample_maps(
    sim: torch.Tensor,
    size: tuple[int, int],
    *,
    output: str = "prob",
    threshold: float | torch.Tensor = 0.5,
    prob_dtype: torch.dtype = torch.float16,
    grid: tuple[int, int] | None = None,
) -> MapResult:
    """Pixel maps at ``size`` = (H, W) from similarities ``sim`` (B, T, h, w), or (B, T, h·w) with ``grid``.

    ``output``: "prob" → sigmoid maps in ``prob_dtype``; "mask" → uint8 prob > ``threshold`` (a float
    or one value per prompt) without any float map in memory; "both" → both from one pass (the mask
    from the float32 probability, never from the rounded map); "none" → only peak and peak_prob.
    """
    if use_triton(sim):
        sim4, thr = _prepare(sim, size, output, threshold, prob_dtype, grid)
        want_prob, want_mask = output in ("prob", "both"), output in ("mask", "both")
        probs, masks, peak, peak_prob = torch.ops.radflash.upsample_maps(
            sim4, int(size[0]), int(size[1]), thr.to(device=sim4.device, dtype=torch.float32).contiguous(),
            prob_dtype, want_prob, want_mask,
        )
        return MapResult(probs if want_prob else None, masks if want_mask else None, peak, peak_prob)
    return upsample_maps_ref(sim, size, output=output, threshold=threshold, prob_dtype=prob_dtype, grid=grid)


def _prepare(
    sim: torch.Tensor,
    size: tuple[int, int],
    output: str,
    threshold: float | torch.Tensor,
    prob_dtype: torch.dtype,
    grid: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate arguments; return sim as (B, T, h, w) and the thresholds as a (T,) tensor."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if prob_dtype not in _PROB_DTYPES:
        raise TypeError(f"prob_dtype must be one of {_PROB_DTYPES}, got {prob_dtype}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (H, W) with positive sides, got {size}")
    if grid is not None:
        if sim.ndim != 3 or sim.shape[-1] != grid[0] * grid[1]:
            raise ValueError(
                f"sim {tuple(sim.shape)} does not match grid={tuple(grid)}: expected (B, T, {grid[0] * grid[1]})"
            )
        sim = sim.reshape(*sim.shape[:2], grid[0], grid[1])
    if sim.ndim != 4:
        raise ValueError(f"expected sim (B, T, h, w), or (B, T, h·w) with grid=, got {tuple(sim.shape)}")
    if not sim.is_floating_point():
        raise TypeError(f"sim must be floating point, got {sim.dtype}")
    t = sim.shape[1]
    thr = torch.as_tensor(threshold, dtype=torch.float32)
    if thr.ndim == 0:
        thr = thr.expand(t)
    elif thr.numel() != t:
        raise ValueError(f"{thr.numel()} thresholds for {t} prompts")
    return sim, thr.reshape(t)


# --------------------------------------------------------------------------------------------- Triton


@jit
def _upsample_maps_kernel(
    sim_ptr, thr_ptr, prob_ptr, mask_ptr, part_val_ptr, part_idx_ptr,
    T, h, w, H, W, scale_y, scale_x,
    stride_sim_bt, stride_sim_y, stride_sim_x,
    stride_out_bt, stride_out_y, stride_out_x,
    stride_part_bt,
    OUT_PROB: tl.constexpr, OUT_MASK: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_Y full output rows of one (image, prompt) map, swept in BLOCK_X columns.
    bt = tl.program_id(0).to(tl.int64)
    pid_y = tl.program_id(1)
    offs_y = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_mask = offs_y < H
    # PyTorch's area_pixel_compute_source_index: src = scale·(dst + ½) − ½, clamped at 0 (fp32).
    src_y = tl.maximum((offs_y.to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
    y0 = tl.minimum(src_y.to(tl.int32), h - 1)  # truncation = floor for src ≥ 0
    y1 = tl.minimum(y0 + 1, h - 1)
    ly = src_y - y0.to(tl.float32)
    hy = 1.0 - ly
    sim_base = sim_ptr + bt * stride_sim_bt
    row0 = y0.to(tl.int64) * stride_sim_y
    row1 = y1.to(tl.int64) * stride_sim_y
    thr = tl.load(thr_ptr + bt % T)

    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 2147483647, tl.int32)
    for x_start in range(0, W, BLOCK_X):
        offs_x = x_start + tl.arange(0, BLOCK_X)
        x_mask = offs_x < W
        src_x = tl.maximum((offs_x.to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
        x0 = tl.minimum(src_x.to(tl.int32), w - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        lx = src_x - x0.to(tl.float32)
        hx = 1.0 - lx
        col0 = x0.to(tl.int64) * stride_sim_x
        col1 = x1.to(tl.int64) * stride_sim_x
        valid = y_mask[:, None] & x_mask[None, :]
        # Gathers from the h×w grid (a few KiB, cache-resident): only the outputs touch DRAM.
        v00 = tl.load(sim_base + row0[:, None] + col0[None, :], mask=valid, other=0.0).to(tl.float32)
        v01 = tl.load(sim_base + row0[:, None] + col1[None, :], mask=valid, other=0.0).to(tl.float32)
        v10 = tl.load(sim_base + row1[:, None] + col0[None, :], mask=valid, other=0.0).to(tl.float32)
        v11 = tl.load(sim_base + row1[:, None] + col1[None, :], mask=valid, other=0.0).to(tl.float32)
        # Same association as PyTorch's kernel: h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11).
        val = hy[:, None] * (hx[None, :] * v00 + lx[None, :] * v01) + ly[:, None] * (
            hx[None, :] * v10 + lx[None, :] * v11
        )
        # probs and masks share one contiguous (B·T, H, W) layout, hence one set of strides.
        out_off = bt * stride_out_bt + offs_y[:, None].to(tl.int64) * stride_out_y + offs_x[None, :] * stride_out_x
        if OUT_PROB or OUT_MASK:
            prob = tl.sigmoid(val)
            if OUT_PROB:
                tl.store(prob_ptr + out_off, prob.to(prob_ptr.dtype.element_ty), mask=valid)
            if OUT_MASK:
                tl.store(mask_ptr + out_off, (prob > thr).to(tl.uint8), mask=valid)
        # Partial arg-max; tiles are visited column-first, so ties compare the row-major index.
        vm = tl.where(valid, val, float("-inf"))
        tile_max = tl.max(vm)
        flat = offs_y[:, None] * W + offs_x[None, :]
        tile_idx = tl.min(tl.where(valid & (vm == tile_max), flat, 2147483647))
        better = (tile_max > best_val) | ((tile_max == best_val) & (tile_idx < best_idx))
        best_val = tl.where(better, tile_max, best_val)
        best_idx = tl.where(better, tile_idx, best_idx)

    tl.store(part_val_ptr + bt * stride_part_bt + pid_y, best_val)
    tl.store(part_idx_ptr + bt * stride_part_bt + pid_y, best_idx)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation, a module-level hook so tests can poison outputs with NaN/sentinels."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(H: int, W: int) -> tuple[int, int]:
    """Size heuristic (row-wise op, no autotuning): 4K-pixel tiles, rows as wide as possible.

    256 fp16 columns = 512 contiguous bytes per row segment: full 128-byte store transactions.
    """
    block_x = min(256, max(16, triton.next_power_of_2(W)))
    block_y = min(max(1, 4096 // block_x), max(1, triton.next_power_of_2(H)))
    if interpreting():  # per-op overhead dominates there: fewer, larger tiles
        block_y = min(64, max(1, triton.next_power_of_2(H)))
    return block_y, block_x


def _upsample_maps_launch(
    sim: torch.Tensor, H: int, W: int, thr: torch.Tensor, prob_dtype: torch.dtype, out_prob: bool, out_mask: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, h, w = sim.shape
    if sim.dtype not in _SIM_DTYPES:
        raise TypeError(f"the Triton map kernel takes float32/float16/bfloat16 similarities, got {sim.dtype}")
    if thr.device != sim.device or thr.shape != (t,):
        raise ValueError("thresholds must be a (T,) tensor on the similarities' device")
    if H * W >= 2**31:
        raise ValueError(f"output size {H}×{W} is too large: in-map indices are int32")
    sim3 = sim.reshape(b * t, h, w).contiguous()
    dev = sim.device
    probs = _alloc((b, t, H, W) if out_prob else (0, 0, 0, 0), prob_dtype, dev)
    masks = _alloc((b, t, H, W) if out_mask else (0, 0, 0, 0), torch.uint8, dev)
    block_y, block_x = _blocks(H, W)
    n_rows = triton.cdiv(H, block_y)
    part_val = _alloc((b * t, n_rows), torch.float32, dev)
    part_idx = _alloc((b * t, n_rows), torch.int32, dev)
    if b * t:
        with device_of(sim):
            _upsample_maps_kernel[(b * t, n_rows)](
                sim3, thr, probs, masks, part_val, part_idx,
                t, h, w, H, W, h / H, w / W,
                *sim3.stride(), H * W, W, 1, part_val.stride(0),
                out_prob, out_mask,
                BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=4,
            )  # fmt: skip
    # Stage 2 (tiny, atomics-free): row blocks hold increasing row-major indices, so the first
    # block holding the maximum (torch.argmax is documented first-wins) holds the first arg-max.
    k = part_val.argmax(-1, keepdim=True)
    best_val = part_val.gather(-1, k)[:, 0].view(b, t)
    best_idx = part_idx.gather(-1, k)[:, 0].view(b, t).long()
    peak = torch.stack((best_idx // W, best_idx % W), dim=-1)
    return probs, masks, peak, torch.sigmoid(best_val)


@torch.library.custom_op("radflash::upsample_maps", mutates_args=())
def _upsample_maps_op(
    sim: torch.Tensor, H: int, W: int, thr: torch.Tensor, prob_dtype: torch.dtype, out_prob: bool, out_mask: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Opaque to torch.compile; outputs not asked for come back empty (ops return fixed arities).
    return _upsample_maps_launch(sim, H, W, thr, prob_dtype, out_prob, out_mask)


@_upsample_maps_op.register_fake
def _(
    sim: torch.Tensor, H: int, W: int, thr: torch.Tensor, prob_dtype: torch.dtype, out_prob: bool, out_mask: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t = sim.shape[:2]
    probs = sim.new_empty((b, t, H, W) if out_prob else (0, 0, 0, 0), dtype=prob_dtype)
    masks = sim.new_empty((b, t, H, W) if out_mask else (0, 0, 0, 0), dtype=torch.uint8)
    return probs, masks, sim.new_empty((b, t, 2), dtype=torch.int64), sim.new_empty((b, t), dtype=torch.float32)
