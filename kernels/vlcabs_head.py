"""Fused VL-CABS similarity head: LayerNorm → L2-normalise → similarity → online softmax → pooled cosine.

The head is memory-bound at small T: plain torch writes and re-reads the normalised tokens, the
B·T·N similarity matrix and its softmax. The kernel reads each image's tokens once per tile of
prompts and keeps everything else on chip (the FlashAttention recipe, with values = normalised keys).

Formulas (spec "Similarity head (VL-CABS)"), x̂ = x/‖x‖₂:
    s_i = ⟨t̂, v̂_i⟩/τ over all N tokens (CLS included),  a = softmax(s),  g = Σ a_i v̂_i,
    logit = ⟨t̂, ĝ⟩/τ,  maps = s over tokens 1..N-1 (the patch grid, CLS dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radflash.kernels._dispatch import HAS_TRITON, device_of, interpreting, jit, tl, triton, use_triton

__all__ = ["vlcabs", "vlcabs_ref"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# F.normalize's clamp on the norm; the kernel uses the same so zero rows stay zero, not NaN.
_NORM_EPS = 1e-12


def vlcabs_ref(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    return_maps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch VL-CABS: the CPU path of the model and the baseline of tests and benchmarks.

    Half-precision inputs are computed in float32: the softmax over 1370+ tokens and the pooled
    norm lose about three digits when accumulated in bf16, and the kernel accumulates in fp32 too.
    """
    _check_inputs(tokens, text, tau, ln_weight, ln_bias, kernel=False)
    compute = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    x = tokens.to(compute)
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_weight.to(compute), ln_bias.to(compute), ln_eps)
    v = F.normalize(x, dim=-1, eps=_NORM_EPS)
    t = F.normalize(text.to(device=x.device, dtype=compute), dim=-1, eps=_NORM_EPS)
    s = torch.matmul(v, t.T).transpose(1, 2) / tau  # (B, T, N)
    pooled = F.normalize(torch.matmul(torch.softmax(s, dim=-1), v), dim=-1, eps=_NORM_EPS)  # (B, T, D)
    logits = (pooled * t).sum(-1).div(tau).float()
    maps = s[..., 1:].to(tokens.dtype).contiguous() if return_maps else None
    return logits, maps


def vlcabs(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    *,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    return_maps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """VL-CABS logits (B, T) float32 and, if asked, patch similarity maps (B, T, N-1) in tokens' dtype.

    ``tokens`` (B, N, D) are the image tokens with CLS first; ``text`` (T, D) the prompt embeddings
    already through the shared LayerNorm. With ``ln_weight``/``ln_bias`` the tokens' LayerNorm is
    fused into the kernel (the normalised tokens are never written); without, tokens must already
    be normalised. Inference only: the Triton path has no backward.
    """
    if use_triton(tokens, text):
        logits, maps = torch.ops.radflash.vlcabs(
            tokens, text, float(tau), ln_weight, ln_bias, float(ln_eps), bool(return_maps)
        )
        return logits, maps if return_maps else None
    return vlcabs_ref(
        tokens, text, tau, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, return_maps=return_maps
    )


def _check_inputs(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    *,
    kernel: bool,
) -> None:
    if tokens.ndim != 3 or text.ndim != 2:
        raise ValueError(
            f"expected tokens (B, N, D) and text (T, D), got {tuple(tokens.shape)} and {tuple(text.shape)}"
        )
    if tokens.shape[-1] != text.shape[-1]:
        raise ValueError(f"tokens have width {tokens.shape[-1]} but text has width {text.shape[-1]}")
    if tokens.shape[1] < 1:
        raise ValueError("tokens must hold at least the CLS token")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("pass both ln_weight and ln_bias, or neither")
    if ln_weight is not None and (ln_weight.shape != (tokens.shape[-1],) or ln_bias.shape != (tokens.shape[-1],)):
        raise ValueError(f"ln_weight/ln_bias must have shape ({tokens.shape[-1]},)")
    if kernel:
        if tokens.dtype not in _KERNEL_DTYPES or text.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"the Triton head takes float32/float16/bfloat16, got {tokens.dtype} and {text.dtype}")
        others = [t for t in (text, ln_weight, ln_bias) if t is not None]
        if any(t.device != tokens.device for t in others):
            raise ValueError("tokens, text and LayerNorm parameters must be on the same device")


