"""What a segment run writes: per-image files (masks, maps, DICOM SEG, NIfTI, preview, JSON) and the report.

:func:`check_formats` validates ``--format`` before the model loads, so a missing optional
dependency fails at once rather than on the first image. :class:`OutputWriter` decides which
files one image gets and records each one that fails in the image's notes instead of stopping
the run; the file formats themselves are in :mod:`radflash.segment.writers`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.errors import InputError
from radflash.io.safe_paths import inside
from radflash.segment.results import DecodedItem, ImageResult, PromptSpec, SegmentRun

if TYPE_CHECKING:
    from radflash.api import RadFlashModel


log = logging.getLogger("radflash.segment")


FORMATS = ("png", "npz", "dicom-seg", "dicom-sr", "nifti")


REPORT = "report.json"


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """``"png,npz"`` / ``["png", "nifti"]`` → validated lower-case formats, de-duplicated, in order."""
    if isinstance(formats, str):
        formats = [formats]
    out = []
    for f in formats:
        for part in str(f).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in FORMATS:
                raise InputError(f"unknown output format {part!r}; choose from {', '.join(FORMATS)}")
            if part not in out:
                out.append(part)
    from radflash.util.optional import require

    if "dicom-seg" in out:  # fail before the model loads, not on the first image
        require("highdicom", extra="seg", purpose="--format dicom-seg")
    if "dicom-sr" in out:
        require("highdicom", extra="seg", purpose="--format dicom-sr")
    if "nifti" in out:
        require("nibabel", extra="nifti", purpose="--format nifti")
    return tuple(out)


class OutputWriter:
    """Writes one image's outputs under OUTDIR/<name>/ (every path checked to stay inside OUTDIR)."""

    def __init__(self, out: Path, rf: RadFlashModel, specs: tuple[PromptSpec, ...], formats: tuple[str, ...],
                 preview: bool, *, header_of: Callable[[DecodedItem], Any] | None = None,
                 overlay: str | None = None) -> None:
        """Keeps no per-study state: an object's InstanceNumber derives from its source image
        (:func:`radflash.dicomout.uids.instance_number_for`), so separate writers (``serve``'s batches, a
        ``--resume``) give one study's objects distinct numbers, the same on every rerun."""
        from radflash.archive.stow import prompt_set_key

        self.out, self.rf, self.specs, self.formats, self.preview = out, rf, specs, formats, preview
        self.overlay = overlay  # "sc": the preview as a DICOM Secondary Capture (overlay-sc.dcm)
        self.header_of = header_of  # a source DICOM header when the source is no file (DICOMweb)
        self.prompts_key = prompt_set_key([(s.name, s.prompt, s.threshold) for s in specs])

    def path(self, name: str, filename: str) -> Path:
        return inside(self.out, name, filename)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def npz(self, name: str):
        from radflash.segment.writers import NpzWriter

        return NpzWriter(self.path(name, "maps.npz"))

    def write_image(self, item: DecodedItem, result: ImageResult, masks: np.ndarray) -> None:
        from radflash.segment import writers as sw

        name = result.name
        # Each output is independent: one that fails is noted and the others are still written.
        if "png" in self.formats:
            for t, s in enumerate(self.specs):
                self._try(result, "png", lambda t=t, s=s: sw.write_mask_png(self.path(name, f"mask-{s.slug}.png"),
                                                                           masks[t]), key=f"mask:{s.name}")
        if "dicom-seg" in self.formats:
            if item.meta is None or item.meta.kind != "dicom":  # PNG/JPEG sources and arrays
                result.notes.append("dicom-seg: not written, the source is not a DICOM file")
            else:
                self._try(result, "dicom-seg", lambda: self._seg(item, name, masks))
        if "dicom-sr" in self.formats:  # after the SEG: the report references it
            if item.meta is None or item.meta.kind != "dicom":
                result.notes.append("dicom-sr: not written, the source is not a DICOM file")
            else:
                self._try(result, "dicom-sr", lambda: self._sr(item, name, result))
        if "nifti" in self.formats:
            spacing = item.meta.pixel_spacing if item.meta is not None else None  # mm (row, column)
            self._try(result, "nifti", lambda: sw.write_nifti(self.path(name, "masks.nii.gz"), masks,
                                                              spacing=spacing))
        if self.preview:
            overlays = [sw.Overlay(s.name, masks[t], g.point, g.bbox, g.max_prob)
                        for t, s in enumerate(self.specs) for g in [result.groundings[s.name]]]
            self._try(result, "preview", lambda: sw.write_preview(self.path(name, "preview.png"), item.pixels,
                                                                  overlays))
        if self.overlay == "sc":
            if item.meta is None or item.meta.kind != "dicom":  # PNG/JPEG sources and arrays
                result.notes.append("overlay-sc: not written, the source is not a DICOM file")
            else:
                self._try(result, "overlay-sc", lambda: self._sc(item, name, result, masks))
        json_path = self.path(name, "result.json")
        result.files["json"] = self.rel(json_path)
        text = json.dumps(image_record(result, self.specs), indent=2, ensure_ascii=False) + "\n"
        sw.atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _try(self, result: ImageResult, kind: str, fn, *, key: str | None = None) -> None:
        from radflash.segment.writers import WriteError

        try:
            path = fn()
        except (WriteError, InputError, OSError) as exc:
            result.notes.append(f"{kind}: failed ({str(exc).splitlines()[0]})")
            log.warning("%s: %s output failed: %s", result.source, kind, exc)
            return
        result.files[key or kind] = self.rel(path)

    def _seg(self, item: DecodedItem, name: str, masks: np.ndarray) -> Path:
        from radflash.archive.stow import seg_uids
        from radflash.segment.writers import SegmentInfo, SegSeries, write_dicom_seg
        from radflash.util.optional import require

        study, sop = item.meta.study_instance_uid, item.meta.sop_instance_uid
        require("highdicom", extra="seg", purpose="DICOM SEG output")
        # UIDs from the source image, the model and the prompt set: a re-run makes the same SEG
        # (same UIDs), which is what lets `--store` skip what a PACS already holds; its instance
        # number is derived from the source image too (build_seg: instance_number_for)
        series_uid, sop_uid = seg_uids(sop or "", study or "", self.rf.sha256 or "", self.prompts_key)
        header = self.header_of(item) if self.header_of is not None else None
        path = write_dicom_seg(
            self.path(name, "seg.dcm"), item.meta, masks,
            [SegmentInfo(s.name, s.prompt, s.threshold) for s in self.specs],
            model_id=self.rf.model_id, model_sha256=self.rf.sha256 or "",
            series=SegSeries(series_uid, sop_instance_uid=sop_uid if sop else None),
            header=header, family=getattr(self.rf, "family", ""),
        )
        return path

    def _sr(self, item: DecodedItem, name: str, result: ImageResult) -> Path:
        """A TID 1500 report of this image's prompts (peak probability, mask present/absent), whose
        groups reference the SEG's segments when the SEG was written (radflash.dicomout.sr)."""
        import pydicom

        from radflash.dicomout.equipment import Equipment
        from radflash.dicomout.sr import FindingResult, build_report
        from radflash.dicomout.uids import segment_sr_uids
        from radflash.segment.writers import atomic_write

        meta = item.meta
        assert meta is not None
        header = self.header_of(item) if self.header_of is not None else meta.source_dataset()
        seg = pydicom.dcmread(self.out / result.files["dicom-seg"]) if "dicom-seg" in result.files else None
        findings = [FindingResult(s.name, s.prompt, g.max_prob, positive=g.positive, threshold=s.threshold,
                                  segment_number=t + 1 if seg is not None else None)
                    for t, s in enumerate(self.specs) for g in [result.groundings[s.name]]]
        series_uid, sop_uid = segment_sr_uids(header.SOPInstanceUID, header.StudyInstanceUID, self.rf.sha256 or "",
                                              self.prompts_key)
        equipment = Equipment(self.rf.model_id, self.rf.sha256 or "", getattr(self.rf, "family", ""))
        sr = build_report(header, findings, equipment=equipment, series_uid=series_uid, sop_uid=sop_uid,
                          segmentation=seg, aggregate="max", series_description="radflash segment findings")
        return atomic_write(self.path(name, "sr.dcm"), lambda tmp: sr.save_as(str(tmp)))

    def _sc(self, item: DecodedItem, name: str, result: ImageResult, masks: np.ndarray) -> Path:
        """The overlay Secondary Capture: same picture as the preview, in the source's study."""
        from radflash.dicomout.uids import instance_number_for, sc_uids
        from radflash.segment import writers as sw

        meta = item.meta
        assert meta is not None
        study, sop = meta.study_instance_uid or "", meta.sop_instance_uid or ""
        series_uid, sop_uid = sc_uids(sop, study, self.rf.sha256 or "", self.prompts_key)
        if not sop:  # no source UID to derive from: a fresh one, never a UID shared by two images
            from pydicom.uid import generate_uid

            sop_uid = str(generate_uid())
        number = instance_number_for(sop or sop_uid)  # as the SEG's and SR's: from the source image
        header = self.header_of(item) if self.header_of is not None else meta.source_dataset()
        overlays = [sw.Overlay(s.name, masks[t], g.point, g.bbox, g.max_prob)
                    for t, s in enumerate(self.specs) for g in [result.groundings[s.name]]]
        return sw.write_overlay_sc(self.path(name, "overlay-sc.dcm"), header, item.pixels, overlays,
                                   model_id=self.rf.model_id, model_sha256=self.rf.sha256 or "",
                                   family=getattr(self.rf, "family", ""), series_uid=series_uid,
                                   sop_uid=sop_uid, instance_number=number)


