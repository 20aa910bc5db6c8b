"""The demo model's tokenizer: an MPNet-shaped WordPiece vocabulary learnt from phantom reports.

The tiny demo text tower has room for ~2000 tokens, far fewer than MPNet's 30527, so its
vocabulary is trained on what it will read: phantom reports, their extracted minimal sentences
and a list of radiology words (CheXpert finding names, anatomy, locations), each a whole token.
Prompts that combine known words in unseen ways ("lung nodule of the left lower lung") then
tokenise into known words instead of characters or ``<unk>``.

Shape follows MPNet's ``tokenizer.json``: BERT normaliser (lower-case), BERT pre-tokeniser,
WordPiece with ``##`` continuations, post-processor ``<s> $A </s>``. Special ids: ``<s>`` 0,
``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 as in MPNet; ``<mask>`` is 4 here (MPNet puts it last, which a
trained-from-scratch vocabulary cannot know in advance). Built from a fixed
corpus with a sorted vocabulary, so the same code gives byte-identical JSON.

``style="bert"`` gives the same vocabulary with BERT's special tokens instead (``[PAD]`` 0,
``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4; post-processor ``[CLS] $A [SEP]``), the shape a
CARZero text tower (BERT, pad 0) is trained with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
PAD_ID = 1
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's order: pad 0
BERT_PAD_ID = 0
VOCAB_SIZE = 2000
CORPUS_SEED = 12345
CORPUS_REPORTS = 400
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:-'()/%"

CHEXPERT_FINDINGS = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged cardiomediastinum", "fracture",
    "lung lesion", "lung opacity", "no finding", "pleural effusion", "pleural other", "pneumonia",
    "pneumothorax", "support devices",
)
RADIOLOGY_WORDS = (
    *CHEXPERT_FINDINGS,
    "lung nodule", "lung mass", "nodule", "mass", "effusion", "emphysema", "fibrosis", "hernia", "infiltration",
    "opacity", "opacities", "airspace", "interstitial", "vascular", "congestion", "calcified", "granuloma",
    "scarring", "thickening", "blunting", "costophrenic", "angle", "hemidiaphragm", "diaphragm", "apical",
    "apex", "base", "basilar", "bibasilar", "lobe", "lobes", "lingula", "hilar", "hilum", "perihilar",
    "retrocardiac", "mediastinum", "mediastinal", "cardiomediastinal", "silhouette", "heart", "cardiac",
    "aorta", "trachea", "clavicle", "ribs", "rib", "spine", "sternotomy", "pacemaker", "catheter", "tube",
    "line", "picc", "endotracheal", "enteric", "nasogastric", "chest", "thorax", "hemithorax", "lung", "lungs",
    "left", "right", "bilateral", "upper", "middle", "lower", "lateral", "medial", "anterior", "posterior",
    "small", "moderate", "large", "mild", "marked", "severe", "there", "is", "may", "be", "no", "of", "the",
    "acute", "cardiopulmonary", "abnormality", "normal", "clear", "present", "possible", "likely",
    "unchanged", "prior", "study", "compared", "pleural", "pulmonary", "focal", "patchy", "linear",
)


def phantom_corpus(n_reports: int = CORPUS_REPORTS, seed: int = CORPUS_SEED) -> list[str]:
    """Reports and minimal sentences of ``n_reports`` seeded phantoms (small images: only text is used)."""
    from radflash.synthetic.phantoms import FINDINGS, generate_batch
    from radflash.training.sentences import CERTAINTIES, extract_sentences, prompt_for

    texts: list[str] = []
    for ph in generate_batch(seed, n_reports, 32):
        texts.append(ph.report)
        texts += extract_sentences(ph.report)
    for name, spec in FINDINGS.items():  # every canonical prompt, in every certainty
        for loc in spec.locations:
            texts += [prompt_for(name, loc, c) for c in CERTAINTIES]
    return texts


def build_tokenizer(extra_texts: Iterable[str] = (), *, vocab_size: int = VOCAB_SIZE,
                    style: Literal["mpnet", "bert"] = "mpnet") -> Tokenizer:
    """The WordPiece tokenizer for the phantom corpus (+ ``extra_texts``), identical on every run.

    ``style`` picks the special tokens and template: MPNet's (RadZero, the default) or BERT's
    (CARZero); the words and pieces, and so every non-special id, are the same in both.

    The vocabulary is the corpus's words by descending frequency (ties alphabetical) after the
    special tokens and every single character with its ``##`` continuation, so any word still
    tokenises without ``<unk>``. ``tokenizers``' own WordPieceTrainer was tried first: two runs in
    one process gave different vocabularies (equal-count merges are taken in hash-map order).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in [*phantom_corpus(), *extra_texts]:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    for word in RADIOLOGY_WORDS:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(word)))
    chars = sorted(set(ALPHABET) | {c for w in counts for c in w})
    specials = BERT_SPECIAL_TOKENS if style == "bert" else SPECIAL_TOKENS
    if style == "bert":
        bos, eos, unk = specials[2], specials[3], specials[1]
    else:
        bos, eos, unk = specials[0], specials[2], specials[3]
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for token in [*chars, *(f"##{c}" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    # fill the rest with word-start and ``##`` pieces of corpus words (long and frequent first), so
    # unseen words ("hydropneumothorax") split into meaningful parts rather than letters
    pieces: Counter[str] = Counter()
    for word, n in counts.items():
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + 10) + 1):
                if (i, j) != (0, len(word)):
                    pieces[word[i:j] if i == 0 else f"##{word[i:j]}"] += n * (j - i)
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    pair = f"{bos} $A {eos} $B {eos}" if style == "bert" else f"{bos} $A {eos} {eos} $B {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=pair, special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    tok.add_special_tokens(list(specials))
    return tok


def save(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` (a folder gets ``tokenizer.json`` inside it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
