"""CARZero: MAE ViT-B/16 image tower, BERT word features, and cross-attention alignment scores.

The score of image i and prompt j is S = (s1 + s2) / 2, two single-query passes of the fusion
decoder (:mod:`radflash.models.fusion`):
- i2t: the prompt's global feature t_j queries the image's 197 tokens [g_i; P_i] → s1;
- t2i: the image's CLS g_i queries the prompt's 98 rows [t_j; W_j] → s2.
Both are batched over every pair at once. The prompt side (t_j, and the keys and values of
[t_j; W_j] in every decoder layer) depends on the prompt only, so :meth:`text_features` returns
it packed in one tensor per prompt, which the API caches with the prompt: per batch of images,
only the image side is computed.

``S`` has no probabilistic meaning of its own (the paper computes AUC on it); the API reports
``sigmoid(S)`` as the monotone map to [0, 1]. There are no per-patch similarity maps: segment and
grounding refuse CARZero models with one line (:attr:`supports_maps`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from radflash.errors import InputError
from radflash.models.bert import BertEncoder
from radflash.models.config import ModelConfig
from radflash.models.fusion import KV, Fusion
from radflash.models.vit import VisionTransformer


class CARZero(nn.Module):
    """The ``carzero`` family (see :class:`radflash.models.base.ModelFamily`)."""

    supports_maps = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.fusion is None:  # the config schema refuses this already; keep the invariant local
            raise ValueError("a carzero model needs a fusion config")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = BertEncoder(cfg.text)
        self.fusion = Fusion(cfg.vision.hidden, cfg.fusion)

    def bind_vocabulary(self, vocab: Mapping[str, int]) -> None:
        """Record which token ids continue a word (the tokenizer the checkpoint ships with)."""
        self.text.bind_vocabulary(vocab)

    # ---- towers -------------------------------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) → (B, 197, D): CLS g then the 14×14 patches P, after the final norm."""
        return self.vision(pixels)

    def prompt_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, 1 + L, D) raw text memory [t; W]: t is the mean of W over all L rows, zeros included."""
        words = self.text.word_features(input_ids, attention_mask)
        return torch.cat([words.mean(dim=1, keepdim=True), words], dim=1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Everything the head needs of a prompt, packed (T, 1 + 2·layers·(1 + L), D).

        Row 0 is t (the i2t query); then, per decoder layer, the keys and then the values of the
        normalised memory [t; W] (the t2i keys/values). Computed once per prompt set.
        """
        memory = self.prompt_memory(input_ids, attention_mask)
        kv = self.fusion.memory_kv(memory)
        return torch.cat([memory[:, :1], *(x for pair in kv for x in pair)], dim=1)

    def unpack_text(self, text: torch.Tensor) -> tuple[torch.Tensor, list[KV]]:
        """Inverse of :meth:`text_features`: queries t (T, D) and per-layer (keys, values) (T, 1 + L, D)."""
        rows = 1 + self.cfg.text.max_length
        layers = len(self.fusion.layers)
        kv = text[:, 1:].unflatten(1, (layers, 2, rows))
        return text[:, 0], [(kv[:, i, 0], kv[:, i, 1]) for i in range(layers)]

    # ---- scores -------------------------------------------------------------------------------
    def head(
        self, tokens: torch.Tensor, text: torch.Tensor, *, return_maps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S (B, T) = (s1 + s2) / 2 for image tokens (B, 197, D) and packed prompt features."""
        if return_maps:
            raise InputError("model family 'carzero' has no similarity maps; use score")
        query, text_kv = self.unpack_text(text.to(tokens.dtype))
        return self.pair_scores(tokens, query, text_kv).mean(0), None

    def pair_scores(self, tokens: torch.Tensor, query: torch.Tensor, text_kv: list[KV]) -> torch.Tensor:
        """(2, B, T): s1 (i2t) and s2 (t2i) for every image and prompt."""
        s1 = self.fusion.decode(query[None], self.fusion.memory_kv(tokens))  # memories: images
        s2 = self.fusion.decode(tokens[None, :, 0], text_kv)  # memories: prompts → (T, B)
        return torch.stack([s1, s2.T])

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(2, B, T) score matrices s1, s2: the differentiable path training uses (plain torch)."""
        tokens = self.image_tokens(pixels)
        memory = self.prompt_memory(input_ids, attention_mask)
        return self.pair_scores(tokens, memory[:, 0], self.fusion.memory_kv(memory))
