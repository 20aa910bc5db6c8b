"""MPNet-style sentence encoder (all-mpnet-base-v2 architecture) with mean pooling.

Post-norm BERT layers plus MPNet's bucketed relative position bias, shared by all layers. The
bias depends only on the padded sequence length, so it is built once per length and reused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from radflash.models.config import TextConfig


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5/MPNet bucketing: exact buckets for small offsets, log-spaced ones up to max_distance."""
    n = -relative
    half = num_buckets // 2
    bucket = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


class TextLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.out(attn.transpose(1, 2).reshape(b, n, d)))
        return self.mlp_norm(x + self.fc2(F.gelu(self.fc1(x))))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embed = nn.Embedding(cfg.vocab, cfg.hidden, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden, padding_idx=cfg.pad_id)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.layers))
        self.relative_bias = nn.Embedding(cfg.buckets, cfg.heads)

    def position_bias(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.relative_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.buckets, self.cfg.max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)  # (heads, L, L)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pad = self.cfg.pad_id
        keep = input_ids.ne(pad).long()
        # fairseq/MPNet positions: count real tokens, start after the padding index
        positions = torch.cumsum(keep, dim=1) * keep + pad
        x = self.embed_norm(self.word_embed(input_ids) + self.pos_embed(positions))
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)
        bias = self.position_bias(input_ids.shape[1]).to(x.dtype)[None] + mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings: attention-mask-weighted mean of the last hidden states."""
        x = self.hidden_states(input_ids, attention_mask)
        weights = attention_mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
