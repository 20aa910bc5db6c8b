"""The report's gallery, gathered in the run's own pass: running top-K images per finding/prompt.

Reading an archive twice to draw a dozen thumbnails would double the cost of a run, so the
gallery is filled by observers the verbs call as they go (``score(..., observer=)``,
``segment(..., observer=)``), while the pixels and image tokens are still in memory:

* :class:`ScoreGallery` sees every scored batch with its image tokens; for the images that enter
  a finding's top-K it asks the model for that finding's similarity map (``similarity_maps`` with
  the tokens already computed: no second encoder pass) at thumbnail size and keeps a JPEG of the
  map blended over the radiograph plus the grounding point (the map's arg-max). A model family
  without maps (``supports_maps`` False) gets no gallery and a note instead.
* :class:`SegmentGallery` sees every segmented image and keeps the grey thumbnail of those in some
  prompt's top-K by peak probability; the masks are overlaid at report time from the PNG files
  ``segment`` already writes.

Both save to ``OUT/gallery.json`` so ``radflash report OUT`` can rebuild the report, and a
``score --resume`` continues the earlier top-K. Ranking is by (score descending, key), so the
chosen images do not depend on batch order. A failure here is logged and ends the gallery (with
a note in the report), never the run: the report is a view of the results, not part of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radflash.errors import InputError
from radflash.report.thumbnails import data_uri, gray_image, gray_thumbnail, heat_overlay

if TYPE_CHECKING:
    import torch

    from radflash.api import RadFlashModel
    from radflash.archive.decode_pool import Decoded
    from radflash.archive.pipeline import PromptSet
    from radflash.archive.sinks import FileRecord
    from radflash.segment.results import DecodedItem, ImageResult

log = logging.getLogger("radflash.report")

GALLERY = "gallery.json"
GALLERY_VERSION = 1


@dataclass
class Tile:
    """One gallery image: its row key, its score, the JPEG (data URI), its size and the grounding point."""

    key: str
    score: float
    image: str
    height: int
    width: int
    point: tuple[float, float] | None = None  # (x, y) in thumbnail pixels
    map_peak: float | None = None  # the similarity map's peak probability there


def _rank(score: float, key: str) -> tuple[float, str]:
    return (-score, key)


class _TopK:
    """Per-name lists of at most ``k`` items, best first by (score descending, key)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise InputError(f"--report-maps must be ≥ 1, got {k}")
        self.k = k
        self.lists: dict[str, list[Tile]] = {}

    def winners(self, name: str, candidates: Sequence[tuple[float, str]]) -> set[str]:
        """Keys among ``candidates`` (score, key) that would be in ``name``'s top-K after adding them."""
        current = [(t.score, t.key) for t in self.lists.get(name, [])]
        best = sorted(current + list(candidates), key=lambda c: _rank(*c))[: self.k]
        new = {key for _, key in candidates}
        return {key for _, key in best if key in new}

    def add(self, name: str, tile: Tile) -> None:
        lst = [t for t in self.lists.get(name, []) if t.key != tile.key]
        lst.append(tile)
        lst.sort(key=lambda t: _rank(t.score, t.key))
        self.lists[name] = lst[: self.k]


