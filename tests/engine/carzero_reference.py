"""An independent CARZero reference: transformers' towers and a literal transcription of the fusion.

The text tower is transformers' ``BertModel`` and the image tower its ``ViTModel`` (the timm/MAE
ViT-B/16 computes the same function: pre-norm blocks, a stored position table, a final norm).
Everything CARZero adds around them is transcribed from the public reference code
(laihaoran/CARZero) line for line, Python loops included: the prompt cleaning of ``process_text``,
``BertEncoder.aggregate_tokens``, and ``TQN_Model`` with ``TransformerDecoderWoSelfAttenLayer``
(``normalize_before=True``) built from ``nn.MultiheadAttention``. Nothing here imports radflash's
model code; only the test glue maps these modules' weights onto radflash's names.
"""

from __future__ import annotations

import copy
import itertools
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel


# ---- prompt cleaning (CARZero ``process_text``) ---------------------------------------------------
def reference_clean(t: str) -> str:
    t = t.replace("\n", " ")
    splitter = re.compile(r"[0-9]+\.")
    captions = splitter.split(t)
    captions = [point.split(".") for point in captions]
    captions = [sent for point in captions for sent in point]
    all_sents = []
    for t in captions:
        t = t.replace("\ufffd\ufffd", " ")
        tokens = re.findall(r"\w+", t.lower())  # nltk's RegexpTokenizer(r"\w+").tokenize
        if len(tokens) <= 1:
            continue
        included_tokens = []
        for t in tokens:
            t = t.encode("ascii", "ignore").decode("ascii")
            if len(t) > 0:
                included_tokens.append(t)
        all_sents.append(" ".join(included_tokens))
    return " ".join(all_sents)


# ---- word aggregation (CARZero ``BertEncoder.aggregate_tokens``) ----------------------------------
def reference_aggregate(embeddings: torch.Tensor, caption_ids: torch.Tensor, idxtoword: dict[int, str]):
    """embeddings (B, layers, words, D) → (B, layers, words, D) with pieces summed into words."""
    _batch_size, num_layers, num_words, dim = embeddings.shape
    embeddings = embeddings.permute(0, 2, 1, 3)
    agg_embs_batch = []
    for embs, caption_id in zip(embeddings, caption_ids):
        agg_embs = []
        token_bank = []
        word_bank = []
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
        agg_embs = torch.stack(agg_embs)
        padding_size = num_words - len(agg_embs)
        paddings = torch.zeros(padding_size, num_layers, dim, dtype=agg_embs.dtype)
        agg_embs_batch.append(torch.cat([agg_embs, paddings]))
    agg_embs_batch = torch.stack(agg_embs_batch)
    return agg_embs_batch.permute(0, 2, 1, 3)


def reference_text(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, idxtoword: dict[int, str]):
    """(word features (B, D, words), sentence feature (B, D)) as ``BertEncoder.forward`` returns them."""
    outputs = bert(ids, mask, torch.zeros_like(ids), output_hidden_states=True)
    embeddings = torch.stack(outputs.hidden_states[-4:]).permute(1, 0, 2, 3)
    embeddings = reference_aggregate(embeddings, ids, idxtoword)
    sent_embeddings = embeddings.mean(axis=2)
    word_embeddings = embeddings.sum(axis=1)
    sent_embeddings = sent_embeddings.sum(axis=1)
    return word_embeddings.permute(0, 2, 1), sent_embeddings


# ---- fusion (CARZero ``TQN_Model``, ``dqn_wo_self_atten_mlp.py``) ---------------------------------
class TransformerDecoderWoSelfAttenLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward=1024, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory):  # forward_pre, every mask and position None
        tgt2 = self.norm2(tgt)
        tgt2, attn_weights = self.multihead_attn(query=tgt2, key=memory, value=memory, attn_mask=None,
                                                 key_padding_mask=None)
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.norm3(tgt)
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt2))))
        tgt = tgt + self.dropout3(tgt2)
        return tgt, attn_weights


class TransformerDecoder(nn.Module):
    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt, memory):
        output = tgt
        attention_ws = []
        for layer in self.layers:
            output, ws = layer(output, memory)
            attention_ws.append(ws)
        if self.norm is not None:
            output = self.norm(output)
        return output, attention_ws


class TQN_Model(nn.Module):
    def __init__(self, embed_dim=768, layers=4, heads=4, ffn=1024, mlp=(1024, 512, 256)):
        super().__init__()
        self.d_model = embed_dim
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        decoder_layer = TransformerDecoderWoSelfAttenLayer(self.d_model, heads, ffn, 0.1)
        self.decoder_norm = nn.LayerNorm(self.d_model)
        self.decoder = TransformerDecoder(decoder_layer, layers, self.decoder_norm)
        self.dropout_feas = nn.Dropout(0.1)
        widths = [embed_dim, *mlp]
        head: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            head += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(0.1)]
        self.mlp_head = nn.Sequential(*head, nn.Linear(widths[-1], 1))

    def forward(self, image_features, text_features):
        batch_size = image_features.shape[0]
        image_features = image_features.transpose(0, 1)
        text_features = text_features.unsqueeze(1).repeat(1, batch_size, 1)
        image_features = self.decoder_norm(image_features)
        text_features = self.decoder_norm(text_features)
        features, _ = self.decoder(text_features, image_features)
        features = self.dropout_feas(features).transpose(0, 1)
        return self.mlp_head(features)


