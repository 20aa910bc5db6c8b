"""What every model family offers the rest of radflash: the protocol the API and the verbs use.

Why a protocol and not a base class: each family is a plain ``nn.Module`` with its own parts
(RadZero: DINOv2 + align layers, MPNet, the VL-CABS head; CARZero: MAE ViT, BERT, a
cross-attention fusion). Nothing is inherited; the API only needs these few members, so a family
satisfies the protocol by shape, and :func:`radflash.models.registry.build` checks that it does
when it builds one. Backends swap :meth:`image_tokens` only; the API caches
:meth:`text_features` per prompt and calls :meth:`head` for scores and, where
:attr:`supports_maps` says so, patch similarity maps.

This module imports no torch model code and no kernels (``torch`` only for type checking).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from radflash.models.config import ModelConfig


# The protocol's members, named for error messages (``typing`` keeps its own list private).
MEMBERS = ("cfg", "supports_maps", "image_tokens", "text_features", "head")


@runtime_checkable
class ModelFamily(Protocol):
    """The family-agnostic interface: encode images, encode prompts, score (and map) them.

    Families are ``nn.Module`` s as well (weights load through ``load_state_dict``, the API moves
    them with ``.to``); a protocol cannot say "and is an nn.Module", so :func:`build` checks both.
    """

    cfg: ModelConfig
    # True when :meth:`head` can return per-patch similarity maps (segmentation, grounding).
    # A class attribute, so the capability is known before anything is encoded.
    supports_maps: bool

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, 1 + N, D) image tokens (CLS first, then N patches)."""
        ...

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L) token ids → per-prompt features with T leading (cached per prompt by the API)."""
        ...

    def head(
        self, tokens: torch.Tensor, text: torch.Tensor, *, return_maps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T) and, when asked and supported, patch similarity logits (B, T, N)."""
        ...
