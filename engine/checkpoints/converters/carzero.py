"""Convert the released CARZero PyTorch Lightning ``.ckpt`` into a radflash checkpoint.

The release is a Lightning 1.1 pickle: ``state_dict`` holds (under an optional ``CARZero.``
prefix) a timm/MAE ViT under ``img_encoder.model.``, a transformers ``BertModel`` under
``text_encoder.model.`` and the fusion decoder and scoring MLP under ``fusion_module.``; the rest
of the file (omegaconf hyper-parameters, callback and optimizer states) is not needed. It is read
with the restricted unpickler of :mod:`radflash.checkpoints.safe_pickle`, so nothing in it runs.

Sizes come from the tensors; what tensors cannot tell (head counts, epsilons, input geometry,
normalisation, prompt length) comes from a preset, ``carzero`` by default: the reference code's
constants. The tokenizer is a local copy of the released BERT tokenizer folder. Nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from radflash.checkpoints.converters import read_json
from radflash.checkpoints.format import CONFIG, Checkpoint, build_on_meta, check_state_dict, save_checkpoint
from radflash.checkpoints.safe_pickle import load_ckpt
from radflash.errors import CheckpointError
from radflash.findings import default_prompts
from radflash.models.config import FusionConfig, ModelConfig, TextConfig, preset
from radflash.tokenizer import PromptTokenizer
from radflash.util.schema import describe

PREFIX = "CARZero."
VISION, TEXT, FUSION = "img_encoder.model.", "text_encoder.model.", "fusion_module."
BUFFER = "text.continues_word"  # not in the release: derived from the tokenizer's vocabulary

_VIT_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_BERT_EMBED = {"word_embeddings": "word_embed", "position_embeddings": "pos_embed",
               "token_type_embeddings": "type_embed", "LayerNorm": "embed_norm"}
_BERT_LAYER = {"attention.output.dense": "out", "attention.output.LayerNorm": "attn_norm",
               "intermediate.dense": "fc1", "output.dense": "fc2", "output.LayerNorm": "mlp_norm"}
_BERT_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")
_BERT_OTHER = re.compile(r"encoder\.layer\.(\d+)\.(" + "|".join(map(re.escape, _BERT_LAYER)) + r")\.(weight|bias)")
# transformers' BertModel: the pooler (CARZero uses word features) and index buffers
_BERT_UNUSED = re.compile(r"pooler\..*|embeddings\.position_ids|embeddings\.token_type_ids")
_FUSION_KEEP = re.compile(r"decoder\.layers\.(\d+)\.(multihead_attn\.(?:in_proj_weight|in_proj_bias|out_proj\.weight"
                          r"|out_proj\.bias)|(?:linear1|linear2|norm2|norm3)\.(?:weight|bias))")
# the decoder layers' self-attention and its norm are never run (one query per pass), the
# decoder's own final norm is the same module as decoder_norm, logit_scale is a training leftover
_FUSION_UNUSED = re.compile(r"decoder\.layers\.\d+\.(self_attn\..*|norm1\.(weight|bias))|decoder\.norm\.(weight|bias)"
                            r"|logit_scale")
_MLP = re.compile(r"mlp_head\.(\d+)\.(weight|bias)")


def convert_carzero(src: str | Path, dst: str | Path, *, tokenizer: str | Path, model_id: str | None = None,
                    base: str = "carzero") -> Path:
    """Convert the released ``src`` .ckpt with the tokenizer folder ``tokenizer`` into ``dst``.

    ``base`` names the preset that supplies what the tensors cannot tell (head counts, image
    geometry, normalisation, prompt length); the published sizes need the default.
    """
    src = Path(src)
    base_cfg = preset(base)
    if base_cfg.architecture != "carzero":
        raise CheckpointError(f"preset {base!r} is not a CARZero preset (architecture {base_cfg.architecture!r})")
    _refuse_other_formats(src)
    where = str(src)
    state = released_to_native(_state_dict(load_ckpt(src), where), where)
    try:
        cfg = infer_config(state, base_cfg, where)
    except ValidationError as exc:  # sizes read from the release that no radflash model can have
        raise CheckpointError(describe(exc, f"{where}: {exc.title}")) from None
    prompt_tokenizer = read_tokenizer(tokenizer, cfg.text)
    state[BUFFER] = _continuation_table(cfg, state, prompt_tokenizer.vocab, where)
    ckpt = Checkpoint(
        config=cfg, state_dict=state, tokenizer=prompt_tokenizer, model_id=model_id or f"carzero:{src.stem}",
        prompts=default_prompts(), source=where,
    )
    return save_checkpoint(ckpt, dst)


def released_to_native(released: Mapping[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename and fuse the release's tensors into radflash's names (all but :data:`BUFFER`).

    Every tensor is accounted for: mapped, dropped as known-unused, or reported. An unknown
    tensor is an error rather than silently ignored, since it may mean the architecture differs.
    """
    rest: dict[str, torch.Tensor] = {}
    for key, value in released.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in rest:
            raise CheckpointError(f"{where}: tensor {name!r} appears both with and without the {PREFIX!r} prefix")
        rest[name] = _plain_tensor(value, key, where)
    if not any(k.startswith((VISION, TEXT, FUSION)) for k in rest):
        raise CheckpointError(_not_carzero(list(rest), where))
    out: dict[str, torch.Tensor] = {}
    vis, txt, fus = (_split(rest, p) for p in (VISION, TEXT, FUSION))

    # vision: timm names already, but the patch projection is a bare Conv2d here
    for name in list(vis):
        if name.startswith("patch_embed.proj."):
            out["vision.patch_embed." + name[len("patch_embed.proj."):]] = vis.pop(name)
        elif name in ("cls_token", "pos_embed", "norm.weight", "norm.bias") or _VIT_BLOCK.fullmatch(name):
            out["vision." + name] = vis.pop(name)

    # text: BertModel → fused qkv, short names
    for name in list(txt):
        if (m := re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", name)) and m.group(1) in _BERT_EMBED:
            out[f"text.{_BERT_EMBED[m.group(1)]}.{m.group(2)}"] = txt.pop(name)
        elif m := _BERT_OTHER.fullmatch(name):
            out[f"text.layers.{m.group(1)}.{_BERT_LAYER[m.group(2)]}.{m.group(3)}"] = txt.pop(name)
        elif _BERT_UNUSED.fullmatch(name):
            txt.pop(name)
    for layer in sorted({int(m.group(1)) for k in txt if (m := _BERT_QKV.fullmatch(k))}):
        for part in ("weight", "bias"):
            pieces = [_take(txt, f"encoder.layer.{layer}.attention.self.{x}.{part}", TEXT, where)
                      for x in ("query", "key", "value")]
            if len({p.shape for p in pieces}) != 1:
                raise CheckpointError(f"{where}: query/key/value {part}s of text layer {layer} have different shapes "
                                      f"({', '.join(str(tuple(p.shape)) for p in pieces)})")
            out[f"text.layers.{layer}.qkv.{part}"] = torch.cat(pieces)

    # fusion: the decoder layers' cross-attention and FFN, the shared norm, the scoring MLP
    for name in list(fus):
        if m := _FUSION_KEEP.fullmatch(name):
            sub = m.group(2).replace("multihead_attn.", "cross_attn.")
            out[f"fusion.layers.{m.group(1)}.{sub}"] = fus.pop(name)
        elif name.startswith("decoder_norm.") and name[len("decoder_norm."):] in ("weight", "bias"):
            out["fusion." + name] = fus.pop(name)
    for part in ("weight", "bias"):
        own, shared = fus.get(f"decoder.norm.{part}"), out.get(f"fusion.decoder_norm.{part}")
        # (shape-only tensors on the meta device have no values to compare)
        if own is not None and shared is not None and not own.is_meta and not torch.equal(own, shared):
            raise CheckpointError(f"{where}: fusion_module.decoder.norm.{part} differs from decoder_norm.{part}; "
                                  "CARZero shares one LayerNorm, so this is not a checkpoint radflash understands")
    linears = sorted({int(m.group(1)) for k in fus if (m := _MLP.fullmatch(k))})
    for i, index in enumerate(linears):  # the Linear layers of the Sequential, in order (ReLUs hold nothing)
        for part in ("weight", "bias"):
            out[f"fusion.mlp.{i}.{part}"] = _take(fus, f"mlp_head.{index}.{part}", FUSION, where)
    for name in [k for k in fus if _FUSION_UNUSED.fullmatch(k)]:
        fus.pop(name)

    unknown = [VISION + k for k in vis] + [TEXT + k for k in txt] + [FUSION + k for k in fus] + list(rest)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" … (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) radflash does not know in a CARZero checkpoint: "
                              f"{shown}")
    # own storage each: safetensors refuses tensors that share memory (views of one buffer)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def infer_config(state: Mapping[str, torch.Tensor], base: ModelConfig, where: str = "checkpoint") -> ModelConfig:
    """The architecture of ``state`` (radflash names): sizes from shapes, the rest from ``base``.

    Head counts are not in any tensor: a tower as wide as the preset's keeps the preset's count,
    another width gets BERT/ViT's 64-wide heads. Pydantic's ValidationError (a size no radflash
    model can have) is left to the caller to word.
    """
    need = _needer(state, where)
    hidden = need("vision.cls_token").shape[-1]
    patch = need("vision.patch_embed.weight")
    if patch.ndim != 4 or patch.shape[-1] != patch.shape[-2]:
        raise CheckpointError(f"{where}: patch projection has shape {tuple(patch.shape)}, not square patches")
    positions = need("vision.pos_embed").shape[-2] - 1
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise CheckpointError(f"{where}: vision position table has {positions} patch positions, not a square grid")
    vision = dataclasses.replace(
        base.vision, hidden=hidden, layers=_count(state, "vision.blocks.", where),
        heads=_heads(hidden, base.vision.hidden, base.vision.heads, "vision", where),
        mlp=need("vision.blocks.0.mlp.fc1.weight").shape[0], patch=patch.shape[-1], pos_grid=grid,
    )
    words = need("text.word_embed.weight")
    max_positions = need("text.pos_embed.weight").shape[0]
    text = dataclasses.replace(
        base.text, vocab=words.shape[0], hidden=words.shape[1], layers=_count(state, "text.layers.", where),
        heads=_heads(words.shape[1], base.text.hidden, base.text.heads, "text", where),
        mlp=need("text.layers.0.fc1.weight").shape[0], max_positions=max_positions,
        type_vocab=need("text.type_embed.weight").shape[0], max_length=min(base.text.max_length, max_positions),
    )
    mlp = [need(f"fusion.mlp.{i}.weight").shape[0] for i in range(_count(state, "fusion.mlp.", where))]
    if mlp[-1] != 1:
        raise CheckpointError(f"{where}: the scoring MLP ends in {mlp[-1]} outputs, expected one score")
    fusion = dataclasses.replace(
        base.fusion or FusionConfig(), layers=_count(state, "fusion.layers.", where),
        ffn=need("fusion.layers.0.linear1.weight").shape[0], mlp=tuple(mlp[:-1]),
    )
    image_size = grid * patch.shape[-1]
    letterbox = base.letterbox
    if letterbox is not None and image_size != base.image_size:  # keep the preset's pad-to-crop ratio
        letterbox = max(image_size, round(image_size * letterbox / base.image_size))
    return dataclasses.replace(base, vision=vision, text=text, fusion=fusion, image_size=image_size,
                               letterbox=letterbox)


