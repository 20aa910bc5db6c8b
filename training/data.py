"""Training and evaluation data: seeded phantoms on the fly, or a MIMIC-CXR-JPG-style folder.

Every dataset yields :class:`Sample` records (an H×W float image in [0, 1] plus its minimal
sentences); :class:`Collator` turns a list of samples into one :class:`Batch` through
:func:`radflash.preprocess`, the same function inference uses, so training and serving can never
disagree on resize or normalisation.

Determinism: a phantom is a pure function of ``(seed, index)``, and the trainer asks for batch
``step`` by index (:func:`batch_indices`), so a resumed run sees exactly the images an
uninterrupted run would have seen without storing any sampler state.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radflash.errors import InputError
from radflash.preprocess import Preprocessing, preprocess
from radflash.tokenizer import PromptTokenizer


@dataclass(frozen=True)
class Sample:
    """One training/evaluation image and what is known about it."""

    image: np.ndarray  # (H, W) float32 in [0, 1]
    sentences: tuple[str, ...]  # minimal sentences; ALL (negated ones too) are positives of this image
    key: str  # stable identifier (phantom seed or file path), for error messages and logs
    # evaluation only: finding name → present?, and finding name → (H, W) bool mask (positives)
    labels: dict[str, bool] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, tuple[tuple[int, int, int, int], ...]] = field(default_factory=dict)  # one per instance
    locations: dict[str, tuple[str, ...]] = field(default_factory=dict)  # finding name → where it is
    # optional map supervision: prompt text → (g, g) fraction of each patch the prompt's finding covers,
    # for the plain finding prompt and each location prompt that is true of the image (map_prompts)
    grid_masks: dict[str, np.ndarray] = field(default_factory=dict)


def sample_seed(seed: int, index: int) -> int:
    """Independent 31-bit seed for item ``index`` of a dataset seeded with ``seed``.

    SeedSequence mixes both numbers, so neighbouring dataset seeds (0 and 1) do not share items,
    which would silently leak training images into a "held-out" split.
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] & 0x7FFFFFFF)


