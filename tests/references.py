"""Float64 references written out from the spec, shared by the CPU kernel tests and the GPU tests.

Each shares no code with radflash (LayerNorm by hand, softmax by max-shift), so a test that
compares radflash against one checks the implementation against the spec, not against itself.
"""

from __future__ import annotations

import torch


def head_f64(
    tokens: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VL-CABS from the spec's formulas in float64: logits (B, T), patch maps s (B, T, N−1), ‖Σ a·v̂‖ (B, T)."""
    x = tokens.double()
    if ln_weight is not None:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double()
    v = x / x.norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    s = torch.einsum("bnd,td->btn", v, t) / tau
    a = torch.exp(s - s.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    g = torch.einsum("btn,bnd->btd", a, v)
    g_norm = g.norm(dim=-1)
    logits = (g / g_norm[..., None] * t).sum(-1) / tau
    return logits, s[..., 1:], g_norm