def read_tokenizer(folder: str | Path, text: TextConfig) -> PromptTokenizer:
    """The prompt tokenizer from a local copy of the released BERT tokenizer folder.

    ``tokenizer.json`` is used as is; otherwise the WordPiece tokenizer is rebuilt from
    ``vocab.txt`` as transformers' BertTokenizerFast would build it (lower-casing per
    ``tokenizer_config.json``). The padding id and the vocabulary size must fit the weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found (give a local copy of the released BERT "
                              "tokenizer folder, with vocab.txt or tokenizer.json)")
    settings = {**read_json(folder / "special_tokens_map.json"), **read_json(folder / "tokenizer_config.json")}
    special = {role: _token_text(settings.get(f"{role}_token"), default)
               for role, default in (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"),
                                     ("mask", "[MASK]"))}
    if (folder / "tokenizer.json").is_file():
        source = folder / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(source))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"{source}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    elif (folder / "vocab.txt").is_file():
        source = folder / "vocab.txt"
        tok = _bert_wordpiece(source, special, settings)
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{folder}: no vocab.txt or tokenizer.json in the tokenizer folder (found: {found})")
    vocab = tok.get_vocab(with_added_tokens=True)
    pad = special["pad"]
    if vocab.get(pad) != text.pad_id:
        found = f"has id {vocab[pad]}" if pad in vocab else "is missing"
        raise CheckpointError(f"{source}: the padding token {pad!r} {found}, CARZero pads with id {text.pad_id}: "
                              "not CARZero's BERT tokenizer")
    top = max(vocab.values())
    if top >= text.vocab:
        raise CheckpointError(f"{source}: token ids run to {top} but the checkpoint's word embedding has {text.vocab} "
                              "rows: not the tokenizer this checkpoint was trained with")
    return PromptTokenizer(tok, pad_id=text.pad_id, max_length=text.max_length, source=str(source),
                           cleaning=text.cleaning)


# ---- helpers ------------------------------------------------------------------------------------
def _refuse_other_formats(src: Path) -> None:
    """One line, with the right hint, for things that are not the released .ckpt at all."""
    if src.is_dir():
        meta = read_json(src / CONFIG)
        if meta.get("format") == "radflash":
            model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            raise CheckpointError(f"{src}: already a radflash checkpoint (a {model.get('architecture', 'radzero')} "
                                  "model; load it with radflash.load), not the released CARZero .ckpt")
        if "architectures" in meta or "model_type" in meta:
            raise CheckpointError(f"{src}: a Hugging Face model folder, not a CARZero checkpoint (for the released "
                                  "RadZero folder use `radflash convert radzero`)")
        raise CheckpointError(f"{src}: a folder; expected the released CARZero .ckpt file")
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        with safe_open(str(src), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return  # not safetensors: the pickle reader decides
    if "radflash.config" in metadata:
        raise CheckpointError(f"{src}: already a radflash checkpoint (load it with radflash.load), not a CARZero .ckpt")
    raise CheckpointError(f"{src}: a safetensors file, not the released CARZero .ckpt")


def _state_dict(loaded: Any, where: str) -> dict[str, Any]:
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{where}: holds a {type(loaded).__name__}, not a PyTorch Lightning checkpoint (a dict "
                              "with a state_dict)")
    state = loaded.get("state_dict")
    if state is None:
        keys = ", ".join(sorted(str(k) for k in loaded)[:8]) or "none"
        raise CheckpointError(f"{where}: no 'state_dict' in the checkpoint (top-level keys: {keys}); expected the "
                              "released CARZero PyTorch Lightning .ckpt")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{where}: 'state_dict' has a key that is not a string ({bad[0]!r})")
    return state


def _not_carzero(names: list[str], where: str) -> str:
    shown = ", ".join(sorted(names)[:4]) or "none"
    hint = ""
    if any(n.startswith(("vision_model.", "text_model.", "align_transformer.", "loss_fns.")) for n in names):
        hint = "; it looks like RadZero's weights: convert the released RadZero folder with `radflash convert radzero`"
    elif any(n.startswith("vision.") for n in names) and any(n.startswith(("text.", "fusion.")) for n in names):
        hint = "; its names are radflash's own: it looks already converted (radflash.load reads those)"
    return (f"{where}: not a CARZero checkpoint (no {VISION}, {TEXT} or {FUSION} weights in its state_dict; "
            f"found {shown}){hint}")


def _split(rest: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}


def _take(group: dict[str, torch.Tensor], name: str, prefix: str, where: str) -> torch.Tensor:
    try:
        return group.pop(name)
    except KeyError:
        raise CheckpointError(f"{where}: CARZero checkpoint is missing tensor {PREFIX}{prefix}{name}") from None


def _plain_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    """A fresh tensor object for a loaded one, whatever attributes the pickle attached to it.

    Calling ``detach`` through ``torch.Tensor`` (not the object) gives a new object on the same
    storage, without instance attributes a crafted file might have set to shadow methods.
    """
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: state_dict entry {name} is a {type(value).__name__}, not a tensor")
    return torch.Tensor.detach(value)


def _needer(state: Mapping[str, torch.Tensor], where: str) -> Callable[[str], torch.Tensor]:
    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"{where}: CARZero checkpoint has no tensor for {name} (radflash's name)")
        return state[name]
    return need


def _count(state: Mapping[str, torch.Tensor], prefix: str, where: str) -> int:
    """Number of numbered sub-modules under ``prefix``; they must run 0..n-1."""
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if not indices or indices != list(range(len(indices))):
        raise CheckpointError(f"{where}: layer indices under {prefix!r} (radflash names) are not 0..n-1: {indices}")
    return len(indices)


def _heads(width: int, base_width: int, base_heads: int, tower: str, where: str) -> int:
    if width == base_width:
        return base_heads
    if width % 64 == 0:
        return width // 64
    raise CheckpointError(f"{where}: cannot tell the head count of the {width}-wide {tower} tower (neither the "
                          f"preset's width {base_width} nor a multiple of 64); pick a preset with matching sizes")


def _continuation_table(cfg: ModelConfig, state: dict[str, torch.Tensor], vocab: Mapping[str, int],
                        where: str) -> torch.Tensor:
    """The model's own ``bind_vocabulary`` result, computed without allocating its weights."""
    module = build_on_meta(cfg)
    table = torch.zeros(module.state_dict()[BUFFER].shape, dtype=torch.bool)
    check_state_dict(module, {**state, BUFFER: table}, where)
    module.load_state_dict({BUFFER: table}, strict=False, assign=True)
    module.bind_vocabulary(vocab)
    return module.state_dict()[BUFFER].clone()


def _bert_wordpiece(vocab_file: Path, special: dict[str, str], settings: dict[str, Any]) -> Tokenizer:
    vocab: dict[str, int] = {}
    try:
        with open(vocab_file, encoding="utf-8") as fh:  # one token a line, as transformers reads it
            for index, line in enumerate(fh):
                vocab[line.rstrip("\n")] = index
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{vocab_file}: cannot read the vocabulary ({exc})") from None
    for role in ("unk", "cls", "sep"):
        if special[role] not in vocab:
            raise CheckpointError(f"{vocab_file}: no {special[role]!r} token ({role}); not a BERT vocabulary")
    cls, sep = special["cls"], special["sep"]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=special["unk"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"), lowercase=bool(settings.get("do_lower_case", True)),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in dict.fromkeys(special.values()) if t in vocab])
    return tok


def _token_text(value: Any, default: str) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default