# ---- records and report ------------------------------------------------------------------------
def image_record(result: ImageResult, specs: Sequence[PromptSpec]) -> dict[str, Any]:
    """The per-image JSON: source, size, and for each prompt its threshold and grounding."""
    return {
        "source": result.source,
        "sop_instance_uid": result.sop_instance_uid,
        "size": {"height": result.size[0], "width": result.size[1]},
        "coordinates": "pixels of the source image; point = (x, y); bbox = [x_min, y_min, x_max, y_max] inclusive",
        "prompts": [
            {"name": s.name, "prompt": s.prompt, "threshold": s.threshold, "file_key": s.slug,
             **result.groundings[s.name].to_dict()}
            for s in specs if s.name in result.groundings
        ],
        "files": dict(result.files),
        "notes": list(result.notes),
    }


def build_report(run: SegmentRun, rf: RadFlashModel, *, started: datetime, complete: bool,
                 preview: bool) -> dict[str, Any]:
    """The run's report. ``images`` and ``failures`` are views that read the run's sequences back as
    they are iterated (:class:`Rows`), never lists of every image: :func:`write_report` streams them."""
    from radflash import __version__

    positives = run.positives
    counts = run.counts
    return {
        "complete": complete,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(run.elapsed_s, 3),
        "radflash_version": __version__,
        "model": {"id": rf.model_id, "sha256": rf.sha256, "notice": rf.notice,
                  "image_size": rf.config.image_size},
        "device": str(rf.device),
        "backend": rf.backend_name, "precision": rf.precision,
        "backend_selection": rf.backend_selection,  # auto: every candidate's timing and agreement
        "formats": list(run.formats),
        "preview": preview,
        "prompts": [{**asdict(s), "positives": positives[s.name]} for s in run.prompts],
        "counts": {**counts, "inputs": counts["segmented"] + len(run.failures) - counts["partial"]},
        "images": Rows(run.images, lambda r: image_entry(r, run.prompts)),
        "failures": Rows(run.failures, asdict),
    }


