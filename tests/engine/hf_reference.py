"""An independent RadZero reference built from transformers' own modules, and the release layout.

transformers is a test-only dependency: its Dinov2Model and MPNetModel are built from configs
with random weights (never from a hub), wrapped exactly the way the released checkpoint nests
them, and the spec's head formulas are written out literally in float64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, MPNetConfig, MPNetModel

from radflash.checkpoints.factory import randomize_, wordpiece_tokenizer

HEAD = "loss_fns.KeyPhraseAlignmentLoss."
ALIGN = "align_transformer.transformer_layers.layer."


@dataclass
class Sizes:
    hidden: int = 48
    heads: int = 4
    vision_layers: int = 2
    align_layers: int = 2
    text_layers: int = 2
    mlp: int = 96
    patch: int = 14
    stored_grid: int = 4  # g0: the position table's grid
    vocab: int = 300


class ReleasedRadZero:
    """Random 'released' RadZero: HF modules + head LN + log τ, and the formulas of the spec."""

    def __init__(self, sizes: Sizes | None = None) -> None:
        self.sizes = s = sizes or Sizes()
        self.vcfg = Dinov2Config(
            hidden_size=s.hidden, num_hidden_layers=s.vision_layers, num_attention_heads=s.heads,
            intermediate_size=s.mlp, patch_size=s.patch, image_size=s.patch * s.stored_grid,
            layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.vision = randomize_(Dinov2Model(self.vcfg)).eval()
        acfg = Dinov2Config(**{**self.vcfg.to_dict(), "num_hidden_layers": s.align_layers})
        self.align = randomize_(Dinov2Model(acfg)).eval()  # only its encoder layers are used
        self.tcfg = MPNetConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.text_layers,
            num_attention_heads=s.heads, intermediate_size=s.mlp, layer_norm_eps=1e-5,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=130,
        )
        self.text = randomize_(MPNetModel(self.tcfg)).eval()
        self.head_ln = randomize_(torch.nn.LayerNorm(s.hidden, eps=1e-5))
        self.log_tau = torch.tensor(math.log(0.07) + 0.1 * torch.randn(()).item())
        self.tokenizer = wordpiece_tokenizer(vocab_size=s.vocab)

    # ---- release layout ----------------------------------------------------------------------
    def state_dict(self, *, old_names: bool = False) -> dict[str, torch.Tensor]:
        out = {f"vision_model.{k}": v for k, v in self.vision.state_dict().items()}
        out.update({f"text_model.{k}": v for k, v in self.text.state_dict().items()})
        for k, v in self.align.state_dict().items():
            if k.startswith("encoder.layer."):
                out[ALIGN + k[len("encoder.layer."):]] = v
        out[HEAD + "layer_norm.weight"] = self.head_ln.weight.detach()
        out[HEAD + "layer_norm.bias"] = self.head_ln.bias.detach()
        out[HEAD + "loss_temperature"] = self.log_tau.clone()
        if old_names:  # transformers 4.39 names, as in the released file
            ren = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                   "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
            fixed = {}
            for k, v in out.items():
                for a, b in ren.items():
                    k = k.replace(a, b)
                fixed[k] = v
            out = fixed
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def write_release(self, folder: Path, *, old_names: bool = True, mean=(0.3, 0.4, 0.5),
                      std=(0.2, 0.25, 0.3), image_size: int | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(old_names=old_names), str(folder / "model.safetensors"))
        config = {
            "architectures": ["CxrAlignModel"], "model_type": "cxr_align",
            "vision_config": {"model_type": "dinov2", **{k: v for k, v in self.vcfg.to_dict().items()
                                                         if k in ("num_attention_heads", "layer_norm_eps")}},
            "text_config": {"model_type": "mpnet", "num_attention_heads": self.sizes.heads,
                            "layer_norm_eps": 1e-5, "pad_token_id": 1},
            "align_transformer_config": {"num_attention_heads": self.sizes.heads},
        }
        (folder / "config.json").write_text(json.dumps(config))
        size = image_size or self.sizes.patch * self.sizes.stored_grid
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": size, "width": size}, "image_mean": list(mean), "image_std": list(std),
            "do_resize": True, "size": {"shortest_edge": size},
        }))
        self.tokenizer.save(str(folder / "tokenizer.json"))
        return folder

    # ---- reference forward ---------------------------------------------------------------------
    @torch.no_grad()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.vision(pixel_values=pixels).last_hidden_state
        for layer in self.align.encoder.layer:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        enc = self.tokenizer.encode_batch(prompts)
        length = max(len(e.ids) for e in enc)
        ids = torch.full((len(prompts), length), 1, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        return (hidden * m).sum(1) / m.sum(1)

    @torch.no_grad()
    def logits_and_sims(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The spec's formulas, literally, in float64: logits (B, T) and s (B, T, N) without CLS."""
        ln = self.head_ln.double()
        v = ln(self.image_tokens(pixels).double())
        t = ln(self.text_embeddings(prompts).double())
        tau = math.exp(float(self.log_tau))
        v_hat = v / v.norm(dim=-1, keepdim=True)
        t_hat = t / t.norm(dim=-1, keepdim=True)
        s = torch.einsum("td,bnd->btn", t_hat, v_hat) / tau
        a = torch.softmax(s, dim=-1)
        g = torch.einsum("btn,bnd->btd", a, v_hat)
        ell = (t_hat[None] * g / g.norm(dim=-1, keepdim=True)).sum(-1)
        return ell / tau, s[..., 1:]


def maps_from_sims(sims: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Spec pixel map: reshape to the patch grid, bilinear (align_corners=False), sigmoid."""
    b, t, _ = sims.shape
    up = F.interpolate(sims.reshape(b * t, 1, *grid), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(up).reshape(b, t, *size)


def interpolate_pos_439(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """transformers 4.39's Dinov2 rule, written out from the spec: scale factors (n // p + 0.1) / g0."""
    g0 = int(math.sqrt(grid.shape[1]))
    dim = grid.shape[-1]
    table = grid.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).to(torch.float32)
    h, w = rows + 0.1, cols + 0.1
    table = F.interpolate(table, scale_factor=(h / g0, w / g0), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, -1, dim)
