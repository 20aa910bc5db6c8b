"""``segment()``: pixel maps, masks and grounding for any prompts, at each image's own size.

The verb behind ``radflash segment``. One RadZero similarity map per image and prompt gives
everything: upsampled to the ORIGINAL resolution and passed through a sigmoid it is the
probability map (saved as float16 ``.npz``); thresholded it is the mask (PNG, DICOM SEG,
NIfTI); its arg-max is the grounding point, and the largest component of the mask gives a box.

Stages (data flows one way)::

    discover → DecodePool (try_load + selection rules, worker processes) → input order → Batcher
             → encode_images (one batch) → per image: similarity_maps(tokens, size=(H, W)) in prompt
             chunks → masks + grounding → writers (atomic) → per-image JSON → report.json

Why it is shaped this way:

* The image tower runs once per batch; prompt embeddings are encoded once per run (the model
  caches them), so many prompts cost only the cheap head and the upsampling.
* Maps are made at each image's own size (radiographs differ: 1955×1841, 3000×2500...), one
  image at a time and in chunks of prompts, so hundreds of open-vocabulary prompts on a large
  image never need a gigabyte-sized float stack.
* Files are decoded by the score pipeline's :class:`radflash.pipeline.DecodePool` (full
  resolution, since the maps are made at the source size): decoding overlaps the map/writer work
  of earlier images, and a file whose decoder crashes or hangs fails alone. Results are re-ordered
  to input order, so output names (collisions get ``-2``...) do not depend on decode timing.
* One mask rule everywhere: ``mask = prob > threshold`` on the float32 probability, computed by
  :func:`radflash.kernels.upsample_maps` (``output="mask"``). The float16 maps saved to ``.npz``
  agree except for pixels within float16 rounding (≤ 2⁻¹¹ relative) of the threshold.
* A file that cannot be read, or an output that cannot be produced for one image, is recorded
  with its reason and the run goes on; files are written atomically, so whatever was written
  stays valid if the run dies later.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.errors import InputError, RadflashError
from radflash.grounding import Grounding, ground
from radflash.safe_paths import NameAllocator, image_output_name, inside

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.imageio import ImageMeta
    from radflash.pipeline import Decoded
    from radflash.selection import SelectionRules

log = logging.getLogger("radflash.segment")

FORMATS = ("png", "npz", "dicom-seg", "nifti")
DEFAULT_THRESHOLD = 0.5
REPORT = "report.json"
# Key under a checkpoint's "calibration" holding per-prompt PIXEL-map thresholds (keyed by finding
# name or prompt text); the score calibration's image-level "threshold" table is a different thing.
MAP_THRESHOLDS = "map_thresholds"
MAP_BUDGET_BYTES = 256 * 2**20  # float16 maps held at once per image (prompt chunking)


# ---- typed results ---------------------------------------------------------------------------
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
class _Item:
    """A decoded image on its way through the run."""

    index: int
    source: str
    pixels: np.ndarray  # H×W float32 in [0, 1], original resolution
    meta: ImageMeta | None = None  # None for in-memory arrays


# ---- the verb ----------------------------------------------------------------------------------
def segment(
    inputs: str | Path | np.ndarray | Any | Sequence[str | Path | np.ndarray | Any],
    outdir: str | Path | None = None,
    *,
    prompts: Sequence[str] | Mapping[str, Any] | str | Path,
    thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
    model: str | Path | RadFlashModel | None = None,
    device: str = "auto",
    dtype: str | None = None,
    backend: str = "eager",
    batch_size: int = 8,
    formats: Sequence[str] = ("png", "npz"),
    preview: bool = False,
    rules: SelectionRules | None = None,
    workers: int | None = None,
    timeout: float | None = 120.0,
    progress: bool = True,
    max_pixels: int | None = None,
) -> SegmentRun:
    """Probability maps, masks and grounding for every image × prompt, at each image's own size.

    Args:
        inputs: DICOM/PNG/JPEG files or folders (searched recursively, same discovery and
            selection rules as ``score``), and/or in-memory H×W arrays in [0, 1] (or uint8).
        outdir: folder for the outputs; ``None`` writes nothing and keeps the float16 maps and
            uint8 masks in :attr:`ImageResult.probs` / ``.masks``.
        prompts: a list of prompt texts (any text: findings or anatomy, e.g. "left lung"); a
            mapping name → text or name → {prompt, threshold}; or a YAML/JSON/TXT prompt file
            (a ``Path``, or a ``str`` naming an existing file).
        thresholds: mask threshold(s) on the probability map: one float for all prompts, one per
            prompt, or name → float. A threshold given with a prompt (file/mapping) wins, then
            this argument, then the checkpoint's calibrated map thresholds, then 0.5.
        formats: any of ``png`` (masks), ``npz`` (float16 maps), ``dicom-seg`` (DICOM sources
            only), ``nifti`` (needs nibabel). The per-image JSON is always written.
        preview: also write an overlay PNG (image + masks + points + legend) at the source size.
        rules: a :class:`radflash.selection.SelectionRules`; ``None`` = the default rules.
        workers: decode processes for files; 0 decodes in-process; ``None`` = min(4, CPU count,
            files), and 0 for a single file (nothing to overlap its decode with).
        timeout: seconds one file may take to decode before its worker is killed and it is failed.
        max_pixels: the pixel budget shared with ``score`` (files above it fail from their header).
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    formats = _check_formats(formats)
    if max_pixels is not None:
        from dataclasses import replace

        from radflash.selection import SelectionRules

        rules = replace(rules or SelectionRules(), max_pixels=max_pixels)
    if outdir is not None:
        from radflash.writers import check_creatable

        check_creatable(outdir)  # a file on the path fails before the model loads
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise InputError(f"workers must be ≥ 0, got {workers}")
    if outdir is None and (formats or preview):
        log.debug("no outdir: formats %s and preview are not written", formats)
    from radflash.api import as_model
    rf = as_model(model, device=device, dtype=dtype, backend=backend)
    specs = resolve_prompts(prompts, thresholds, calibration=rf.calibration, default_prompts=rf.default_prompts)
    rf.encode_text([s.prompt for s in specs])  # validate + cache all prompt embeddings up front

    out = None
    if outdir is not None:
        out = Path(outdir)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: output exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()

    arrays, paths = _split_inputs(inputs)
    failures: list[InputFailure] = []
    if paths:
        from radflash.discovery import discover

        files = list(discover(paths))
        if rules is None:
            from radflash.selection import SelectionRules

            rules = SelectionRules()
    else:
        files = []
    total = len(arrays) + len(files)
    if total == 0:
        raise InputError("no input images found" + (f" under {', '.join(map(str, paths))}" if paths else ""))

    writer = _Writer(out, rf, specs, formats, preview) if out is not None else None
    names = NameAllocator(fallback="image")
    images: list[ImageResult] = []
    if workers is None:  # a single file has nothing to overlap its decode with: no spawn cost
        workers = min(4, os.cpu_count() or 1, len(files)) if len(files) > 1 else 0
    bar = _progress(total, enabled=progress)
    items = _decoded(arrays, files, rules, failures, bar, workers=min(workers, len(files)), timeout=timeout)
    try:
        from radflash.batching import Batcher

        for batch in Batcher(batch_size, max_wait=None).from_iterable(items):
            tokens = rf.encode_images([item.pixels for item in batch.items])
            for i, item in enumerate(batch.items):
                meta = item.meta
                uid = meta.sop_instance_uid if meta is not None else None
                stem = image_output_name(None, item.source if meta is not None else None, item.index)
                name = names.claim(image_output_name(uid, None, item.index) if uid else stem, fallback=stem)
                try:
                    result = _segment_one(rf, tokens[i:i + 1], item, name, uid, specs, writer)
                except (RadflashError, OSError) as exc:  # this image's outputs; the next may still work
                    failures.append(InputFailure(item.source, "failed", f"{exc}".splitlines()[0]))
                else:
                    images.append(result)
                    failed = [n for n in result.notes if ": failed" in n]
                    if failed:  # the image's other outputs (and its JSON) were written
                        failures.append(InputFailure(item.source, "partial", "; ".join(failed)))
                if bar is not None:
                    bar.update(1)
            del tokens
    finally:
        items.close()  # stops decode workers promptly if the run ended early
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        run = SegmentRun(outdir=out, model_id=rf.model_id, prompts=specs, formats=formats, images=images,
                         failures=failures, elapsed_s=elapsed)
        report = build_report(run, rf, started=started, complete=sys.exc_info()[0] is None, preview=preview)
        run.report = report
        if out is not None:
            from radflash.seg_writers import atomic_write

            path = inside(out, REPORT)
            text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            run.report_path = path
    return run