class ScoreGallery:
    """A batch observer for :func:`radflash.archive.verb.score`: top-K heat-map thumbnails per finding."""

    kind = "score"

    def __init__(self, k: int) -> None:
        self.top = _TopK(k)
        self.observed = 0  # scored images seen (by this run and, after a resume, the earlier ones)
        self.note: str | None = None  # why there is no (complete) gallery
        self._shipped: set[tuple[str, str]] = set()  # (finding, key) tiles already handed over (Ray actors)

    @classmethod
    def resume(cls, out_dir: str | Path, k: int) -> ScoreGallery:
        """A gallery continuing the one an earlier run into ``out_dir`` saved (if any)."""
        gallery = cls(k)
        saved = load_gallery(out_dir)
        if saved is not None and saved.get("kind") == cls.kind:
            gallery.observed = int(saved.get("observed", 0))
            for name, tiles in saved.get("findings", {}).items():
                for t in tiles:
                    gallery.top.add(name, _tile(t))
        return gallery

    def __call__(self, model: RadFlashModel, prompts: PromptSet, items: Sequence[Decoded], tokens: torch.Tensor,
                 records: Sequence[FileRecord]) -> None:
        if self.note is not None:
            return
        if not model.supports_maps:
            self.note = f"model family {model.family!r} has no similarity maps, so there is no gallery"
            return
        try:
            self._observe(model, prompts, items, tokens, records)
        except Exception as exc:  # the gallery is a view; losing it must not lose the run
            self.note = f"the gallery stopped after {self.observed} images ({type(exc).__name__}: {exc})"
            log.warning("report gallery disabled: %s", self.note)

    def _observe(self, model: RadFlashModel, prompts: PromptSet, items: Sequence[Decoded], tokens: torch.Tensor,
                 records: Sequence[FileRecord]) -> None:
        scored = [(i, r) for i, r in enumerate(records) if r.status == "scored" and r.probs is not None]
        self.observed += len(scored)
        wanted: dict[int, list[int]] = {}  # batch index → findings it enters the top-K of
        for j, name in enumerate(prompts.names):
            winners = self.top.winners(name, [(float(r.probs[j]), r.path) for _, r in scored])  # type: ignore[index]
            for i, r in scored:
                if r.path in winners:
                    wanted.setdefault(i, []).append(j)
        for i, js in wanted.items():
            record = records[i]
            gray = gray_thumbnail(items[i].pixels)  # type: ignore[arg-type]
            h, w = gray.shape
            maps = model.similarity_maps(prompts=[prompts.prompts[j] for j in js], tokens=tokens[i:i + 1],
                                         size=(h, w), output="prob")
            for t, j in enumerate(js):
                y, x = (int(v) for v in maps.peak[0, t].tolist())
                self.top.add(prompts.names[j], Tile(
                    key=record.path, score=float(record.probs[j]),  # type: ignore[index]
                    image=data_uri(heat_overlay(gray, maps.probs[0, t].float().cpu().numpy())),
                    height=h, width=w, point=(x + 0.5, y + 0.5), map_peak=round(float(maps.peak_prob[0, t]), 4)))

    # ---- under Ray (radflash.archive.pipeline.DistributedObserver): a copy in every actor ----------
    def for_worker(self) -> ScoreGallery:
        """An empty gallery of the same K for one Ray actor (pickled to it).

        Each actor keeps its own top-K and ships a tile when it enters that list; every image of the
        global top-K is in its actor's top-K when it is scored, so merging what the actors ship gives
        exactly the gallery of a local run.
        """
        return ScoreGallery(self.top.k)

    def take_delta(self) -> dict[str, Any]:
        """What this (actor's) gallery gained since the last call: tiles, images observed, its note."""
        tiles = {name: [asdict(t) for t in lst if (name, t.key) not in self._shipped]
                 for name, lst in self.top.lists.items()}
        self._shipped.update((name, t["key"]) for name, lst in tiles.items() for t in lst)
        observed, self.observed = self.observed, 0
        return {"observed": observed, "note": self.note, "tiles": {n: lst for n, lst in tiles.items() if lst}}

    def merge_delta(self, delta: dict[str, Any]) -> None:
        """Fold an actor's :meth:`take_delta` into this (the driver's) gallery."""
        self.observed += int(delta.get("observed", 0))
        if delta.get("note") and self.note is None:
            self.note = str(delta["note"])
        for name, tiles in delta.get("tiles", {}).items():
            for t in tiles:
                self.top.add(name, _tile(t))

    def save(self, out_dir: str | Path) -> Path:
        return save_gallery(out_dir, {"kind": self.kind, "k": self.top.k, "observed": self.observed,
                                      "note": self.note,
                                      "findings": {n: [asdict(t) for t in lst] for n, lst in self.top.lists.items()}})


class SegmentGallery:
    """An image observer for :func:`radflash.segment.verb.segment`: grey thumbnails of each prompt's top-K.

    Only thumbnails are kept; which images are a prompt's top-K is re-derived at report time from
    the per-image JSON (the same ranking), and the masks come from the PNG files of the run.
    """

    kind = "segment"

    def __init__(self, k: int) -> None:
        self.top = _TopK(k)
        self.thumbs: dict[str, str] = {}  # output name → grey JPEG data URI
        self.note: str | None = None

    def __call__(self, item: DecodedItem, result: ImageResult) -> None:
        if self.note is not None:
            return
        try:
            self._observe(item, result)
        except Exception as exc:  # the gallery is a view; losing it must not lose the run
            self.note = f"the gallery stopped at {result.name} ({type(exc).__name__}: {exc})"
            log.warning("report gallery disabled: %s", self.note)

    def _observe(self, item: DecodedItem, result: ImageResult) -> None:
        uri: str | None = None
        for name, g in result.groundings.items():
            if result.name not in self.top.winners(name, [(float(g.max_prob), result.name)]):
                continue
            if uri is None:
                gray = gray_thumbnail(item.pixels)
                uri = data_uri(gray_image(gray))
                self.thumbs[result.name] = uri
            self.top.add(name, Tile(key=result.name, score=float(g.max_prob), image="", height=0, width=0))
        kept = {t.key for lst in self.top.lists.values() for t in lst}
        self.thumbs = {k: v for k, v in self.thumbs.items() if k in kept}

    def save(self, out_dir: str | Path) -> Path:
        return save_gallery(out_dir, {"kind": self.kind, "k": self.top.k, "note": self.note,
                                      "thumbnails": dict(sorted(self.thumbs.items()))})


def _tile(d: dict[str, Any]) -> Tile:
    point = d.get("point")
    return Tile(key=str(d["key"]), score=float(d["score"]), image=str(d["image"]), height=int(d["height"]),
                width=int(d["width"]), point=None if point is None else (float(point[0]), float(point[1])),
                map_peak=d.get("map_peak"))


def tiles_of(saved: dict[str, Any]) -> dict[str, list[Tile]]:
    """A saved score gallery's tiles per finding (best first)."""
    return {name: [_tile(t) for t in tiles] for name, tiles in saved.get("findings", {}).items()}


def save_gallery(out_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``OUT/gallery.json`` atomically (tmp file + rename)."""
    path = Path(out_dir) / GALLERY
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"gallery_version": GALLERY_VERSION, **payload}, separators=(",", ":")) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_gallery(out_dir: str | Path) -> dict[str, Any] | None:
    """``OUT/gallery.json`` as a dict, or None when the run kept no gallery."""
    path = Path(out_dir) / GALLERY
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable gallery ({exc})") from None
    if not isinstance(saved, dict):
        raise InputError(f"{path}: unreadable gallery (not a JSON object)")
    return saved
