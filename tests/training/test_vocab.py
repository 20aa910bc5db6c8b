"""The demo tokenizer: deterministic, MPNet-shaped, and no <unk> for radiology words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from radflash.training.sentences import prompt_for
from radflash.training.vocab import PAD_ID, RADIOLOGY_WORDS, SPECIAL_TOKENS, build_tokenizer, save


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer()


def test_deterministic(tok: Tokenizer) -> None:
    assert build_tokenizer().to_str() == tok.to_str()


def test_special_tokens(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    enc = tok.encode("There is no pneumothorax")
    assert enc.tokens[0] == "<s>" and enc.tokens[-1] == "</s>"
    assert enc.ids[0] == 0 and enc.ids[-1] == 2
    assert tok.encode("<mask> effusion", add_special_tokens=False).ids[0] == 4
    assert tok.decode(enc.ids) == "there is no pneumothorax"
    assert tok.get_vocab_size() <= 2048  # the tiny preset's embedding table


def test_radiology_words_are_known(tok: Tokenizer) -> None:
    for word in RADIOLOGY_WORDS:
        enc = tok.encode(word, add_special_tokens=False)
        assert "<unk>" not in enc.tokens, word
        assert len(enc.tokens) == len(word.split()), (word, enc.tokens)  # whole words, not pieces
    # unseen words split into pieces, never <unk>
    assert "<unk>" not in tok.encode("Hydropneumothorax and bronchiectasis, 3.5 cm").tokens
    assert tok.encode(prompt_for("lung nodule", "left lower lung")).tokens[1:-1] == \
        ["there", "is", "lung", "nodule", "of", "the", "left", "lower", "lung"]


def test_padding(tok: Tokenizer) -> None:
    tok = Tokenizer.from_str(tok.to_str())
    tok.enable_padding(pad_id=PAD_ID, pad_token="<pad>")
    short, long = tok.encode_batch(["There is cardiomegaly", "There is no pleural effusion of the left lung"])
    assert len(short.ids) == len(long.ids)
    n = sum(short.attention_mask)
    assert short.ids[n:] == [PAD_ID] * (len(short.ids) - n) and short.ids[n - 1] == 2


def test_save_roundtrip(tok: Tokenizer, tmp_path: Path) -> None:
    path = save(tok, tmp_path)
    assert path.name == "tokenizer.json"
    data = json.loads(path.read_text())
    assert data["model"]["type"] == "WordPiece"
    again = Tokenizer.from_file(str(path))
    assert again.encode("Small left apical pneumothorax").ids == tok.encode("Small left apical pneumothorax").ids
