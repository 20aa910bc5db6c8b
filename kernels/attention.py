"""Fused cross-attention for CARZero's fusion decoder: many single-query attentions against shared keys/values.

The decoder scores every (image, prompt) pair twice: "i2t" (batch = images, queries = all T
prompts, keys/values = the 197 image tokens) and "t2i" (batch = prompts, queries = all B images,
keys/values = the 98 text tokens). The reference runs SDPA in float32, so on GPU it first copies
half inputs (and the expanded or strided views the decoder passes) to float32 tensors and then
forgoes the tensor-core attention backends, which take only fp16/bf16. The kernel reads q/k/v in
place through their strides and in their own dtype, computes q·kᵀ and p·v on tensor cores with
float32 accumulation, and keeps scores and probabilities on chip (the FlashAttention recipe: one
program per (n, head, tile of queries) streams that row's keys/values with an online softmax).

Formula, per batch row n and head h (no mask: padded tokens are attended to on purpose):
    out[n, :, h] = softmax(q[n, :, h] · k[n, :, h]ᵀ / √Dh) · v[n, :, h]
with q (N, Q, H, Dh), k and v (N, K, H, Dh), out (N, Q, H, Dh) in q's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from radflash.kernels._dispatch import HAS_TRITON, device_of, interpreting, jit, tl, triton, use_triton

__all__ = ["cross_attention", "cross_attention_ref"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CUDA caps grid axes 1 and 2 at 65535: batch rows beyond that go to further launches.
_MAX_GRID_N = 65535
_LOG2E = 1.4426950408889634


def cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain torch (SDPA): the CPU path of the model and the baseline of tests and benchmarks.

    Half-precision inputs are computed in float32, like the kernel's accumulators: a bf16 softmax
    over 197 keys and its weighted sum would lose about two digits. The (N, H, L, Dh) views SDPA
    wants are transposes of the caller's (N, L, H, Dh) layout, never copies made here.
    """
    _check_inputs(q, k, v, kernel=False)
    n, nq, h, dh = q.shape
    if q.numel() == 0:
        return q.new_empty((n, nq, h, dh))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).to(compute),
        k.transpose(1, 2).to(compute),
        v.transpose(1, 2).to(compute),
        scale=1.0 / math.sqrt(dh),
    )
    # SDPA keeps q's memory layout, so for a (N, Q, H, Dh)-major q this is already contiguous.
    return out.transpose(1, 2).to(q.dtype).contiguous()


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v per batch row and head: q (N, Q, H, Dh), k and v (N, K, H, Dh) → (N, Q, H, Dh).

    Triton on CUDA tensors (see :mod:`radflash.kernels._dispatch`), :func:`cross_attention_ref`
    otherwise. Inputs may be strided views (e.g. ``qkv.view(N, L, 3, H, Dh)[:, :, 0]``); the
    output is contiguous and in q's dtype. Inference only: the Triton path has no backward.
    """
    if use_triton(q, k, v):
        return torch.ops.radflash.cross_attention(q, k, v)
    return cross_attention_ref(q, k, v)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: bool) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q (N, Q, H, Dh), k and v (N, K, H, Dh), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on the batch, heads and head dim (N, _, H, Dh)"
        )
    if k.shape[1] < 1 or q.shape[3] < 1:
        # A softmax over no keys is undefined, and Dh = 0 has no scale.
        raise ValueError(f"need at least one key and a head dim ≥ 1, got K={k.shape[1]}, Dh={q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kernel:
        if q.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"the Triton cross-attention takes float32/float16/bfloat16, got {q.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError("q, k and v must be on the same device")


# --------------------------------------------------------------------------------------------- Triton


def _cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    Q, K, Dh, qk_scale,
    stride_qn, stride_qq, stride_qh, stride_qd,
    stride_kn, stride_kk, stride_kh, stride_kd,
    stride_vn, stride_vk, stride_vh, stride_vd,
    stride_on, stride_oq, stride_oh, stride_od,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Axis 0 = query tile, so consecutive programs share one (n, head)'s keys/values in L2.
    pid_q = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Q
    d_mask = offs_d < Dh  # BLOCK_D = next_power_of_2(Dh): padded lanes load 0, add 0 to every dot

    q = tl.load(
        q_ptr + n * stride_qn + h * stride_qh + offs_q[:, None].to(tl.int64) * stride_qq + offs_d[None, :] * stride_qd,
        mask=q_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + n * stride_kn + h * stride_kh
    v_base = v_ptr + n * stride_vn + h * stride_vh

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros([BLOCK_Q], tl.float32)  # running Σ 2^(s - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)  # running Σ 2^(s - m) v
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kv_mask = k_mask[:, None] & d_mask[None, :]
        kb = tl.load(
            k_base + offs_k[:, None].to(tl.int64) * stride_kk + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
        )
        vb = tl.load(
            v_base + offs_k[:, None].to(tl.int64) * stride_vk + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
        )
        if DOT_F32:
            kb = kb.to(tl.float32)
            vb = vb.to(tl.float32)
        # Logits in base 2 (scale·log2 e folded into one multiply): exp2 is the native instruction.
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_K) fp32
        s = tl.where(k_mask[None, :], s, float("-inf"))
        # K ≥ 1 puts a real key in the first block, so m_new is finite from there on: no inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Half inputs: p is rounded to v's dtype for a tensor-core dot (FlashAttention's trade: one
        # rounding of each weight, no growth with K), the products summed in fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]  # l_i ≥ 1: the maximal key contributes 2⁰
    tl.store(
        o_ptr + n * stride_on + h * stride_oh + offs_q[:, None].to(tl.int64) * stride_oq + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty),
        mask=q_mask[:, None] & d_mask[None, :],
    )


if HAS_TRITON:
    # Q and K only bound masks and the key loop: specialising on them (== 1, divisible by 16) would
    # compile a new binary for every batch size class of t2i, where Q is the image count.
    _cross_attention_kernel = triton.jit(do_not_specialize=["Q", "K"])(_cross_attention_kernel)
else:
    _cross_attention_kernel = jit(_cross_attention_kernel)

# (BLOCK_Q, BLOCK_K, num_warps, num_stages). tl.dot needs every tile side ≥ 16; Q = 1…~256 and
# K = 98 or 197 at Dh = 192 (BLOCK_D = 256) are the shapes that matter. Each list holds only tiles
# that compile for sm_90 at BLOCK_D = 256 without spilling registers (checked with ptxas).
# Half inputs: tensor-core dots, operands staged in shared memory by the software pipeline.
_CONFIGS_HALF = (
    (16, 32, 4, 2),
    (16, 64, 4, 2),
    (32, 64, 4, 2),
    (64, 32, 4, 2),
    (64, 32, 8, 3),
    (64, 64, 8, 2),
    (128, 32, 8, 2),
)
# fp32 inputs: IEEE dots run on the FMA units, whose operand layouts need far more registers per
# tile: only small tiles stay out of local memory (e.g. 32×32 at 8 warps spills ~6 KB per thread).
_CONFIGS_F32 = (
    (16, 16, 4, 2),
    (16, 32, 4, 2),
    (32, 16, 8, 2),
)
# Shared memory for the q tile and `num_stages` pipelined k and v tiles: an upper bound of what the
# compiler allocates, kept below the 227 KiB an H100/H200 block may use.
_SMEM_BUDGET = 200 * 1024


def _configs() -> list:
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bq, bk, w, st in dict.fromkeys(_CONFIGS_HALF + _CONFIGS_F32)
    ]


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep the tiles of this dtype's dot path, no taller than the query count, that fit shared memory."""
    q_cap = max(16, triton.next_power_of_2(named_args["Q"]))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    f32 = bool(kwargs.get("DOT_F32", named_args.get("DOT_F32")))
    elt = 4 if f32 else named_args["q_ptr"].element_size()
    allowed = set(_CONFIGS_F32 if f32 else _CONFIGS_HALF)
    path = [c for c in configs if (c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in allowed]
    kept = [
        c for c in path
        if c.kwargs["BLOCK_Q"] <= q_cap
        and (c.kwargs["BLOCK_Q"] + 2 * c.kwargs["BLOCK_K"] * c.num_stages) * block_d * elt <= _SMEM_BUDGET
    ]  # fmt: skip
    return kept or [min(path, key=lambda c: (c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps))]


if HAS_TRITON:
    # Keyed on the sizes that shape the work of one program, and (implicitly) the dtypes; never on
    # N or H, which only widen the grid, so another batch size reuses the tuned config.
    _cross_attention_kernel_tuned = triton.autotune(
        configs=_configs(), key=["Q", "K", "Dh"], prune_configs_by={"early_config_prune": _prune}
    )(_cross_attention_kernel)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation, a module-level hook so tests can poison outputs with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _cross_attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _check_inputs(q, k, v, kernel=True)
    n, nq, h, dh = q.shape
    nk = k.shape[1]
    out = _alloc((n, nq, h, dh), q.dtype, q.device)
    if out.numel() == 0:
        return out
    # fp32 inputs: IEEE fp32 dots (tf32 rounds operands to 11 bits, ~1e-3 relative, where an fp32
    # caller expects fp32 results). Half
    # inputs: tensor-core dots in their own dtype with fp32 accumulation, except bf16 under the
    # interpreter, whose tl.dot reads bf16 bits as integers (Triton 3.x): upcast there instead.
    dot_f32 = q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16)
    block_d = max(16, triton.next_power_of_2(dh))
    qk_scale = _LOG2E / math.sqrt(dh)
    with device_of(q):
        for n0 in range(0, n, _MAX_GRID_N):
            rows = slice(n0, n0 + _MAX_GRID_N)
            nb = out[rows].shape[0]
            # Strides, not .contiguous(): the caller's q/k/v are views of one fused projection.
            args = (
                q[rows], k[rows], v[rows], out[rows],
                nq, nk, dh, qk_scale,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                dot_f32, "ieee",
            )  # fmt: skip
            if interpreting():
                # The interpreter cannot time configs; large key blocks keep its per-op overhead down.
                block_k = min(64, max(16, triton.next_power_of_2(nk)))
                grid = (triton.cdiv(nq, 16), h, nb)
                _cross_attention_kernel[grid](*args, BLOCK_D=block_d, BLOCK_Q=16, BLOCK_K=block_k)
            else:
                grid = lambda meta, nb=nb: (triton.cdiv(nq, meta["BLOCK_Q"]), h, nb)
                _cross_attention_kernel_tuned[grid](*args, BLOCK_D=block_d)
    return out


@torch.library.custom_op("radflash::cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # An opaque op for torch.compile: dynamo cannot trace the autotuner, and the kernel already is
    # the fused graph.
    return _cross_attention_launch(q, k, v)


@_cross_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
