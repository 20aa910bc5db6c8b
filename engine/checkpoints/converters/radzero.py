"""Convert a local copy of the released RadZero Hugging Face folder into a radflash checkpoint.

The release stores a custom ``CxrAlignConfig`` model: transformers' ``Dinov2Model`` under
``vision_model.``, ``MPNetModel`` under ``text_model.``, two DINOv2 layers under
``align_transformer.transformer_layers.layer.N.`` and the head's LayerNorm and log τ under
``loss_fns.KeyPhraseAlignmentLoss.``. Sizes are read from the tensors themselves (the config is
custom code we never import); head counts and epsilons from ``config.json`` where present.
Nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from radflash.checkpoints.converters import read_json
from radflash.checkpoints.format import Checkpoint, check_state_dict, save_checkpoint
from radflash.errors import CheckpointError
from radflash.findings import default_prompts
from radflash.models import RadZero
from radflash.models.config import ModelConfig, TextConfig, VisionConfig
from radflash.tokenizer import PromptTokenizer
from radflash.util.schema import describe

HEAD = "loss_fns.KeyPhraseAlignmentLoss."

# DINOv2 layer names: transformers ≤4.x ("attention.attention.query") and 5.x ("attention.q_proj").
_DINO_LAYER = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1", "layer_scale2.lambda1": "ls2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
}
_DINO_QKV = {
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
}
_MPNET_LAYER = {
    "attention.attn.o": "out", "attention.LayerNorm": "attn_norm", "intermediate.dense": "fc1",
    "output.dense": "fc2", "output.LayerNorm": "mlp_norm",
}


def convert_radzero(src: str | Path, dst: str | Path, *, model_id: str | None = None) -> Path:
    """Read ``src`` (config.json, model.safetensors, tokenizer.json, preprocessor_config.json)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: expected the released RadZero folder (config.json, model.safetensors, ...)")
    hf_config = read_json(src / "config.json", required=False)
    pre = read_json(src / "preprocessor_config.json", required=True)
    tensors = _read_released_tensors(src)
    try:
        state, cfg = released_to_native(tensors, hf_config, pre)
    except ValidationError as exc:  # sizes read from the release that no radflash model can have
        raise CheckpointError(describe(exc, f"{src}: {exc.title}")) from None
    tokenizer = PromptTokenizer.from_file(
        _need(src / "tokenizer.json"), pad_id=cfg.text.pad_id, max_length=cfg.text.max_length
    )
    check_state_dict(RadZero(cfg), state, str(src))
    ckpt = Checkpoint(
        config=cfg, state_dict=state, tokenizer=tokenizer, model_id=model_id or f"radzero:{src.name}",
        prompts=default_prompts(), source=str(src),
    )
    return save_checkpoint(ckpt, dst)


