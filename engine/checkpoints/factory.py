"""Randomly initialised checkpoints: for tests, benchmarks and as the trainer's starting point.

Real weights never ship with radflash; latency depends only on shapes, so benchmarks of the
published sizes use random weights of the right architecture.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from radflash.checkpoints.format import Checkpoint
from radflash.findings import default_prompts
from radflash.models.config import ModelConfig, preset
from radflash.models.registry import build
from radflash.tokenizer import PromptTokenizer

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # MPNet's ids 0..3 (pad = 1)
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, with pad = 0
BASIC_WORDS = (
    "there", "is", "are", "no", "may", "be", "of", "the", "a", "and", "or", "in", "with", "left",
    "right", "upper", "lower", "lung", "lungs", "lobe", "apical", "basal", "bilateral", "small", "large",
    "moderate", "pleural", "effusion", "pneumothorax", "cardiomegaly", "nodule", "mass", "consolidation",
    "atelectasis", "edema", "opacity", "fracture", "lesion", "pneumonia", "support", "devices",
    "enlarged", "cardiomediastinum", "other", "finding", "heart", "normal", "clear",
)


def wordpiece_tokenizer(words: Iterable[str] = BASIC_WORDS, *, vocab_size: int | None = None,
                        style: str = "mpnet") -> Tokenizer:
    """A WordPiece tokenizer over a fixed word list (+ single characters as fallback).

    ``style="mpnet"``: RadZero's special tokens (``<s> … </s>``, pad 1); ``"bert"``: CARZero's
    (``[CLS] … [SEP]``, pad 0). Words outside the list split into ``##`` pieces, which is what
    CARZero's word aggregation is tested on.
    """
    specials = BERT_SPECIAL_TOKENS if style == "bert" else SPECIAL_TOKENS
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:-'()/"))
    for token in [*chars, *[f"##{c}" for c in chars], *words]:
        vocab.setdefault(token, len(vocab))
    if vocab_size is not None:
        for i in range(len(vocab), vocab_size):
            vocab[f"[unused{i}]"] = i
    if style == "bert":
        bos, eos, unk = "[CLS]", "[SEP]", "[UNK]"
    else:
        bos, eos, unk = "<s>", "</s>", "<unk>"
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tok.decoder = decoders.WordPiece()
    return tok


def randomize_(module: torch.nn.Module, *, seed: int | None = None, std: float | None = 0.02) -> torch.nn.Module:
    """Non-trivial random weights everywhere (LayerNorm gains/biases and LayerScale included).

    Default inits leave LayerNorms at 1/0 and position tables at 0, which would let parity tests
    pass with a wrong parameter mapping; randomising everything makes such bugs visible.
    ``std=None`` scales each matrix by 1/√fan-in instead, so signals keep their size through deep
    stacks (CARZero's 4-layer scoring MLP turns 0.02-std weights into a constant score).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("log_tau"):
                p.fill_(math.log(0.07))
            elif p.ndim == 1 and _is_gain(name.lower()):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                scale = std if std is not None or p.ndim < 2 or "embed" in name else p[0].numel() ** -0.5
                p.copy_((scale or 0.02) * torch.randn(p.shape, generator=gen))
    return module


def random_model(config: ModelConfig, *, seed: int | None = None) -> torch.nn.Module:
    """The module of ``config``'s family with random weights at the scale that family needs.

    CARZero's 4-layer scoring MLP turns 0.02-std weights into one constant score, so its matrices
    are scaled by 1/√fan-in; RadZero keeps the 0.02 its checkpoints and tests were built with.
    """
    std = None if config.architecture == "carzero" else 0.02
    return randomize_(build(config), seed=seed, std=std)


def _is_gain(name: str) -> bool:
    return ("norm" in name and name.endswith("weight")) or name.endswith(("ls1", "ls2", "lambda1"))


def random_checkpoint(
    config: ModelConfig | str = "tiny",
    *,
    seed: int | None = None,
    tokenizer: Tokenizer | None = None,
    model_id: str = "random",
) -> Checkpoint:
    cfg = preset(config) if isinstance(config, str) else config
    tok = tokenizer or wordpiece_tokenizer(vocab_size=cfg.text.vocab, style=cfg.text.kind)
    if tok.get_vocab_size() > cfg.text.vocab:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, model vocab is {cfg.text.vocab}")
    module = random_model(cfg, seed=seed)  # the family the config names
    bind = getattr(module, "bind_vocabulary", None)  # families whose weights record tokenizer facts
    if bind is not None:
        bind(tok.get_vocab(with_added_tokens=True))
    return Checkpoint(
        config=cfg,
        state_dict={k: v.clone() for k, v in module.state_dict().items()},
        tokenizer=PromptTokenizer(tok, pad_id=cfg.text.pad_id, max_length=cfg.text.max_length,
                                  cleaning=cfg.text.cleaning),
        model_id=model_id,
        prompts=default_prompts(),
    )
