"""CARZero's cross-attention fusion: decoder layers without self-attention and a scoring MLP.

Each (image, prompt) pair is scored by a single-query decoder pass, and with no self-attention the
queries of different pairs never interact. So one direction is run as a batch of memories with
many queries each: i2t has one memory per image (its 197 tokens) and every prompt as a query;
t2i has one memory per prompt (its 98 word rows) and every image as a query. The keys and values
of a memory are projected once per layer and reused by all its queries; for prompts they are
computed once per prompt set and cached by the API (:meth:`Fusion.memory_kv`), where the
reference recomputes them for every image.

The layer is pre-norm: ``h += MHA(LN2(h), M, M)``, ``h += FFN(LN3(h))``. One LayerNorm
(``decoder_norm``) normalises the query input, the memory (once) and the output. No key padding
mask: the reference attends to the zero rows of short prompts too, and so does this.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from radflash.kernels import cross_attention, cross_attention_ref
from radflash.models.config import FusionConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (N, K, D)


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (packed in-projection), used as cross-attention only."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project_kv(self, memory: torch.Tensor) -> KV:
        """Keys and values of a normalised memory (N, K, D): the part that can be cached."""
        d = memory.shape[-1]
        w, b = self.in_proj_weight[d:], self.in_proj_bias[d:]
        k, v = F.linear(memory, w, b).chunk(2, dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        """x (N or 1, Q, D) queries → (N, Q, D); a query batch of 1 is shared by all N memories."""
        k, v = kv
        n, kn, d = k.shape
        q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
        dh = d // self.heads
        q = q.view(q.shape[0], q.shape[1], self.heads, dh).expand(n, -1, -1, -1)
        # the fused kernel has no backward: training (autograd) takes the plain-torch path
        attend = cross_attention_ref if torch.is_grad_enabled() and q.requires_grad else cross_attention
        out = attend(q, k.view(n, kn, self.heads, dh), v.view(n, kn, self.heads, dh))
        return self.out_proj(out.reshape(n, -1, d))


class FusionLayer(nn.Module):
    def __init__(self, dim: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, cfg.heads)
        self.linear1 = nn.Linear(dim, cfg.ffn)
        self.linear2 = nn.Linear(cfg.ffn, dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps)

    def forward(self, h: torch.Tensor, kv: KV) -> torch.Tensor:
        h = h + self.cross_attn(self.norm2(h), kv)
        return h + self.linear2(F.relu(self.linear1(self.norm3(h))))


class Fusion(nn.Module):
    def __init__(self, dim: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(dim, cfg) for _ in range(cfg.layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=cfg.eps)
        widths = [dim, *cfg.mlp, 1]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def memory_kv(self, memory: torch.Tensor) -> list[KV]:
        """Every layer's keys and values of raw memories (N, K, D), after the shared LayerNorm."""
        normed = self.decoder_norm(memory)
        return [layer.cross_attn.project_kv(normed) for layer in self.layers]

    def decode(self, queries: torch.Tensor, kv: list[KV]) -> torch.Tensor:
        """Scores (N, Q) of raw queries against N memories; ``queries`` is (N or 1, Q, D)."""
        h = self.decoder_norm(queries)
        for layer, layer_kv in zip(self.layers, kv):
            h = layer(h, layer_kv)
        x = self.decoder_norm(h)
        for i, linear in enumerate(self.mlp):
            x = linear(x) if i == len(self.mlp) - 1 else F.relu(linear(x))
        return x.squeeze(-1)