# ---- prompts -----------------------------------------------------------------------------------
def resolve_prompts(
    prompts: Sequence[str] | Mapping[str, Any] | str | Path,
    thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    default_prompts: Mapping[str, str] | None = None,
) -> tuple[PromptSpec, ...]:
    """Any accepted ``prompts``/``thresholds`` form → validated :class:`PromptSpec` s (non-empty)."""
    from radflash.findings import _normalise, load_prompt_file

    if isinstance(prompts, Path) or (isinstance(prompts, str) and os.path.isfile(prompts)):
        entries = load_prompt_file(prompts)
    elif isinstance(prompts, str):
        entries = {prompts.strip(): {"prompt": prompts.strip(), "threshold": None}}
    elif isinstance(prompts, Mapping):
        entries = _normalise(dict(prompts), Path("prompts"))
    elif isinstance(prompts, Sequence):
        texts = [p.strip() for p in prompts if isinstance(p, str)]
        if len(texts) != len(prompts) or not all(texts):
            raise InputError("prompts must be non-empty strings")
        entries = {p: {"prompt": p, "threshold": None} for p in dict.fromkeys(texts)}
    else:
        raise InputError(f"prompts must be a prompt file, a mapping or a list of prompts, got {type(prompts).__name__}")
    if not entries:
        raise InputError("no prompts given")

    names = list(entries)
    per_arg = _threshold_arg(thresholds, names)
    calib = _calibrated(calibration or {}, default_prompts or {})
    slugs = NameAllocator(fallback="prompt", max_len=64)
    specs = []
    for name in names:
        text, own = entries[name]["prompt"], entries[name]["threshold"]
        if own is not None:
            thr, src = float(own), "prompt-file"
        elif per_arg.get(name) is not None:
            thr, src = per_arg[name], "argument"
        elif name in calib or text in calib:
            thr, src = calib.get(name, calib.get(text)), "model"
        else:
            thr, src = DEFAULT_THRESHOLD, "default"
        specs.append(PromptSpec(name, text, float(thr), src, slugs.claim(name)))
    return tuple(specs)


