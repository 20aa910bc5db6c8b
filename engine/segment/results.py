"""The typed values a segment run hands around and returns.

:class:`PromptSpec` (one resolved prompt), :class:`ImageResult` and :class:`InputFailure` (one
image's outcome), :class:`SegmentRun` (the whole call) and :class:`DecodedItem` (an image between
decoding and segmentation). They live apart from the verb so that the prompt parser, the output
writers and the summary can all use them without importing the verb or each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.segment.grounding import Grounding

if TYPE_CHECKING:
    from radflash.io.imageio import ImageMeta


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the run: ``name`` (for files and tables), text, and its mask threshold."""

    name: str
    prompt: str
    threshold: float
    threshold_source: str = "default"  # prompt-file | argument | model | default
    slug: str = ""  # safe file-name component, unique within the run


@dataclass
class ImageResult:
    """Outputs for one image: grounding per prompt, file paths, and arrays when kept in memory."""

    source: str
    name: str  # safe output name (folder under OUTDIR)
    size: tuple[int, int]  # (H, W) of the source image
    sop_instance_uid: str | None
    groundings: dict[str, Grounding]  # prompt name → grounding
    files: dict[str, str] = field(default_factory=dict)  # kind → path relative to OUTDIR
    notes: list[str] = field(default_factory=list)  # outputs not produced, and why
    probs: np.ndarray | None = field(default=None, repr=False)  # (T, H, W) float16 (in memory only)
    masks: np.ndarray | None = field(default=None, repr=False)  # (T, H, W) uint8 (in memory only)


@dataclass(frozen=True)
class InputFailure:
    """A file with no results (``skipped`` by the selection rules, ``failed``) or ``partial`` ones
    (segmented, but some outputs could not be written; the reason lists them)."""

    source: str
    status: str
    reason: str


class Tally:
    """Running aggregates of a run (counts, per-prompt positives and peak sums), updated as each
    image or failure is committed, so the summary never needs the per-image results in memory."""

    def __init__(self, prompts: Sequence[PromptSpec]) -> None:
        self.segmented = 0
        self.statuses: Counter[str] = Counter()  # failure status → files
        self.positives = {p.name: 0 for p in prompts}
        self.peak_sums = {p.name: 0.0 for p in prompts}
        self.peak_counts = {p.name: 0 for p in prompts}

    def add_image(self, result: ImageResult) -> None:
        self.segmented += 1
        for name, g in result.groundings.items():
            if name in self.positives:
                self.positives[name] += bool(g.positive)
                self.peak_sums[name] += float(g.max_prob)
                self.peak_counts[name] += 1

    def add_failure(self, failure: InputFailure) -> None:
        self.statuses[failure.status] += 1

    def mean_peak(self, name: str) -> float | None:
        n = self.peak_counts.get(name, 0)
        return self.peak_sums[name] / n if n else None


@dataclass
class SegmentRun:
    """Summary of one ``segment`` call; ``images`` in input order, ``failures`` with reasons.

    With an output folder both are read back from the run's ledger as they are iterated
    (:mod:`radflash.segment.ledger`: memory stays bounded whatever the archive size); without one
    ``images`` is a list holding each image's arrays. ``tally`` has the counts and per-prompt
    aggregates, kept as the run went.
    """

    outdir: Path | None
    model_id: str
    prompts: tuple[PromptSpec, ...]
    formats: tuple[str, ...]
    images: Sequence[ImageResult]
    failures: Sequence[InputFailure]
    elapsed_s: float
    report_path: Path | None = None
    report: dict = field(default_factory=dict, repr=False)
    tally: Tally | None = field(default=None, repr=False)

    def _tally(self) -> Tally:
        if self.tally is not None:
            return self.tally
        tally = Tally(self.prompts)  # built by hand (no verb): aggregate the sequences once
        for img in self.images:
            tally.add_image(img)
        for f in self.failures:
            tally.add_failure(f)
        return tally

    @property
    def positives(self) -> dict[str, int]:
        """Prompt name → number of images whose mask has at least one pixel."""
        return dict(self._tally().positives)

    @property
    def mean_peaks(self) -> dict[str, float | None]:
        """Prompt name → mean peak probability over the segmented images (None: no image)."""
        tally = self._tally()
        return {p.name: tally.mean_peak(p.name) for p in self.prompts}

    @property
    def counts(self) -> dict[str, int]:
        tally = self._tally()
        return {"segmented": tally.segmented, **{s: tally.statuses[s] for s in ("skipped", "failed", "partial")}}


@dataclass
class DecodedItem:
    """A decoded image on its way through the run: its position in the input order, its source (a
    path, or ``<array i>``) and its full-resolution pixels, since maps are made at the source size."""

    index: int
    source: str
    pixels: np.ndarray  # H×W float32 in [0, 1], original resolution
    meta: ImageMeta | None = None  # None for in-memory arrays


# ---- the ledger's JSON form (radflash.segment.ledger) -------------------------------------------
def image_to_json(result: ImageResult) -> dict[str, Any]:
    """An :class:`ImageResult` without its arrays, as JSON (the arrays were written to files)."""
    return {"source": result.source, "name": result.name, "size": list(result.size),
            "uid": result.sop_instance_uid, "groundings": {k: _grounding_json(g) for k, g in result.groundings.items()},
            "files": result.files, "notes": result.notes}


def _grounding_json(g: Grounding) -> dict[str, Any]:
    """The fields by hand: ``dataclasses.asdict`` (deep copies) would cost more than the ledger's write."""
    return {"point": [int(v) for v in g.point], "max_prob": float(g.max_prob),
            "bbox": None if g.bbox is None else [int(v) for v in g.bbox],
            "mask_pixels": int(g.mask_pixels), "component_pixels": int(g.component_pixels)}


def image_from_json(d: dict[str, Any]) -> ImageResult:
    groundings = {k: Grounding(point=tuple(g["point"]), max_prob=g["max_prob"],
                               bbox=None if g["bbox"] is None else tuple(g["bbox"]),
                               mask_pixels=g["mask_pixels"], component_pixels=g["component_pixels"])
                  for k, g in d["groundings"].items()}
    return ImageResult(d["source"], d["name"], tuple(d["size"]), d["uid"], groundings,  # type: ignore[arg-type]
                       dict(d["files"]), list(d["notes"]))


def failure_to_json(failure: InputFailure) -> dict[str, str]:
    return asdict(failure)


def failure_from_json(d: dict[str, str]) -> InputFailure:
    return InputFailure(**d)
