"""RadZero: image tower + align layers, MPNet text tower, and the VL-CABS similarity head.

The module holds weights and the tensor maths only; tokenising, preprocessing, caching of prompt
embeddings and device handling live in :mod:`radflash.api`, so that compiled backends can swap
the image tower without touching the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from radflash.kernels import vlcabs, vlcabs_ref
from radflash.models.config import ModelConfig
from radflash.models.text import TextEncoder
from radflash.models.vit import AlignTransformer, VisionTransformer


class RadZero(nn.Module):
    """The ``radzero`` family (see :class:`radflash.models.base.ModelFamily`)."""

    # VL-CABS keeps the per-patch similarities s, so pixel maps come with the scores.
    supports_maps = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.align = AlignTransformer(cfg.vision, cfg.align_layers)
        self.text = TextEncoder(cfg.text)
        # One LayerNorm shared by both towers, and log τ (τ is used in the attention and the logit).
        self.head_norm = nn.LayerNorm(cfg.vision.hidden, eps=cfg.head_eps)
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.07)))

    @property
    def tau(self) -> float:
        return float(self.log_tau.detach().exp())

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, 1 + N, D) tokens, before the shared LayerNorm."""
        return self.align(self.vision(pixels))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L) token ids → (T, D) prompt embeddings after the shared LayerNorm."""
        return self.head_norm(self.text(input_ids, attention_mask))

    def head(
        self, tokens: torch.Tensor, text: torch.Tensor, *, return_maps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """VL-CABS logits (B, T) and optionally patch similarity maps s (B, T, N) with CLS dropped.

        The shared LayerNorm of the image tokens is fused into the head kernel, so the normalised
        tokens are never written out.
        """
        return vlcabs(
            tokens,
            text.to(tokens.dtype),
            self.log_tau.detach().exp().item(),
            ln_weight=self.head_norm.weight,
            ln_bias=self.head_norm.bias,
            ln_eps=self.head_norm.eps,
            return_maps=return_maps,
        )

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T): the differentiable path used by training (plain torch, autograd-safe)."""
        tokens = self.head_norm(self.image_tokens(pixels))
        text = self.text_features(input_ids, attention_mask)
        return self.cosine(tokens, text) / self.log_tau.exp()

    def cosine(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """ℓ (B, T) for already-LayerNormed tokens; differentiable in the inputs and in τ.

        The plain-torch head reference is autograd-safe, so training shares it rather than keeping
        a second copy of the formulas.
        """
        tau = self.log_tau.exp()
        logits, _ = vlcabs_ref(tokens, text, tau)
        return logits * tau