def reference_scores(tqn: TQN_Model, img_g, img_l, text_g, text_w):
    """S (B, T) the way the reference's forward pairs the two directions (img_l (B, N, D), text_w (T, D, L))."""
    i2t = tqn(torch.cat([img_g.unsqueeze(1), img_l], dim=1), text_g).squeeze(-1)
    t2i = tqn(torch.cat([text_g.unsqueeze(1), text_w.permute(0, 2, 1)], dim=1), img_g).squeeze(-1)
    return (i2t + t2i.T) / 2


# ---- towers at given sizes, and their weights under radflash's names ------------------------------
def make_bert(vocab: int, hidden: int, layers: int, heads: int, mlp: int, positions: int = 512) -> BertModel:
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=mlp, max_position_embeddings=positions, layer_norm_eps=1e-12,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def make_vit(hidden: int, layers: int, heads: int, mlp: int, image: int = 224, patch: int = 16) -> ViTModel:
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                    image_size=image, patch_size=patch, layer_norm_eps=1e-6, qkv_bias=True,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def native_state(bert: BertModel, vit: ViTModel, tqn: TQN_Model) -> dict[str, torch.Tensor]:
    """radflash names for the three modules' weights (the glue of the parity tests)."""
    out: dict[str, torch.Tensor] = {}
    b = bert.state_dict()
    out["text.word_embed.weight"] = b["embeddings.word_embeddings.weight"]
    out["text.pos_embed.weight"] = b["embeddings.position_embeddings.weight"]
    out["text.type_embed.weight"] = b["embeddings.token_type_embeddings.weight"]
    for part in ("weight", "bias"):
        out[f"text.embed_norm.{part}"] = b[f"embeddings.LayerNorm.{part}"]
        for i in range(bert.config.num_hidden_layers):
            p, q = f"encoder.layer.{i}.", f"text.layers.{i}."
            out[q + "qkv." + part] = torch.cat([b[f"{p}attention.self.{x}.{part}"] for x in ("query", "key", "value")])
            out[f"{q}out.{part}"] = b[f"{p}attention.output.dense.{part}"]
            out[f"{q}attn_norm.{part}"] = b[f"{p}attention.output.LayerNorm.{part}"]
            out[f"{q}fc1.{part}"] = b[f"{p}intermediate.dense.{part}"]
            out[f"{q}fc2.{part}"] = b[f"{p}output.dense.{part}"]
            out[f"{q}mlp_norm.{part}"] = b[f"{p}output.LayerNorm.{part}"]
    v = vit.state_dict()
    out["vision.cls_token"] = v["embeddings.cls_token"]
    out["vision.pos_embed"] = v["embeddings.position_embeddings"]
    for part in ("weight", "bias"):
        out[f"vision.patch_embed.{part}"] = v[f"embeddings.patch_embeddings.projection.{part}"]
        out[f"vision.norm.{part}"] = v[f"layernorm.{part}"]
        for i in range(vit.config.num_hidden_layers):
            p, q = f"layers.{i}.", f"vision.blocks.{i}."
            out[q + "attn.qkv." + part] = torch.cat([v[f"{p}attention.{x}_proj.{part}"] for x in "qkv"])
            out[f"{q}attn.proj.{part}"] = v[f"{p}attention.o_proj.{part}"]
            out[f"{q}norm1.{part}"] = v[f"{p}layernorm_before.{part}"]
            out[f"{q}norm2.{part}"] = v[f"{p}layernorm_after.{part}"]
            out[f"{q}mlp.fc1.{part}"] = v[f"{p}mlp.fc1.{part}"]
            out[f"{q}mlp.fc2.{part}"] = v[f"{p}mlp.fc2.{part}"]
    t = tqn.state_dict()
    linears = [i for i, m in enumerate(tqn.mlp_head) if isinstance(m, nn.Linear)]
    for key, value in t.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            if ".self_attn." in rest or ".norm1." in rest:
                continue
            out["fusion.layers." + rest.replace("multihead_attn.", "cross_attn.")] = value
        elif key.startswith("decoder_norm."):
            out["fusion." + key] = value
        elif key.startswith("mlp_head."):
            index, part = key[len("mlp_head."):].split(".")
            out[f"fusion.mlp.{linears.index(int(index))}.{part}"] = value
    return out