class PhantomDataset(torch.utils.data.Dataset):
    """Seeded synthetic radiographs generated on the fly (``radflash.synthetic.phantoms``).

    ``exclude`` lists (finding, location) combinations that never appear (held out for the
    zero-shot test); ``findings`` draws exactly those (name or (name, location)) in every image. ``augment`` applies a
    mild seeded intensity augmentation (gamma, contrast, noise) so that the model cannot key on the
    generator's exact grey levels. ``plain_sentence_prob`` adds, per located positive sentence and
    with that probability, its location-free twin ("There is lung nodule"): phantom reports always
    name a location, so without it the plain prompts users type are never trained.
    """

    def __init__(
        self,
        *,
        seed: int,
        length: int,
        size: int = 224,
        exclude: Sequence[tuple[str, str]] = (),
        findings: Sequence[str | tuple[str, str | None]] | None = None,
        augment: bool = False,
        pool: int | None = None,
        mask_grid: int | None = None,
        plain_sentence_prob: float = 0.0,
    ) -> None:
        if length < 1:
            raise InputError(f"phantom dataset length must be ≥ 1, got {length}")
        self.seed = int(seed)
        self.length = int(length)
        self.size = int(size)
        self.exclude = tuple((str(f), str(loc)) for f, loc in exclude)
        self.findings = tuple(findings) if findings is not None else None  # exactly these, every image
        self.augment = augment
        # pool: item i shows phantom i % pool (drawn once, cached) with its own augmentation draw.
        # Drawing costs more than a training step of the tiny model; a cached pool re-used for a
        # few epochs buys ~2× more steps in the same CPU budget.
        self.pool = int(pool) if pool else None
        self._cache: dict[int, tuple[np.ndarray, tuple[str, ...], dict[str, np.ndarray]]] = {}
        self.mask_grid = int(mask_grid) if mask_grid else None
        if not 0.0 <= plain_sentence_prob <= 1.0:
            raise InputError(f"plain_sentence_prob must be in [0, 1], got {plain_sentence_prob}")
        self.plain_sentence_prob = float(plain_sentence_prob)

    def prefill(self, processes: int = 1) -> None:
        """Draw the whole pool now (in ``processes`` forked workers): a pure function of the indices."""
        if not self.pool:
            return
        todo = [i for i in range(self.pool) if i not in self._cache]
        if processes > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(processes) as workers:
                drawn = workers.map(self._draw_for_cache, todo, chunksize=16)
        else:
            drawn = [self._draw_for_cache(i) for i in todo]
        self._cache.update(zip(todo, drawn))

    def _draw_for_cache(self, base: int) -> tuple[np.ndarray, tuple[str, ...], dict[str, np.ndarray]]:
        sample = self._draw(base)
        return sample.image.astype(np.float16), sample.sentences, sample.grid_masks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if self.pool:
            base = index % self.pool
            if base not in self._cache:
                self._cache[base] = self._draw_for_cache(base)
            image, sentences, grid_masks = self._cache[base]
            sample = Sample(image=image.astype(np.float32), sentences=sentences,
                            key=f"phantom:{sample_seed(self.seed, base)}", grid_masks=grid_masks)
        else:
            sample = self._draw(index)
        if self.augment:
            image = _augment(sample.image, np.random.default_rng([self.seed, index]))
            sample = dataclasses.replace(sample, image=image)
        if self.plain_sentence_prob:
            twins = with_plain_twins(sample.sentences, self.plain_sentence_prob,
                                     np.random.default_rng([self.seed, index, 1]))
            sample = dataclasses.replace(sample, sentences=twins)
        return sample

    def _draw(self, index: int) -> Sample:
        from radflash.synthetic.phantoms import generate_phantom

        seed = sample_seed(self.seed, index)
        kwargs: dict = {"exclude": self.exclude}
        if self.findings is not None:
            kwargs["findings"] = list(self.findings)
        ph = generate_phantom(seed, self.size, **kwargs)
        image = np.asarray(ph.image, dtype=np.float32)
        labels: dict[str, bool] = {}
        masks: dict[str, np.ndarray] = {}
        boxes: dict[str, tuple[tuple[int, int, int, int], ...]] = {}
        locations: dict[str, tuple[str, ...]] = {}
        for placed in ph.findings:
            locations[placed.name] = (*locations.get(placed.name, ()), str(placed.location))
            labels[placed.name] = True
            mask = np.asarray(placed.mask, dtype=bool)
            masks[placed.name] = masks[placed.name] | mask if placed.name in masks else mask
            box = (int(placed.box[0]), int(placed.box[1]), int(placed.box[2]), int(placed.box[3]))
            boxes[placed.name] = (*boxes.get(placed.name, ()), box)
        grid_masks = prompt_grid_masks(ph.findings, self.mask_grid) if self.mask_grid else {}
        return Sample(image=image, sentences=tuple(phantom_sentences(ph)), key=f"phantom:{seed}",
                      labels=labels, masks=masks, boxes=boxes, locations=locations, grid_masks=grid_masks)


def phantom_sentences(ph: Any) -> list[str]:
    """Minimal sentences of a phantom: ``sentences.extract_sentences`` on its free-text report
    (not its labels), so training exercises the same extractor real reports go through."""
    from radflash.training.sentences import extract_sentences

    return list(extract_sentences(ph.report))


def prompt_grid_masks(placed: Sequence[Any], grid: int) -> dict[str, np.ndarray]:
    """Patch-coverage targets, keyed by every present-tense prompt that is TRUE of the image.

    "There is X" covers all instances of X; "There is X of the L" those at L or inside it (an apical
    pneumothorax is also "of the right lung"). A prompt that is absent from the result is false of
    the image, so its target is an empty map.
    """
    masks: dict[str, np.ndarray] = {}

    def add(prompt: str, mask: np.ndarray) -> None:
        masks[prompt] = masks[prompt] | mask if prompt in masks else mask

    for f in placed:
        mask = np.asarray(f.mask, dtype=bool)
        add(canonical_prompt(f.name), mask)
        if f.location and f.location != "None":
            side, *zone = str(f.location).split(" ")
            add(canonical_prompt(f.name, f.location), mask)
            if len(zone) == 2:  # "right upper lung" is also "right lung"
                add(canonical_prompt(f.name, f"{side} lung"), mask)
    out = {}
    for prompt, mask in masks.items():
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        out[prompt] = torch.nn.functional.adaptive_avg_pool2d(t, grid)[0, 0].numpy()
    return out


