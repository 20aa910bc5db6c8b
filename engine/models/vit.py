"""DINOv2-style vision transformer and the align layers that RadZero stacks on it.

Written natively (not wrapping transformers) so that the image tower can be fused, exported to
ONNX with a dynamic batch axis and compiled. q, k and v live in one fused ``qkv`` projection: one
GEMM instead of three per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radflash.models.config import VisionConfig


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, with LayerScale (DINOv2) or without (MAE/timm, ``layer_scale=False``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = SelfAttention(cfg.hidden, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = Mlp(cfg.hidden, cfg.mlp)
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(cfg.hidden))
            self.ls2 = nn.Parameter(torch.ones(cfg.hidden))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ls1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


def interpolate_pos_grid(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Resize a (1, g0*g0, D) patch position table to rows×cols by transformers 4.39's rule.

    RadZero's weights were trained with that rule: a *scale factor* of (rows + 0.1) / g0 handed to
    bicubic interpolation, in float32. Later transformers pass the output size instead, which
    samples the table at different points (~7% of the embedding scale at 37×37), so we keep the
    old rule to reproduce the authors' numbers.
    """
    g0 = round(grid.shape[1] ** 0.5)
    if rows == g0 and cols == g0:
        return grid
    dim = grid.shape[-1]
    table = grid.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).float()
    table = F.interpolate(
        table,
        scale_factor=((rows + 0.1) / g0, (cols + 0.1) / g0),
        mode="bicubic",
        align_corners=False,
    )
    if table.shape[-2:] != (rows, cols):  # float rounding of the scale factor; never seen in practice
        raise RuntimeError(f"position interpolation gave {tuple(table.shape[-2:])}, expected {(rows, cols)}")
    return table.to(grid.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)


def _version(t: torch.Tensor) -> int:
    """In-place update counter; inference-mode tensors have none (and cannot change outside it)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class VisionTransformer(nn.Module):
    """Patch embedding + CLS + blocks + final LayerNorm (the backbone's ``last_hidden_state``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows×cols grid, computed once per resolution (not per forward)."""
        if (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return self._compute_table(rows, cols)  # stays in the autograd / traced graph
        # _version changes on every in-place update (optimizer step, load_state_dict), so a
        # stale table can never be served.
        key = (rows, cols, self.pos_embed.dtype, self.pos_embed.device, _version(self.pos_embed))
        table = self._pos_cache.get(key)
        if table is None:
            self._pos_cache.clear()
            with torch.no_grad():
                table = self._pos_cache[key] = self._compute_table(rows, cols)
        return table

    def _compute_table(self, rows: int, cols: int) -> torch.Tensor:
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        return torch.cat([cls_pos, interpolate_pos_grid(grid, rows, cols)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_table(rows, cols)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class AlignTransformer(nn.Module):
    """RadZero's trainable layers on top of the frozen backbone: DINOv2 blocks, no final norm."""

    def __init__(self, cfg: VisionConfig, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