def released_to_native(
    tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], preprocessor: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Rename/fuse released tensors into radflash names and infer the architecture config."""
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    vis = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    txt = {k[len("text_model."):]: v for k, v in tensors.items() if k.startswith("text_model.")}
    align_prefix = "align_transformer.transformer_layers.layer."
    aln = {k[len(align_prefix):]: v for k, v in tensors.items() if k.startswith(align_prefix)}
    known = ("vision_model.", "text_model.", align_prefix, HEAD)
    unused += [k for k in tensors if not k.startswith(known)]

    emb = "embeddings."
    out["vision.cls_token"] = _take(vis, emb + "cls_token")
    out["vision.pos_embed"] = _take(vis, emb + "position_embeddings")
    out["vision.patch_embed.weight"] = _take(vis, emb + "patch_embeddings.projection.weight")
    out["vision.patch_embed.bias"] = _take(vis, emb + "patch_embeddings.projection.bias")
    vis.pop(emb + "mask_token", None)  # only used for masked-image pre-training
    out["vision.norm.weight"] = _take(vis, "layernorm.weight")
    out["vision.norm.bias"] = _take(vis, "layernorm.bias")
    n_vis = _convert_dino_layers(vis, "encoder.layer.", "vision.blocks.", out)
    n_align = _convert_dino_layers(aln, "", "align.blocks.", out)

    out["text.word_embed.weight"] = _take(txt, "embeddings.word_embeddings.weight")
    out["text.pos_embed.weight"] = _take(txt, "embeddings.position_embeddings.weight")
    out["text.embed_norm.weight"] = _take(txt, "embeddings.LayerNorm.weight")
    out["text.embed_norm.bias"] = _take(txt, "embeddings.LayerNorm.bias")
    out["text.relative_bias.weight"] = _take(txt, "encoder.relative_attention_bias.weight")
    for key in [k for k in txt if k.startswith(("pooler.", "embeddings.position_ids"))]:
        txt.pop(key)  # the pooler is not used by mean pooling
    n_txt = 0
    while f"encoder.layer.{n_txt}.attention.attn.q.weight" in txt:
        p, q = f"encoder.layer.{n_txt}.", f"text.layers.{n_txt}."
        for part in ("weight", "bias"):
            out[q + "qkv." + part] = torch.cat([_take(txt, f"{p}attention.attn.{x}.{part}") for x in "qkv"])
            for old, new in _MPNET_LAYER.items():
                out[f"{q}{new}.{part}"] = _take(txt, f"{p}{old}.{part}")
        n_txt += 1

    out["head_norm.weight"] = _take(tensors, HEAD + "layer_norm.weight")
    out["head_norm.bias"] = _take(tensors, HEAD + "layer_norm.bias")
    out["log_tau"] = _take(tensors, HEAD + "loss_temperature").reshape(())  # stores log τ
    unused += [f"vision_model.{k}" for k in vis] + [f"text_model.{k}" for k in txt]
    unused += [f"{align_prefix}{k}" for k in aln]
    unused += [k for k in tensors if k.startswith(HEAD) and k[len(HEAD):] not in
               ("layer_norm.weight", "layer_norm.bias", "loss_temperature")]
    if unused:
        shown = ", ".join(sorted(unused)[:6])
        raise CheckpointError(f"released checkpoint has {len(unused)} tensor(s) radflash does not know: {shown}")

    vc = hf_config.get("vision_config") or {}
    tc = hf_config.get("text_config") or {}
    ac = hf_config.get("align_transformer_config") or {}
    hidden = out["vision.cls_token"].shape[-1]
    if "num_attention_heads" not in vc and hidden % 64:
        raise CheckpointError("config.json: vision_config.num_attention_heads is needed for width "
                              f"{hidden} (the 64-wide-head default does not divide it)")
    pos_positions = out["vision.pos_embed"].shape[1] - 1
    g0 = round(pos_positions**0.5)
    if g0 * g0 != pos_positions:
        raise CheckpointError(f"vision position table has {pos_positions} patch positions, not a square grid")
    vision = VisionConfig(
        hidden=hidden, layers=n_vis, heads=int(vc.get("num_attention_heads", hidden // 64)),
        mlp=out["vision.blocks.0.mlp.fc1.weight"].shape[0], patch=out["vision.patch_embed.weight"].shape[-1],
        pos_grid=g0, in_chans=out["vision.patch_embed.weight"].shape[1], eps=float(vc.get("layer_norm_eps", 1e-6)),
    )
    if n_align and int(ac.get("num_attention_heads", vision.heads)) != vision.heads:
        raise CheckpointError("align transformer head count differs from the backbone's; not supported")
    text = TextConfig(
        vocab=out["text.word_embed.weight"].shape[0], hidden=out["text.word_embed.weight"].shape[1],
        layers=n_txt, heads=out["text.relative_bias.weight"].shape[1],
        mlp=out["text.layers.0.fc1.weight"].shape[0], max_positions=out["text.pos_embed.weight"].shape[0],
        buckets=out["text.relative_bias.weight"].shape[0], eps=float(tc.get("layer_norm_eps", 1e-5)),
        pad_id=int(tc.get("pad_token_id", 1)),
        max_length=min(512, out["text.pos_embed.weight"].shape[0] - int(tc.get("pad_token_id", 1)) - 1),
    )
    size = _image_size(preprocessor)
    try:
        mean = tuple(float(x) for x in preprocessor["image_mean"])
        std = tuple(float(x) for x in preprocessor["image_std"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("preprocessor_config.json: needs image_mean and image_std lists") from None
    cfg = ModelConfig(vision=vision, text=text, align_layers=n_align, image_size=size, mean=mean, std=std)
    return out, cfg


def _convert_dino_layers(src: dict[str, torch.Tensor], prefix: str, dst_prefix: str,
                         out: dict[str, torch.Tensor]) -> int:
    indices = sorted({int(m.group(1)) for k in src if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"layer indices under {prefix!r} are not contiguous: {indices}")
    for i in indices:
        p, q = f"{prefix}{i}.", f"{dst_prefix}{i}."
        for part in ("weight", "bias"):
            out[f"{q}attn.qkv.{part}"] = torch.cat([_take_any(src, [p + n + "." + part for n in _DINO_QKV[x]])
                                                    for x in "qkv"])
        for old, new in _DINO_LAYER.items():
            for part in (("lambda1",) if old.endswith("lambda1") else ("weight", "bias")):
                key = p + old if old.endswith("lambda1") else f"{p}{old}.{part}"
                if key in src:
                    out[q + new if old.endswith("lambda1") else f"{q}{new}.{part}"] = src.pop(key)
    return len(indices)


def _take(d: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return d.pop(key)
    except KeyError:
        raise CheckpointError(f"released checkpoint is missing tensor {key!r}") from None


def _take_any(d: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    for key in keys:
        if key in d:
            return d.pop(key)
    raise CheckpointError(f"released checkpoint is missing tensor {keys[0]!r}")


def _image_size(pre: dict[str, Any]) -> int:
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for k in ("height", "shortest_edge"):
                if k in value:
                    return int(value[k])
    raise CheckpointError("preprocessor_config.json: cannot tell the input size (crop_size/size)")


def _need(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: missing (copy it from the released model folder)")
    return path



def _read_released_tensors(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise CheckpointError(f"{src}: no model.safetensors{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118
                    tensors[k] = fh.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: not a safetensors file ({exc})") from None
    return tensors