def with_plain_twins(sentences: Sequence[str], prob: float, rng: np.random.Generator) -> tuple[str, ...]:
    """``sentences`` plus, with probability ``prob`` each, the location-free twin of a located
    positive or hedged sentence ("There is X of the L" → "There is X"); never duplicates one."""
    out = list(sentences)
    for sent in sentences:
        head, sep, _ = sent.partition(" of the ")
        if sep and not head.startswith("There is no ") and rng.random() < prob and head not in out:
            out.append(head)
    return tuple(out)


def canonical_prompt(finding: str, location: str | None = None) -> str:
    """The canonical prompt of ``sentences.prompt_for`` ("There is <finding> of the <location>")."""
    from radflash.training.sentences import prompt_for

    return prompt_for(finding, location)


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = float(np.exp(rng.normal(0.0, 0.15)))
    contrast = float(rng.uniform(0.85, 1.15))
    bright = float(rng.normal(0.0, 0.04))
    out = np.clip(image, 0.0, 1.0) ** gamma
    out = (out - 0.5) * contrast + 0.5 + bright
    out = out + rng.normal(0.0, 0.01, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class MimicStyleDataset(torch.utils.data.Dataset):
    """Real radiographs in a MIMIC-CXR-JPG-style layout, for users training on their own data.

    ``root`` holds the image files (PNG/JPEG, any depth). Sentences come from either

    - ``sentences``: a JSON object ``{image_path: [sentence, ...]}`` (paths relative to ``root``),
      already split into minimal sentences (the RadZero recipe uses an LLM for that), or
    - ``reports``: a CSV with an image column (``path``, ``image_path``, ``dicom_id`` or
      ``image_column``) and a report column (``report``, ``text``, ``findings`` or
      ``report_column``); reports are split with :func:`radflash.training.sentences.extract_sentences`.
      A ``dicom_id`` column is resolved to ``<root>/**/<dicom_id>.jpg``.

    Every listed file must exist; all problems are reported in one error, with the first few names.
    """

    IMAGE_COLUMNS = ("path", "image_path", "dicom_id")
    REPORT_COLUMNS = ("report", "text", "findings")
    SUFFIXES = (".jpg", ".jpeg", ".png")

    def __init__(
        self,
        root: str | Path,
        *,
        reports: str | Path | None = None,
        sentences: str | Path | None = None,
        image_column: str | None = None,
        report_column: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: image folder not found")
        if (reports is None) == (sentences is None):
            raise InputError("MimicStyleDataset needs exactly one of reports= (CSV) or sentences= (JSON)")
        if sentences is not None:
            items = self._read_sentences(Path(sentences))
        else:
            items = self._read_reports(Path(reports), image_column, report_column)  # type: ignore[arg-type]
        missing = [str(p) for p, _ in items if not p.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" … (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise InputError(f"{len(missing)} image file(s) listed but not found under {self.root}: {shown}")
        empty = [str(p) for p, s in items if not s]
        if len(empty) == len(items):
            raise InputError("no image has any sentence: check the report column / sentences file")
        self.items = [(p, s) for p, s in items if s]  # an image without sentences has no positive

    def _read_sentences(self, path: Path) -> list[tuple[Path, tuple[str, ...]]]:
        if path.suffix.lower() == ".parquet":
            return self._read_sentence_table(path)
        if not path.is_file():
            raise InputError(f"{path}: sentences JSON not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read sentences JSON ({exc})") from None
        if not isinstance(data, dict) or not data:
            raise InputError(f"{path}: expected a non-empty object {{image_path: [sentences]}}")
        out = []
        for name, sents in data.items():
            if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                raise InputError(f"{path}: entry {name!r} must be a list of strings")
            out.append((self.root / name, tuple(s.strip() for s in sents if s.strip())))
        return out

    def _read_sentence_table(self, path: Path) -> list[tuple[Path, tuple[str, ...]]]:
        """The Parquet table ``radflash sentences`` writes: an image column and a ``sentences`` list
        per row, read as it is (no second extraction); ``dicom_id`` rows are found under the root."""
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the sentence table ({exc})") from None
        img_col = _pick_column(table.column_names, None, self.IMAGE_COLUMNS, path, "image")
        if "sentences" not in table.column_names:
            raise InputError(f"{path}: no 'sentences' column (write it with `radflash sentences`)")
        index = self._dicom_index() if img_col == "dicom_id" else {}
        out = []
        for ref, sents in zip(table.column(img_col).to_pylist(), table.column("sentences").to_pylist()):
            ref = str(ref or "").strip()
            file = index.get(ref, self.root / f"{ref}.jpg") if img_col == "dicom_id" else self.root / ref
            out.append((file, tuple(s.strip() for s in sents or () if isinstance(s, str) and s.strip())))
        return out

    def _read_reports(self, path: Path, image_column: str | None,
                      report_column: str | None) -> list[tuple[Path, tuple[str, ...]]]:
        if not path.is_file():
            raise InputError(f"{path}: reports CSV not found")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            img_col = _pick_column(columns, image_column, self.IMAGE_COLUMNS, path, "image")
            rep_col = _pick_column(columns, report_column, self.REPORT_COLUMNS, path, "report")
            rows = list(reader)
        if not rows:
            raise InputError(f"{path}: the reports CSV has no rows")
        from radflash.training.sentences import extract_sentences

        index = self._dicom_index() if img_col == "dicom_id" else {}
        out = []
        for row in rows:
            ref = (row.get(img_col) or "").strip()
            file = index.get(ref, self.root / f"{ref}.jpg") if img_col == "dicom_id" else self.root / ref
            out.append((file, tuple(extract_sentences(row.get(rep_col) or ""))))
        return out

    def _dicom_index(self) -> dict[str, Path]:
        return {p.stem: p for p in self.root.rglob("*") if p.suffix.lower() in self.SUFFIXES}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        from PIL import Image

        path, sents = self.items[index]
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except OSError as exc:
            raise InputError(f"{path}: cannot read image ({exc})") from None
        return Sample(image=image, sentences=sents, key=str(path))


class OneSentencePerUse(torch.utils.data.Dataset):
    """CARZero's pairing: every USE of an image comes with ONE of its sentences, drawn uniformly.

    The reference trains on (image, one sentence of its report) pairs, a fresh sentence each time
    the image is drawn (its ``full_report: false``), so that the B×B score matrices have one true
    pair per row and column. Items are addressed by ``(index, use)``: ``use`` numbers the draw
    (the sample's position in the stream of global batches, :func:`batch_uses`), and the sentence is
    a pure function of ``(seed, use)``, so a resumed run pairs exactly as an uninterrupted one.
    """

    STREAM = 0x5E17  # keeps these draws apart from batch_indices' permutations, seeded (seed, epoch)

    def __init__(self, base: torch.utils.data.Dataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, use = key
        sample = self.base[index]
        if not sample.sentences:
            raise InputError(f"{sample.key}: no sentence to pair the image with")
        pick = int(np.random.default_rng([self.seed, self.STREAM, use]).integers(len(sample.sentences)))
        return dataclasses.replace(sample, sentences=(sample.sentences[pick],))


def _pick_column(columns: list[str], wanted: str | None, candidates: Sequence[str], path: Path, what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{path}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise InputError(
        f"{path}: no {what} column; expected one of {', '.join(candidates)} (columns: {', '.join(columns)})"
    )


@dataclass
class Batch:
    """One contrastive batch: B images and K sentence instances over U unique sentence texts."""

    pixels: torch.Tensor  # (B, 3, S, S) normalised
    input_ids: torch.Tensor  # (U, L) unique sentences, tokenised once
    attention_mask: torch.Tensor  # (U, L)
    text_index: torch.Tensor  # (K,) row of input_ids for each sentence instance
    owner: torch.Tensor  # (K,) image (0..B-1) each sentence instance belongs to
    texts: list[str]  # the U unique sentences
    text_hash: torch.Tensor | None = None  # (U,) int64 content hash: equal texts match across ranks
    # optional map supervision: rows of input_ids holding the finding prompts, and (B, F, g, g) targets
    map_rows: torch.Tensor | None = None
    map_targets: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device)
        return Batch(*(t.to(device) for t in (self.pixels, self.input_ids, self.attention_mask,
                                                self.text_index, self.owner)), texts=self.texts,
                     text_hash=move(self.text_hash), map_rows=move(self.map_rows),
                     map_targets=move(self.map_targets))


class Collator:
    """samples → :class:`Batch`: pixels via :func:`radflash.preprocess`, deduplicated tokenising.

    A sentence such as "There is no pneumothorax" occurs in most reports; encoding it once per
    batch instead of once per image saves a large share of the text tower's work.
    """

    def __init__(self, tokenizer: PromptTokenizer, preprocessing: Preprocessing, *,
                 map_prompts: Sequence[str] = (), grid: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.map_prompts = tuple(map_prompts)  # prompts whose patch maps are supervised (Sample.grid_masks keys)
        self.grid = grid

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        if not samples:
            raise InputError("empty batch")
        texts: dict[str, int] = {}
        text_index, owner = [], []
        for j, s in enumerate(samples):
            for sent in s.sentences:
                text_index.append(texts.setdefault(sent, len(texts)))
                owner.append(j)
        if not texts:
            raise InputError(f"no sentences in batch (first image {samples[0].key})")
        map_rows = map_targets = None
        if self.map_prompts:
            g = int(self.grid or 1)
            map_rows = torch.tensor([texts.setdefault(p, len(texts)) for p in self.map_prompts])
            map_targets = torch.zeros(len(samples), len(self.map_prompts), g, g)
            for j, s in enumerate(samples):
                for f, prompt in enumerate(self.map_prompts):
                    if prompt in s.grid_masks:
                        map_targets[j, f] = torch.from_numpy(np.asarray(s.grid_masks[prompt], dtype=np.float32))
        ids, mask = self.tokenizer(list(texts))
        pixels = preprocess([s.image for s in samples], self.preprocessing)
        return Batch(pixels=pixels, input_ids=ids, attention_mask=mask,
                     text_index=torch.tensor(text_index, dtype=torch.long),
                     owner=torch.tensor(owner, dtype=torch.long), texts=list(texts),
                     text_hash=torch.tensor([text_hash(t) for t in texts], dtype=torch.long),
                     map_rows=map_rows, map_targets=map_targets)


def text_hash(text: str) -> int:
    """Stable 63-bit hash of a sentence (Python's hash() is salted per process, useless across ranks)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def batch_indices(step: int, *, batch_size: int, length: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Dataset indices of this rank's share of global batch ``step``.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)``; the global batch is split into
    contiguous per-rank slices. A pure function of ``step``: resuming needs no sampler state.
    """
    global_bs = batch_size * world_size
    start = step * global_bs + rank * batch_size
    out = []
    perm_cache: dict[int, np.ndarray] = {}
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, length)
        if epoch not in perm_cache:
            perm_cache[epoch] = np.random.default_rng([seed, epoch]).permutation(length)
        out.append(int(perm_cache[epoch][offset]))
    return out


def batch_uses(step: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Positions of this rank's share of global batch ``step`` in the stream of all samples drawn:
    a distinct number for every (step, slot) of a run, whatever the dataset's length."""
    start = step * batch_size * world_size + rank * batch_size
    return list(range(start, start + batch_size))