# --------------------------------------------------------------------------------------------- Triton


@jit
def _vlcabs_kernel(
    tok_ptr, text_ptr, lnw_ptr, lnb_ptr, logits_ptr, maps_ptr,
    N, D, T, inv_tau, ln_eps,
    stride_tok_b, stride_tok_n, stride_tok_d,
    stride_text_t, stride_text_d,
    stride_logits_b, stride_logits_t,
    stride_maps_b, stride_maps_t, stride_maps_n,
    HAS_LN: tl.constexpr, HAS_MAPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Axis 0 = prompt tile, axis 1 = image: consecutive programs share one image's tokens in L2.
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    LOG2E: tl.constexpr = 1.4426950408889634

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    d_mask = offs_d < D  # BLOCK_D = next_power_of_2(D): padded lanes load 0 and stay 0

    t_rows = tl.load(
        text_ptr + offs_t[:, None].to(tl.int64) * stride_text_t + offs_d[None, :] * stride_text_d,
        mask=t_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)
    t_hat = t_rows / tl.maximum(tl.sqrt(tl.sum(t_rows * t_rows, 1)), 1e-12)[:, None]
    if HAS_LN:
        w = tl.load(lnw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        bias = tl.load(lnb_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    # Unnormalised Σ exp(s_i - m) v̂_i: the softmax denominator cancels in ĝ, so no running sum.
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    tok_base = tok_ptr + b * stride_tok_b
    maps_base = maps_ptr + b * stride_maps_b + offs_t[:, None].to(tl.int64) * stride_maps_t

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # Upcast at load: fp32 statistics (bf16 LayerNorm variance over 768 lanes loses ~3 digits).
        x = tl.load(
            tok_base + offs_n[:, None].to(tl.int64) * stride_tok_n + offs_d[None, :] * stride_tok_d,
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(x, 1) / D
            xc = tl.where(d_mask[None, :], x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, 1) / D
            x = xc * (1.0 / tl.sqrt(var + ln_eps))[:, None] * w[None, :] + bias[None, :]
        v_hat = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]

        s = tl.dot(t_hat, tl.trans(v_hat), input_precision=DOT_PRECISION) * inv_tau  # (BLOCK_T, BLOCK_N)
        if HAS_MAPS:
            tl.store(
                maps_base + (offs_n[None, :] - 1).to(tl.int64) * stride_maps_n,
                s.to(maps_ptr.dtype.element_ty),
                mask=t_mask[:, None] & (n_mask & (offs_n >= 1))[None, :],
            )
        # Token 0 (CLS) is always valid, so m_i is finite after the first block: no inf - inf.
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        acc = acc * alpha[:, None] + tl.dot(p, v_hat, input_precision=DOT_PRECISION)
        m_i = m_new

    g_norm = tl.maximum(tl.sqrt(tl.sum(acc * acc, 1)), 1e-12)
    logit = tl.sum(t_hat * acc, 1) / g_norm * inv_tau
    tl.store(logits_ptr + b * stride_logits_b + offs_t.to(tl.int64) * stride_logits_t, logit, mask=t_mask)


# tl.dot needs every tile side ≥ 16, so BLOCK_T starts at 16 (T < 16 wastes lanes, not bandwidth).
_BLOCK_T = (16, 32, 64)
_BLOCK_N = (16, 32, 64)
# fp32 tiles held at once: acc (BLOCK_T·BLOCK_D) in registers, v̂ (BLOCK_N·BLOCK_D) staged in shared
# memory for the second dot. 32K fp32 = 128 KiB: more spills registers or overflows 228 KiB of smem.
_MAX_TILE = 32 * 1024


def _configs() -> list:
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w, num_stages=2)
        for bt in _BLOCK_T
        for bn in _BLOCK_N
        for w in (4, 8, 16)
    ]


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Drop tiles wider than the prompt count or too large for registers/shared memory at this D."""
    t_cap = max(16, triton.next_power_of_2(named_args["T"]))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_T"] <= t_cap
        and c.kwargs["BLOCK_T"] * block_d <= _MAX_TILE
        and c.kwargs["BLOCK_N"] * block_d <= _MAX_TILE
        # Wide rows need many threads to hold acc + t̂ + the token tile without spilling, and
        # narrow ones do not fill 16 warps.
        and (c.num_warps >= 8 if block_d >= 512 else c.num_warps <= 8)
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"], c.num_warps))]


if HAS_TRITON:
    # Keyed on shapes and (implicitly) dtypes, never on B: B only widens the grid, so a new batch
    # size reuses the tuned config and the compiled binary.
    _vlcabs_kernel_tuned = triton.autotune(
        configs=_configs(), key=["N", "D", "T", "HAS_LN", "HAS_MAPS"], prune_configs_by={"early_config_prune": _prune}
    )(_vlcabs_kernel)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation, a module-level hook so tests can poison outputs with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def _vlcabs_launch(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    ln_eps: float,
    return_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(tokens, text, tau, ln_weight, ln_bias, kernel=True)
    # Unit stride on D gives vectorised loads; a no-op for the model's tensors.
    tokens, text = tokens.contiguous(), text.contiguous()
    has_ln = ln_weight is not None
    if has_ln:
        ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    b, n, d = tokens.shape
    t = text.shape[0]
    logits = _alloc((b, t), torch.float32, tokens.device)
    maps = _alloc((b, t, n - 1) if return_maps else (0, 0, 0), tokens.dtype, tokens.device)
    if b == 0 or t == 0:
        return logits, maps
    ms = maps.stride() if return_maps else (0, 0, 0)
    # ieee for fp32 inputs (tf32 costs ~1e-3 relative, the tests ask 1e-5); half inputs carry at
    # most 11 significant bits, which tf32 keeps, so they take the faster path.
    precision = "ieee" if tokens.dtype == torch.float32 else "tf32"
    block_d = max(16, triton.next_power_of_2(d))
    args = (
        tokens, text, ln_weight if has_ln else tokens, ln_bias if has_ln else tokens, logits, maps,
        n, d, t, 1.0 / tau, ln_eps,
        *tokens.stride(), *text.stride(), *logits.stride(), *ms,
        has_ln, return_maps, precision,
    )  # fmt: skip
    with device_of(tokens):
        if interpreting():
            # The interpreter cannot time configs; big N blocks keep its per-op overhead down.
            block_n = min(64, max(16, triton.next_power_of_2(n)))
            grid = (triton.cdiv(t, 16), b)
            _vlcabs_kernel[grid](*args, BLOCK_D=block_d, BLOCK_T=16, BLOCK_N=block_n)
        else:
            grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), b)
            _vlcabs_kernel_tuned[grid](*args, BLOCK_D=block_d)
    return logits, maps


@torch.library.custom_op("radflash::vlcabs", mutates_args=())
def _vlcabs_op(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    ln_eps: float,
    return_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # An opaque op for torch.compile: dynamo cannot trace the autotuner, and the kernel already
    # is the fused graph. Maps come back empty when not asked for (ops return fixed arities).
    return _vlcabs_launch(tokens, text, tau, ln_weight, ln_bias, ln_eps, return_maps)


@_vlcabs_op.register_fake
def _(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    ln_eps: float,
    return_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _ = tokens.shape
    t = text.shape[0]
    logits = tokens.new_empty((b, t), dtype=torch.float32)
    maps = tokens.new_empty((b, t, n - 1) if return_maps else (0, 0, 0))
    return logits, maps