def image_entry(result: ImageResult, prompts: Sequence[PromptSpec]) -> dict[str, Any]:
    """One image's line in ``report.json``: where it came from, its JSON, its positive prompts."""
    return {"source": result.source, "name": result.name, "json": result.files.get("json"),
            "positive": [s.name for s in prompts if s.name in result.groundings and result.groundings[s.name].positive]}


class Rows(Sequence[dict]):
    """A read-only view of a sequence with each item mapped to its report entry on access."""

    def __init__(self, items: Sequence[Any], entry: Callable[[Any], dict]) -> None:
        self._items, self._entry = items, entry

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[dict]:
        return (self._entry(x) for x in self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._entry(x) for x in self._items[index]]
        return self._entry(self._items[index])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


def report_chunks(report: dict[str, Any]) -> Iterator[str]:
    """``json.dumps(report, indent=2, ensure_ascii=False)``, in pieces, without materialising its lists.

    Top-level values that are sequences (the images and failures of a million-image run) are
    encoded one item at a time; the text is exactly what ``json.dumps`` makes of the same dict with
    lists, so ``report.json`` reads and diffs as before.
    """
    yield "{"
    for i, (key, value) in enumerate(report.items()):
        yield ("," if i else "") + "\n  " + json.dumps(key, ensure_ascii=False) + ": "
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            yield from _array_chunks(value, depth=1)
        else:
            yield _dumps(value, depth=1)
    yield "\n}" if report else "}"


def _array_chunks(items: Iterable[Any], *, depth: int) -> Iterator[str]:
    pad = "\n" + "  " * (depth + 1)
    first = True
    for item in items:
        yield ("[" if first else ",") + pad + _dumps(item, depth=depth + 1)
        first = False
    yield "[]" if first else "\n" + "  " * depth + "]"


def _dumps(value: Any, *, depth: int) -> str:
    """``value`` as ``json.dumps(indent=2)`` would write it nested ``depth`` levels deep."""
    return json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n" + "  " * depth)


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """``report.json``, streamed into a temporary file and renamed into place (atomic)."""
    from radflash.segment.writers import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for chunk in report_chunks(report):
                fh.write(chunk)
            fh.write("\n")

    return atomic_write(path, write)