def _threshold_arg(thresholds: Any, names: list[str]) -> dict[str, float | None]:
    def check(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise InputError(f"threshold {what}{value!r} must be a number in [0, 1]")
        return float(value)

    if thresholds is None:
        return {}
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        return dict.fromkeys(names, check(thresholds, ""))
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(map(str, thresholds)) - set(names))
        if unknown:
            raise InputError(f"thresholds given for unknown prompt(s) {', '.join(map(repr, unknown))}")
        return {str(k): check(v, f"for {k!r} ") for k, v in thresholds.items()}
    if isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
        if len(thresholds) != len(names):
            raise InputError(f"{len(thresholds)} thresholds given for {len(names)} prompts")
        return {n: check(v, f"for {n!r} ") for n, v in zip(names, thresholds)}
    raise InputError(f"thresholds must be a number, a list or a mapping, got {type(thresholds).__name__}")


def _calibrated(calibration: Mapping[str, Any], default_prompts: Mapping[str, str]) -> dict[str, float]:
    """Per-prompt map thresholds stored in a checkpoint, keyed by finding name AND prompt text.

    The trainer stores them under :data:`MAP_THRESHOLDS` (name → threshold, chosen for Dice on
    validation phantoms).
    """
    table = calibration.get(MAP_THRESHOLDS)
    if not isinstance(table, Mapping):
        return {}
    out: dict[str, float] = {}
    for k, v in table.items():
        v = v.get("threshold") if isinstance(v, Mapping) else v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0:
            out[str(k)] = float(v)
            if str(k) in default_prompts:
                out.setdefault(default_prompts[str(k)], float(v))
    return out


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
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
    from radflash._optional import require

    if "dicom-seg" in out:  # fail before the model loads, not on the first image
        require("highdicom", extra="seg", purpose="--format dicom-seg")
    if "nifti" in out:
        require("nibabel", extra="nifti", purpose="--format nifti")
    return tuple(out)


