"""The RadZero reference formulation, for side-by-side benchmarks: transformers modules, fp32, eager.

``ReferenceRadZero.from_model(model)`` rebuilds what the released code runs, with the SAME
weights as a loaded :class:`radflash.api.RadFlashModel`:

* image tower: transformers' ``Dinov2Model`` (eager attention, fp32) with transformers 4.39's
  position-interpolation rule (the one the weights were trained with; see the spec), then the
  two align layers as transformers ``Dinov2Layer`` modules;
* text tower: transformers' ``MPNetModel`` + attention-mask mean pooling + the shared LayerNorm;
* head: VL-CABS written out here in the RadZero code's own order, one tensor per step and nothing
  fused (:meth:`ReferenceRadZero.head`); it shares no code with radflash's head (no
  ``radflash.kernels``, no ``radflash.models``: a test checks the imports), so a bench ratio
  compares two independent implementations; pixel maps: ``F.interpolate`` (bilinear,
  align_corners=False) + sigmoid + arg-max, written out;
* DICOM decode and preprocessing as the reference code does them: pydicom pixel data scaled
  by 255/max (MONOCHROME1 inverted), PIL bicubic resize, mean/std normalisation.

Weights travel through the released checkpoint layout: :func:`native_to_released` is the
inverse of :func:`radflash.checkpoints.converters.radzero.released_to_native`. transformers is optional (the ``bench``
extra) and imported only here, lazily.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from radflash.errors import BackendUnavailable, InputError
from radflash.models.config import ModelConfig

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

HEAD = "loss_fns.KeyPhraseAlignmentLoss."
ALIGN = "align_transformer.transformer_layers.layer."
INSTALL_HINT = "the reference path needs transformers: pip install 'transformers>=4.44' (the radflash 'bench' extra)"

_DINO_PLAIN = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "attn.proj": "attention.o_proj"}
# Tensors outside the layers that only change name: radflash name → released name.
_RENAMED = {
    "vision.cls_token": "vision_model.embeddings.cls_token",
    "vision.pos_embed": "vision_model.embeddings.position_embeddings",
    "vision.patch_embed.weight": "vision_model.embeddings.patch_embeddings.projection.weight",
    "vision.patch_embed.bias": "vision_model.embeddings.patch_embeddings.projection.bias",
    "vision.norm.weight": "vision_model.layernorm.weight",
    "vision.norm.bias": "vision_model.layernorm.bias",
    "text.word_embed.weight": "text_model.embeddings.word_embeddings.weight",
    "text.pos_embed.weight": "text_model.embeddings.position_embeddings.weight",
    "text.embed_norm.weight": "text_model.embeddings.LayerNorm.weight",
    "text.embed_norm.bias": "text_model.embeddings.LayerNorm.bias",
    "text.relative_bias.weight": "text_model.encoder.relative_attention_bias.weight",
    "head_norm.weight": HEAD + "layer_norm.weight",
    "head_norm.bias": HEAD + "layer_norm.bias",
    "log_tau": HEAD + "loss_temperature",
}
_MPNET_PLAIN = {"out": "attention.attn.o", "attn_norm": "attention.LayerNorm", "fc1": "intermediate.dense",
                "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}
# transformers ≤ 4.x names of the DINOv2 attention projections (5.x: q_proj, k_proj, v_proj, o_proj)
_TF4_NAMES = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from None
    return transformers


# ---- weights: radflash layout → released layout ---------------------------------------------------
def native_to_released(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """radflash state dict → the released RadZero names (transformers 5.x DINOv2 names).

    Inverse of :func:`radflash.checkpoints.converters.radzero.released_to_native`: fused qkv projections are split back,
    LayerScale gains renamed, and the unused ``mask_token`` is added as zeros.
    """
    out = {theirs: state[ours] for ours, theirs in _RENAMED.items()}
    out["vision_model.embeddings.mask_token"] = torch.zeros(1, cfg.vision.hidden, dtype=state["vision.cls_token"].dtype)
    for i in range(cfg.vision.layers):
        _dino_layer(state, f"vision.blocks.{i}.", f"vision_model.encoder.layer.{i}.", out)
    for i in range(cfg.align_layers):
        _dino_layer(state, f"align.blocks.{i}.", f"{ALIGN}{i}.", out)
    for i in range(cfg.text.layers):
        p, q = f"text.layers.{i}.", f"text_model.encoder.layer.{i}."
        for part in ("weight", "bias"):
            for name, chunk in zip("qkv", state[f"{p}qkv.{part}"].chunk(3)):
                out[f"{q}attention.attn.{name}.{part}"] = chunk
            for ours, theirs in _MPNET_PLAIN.items():
                out[f"{q}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
    return {k: t.detach().clone().contiguous() for k, t in out.items()}


def _dino_layer(state: dict[str, torch.Tensor], p: str, q: str, out: dict[str, torch.Tensor]) -> None:
    for part in ("weight", "bias"):
        for name, chunk in zip(("q_proj", "k_proj", "v_proj"), state[f"{p}attn.qkv.{part}"].chunk(3)):
            out[f"{q}attention.{name}.{part}"] = chunk
        for ours, theirs in _DINO_PLAIN.items():
            out[f"{q}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
    out[q + "layer_scale1.lambda1"] = state[p + "ls1"]
    out[q + "layer_scale2.lambda1"] = state[p + "ls2"]


def _sub(released: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix``, renamed to transformers 4.x names if ``module`` uses those."""
    sub = {k[len(prefix):]: t for k, t in released.items() if k.startswith(prefix)}
    if any(".attention.attention.query." in k for k in module.state_dict()):
        renamed = {}
        for k, t in sub.items():
            for new, old in _TF4_NAMES.items():
                k = k.replace(new, old)
            renamed[k] = t
        sub = renamed
    return sub


