"""CARZero at the published sizes against transformers' towers and the reference fusion, in float32.

Random weights everywhere (LayerNorms included, matrices scaled by 1/√fan-in so the deep scoring
MLP does not flatten the scores to a constant), real widths and depths (ViT-B/16 at 224, BERT-base,
the 4-layer fusion of width 768 with 4 heads), and prompts that exercise every path of the text
side: multi-piece words, a prompt the cleaning empties, one truncated mid-word at 97 pieces.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from radflash.bench.carzero_reference import native_to_reference, vit_state_names
from radflash.checkpoints.factory import randomize_, wordpiece_tokenizer
from radflash.models.carzero import CARZero
from radflash.models.config import preset
from radflash.tokenizer import PromptTokenizer
from tests.engine.carzero_reference import (
    TQN_Model,
    make_bert,
    make_vit,
    reference_clean,
    reference_scores,
    reference_text,
)

PROMPTS = [
    "There is cardiomegaly",
    "Cardiomegaly",  # one word: cleaned to the empty prompt, [CLS][SEP]
    "1. Small left pleural effusion. 2. Mild bibasilar atelectasis.\nNo pneumothorax",
    " ".join(["xylophone quixotic zebra"] * 12),  # > 97 pieces: cut mid-word
]
S_BOUND = 1e-4  # the bound on S in float32 (S is O(1); float32 chains of this depth give ~1e-6)


@pytest.fixture(scope="module")
def parity() -> dict:
    torch.manual_seed(1234)  # module-scoped build; each test's own randomness comes from the autouse seed
    cfg = preset("carzero")
    tok = wordpiece_tokenizer(vocab_size=2048, style="bert")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab=2048))
    model = randomize_(CARZero(cfg), seed=1, std=None).eval()
    model.bind_vocabulary(tok.get_vocab(with_added_tokens=True))
    # the same weights in the reference modules, through the bench reference's name mapping
    weights = native_to_reference(model.state_dict(), cfg)
    bert, vit = make_bert(2048, 768, 12, 12, 3072), make_vit(768, 12, 12, 3072)
    tqn = TQN_Model(768, 4, 1024, 4, (1024, 512, 256), 1e-5).eval()
    bert.load_state_dict(weights["bert"])
    vit.load_state_dict(vit_state_names(weights["vit"], vit))  # transformers 4.x or 5.x layer names
    tqn.load_state_dict(weights["fusion"])
    ptok = PromptTokenizer(tok, pad_id=0, max_length=97, cleaning="carzero")
    return {"model": model, "bert": bert, "vit": vit, "tqn": tqn, "tok": tok, "ptok": ptok}


def reference_ids(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the reference's HF tokenizer call gives: cleaned text, truncation, padding to 97."""
    enc = tok.encode_batch([reference_clean(p) for p in prompts])
    ids = torch.zeros(len(prompts), 97, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(enc):
        n = min(len(e.ids), 97)
        kept = [*e.ids[:n - 1], e.ids[-1]] if len(e.ids) > 97 else e.ids  # HF keeps [SEP] when truncating
        ids[row, :n] = torch.tensor(kept)
        mask[row, :n] = 1
    return ids, mask


@torch.no_grad()
def test_vision_tower_matches_transformers_vit(parity: dict) -> None:
    pixels = torch.randn(2, 3, 224, 224)
    want = parity["vit"](pixel_values=pixels).last_hidden_state
    got = parity["model"].image_tokens(pixels)
    assert got.shape == (2, 197, 768)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@torch.no_grad()
def test_text_side_matches_bert_and_the_reference_aggregation(parity: dict) -> None:
    model, tok = parity["model"], parity["tok"]
    ids, mask = parity["ptok"](PROMPTS)
    ref_ids, ref_mask = reference_ids(tok, PROMPTS)
    assert ids.shape[1] == 97  # the long prompt is truncated to exactly 97 pieces
    assert torch.equal(ids, ref_ids[:, : ids.shape[1]]) and torch.equal(mask, ref_mask[:, : ids.shape[1]])
    assert mask[1].sum() == 2  # "Cardiomegaly" → [CLS][SEP]
    idx = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    words, sent = reference_text(parity["bert"], ref_ids, ref_mask, idx)
    memory = model.prompt_memory(ids, mask)
    scale = words.abs().max()
    assert (memory[:, 1:] - words.permute(0, 2, 1)).abs().max() <= 1e-5 * scale
    assert (memory[:, 0] - sent).abs().max() <= 1e-5 * scale
    pieces = int(mask[0].sum())
    assert memory[0, 1 + pieces:].abs().max() == 0  # zero rows after [SEP] (≤ pieces rows are words)


@torch.no_grad()
def test_scores_match_the_reference_formulation(parity: dict) -> None:
    model, tok = parity["model"], parity["tok"]
    pixels = torch.randn(3, 3, 224, 224)
    hidden = parity["vit"](pixel_values=pixels).last_hidden_state
    ref_ids, ref_mask = reference_ids(tok, PROMPTS)
    idx = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    words, sent = reference_text(parity["bert"], ref_ids, ref_mask, idx)
    want = reference_scores(parity["tqn"], hidden[:, 0], hidden[:, 1:], sent, words)

    ids, mask = parity["ptok"](PROMPTS)
    got, maps = model.head(model.image_tokens(pixels), model.text_features(ids, mask))
    assert maps is None and got.shape == (3, len(PROMPTS))
    assert want.std() > 100 * S_BOUND  # the scores differ between pairs: the comparison can fail
    assert (got - want).abs().max() <= S_BOUND
    # the differentiable training path computes the same two directions
    both = model(pixels, ids, mask)
    assert (both.mean(0) - want).abs().max() <= S_BOUND
