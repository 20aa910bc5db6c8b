"""The typed values a segment run hands around and returns.

:class:`PromptSpec` (one resolved prompt), :class:`ImageResult` and :class:`InputFailure` (one
image's outcome), :class:`SegmentRun` (the whole call) and :class:`DecodedItem` (an image between
decoding and segmentation). They live apart from the verb so that the prompt parser, the output
writers and the summary can all use them without importing the verb or each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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


@dataclass
class SegmentRun:
    """Summary of one ``segment`` call; ``images`` in input order, ``failures`` with reasons."""

    outdir: Path | None
    model_id: str
    prompts: tuple[PromptSpec, ...]
    formats: tuple[str, ...]
    images: list[ImageResult]
    failures: list[InputFailure]
    elapsed_s: float
    report_path: Path | None = None
    report: dict = field(default_factory=dict, repr=False)

    @property
    def positives(self) -> dict[str, int]:
        """Prompt name → number of images whose mask has at least one pixel."""
        return {p.name: sum(img.groundings[p.name].positive for img in self.images if p.name in img.groundings)
                for p in self.prompts}

    @property
    def counts(self) -> dict[str, int]:
        return {"segmented": len(self.images),
                "skipped": sum(f.status == "skipped" for f in self.failures),
                "failed": sum(f.status == "failed" for f in self.failures),
                "partial": sum(f.status == "partial" for f in self.failures)}


@dataclass
class DecodedItem:
    """A decoded image on its way through the run: its position in the input order, its source (a
    path, or ``<array i>``) and its full-resolution pixels, since maps are made at the source size."""

    index: int
    source: str
    pixels: np.ndarray  # H×W float32 in [0, 1], original resolution
    meta: ImageMeta | None = None  # None for in-memory arrays