# ---- transformers 4.39's position interpolation (the rule the weights were trained with) ----------
def _interpolate_pos_encoding_439(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers 4.39 ``Dinov2Embeddings.interpolate_pos_encoding``, written out from the spec."""
    num_patches = embeddings.shape[1] - 1
    num_positions = self.position_embeddings.shape[1] - 1
    if num_patches == num_positions and height == width:
        return self.position_embeddings
    class_pos_embed = self.position_embeddings[:, 0]
    patch_pos_embed = self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    height = height // self.config.patch_size + 0.1
    width = width // self.config.patch_size + 0.1
    g0 = math.sqrt(num_positions)
    patch_pos_embed = patch_pos_embed.reshape(1, int(g0), int(g0), dim).permute(0, 3, 1, 2)
    target_dtype = patch_pos_embed.dtype
    patch_pos_embed = F.interpolate(patch_pos_embed.to(torch.float32), scale_factor=(height / g0, width / g0),
                                    mode="bicubic", align_corners=False).to(dtype=target_dtype)
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


# ---- the reference model ------------------------------------------------------------------------------
class ReferenceRadZero:
    """RadZero as the released code computes it (transformers modules, fp32, eager attention)."""

    def __init__(self, released: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any, *,
                 device: torch.device | str = "cpu") -> None:
        tf = _transformers()
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, torch.device(device)
        vc = cfg.vision
        if vc.mlp % vc.hidden:  # Dinov2Config has no intermediate_size: the MLP width is hidden · mlp_ratio
            raise InputError(f"the transformers Dinov2 reference needs an MLP width that is a multiple of the "
                             f"hidden width, got {vc.mlp} and {vc.hidden}")
        vcfg = tf.Dinov2Config(
            hidden_size=vc.hidden, num_hidden_layers=vc.layers, num_attention_heads=vc.heads,
            mlp_ratio=vc.mlp // vc.hidden,
            patch_size=vc.patch, image_size=vc.patch * vc.pos_grid, num_channels=vc.in_chans, layer_norm_eps=vc.eps,
            hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        self.vision = tf.Dinov2Model(vcfg)
        self.vision.embeddings.interpolate_pos_encoding = types.MethodType(
            _interpolate_pos_encoding_439, self.vision.embeddings)
        self.vision.load_state_dict(_sub(released, "vision_model.", self.vision), strict=True)
        layer_cls = type(self.vision.encoder.layer[0])
        self.align = torch.nn.ModuleList(layer_cls(vcfg) for _ in range(cfg.align_layers))
        self.align.load_state_dict(_sub(released, ALIGN, self.align), strict=True)
        tc = cfg.text
        tcfg = tf.MPNetConfig(
            vocab_size=tc.vocab, hidden_size=tc.hidden, num_hidden_layers=tc.layers, num_attention_heads=tc.heads,
            intermediate_size=tc.mlp, max_position_embeddings=tc.max_positions,
            relative_attention_num_buckets=tc.buckets, layer_norm_eps=tc.eps, pad_token_id=tc.pad_id,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        self.text = tf.MPNetModel(tcfg, add_pooling_layer=False)
        self.text.load_state_dict(_sub(released, "text_model.", self.text), strict=False)
        self.head_norm = torch.nn.LayerNorm(tc.hidden, eps=cfg.head_eps)
        self.head_norm.weight.data.copy_(released[HEAD + "layer_norm.weight"])
        self.head_norm.bias.data.copy_(released[HEAD + "layer_norm.bias"])
        self.log_tau = float(released[HEAD + "loss_temperature"])
        for m in (self.vision, self.align, self.text, self.head_norm):
            m.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_model(cls, model: RadFlashModel) -> ReferenceRadZero:
        """The reference with ``model``'s weights (converted through the released layout), on its device."""
        state = {k: t.detach().float().cpu() for k, t in model.module.state_dict().items()}
        return cls(native_to_released(state, model.config), model.config, model.tokenizer, device=model.device)

    @property
    def tau(self) -> float:
        return math.exp(self.log_tau)

    # ---- towers -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 1 + N, D): Dinov2 ``last_hidden_state`` then the align layers."""
        x = self.vision(pixel_values=pixels.to(self.device, torch.float32)).last_hidden_state
        for layer in self.align:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(T, D) mean-pooled MPNet embeddings after the shared LayerNorm (cached per prompt list)."""
        key = tuple(prompts)
        if key not in self._text_cache:
            ids, mask = self.tokenizer(list(prompts))
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].float()
            self._text_cache[key] = self.head_norm((hidden * m).sum(1) / m.sum(1))
        return self._text_cache[key]

    # ---- head and maps ----------------------------------------------------------------------------
    @torch.inference_mode()
    def head(self, tokens: torch.Tensor, text: torch.Tensor, *, return_maps: bool = False):
        """VL-CABS as the RadZero code computes it: logits (B, T) float32, and s (B, T, N − 1) if asked.

        The released code's steps, in its order, each materialised (this is what radflash's fused
        head is measured against): LayerNorm the image tokens (the prompts come through the same
        LayerNorm from :meth:`text_features`); repeat the prompts per image; L2-normalise prompts
        and tokens; scores = batched prompts @ tokensᵀ / τ over all tokens, CLS included; softmax
        over the tokens; weighted sum of the normalised tokens; L2-normalise prompts again and the
        pooled vector; cosine as a batched (1×D)@(D×1) product; logit = cosine / τ. The maps are the
        scores without the CLS column. float64 inputs are computed in float64 (for tests), all else
        in float32 like the released model.
        """
        dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        tau = torch.tensor(self.log_tau, dtype=dtype).exp()
        x = tokens.to(self.device, dtype)
        x = F.layer_norm(x, (x.shape[-1],), self.head_norm.weight.to(dtype), self.head_norm.bias.to(dtype),
                         self.head_norm.eps)
        b, t = x.shape[0], text.shape[0]
        queries = text.to(self.device, dtype).unsqueeze(0).expand(b, t, text.shape[-1])
        queries = F.normalize(queries, p=2, dim=-1)
        keys = F.normalize(x, p=2, dim=-1)
        scores = torch.bmm(queries, keys.permute(0, 2, 1)) / tau  # (B, T, N)
        weights = F.softmax(scores, dim=-1)
        pooled = torch.matmul(weights, keys)  # (B, T, D)
        queries = F.normalize(queries, p=2, dim=-1)
        pooled = F.normalize(pooled, p=2, dim=-1)
        cosine = torch.matmul(queries.unsqueeze(2), pooled.unsqueeze(-1)).reshape(b, t)
        logits = (cosine / tau).float()
        return logits, (scores[:, :, 1:].contiguous() if return_maps else None)

    @staticmethod
    @torch.inference_mode()
    def maps(sims: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
        """Spec pixel maps: bilinear (align_corners=False) to ``size``, sigmoid; arg-max pixel and its prob."""
        b, t, _ = sims.shape
        up = F.interpolate(sims.float().reshape(b * t, 1, *grid), size=size, mode="bilinear", align_corners=False)
        up = up.reshape(b, t, -1)
        peak = up.argmax(-1)
        return torch.sigmoid(up).reshape(b, t, *size), peak, torch.sigmoid(up.gather(-1, peak[..., None]))[..., 0]

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        logits, _ = self.head(self.image_tokens(pixels), self.text_features(prompts))
        return logits

    # ---- the reference code's DICOM handling and preprocessing -------------------------------------
    @staticmethod
    def decode(path: str | Path) -> np.ndarray:
        """pydicom pixel data → uint8 H×W: scale by 255/max, invert MONOCHROME1 (the reference's rule)."""
        import pydicom

        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
        if arr.ndim == 3:  # multi-frame: first frame
            arr = arr[0]
        arr = arr * (255.0 / max(float(arr.max()), 1e-6))
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = 255.0 - arr
        return arr.clip(0, 255).astype(np.uint8)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 H×W images → (B, 3, S, S) float32: PIL RGB, bicubic resize, /255, mean/std (image processor)."""
        from PIL import Image

        size = self.cfg.image_size
        mean = np.asarray(self.cfg.mean, dtype=np.float32)
        std = np.asarray(self.cfg.std, dtype=np.float32)
        batch = []
        for img in images:
            pil = Image.fromarray(img).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            batch.append((np.asarray(pil, dtype=np.float32) / 255.0 - mean) / std)
        return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(self.device)
