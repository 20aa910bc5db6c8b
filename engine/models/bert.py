"""BERT text tower with CARZero's word features: last-4-layer sum, WordPiece pieces summed into words.

Post-norm BERT layers (the same layer as the MPNet tower, :class:`radflash.models.text.TextLayer`)
on absolute position and token-type embeddings. CARZero does not use BERT's pooled output: its
word features are the sum of the last four hidden layers, with the WordPiece pieces of each word
summed into one row. The reference does that merge with a Python loop over every token of every
prompt; here it is one ``scatter_add`` driven by a vocabulary table of continuation pieces
(``##…``), stored with the weights so the model never needs the tokenizer's strings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from radflash.models.config import TextConfig
from radflash.models.text import TextLayer

LAST_LAYERS = 4  # CARZero sums the hidden states of the last four layers


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embed = nn.Embedding(cfg.vocab, cfg.hidden, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.type_embed = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.layers))
        # True for the ids of pieces that continue a word ("##ing"): saved with the weights
        self.register_buffer("continues_word", torch.zeros(cfg.vocab, dtype=torch.bool))

    def bind_vocabulary(self, vocab: Mapping[str, int]) -> None:
        """Mark the continuation pieces of the tokenizer the checkpoint ships with."""
        table = torch.zeros_like(self.continues_word)
        ids = [i for token, i in vocab.items() if token.startswith("##") and 0 <= i < table.numel()]
        table[ids] = True
        self.continues_word.copy_(table)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The embedding output and every layer's output, each (T, L, D) (transformers' ``hidden_states``)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids)  # CARZero's prompts are single segments: token type 0
        x = self.embed_norm(self.word_embed(input_ids) + self.pos_embed(positions)[None] + self.type_embed(types))
        mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        bias = mask.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], bias))
        return states

    def word_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L_max, D): [CLS], one row per word, [SEP], then zero rows up to ``max_length``.

        Each row sums the last-four-layer sum over the word's pieces. Padding tokens contribute
        nothing (the reference stops at [SEP]).
        """
        summed = torch.stack(self.hidden_states(input_ids, attention_mask)[-LAST_LAYERS:]).sum(0)
        real = attention_mask.bool()
        starts = real & ~self.continues_word[input_ids]
        word = torch.cumsum(starts.long(), dim=1) - 1  # index of the word each piece belongs to
        length = self.cfg.max_length
        word = torch.where(real, word.clamp(min=0), length)  # padding goes to a dump row, cut below
        out = summed.new_zeros(summed.shape[0], length + 1, summed.shape[2])
        out = out.scatter_add(1, word.unsqueeze(-1).expand_as(summed), summed)
        return out[:, :length]