# ---- inputs ------------------------------------------------------------------------------------
def _split_inputs(inputs: Any) -> tuple[list[np.ndarray], list[Path]]:
    import torch

    if isinstance(inputs, (str, Path, np.ndarray, torch.Tensor)):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not inputs:
        raise InputError("no inputs given")
    arrays, paths = [], []
    for x in inputs:
        if isinstance(x, (str, Path)):
            paths.append(Path(x))
        elif isinstance(x, torch.Tensor):
            arrays.append(x.detach().cpu().numpy())
        elif isinstance(x, np.ndarray):
            arrays.append(x)
        else:
            raise InputError(f"inputs must be paths or arrays, got {type(x).__name__}")
    return arrays, paths


def _decoded(arrays: list[np.ndarray], files: list[Path], rules: SelectionRules | None,
             failures: list[InputFailure], bar: Any, *, workers: int, timeout: float | None) -> Iterator[_Item]:
    """In-memory arrays, then the files through the shared decode stage (input order);
    unloadable files are recorded in ``failures``."""
    from radflash.pipeline import decode_stream
    from radflash.preprocess import as_image_list

    index = 0
    for arr in arrays:
        index += 1
        try:
            (img,) = as_image_list(arr)
        except (InputError, ValueError) as exc:
            failures.append(InputFailure(f"<array {index}>", "failed", str(exc)))
            if bar is not None:
                bar.update(1)
            continue
        yield _Item(index, f"<array {index}>", img.float().numpy())
    if not files:
        return
    stream, _ = decode_stream(files, workers=workers, rules=rules, timeout=timeout)
    try:
        for d in _in_input_order(stream):
            if d.status != "loaded":
                failures.append(InputFailure(d.path, d.status, d.reason or "no image"))
                if bar is not None:
                    bar.update(1)
                continue
            yield _Item(index + 1 + d.index, d.path, d.pixels, d.meta)
    finally:
        stream.close()  # stops the worker processes when the run ends early


def _in_input_order(stream: Iterator[Decoded]) -> Iterator[Decoded]:
    """Re-order a decode stream (completion order) by task index. The pool has at most
    workers × depth tasks in flight, so at most that many items wait here."""
    waiting: dict[int, Decoded] = {}
    following = 0
    for d in stream:
        waiting[d.index] = d
        while following in waiting:
            yield waiting.pop(following)
            following += 1
    yield from (waiting[i] for i in sorted(waiting))  # only if indices had gaps (they never do)


