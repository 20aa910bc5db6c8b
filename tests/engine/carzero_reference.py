"""An independent CARZero reference: transformers' towers and a literal transcription of the fusion.

The text tower is transformers' ``BertModel`` and the image tower its ``ViTModel`` (the timm/MAE
ViT-B/16 computes the same function: pre-norm blocks, a stored position table, a final norm).
Everything CARZero adds around them is the public reference code (laihaoran/CARZero) transcribed
line for line, Python loops included, in :mod:`radflash.bench.carzero_reference` (the bench's
reference, which shares no code with radflash's model): the prompt cleaning of ``process_text``,
``BertEncoder.aggregate_tokens``, and ``TQN_Model`` with ``TransformerDecoderWoSelfAttenLayer``
(``normalize_before=True``) built from ``nn.MultiheadAttention``. The weights travel through the bench
reference's own name mapping (``native_to_reference``).
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from radflash.bench.carzero_reference import TQN_Model, aggregate_tokens, process_text

# The reference's own Python: prompt cleaning (``process_text``), word aggregation
# (``BertEncoder.aggregate_tokens``) and the fusion (``TQN_Model``), transcribed once in the bench's
# reference (it imports no radflash model, kernel or tokenizer code; tests/engine/bench checks that).
reference_clean = process_text
reference_aggregate = aggregate_tokens


def reference_text(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, idxtoword: dict[int, str]):
    """(word features (B, D, words), sentence feature (B, D)) as ``BertEncoder.forward`` returns them."""
    outputs = bert(ids, mask, torch.zeros_like(ids), output_hidden_states=True)
    embeddings = torch.stack(outputs.hidden_states[-4:]).permute(1, 0, 2, 3)
    embeddings = reference_aggregate(embeddings, ids, idxtoword)
    sent_embeddings = embeddings.mean(axis=2)
    word_embeddings = embeddings.sum(axis=1)
    sent_embeddings = sent_embeddings.sum(axis=1)
    return word_embeddings.permute(0, 2, 1), sent_embeddings


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
