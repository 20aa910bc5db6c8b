"""CARZero as its released code computes it, with the weights of a radflash model: the bench baseline.

What radflash's CARZero path (:mod:`radflash.models.carzero`) is timed against, so it shares no
model or kernel code with it (a test reads this module's imports). Towers: transformers'
``ViTModel`` (the MAE/timm ViT-B/16 computes the same function: pre-norm blocks, a stored
position table, a final LayerNorm) and ``BertModel``, eager attention, fp32. Around them the
released code (laihaoran/CARZero) is written out as it stands: the prompt cleaning of
``process_text``, the tokenizer call padding every prompt to ``max_length``,
``BertEncoder.aggregate_tokens`` (a Python loop over every token of every prompt), and the fusion
``TQN_Model`` with ``TransformerDecoderWoSelfAttenLayer(normalize_before=True)`` built from
``nn.MultiheadAttention``.

Scoring (:meth:`ReferenceCARZero.head`) has two loops:

- ``loop="image"`` (the default, what the harness times): the released zero-shot path,
  ``dqn_shot_classification`` → ``get_dqn_similarities``. It loops over the images; for image i
  one i2t call (memory = the image's 197 tokens, queries = all T prompts' t) and one t2i call
  (memory = all T prompts' rows [t; W], query = the image's g). The keys and values of every
  prompt's 98 rows are projected again in every decoder layer for every image.
- ``loop="pair"``: one i2t and one t2i call per (image, prompt) pair, single query each, so the
  image keys/values are also projected again for every prompt. Not what the released code runs
  (``nn.MultiheadAttention`` batches the prompts of one image); kept as the literal per-pair
  formulation of the spec, for the benchmark and the tests.

One deliberate saving against the released loop: BERT runs once per prompt list and is cached
(``get_dqn_similarities`` re-runs it for every batch of images, which at its batch size of 1024
is amortised anyway); only the fusion, the ViT and the preprocessing are timed per batch.

Preprocessing is the released ``process_img`` minus its file reading: 8-bit grayscale → longer
side resized to ``letterbox`` with cv2's ``INTER_AREA`` → zero padding centred (floor/ceil) →
PIL RGB → torchvision's ``CenterCrop`` → ``ToTensor`` → ``Normalize``. cv2 and torchvision are not
dependencies of radflash, so the pieces are written out here (see :func:`inter_area` and
:meth:`ReferenceCARZero.preprocess`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radflash.bench.reference import INSTALL_HINT, ReferenceRadZero
from radflash.errors import BackendUnavailable, InputError
from radflash.models.config import ModelConfig

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

LAST_N_LAYERS = 4  # cfg.model.text.last_n_layers of the released config; aggregate_method "sum"
LOOPS = ("image", "pair")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from None
    return transformers


# ---- prompt cleaning and word aggregation (released ``process_text``, ``aggregate_tokens``) ------------
def process_text(t: str) -> str:
    """The released ``process_text`` cleaning of one prompt (nltk's ``RegexpTokenizer(r"\\w+")`` is ``re.findall``)."""
    t = t.replace("\n", " ")
    splitter = re.compile(r"[0-9]+\.")
    captions = splitter.split(t)
    captions = [point.split(".") for point in captions]
    captions = [sent for point in captions for sent in point]
    all_sents = []
    for t in captions:
        t = t.replace("\ufffd\ufffd", " ")
        tokens = re.findall(r"\w+", t.lower())
        if len(tokens) <= 1:
            continue
        included_tokens = []
        for t in tokens:
            t = t.encode("ascii", "ignore").decode("ascii")
            if len(t) > 0:
                included_tokens.append(t)
        all_sents.append(" ".join(included_tokens))
    return " ".join(all_sents)


def aggregate_tokens(embeddings: torch.Tensor, caption_ids: torch.Tensor, idxtoword: dict[int, str]) -> torch.Tensor:
    """(B, layers, words, D) → the same shape, WordPiece pieces summed into words, zero rows after [SEP]."""
    _, num_layers, num_words, dim = embeddings.shape
    embeddings = embeddings.permute(0, 2, 1, 3)
    agg_embs_batch = []
    for embs, caption_id in zip(embeddings, caption_ids):
        agg_embs = []
        token_bank: list[torch.Tensor] = []
        word_bank: list[str] = []
        for word_emb, word_id in zip(embs, caption_id):
            word = idxtoword[word_id.item()]
            if word == "[SEP]":
                new_emb = torch.stack(token_bank)
                new_emb = new_emb.sum(axis=0)
                agg_embs.append(new_emb)
                agg_embs.append(word_emb)
                break
            if not word.startswith("##"):
                if len(word_bank) == 0:
                    token_bank.append(word_emb)
                    word_bank.append(word)
                else:
                    new_emb = torch.stack(token_bank)
                    new_emb = new_emb.sum(axis=0)
                    agg_embs.append(new_emb)
                    token_bank = [word_emb]
                    word_bank = [word]
            else:
                token_bank.append(word_emb)
                word_bank.append(word[2:])
        stacked = torch.stack(agg_embs)
        padding_size = num_words - len(stacked)
        paddings = torch.zeros(padding_size, num_layers, dim, dtype=stacked.dtype, device=stacked.device)
        agg_embs_batch.append(torch.cat([stacked, paddings]))
    return torch.stack(agg_embs_batch).permute(0, 2, 1, 3)


# ---- the fusion module (released ``TQN_Model``, ``dqn_wo_self_atten_mlp.py``) -------------------------
class TransformerDecoderWoSelfAttenLayer(nn.Module):
    """``forward_pre`` of the released layer. Its ``self_attn`` and ``norm1`` exist in the released
    module but the forward never calls them (commented out there), so they are left out here."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tgt2 = self.norm2(tgt)
        tgt2, attn_weights = self.multihead_attn(query=tgt2, key=memory, value=memory, attn_mask=None,
                                                 key_padding_mask=None)
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.norm3(tgt)
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt2))))
        tgt = tgt + self.dropout3(tgt2)
        return tgt, attn_weights


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        output = tgt
        attention_ws = []
        for layer in self.layers:
            output, ws = layer(output, memory)
            attention_ws.append(ws)
        output = self.norm(output)
        return output, attention_ws


class TQN_Model(nn.Module):  # the released name
    """The released fusion: ``decoder_norm`` on memory and queries, 4 pre-norm layers, ``decoder_norm``
    again (as the decoder's final norm: the same module), then the scoring MLP."""

    def __init__(self, d_model: int, heads: int, ffn: int, layers: int, mlp: Sequence[int], eps: float) -> None:
        super().__init__()
        self.decoder_norm = nn.LayerNorm(d_model, eps=eps)
        self.decoder = TransformerDecoder(
            [TransformerDecoderWoSelfAttenLayer(d_model, heads, ffn, 0.1, eps) for _ in range(layers)],
            self.decoder_norm)
        self.dropout_feas = nn.Dropout(0.1)
        widths = [d_model, *mlp]
        head: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            head += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(0.1)]
        self.mlp_head = nn.Sequential(*head, nn.Linear(widths[-1], 1))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """image_features (batch, memory rows, D) are the memories, text_features (queries, D) the
        queries, repeated per memory → (batch, queries, 1)."""
        batch_size = image_features.shape[0]
        image_features = image_features.transpose(0, 1)
        text_features = text_features.unsqueeze(1).repeat(1, batch_size, 1)
        image_features = self.decoder_norm(image_features)
        text_features = self.decoder_norm(text_features)
        features, _ = self.decoder(text_features, image_features)
        features = self.dropout_feas(features).transpose(0, 1)
        return self.mlp_head(features)


# ---- weights: radflash names → the reference modules ---------------------------------------------------
_VIT_PLAIN = {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# transformers ≤ 4.x names of ViTModel's layers (5.x: layers.{i}.attention.q_proj …)
_VIT_TF4 = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_BERT_PLAIN = {"out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "fc1": "intermediate.dense", "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}


def native_to_reference(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """radflash's state dict → ``{"vit": …, "bert": …, "fusion": …}`` under the reference modules' names.

    Fused qkv projections are split back into query/key/value; radflash's scoring MLP
    ``fusion.mlp.k`` is ``mlp_head.{3k}`` (Linear, ReLU, Dropout per hidden width). The
    ``continues_word`` table is not a weight of the released model (its tokenizer decides), so it
    is dropped.
    """
    if cfg.fusion is None:
        raise InputError("not a CARZero config: it has no fusion section")
    vit = {"embeddings.cls_token": state["vision.cls_token"],
           "embeddings.position_embeddings": state["vision.pos_embed"]}
    bert = {"embeddings.word_embeddings.weight": state["text.word_embed.weight"],
            "embeddings.position_embeddings.weight": state["text.pos_embed.weight"],
            "embeddings.token_type_embeddings.weight": state["text.type_embed.weight"]}
    fusion: dict[str, torch.Tensor] = {}
    for part in ("weight", "bias"):
        vit[f"embeddings.patch_embeddings.projection.{part}"] = state[f"vision.patch_embed.{part}"]
        vit[f"layernorm.{part}"] = state[f"vision.norm.{part}"]
        for i in range(cfg.vision.layers):
            p, q = f"vision.blocks.{i}.", f"layers.{i}."
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), state[f"{p}attn.qkv.{part}"].chunk(3)):
                vit[f"{q}attention.{name}.{part}"] = chunk
            for ours, theirs in _VIT_PLAIN.items():
                vit[f"{q}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
        bert[f"embeddings.LayerNorm.{part}"] = state[f"text.embed_norm.{part}"]
        for i in range(cfg.text.layers):
            p, q = f"text.layers.{i}.", f"encoder.layer.{i}."
            for name, chunk in zip(("query", "key", "value"), state[f"{p}qkv.{part}"].chunk(3)):
                bert[f"{q}attention.self.{name}.{part}"] = chunk
            for ours, theirs in _BERT_PLAIN.items():
                bert[f"{q}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
        for i in range(cfg.fusion.layers):
            p, q = f"fusion.layers.{i}.", f"decoder.layers.{i}."
            for ours, theirs in (("linear1", "linear1"), ("linear2", "linear2"), ("norm2", "norm2"),
                                 ("norm3", "norm3"), ("cross_attn.out_proj", "multihead_attn.out_proj")):
                fusion[f"{q}{theirs}.{part}"] = state[f"{p}{ours}.{part}"]
            fusion[f"{q}multihead_attn.in_proj_{part}"] = state[f"{p}cross_attn.in_proj_{part}"]
        # one module under two names, as in the released checkpoint: the decoder's final norm is decoder_norm
        fusion[f"decoder_norm.{part}"] = fusion[f"decoder.norm.{part}"] = state[f"fusion.decoder_norm.{part}"]
        for k in range(len(cfg.fusion.mlp) + 1):
            fusion[f"mlp_head.{3 * k}.{part}"] = state[f"fusion.mlp.{k}.{part}"]
    out = {"vit": vit, "bert": bert, "fusion": fusion}
    return {m: {k: t.detach().float().cpu().clone().contiguous() for k, t in d.items()} for m, d in out.items()}


def vit_state_names(sub: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Rename to transformers 4.x ViT names if ``module`` uses them."""
    if "layers.0.attention.q_proj.weight" in module.state_dict():
        return sub
    renamed = {}
    for k, t in sub.items():
        if k.startswith("layers."):
            k = "encoder.layer." + k[len("layers."):]
            for new, old in _VIT_TF4.items():
                k = k.replace(new, old)
        renamed[k] = t
    return renamed


# ---- preprocessing -------------------------------------------------------------------------------------
def inter_area(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 H×W → uint8 height×width, standing in for ``cv2.resize(img, (width, height), INTER_AREA)``.

    cv2 is not a radflash dependency. When shrinking, cv2's INTER_AREA is the exact box average:
    each output pixel averages the input area it covers, edge pixels weighted by their covered
    fraction. That is written here as two weight-matrix products in torch (float32), rounded to
    uint8 like cv2's output. When either side grows, cv2 switches to its own bilinear variant;
    here it is torch's bilinear (``align_corners=False``), which can differ from cv2 by a grey level.
    """
    h, w = img.shape
    x = torch.from_numpy(np.ascontiguousarray(img)).float()
    if height <= h and width <= w:
        out = _box_weights(h, height) @ x @ _box_weights(w, width).T
    else:
        out = F.interpolate(x[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def _box_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): output cell j covers input [j·s, (j+1)·s), s = n_in / n_out; weights = covered fraction / s."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    cells = np.arange(n_in)[None, :]
    cover = np.clip(np.minimum(lo + s, cells + 1) - np.maximum(lo, cells), 0, None)
    return torch.from_numpy(cover / s).float()


def resize_img(img: np.ndarray, scale: int) -> np.ndarray:
    """The released ``_resize_img``: longer side to ``scale`` (the other truncated by ``int``), zero pad centred."""
    size = img.shape
    max_dim = max(size)
    max_ind = size.index(max_dim)
    if max_ind == 0:
        wpercent = scale / float(size[0])
        hsize = int(float(size[1]) * float(wpercent))
        desireable_size = (scale, hsize)
    else:
        hpercent = scale / float(size[1])
        wsize = int(float(size[0]) * float(hpercent))
        desireable_size = (wsize, scale)
    resized_img = inter_area(img, *desireable_size)
    if max_ind == 0:
        pad_size = scale - resized_img.shape[1]
        left, right, top, bottom = int(np.floor(pad_size / 2)), int(np.ceil(pad_size / 2)), 0, 0
    else:
        pad_size = scale - resized_img.shape[0]
        top, bottom, left, right = int(np.floor(pad_size / 2)), int(np.ceil(pad_size / 2)), 0, 0
    return np.pad(resized_img, [(top, bottom), (left, right)], "constant", constant_values=0)


# ---- the reference model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceText:
    """What the released ``text_encoder_forward`` returns for a prompt list: (T, D, L) and (T, D)."""

    words: torch.Tensor  # query_emb_l: word features, channels first, zero columns after [SEP]
    sent: torch.Tensor  # query_emb_g: mean over all L positions (zeros included) of the 4-layer sum

    def __len__(self) -> int:
        return self.sent.shape[0]


class ReferenceCARZero:
    """CARZero as the released code computes it (transformers towers, the written-out fusion, fp32)."""

    family = "carzero"
    supports_maps = False
    loop = "image"  # the default of :meth:`head`: the released per-image loop, or "pair"

    def __init__(self, weights: dict[str, dict[str, torch.Tensor]], cfg: ModelConfig, tokenizer_json: str, *,
                 device: torch.device | str = "cpu") -> None:
        tf = _transformers()
        from tokenizers import Tokenizer

        if cfg.fusion is None:
            raise InputError("not a CARZero config: it has no fusion section")
        self.cfg, self.device = cfg, torch.device(device)
        vc, tc, fc = cfg.vision, cfg.text, cfg.fusion
        if cfg.image_size != vc.patch * vc.pos_grid:
            # the released model only runs at its training size; ViTModel would interpolate its own way
            raise BackendUnavailable(f"the CARZero reference runs at the stored position grid, "
                                     f"{vc.patch * vc.pos_grid}², not {cfg.image_size}²")
        self.vit = tf.ViTModel(tf.ViTConfig(
            hidden_size=vc.hidden, num_hidden_layers=vc.layers, num_attention_heads=vc.heads,
            intermediate_size=vc.mlp, image_size=cfg.image_size, patch_size=vc.patch, num_channels=vc.in_chans,
            layer_norm_eps=vc.eps, qkv_bias=True, hidden_act="gelu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager"), add_pooling_layer=False)
        self.vit.load_state_dict(vit_state_names(weights["vit"], self.vit), strict=True)
        self.bert = tf.BertModel(tf.BertConfig(
            vocab_size=tc.vocab, hidden_size=tc.hidden, num_hidden_layers=tc.layers, num_attention_heads=tc.heads,
            intermediate_size=tc.mlp, max_position_embeddings=tc.max_positions, type_vocab_size=tc.type_vocab,
            layer_norm_eps=tc.eps, pad_token_id=tc.pad_id, hidden_act="gelu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager"), add_pooling_layer=False)
        self.bert.load_state_dict(weights["bert"], strict=True)
        self.fusion = TQN_Model(vc.hidden, fc.heads, fc.ffn, fc.layers, fc.mlp, fc.eps)
        self.fusion.load_state_dict(weights["fusion"], strict=True)
        for m in (self.vit, self.bert, self.fusion):
            m.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(tc.max_length)
        self.idxtoword = {v: k for k, v in self.tokenizer.get_vocab(with_added_tokens=True).items()}
        self._text_cache: dict[tuple[str, ...], ReferenceText] = {}

    @classmethod
    def from_model(cls, model: RadFlashModel) -> ReferenceCARZero:
        """The reference with ``model``'s weights and tokenizer, on its device."""
        state = {k: t.detach().float().cpu() for k, t in model.module.state_dict().items()}
        return cls(native_to_reference(state, model.config), model.config, model.tokenizer.to_str(),
                   device=model.device)

    # ---- text -------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The released tokenizer call per cleaned prompt: truncation, padding to ``max_length`` → (T, L)."""
        length, pad = self.cfg.text.max_length, self.cfg.text.pad_id
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            enc = self.tokenizer.encode(process_text(p))
            ids[row, :len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
            mask[row, :len(enc.ids)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> ReferenceText:
        """The released ``BertEncoder.forward`` (last 4 layers, pieces summed into words), cached per list."""
        key = tuple(prompts)
        if key not in self._text_cache:
            ids, mask = self.tokenize(prompts)
            outputs = self.bert(ids, mask, torch.zeros_like(ids), output_hidden_states=True)
            embeddings = torch.stack(outputs.hidden_states[-LAST_N_LAYERS:]).permute(1, 0, 2, 3)
            embeddings = aggregate_tokens(embeddings, ids, self.idxtoword)
            sent_embeddings = embeddings.mean(axis=2)
            word_embeddings = embeddings.sum(axis=1)
            sent_embeddings = sent_embeddings.sum(axis=1)
            self._text_cache[key] = ReferenceText(word_embeddings.permute(0, 2, 1), sent_embeddings)
        return self._text_cache[key]

    # ---- images ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 1 + N, D): ViTModel's ``last_hidden_state`` (g = row 0, P = the patches)."""
        return self.vit(pixel_values=pixels.to(self.device, torch.float32)).last_hidden_state

    decode = staticmethod(ReferenceRadZero.decode)  # pydicom → uint8 (the released code reads 8-bit PNGs)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 H×W images → (B, 3, S, S) float32: the released ``process_img`` after ``cv2.imread``.

        ``_resize_img`` (:func:`resize_img`), ``Image.fromarray(x).convert("RGB")``, then the test
        transform written out: ``CenterCrop(S)`` (top/left = round((side − S) / 2)), ``ToTensor``
        (/255, channels first) and ``Normalize(mean, std)``.
        """
        from PIL import Image

        size, side = self.cfg.image_size, self.cfg.letterbox or self.cfg.image_size
        mean = np.asarray(self.cfg.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.cfg.std, dtype=np.float32)[:, None, None]
        batch = []
        for img in images:
            rgb = np.asarray(Image.fromarray(resize_img(img, side)).convert("RGB"))
            h, w = rgb.shape[:2]
            top, left = round((h - size) / 2.0), round((w - size) / 2.0)
            crop = rgb[top:top + size, left:left + size]
            tensor = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
            batch.append((tensor - mean) / std)
        return torch.from_numpy(np.stack(batch)).to(self.device)

    # ---- scores ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def head(self, tokens: torch.Tensor, text: ReferenceText, *, return_maps: bool = False,
             loop: str | None = None) -> tuple[torch.Tensor, None]:
        """S (B, T) = (i2t + t2i) / 2, float32, by the released per-image loop or the per-pair loop.

        ``tokens`` (B, 1 + N, D) are the ViT's outputs, g = row 0. No key-padding mask: the zero
        word rows after [SEP] are attended to, as in the released code.
        """
        if return_maps:
            raise InputError("model family 'carzero' has no similarity maps; use score")
        loop = loop or self.loop
        if loop not in LOOPS:
            raise InputError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        tokens = tokens.to(self.device, torch.float32)
        label_img_emb_g = tokens[:, 0]
        label_img_emb_l = tokens[:, 1:]
        query_emb_g = text.sent
        query_emb_l_ = text.words.permute(0, 2, 1)  # (T, L, D)
        cls_bs = []
        for i in range(tokens.shape[0]):
            memory_i = torch.cat([label_img_emb_g[i:i + 1].unsqueeze(1), label_img_emb_l[i:i + 1]], dim=1)
            if loop == "image":  # get_dqn_similarities: all prompts in each call
                i2t_cls = self.fusion(memory_i, query_emb_g).squeeze(-1)  # (1, T)
                t2i_cls = self.fusion(torch.cat([query_emb_g.unsqueeze(1), query_emb_l_], dim=1),
                                      label_img_emb_g[i:i + 1]).squeeze(-1).transpose(1, 0)  # (T, 1) → (1, T)
                cls_bs.append((i2t_cls + t2i_cls) / 2)
                continue
            row = []
            for j in range(len(text)):
                i2t = self.fusion(memory_i, query_emb_g[j:j + 1]).reshape(())
                memory_j = torch.cat([query_emb_g[j:j + 1].unsqueeze(1), query_emb_l_[j:j + 1]], dim=1)
                t2i = self.fusion(memory_j, label_img_emb_g[i:i + 1]).reshape(())
                row.append((i2t + t2i) / 2)
            cls_bs.append(torch.stack(row)[None])
        return torch.cat(cls_bs, dim=0).float(), None

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor, prompts: Sequence[str], *, loop: str = "image") -> torch.Tensor:
        """S (B, T) from preprocessed pixels and raw prompts."""
        scores, _ = self.head(self.image_tokens(pixels), self.text_features(prompts), loop=loop)
        return scores


__all__ = ["LOOPS", "ReferenceCARZero", "ReferenceText", "TQN_Model", "aggregate_tokens", "inter_area",
           "native_to_reference", "process_text", "resize_img"]