# ---- one image ---------------------------------------------------------------------------------
def _segment_one(rf: RadFlashModel, tokens: Any, item: _Item, name: str, uid: str | None,
                 specs: tuple[PromptSpec, ...], writer: _Writer | None) -> ImageResult:
    h, w = item.pixels.shape
    t_all = len(specs)
    chunk = max(1, min(t_all, MAP_BUDGET_BYTES // (3 * h * w)))  # uint8 mask + float16 map per prompt
    keep_probs = writer is None
    need_probs = keep_probs or (writer is not None and "npz" in writer.formats)
    masks = np.zeros((t_all, h, w), np.uint8)
    probs = np.zeros((t_all, h, w), np.float16) if keep_probs else None
    peaks, peak_probs = np.zeros((t_all, 2), np.int64), np.zeros(t_all, np.float32)
    result = ImageResult(item.source, name, (h, w), uid, {})
    npz = writer.npz(name) if writer is not None and "npz" in writer.formats else None
    try:
        for lo in range(0, t_all, chunk):
            part = specs[lo:lo + chunk]
            texts, sl = [s.prompt for s in part], slice(lo, lo + len(part))
            # The mask is the kernel's (prob > threshold in float32), never re-derived from the
            # float16 map: one rule for every caller. Maps and masks come from the same pass.
            res = rf.similarity_maps(prompts=texts, tokens=tokens, size=(h, w), output="both" if need_probs else "mask",
                                     threshold=[s.threshold for s in part])
            masks[sl] = res.masks[0].cpu().numpy()
            peaks[sl] = res.peak[0].cpu().numpy()
            peak_probs[sl] = res.peak_prob[0].float().cpu().numpy()
            if need_probs:
                p_np = res.probs[0].cpu().numpy()
                if probs is not None:
                    probs[sl] = p_np
                if npz is not None:
                    for j, s in enumerate(part):
                        npz.add(s.slug, p_np[j])
                del p_np
            del res
        if npz is not None:
            npz.add_strings("_names", [s.name for s in specs])
            npz.add_strings("_prompts", [s.prompt for s in specs])
            npz.commit()
            result.files["npz"] = writer.rel(npz.path)  # type: ignore[union-attr]
            npz = None
    finally:
        if npz is not None:  # not committed: an error came first
            npz.discard()
    for t, s in enumerate(specs):
        result.groundings[s.name] = ground(masks[t], peak_yx=tuple(peaks[t]), peak_prob=float(peak_probs[t]))
    if writer is not None:
        writer.write_image(item, result, masks)
    else:
        result.probs, result.masks = probs, masks
    return result


# ---- writing -----------------------------------------------------------------------------------
class _Writer:
    """Writes one image's outputs under OUTDIR/<name>/ (every path checked to stay inside OUTDIR)."""

    def __init__(self, out: Path, rf: RadFlashModel, specs: tuple[PromptSpec, ...], formats: tuple[str, ...],
                 preview: bool) -> None:
        self.out, self.rf, self.specs, self.formats, self.preview = out, rf, specs, formats, preview
        self._series: dict[str, tuple[str, int]] = {}  # study UID → (SEG series UID, instances so far)

    def path(self, name: str, filename: str) -> Path:
        return inside(self.out, name, filename)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def npz(self, name: str):
        from radflash.seg_writers import NpzWriter

        return NpzWriter(self.path(name, "maps.npz"))

    def write_image(self, item: _Item, result: ImageResult, masks: np.ndarray) -> None:
        from radflash import seg_writers as sw

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
        if "nifti" in self.formats:
            spacing = item.meta.pixel_spacing if item.meta is not None else None  # mm (row, column)
            self._try(result, "nifti", lambda: sw.write_nifti(self.path(name, "masks.nii.gz"), masks,
                                                              spacing=spacing))
        if self.preview:
            overlays = [sw.Overlay(s.name, masks[t], g.point, g.bbox, g.max_prob)
                        for t, s in enumerate(self.specs) for g in [result.groundings[s.name]]]
            self._try(result, "preview", lambda: sw.write_preview(self.path(name, "preview.png"), item.pixels,
                                                                  overlays))
        json_path = self.path(name, "result.json")
        result.files["json"] = self.rel(json_path)
        text = json.dumps(image_record(result, self.specs), indent=2, ensure_ascii=False) + "\n"
        sw.atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _try(self, result: ImageResult, kind: str, fn, *, key: str | None = None) -> None:
        from radflash.seg_writers import WriteError

        try:
            path = fn()
        except (WriteError, InputError, OSError) as exc:
            result.notes.append(f"{kind}: failed ({str(exc).splitlines()[0]})")
            log.warning("%s: %s output failed: %s", result.source, kind, exc)
            return
        result.files[key or kind] = self.rel(path)

    def _seg(self, item: _Item, name: str, masks: np.ndarray) -> Path:
        from radflash._optional import require
        from radflash.seg_writers import SegmentInfo, SegSeries, write_dicom_seg

        study = item.meta.study_instance_uid or ""
        hd = require("highdicom", extra="seg", purpose="DICOM SEG output")
        series_uid, n = self._series.get(study, (str(hd.UID()), 0))
        self._series[study] = (series_uid, n + 1)
        path = write_dicom_seg(
            self.path(name, "seg.dcm"), item.meta, masks,
            [SegmentInfo(s.name, s.prompt, s.threshold) for s in self.specs],
            model_id=self.rf.model_id, model_sha256=self.rf.sha256 or "",
            series=SegSeries(series_uid, instance_number=n + 1),
        )
        return path


# ---- records, report, summary ------------------------------------------------------------------
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
    from radflash import __version__

    positives = run.positives
    return {
        "complete": complete,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(run.elapsed_s, 3),
        "radflash_version": __version__,
        "model": {"id": rf.model_id, "sha256": rf.sha256, "notice": rf.notice,
                  "image_size": rf.config.image_size},
        "device": str(rf.device),
        "formats": list(run.formats),
        "preview": preview,
        "prompts": [{**asdict(s), "positives": positives[s.name]} for s in run.prompts],
        "counts": {**run.counts, "inputs": len(run.images) + sum(f.status != "partial" for f in run.failures)},
        "images": [{"source": r.source, "name": r.name, "json": r.files.get("json"),
                    "positive": [s.name for s in run.prompts if s.name in r.groundings
                                 and r.groundings[s.name].positive]}
                   for r in run.images],
        "failures": [asdict(f) for f in run.failures],
    }


def summary_table(run: SegmentRun):
    """A rich renderable: counts, then one row per prompt (threshold, positives, mean peak)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = run.counts
    head = Text(f"{counts['segmented']} image(s) segmented, {counts['skipped']} skipped, "
                f"{counts['failed']} failed · {len(run.prompts)} prompt(s) · {run.elapsed_s:.1f} s")
    table = Table(title=None, show_lines=False)
    table.add_column("prompt")
    table.add_column("threshold", justify="right")
    table.add_column("positive", justify="right")
    table.add_column("mean max prob", justify="right")
    positives = run.positives
    n = len(run.images)
    for s in run.prompts:
        peaks = [img.groundings[s.name].max_prob for img in run.images if s.name in img.groundings]
        table.add_row(s.name if s.name == s.prompt else f"{s.name}: {s.prompt}", f"{s.threshold:g}",
                      f"{positives[s.name]}/{n}", f"{np.mean(peaks):.3f}" if peaks else "–")
    parts: list[Any] = [head, table]
    if run.failures:
        fail = Table(title="skipped / failed", show_lines=False)
        fail.add_column("file")
        fail.add_column("status")
        fail.add_column("reason")
        for f in run.failures[:20]:
            fail.add_row(f.source, f.status, f.reason)
        if len(run.failures) > 20:
            fail.add_row(f"… {len(run.failures) - 20} more in report.json", "", "")
        parts.append(fail)
    if run.report_path is not None:
        parts.append(Text(f"report: {run.report_path}"))
    return Group(*parts)


# ---- helpers -----------------------------------------------------------------------------------
def _progress(total: int, *, enabled: bool):
    from radflash.progress import progress_bar

    return progress_bar(total, desc="segmenting", enabled=enabled)
