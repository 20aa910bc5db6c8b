"""``segment()``: pixel maps, masks and grounding for any prompts, at each image's own size.

The verb behind ``radflash segment``. One RadZero similarity map per image and prompt gives
everything: upsampled to the ORIGINAL resolution and passed through a sigmoid it is the
probability map (saved as float16 ``.npz``); thresholded it is the mask (PNG, DICOM SEG,
NIfTI); its arg-max is the grounding point, and the largest component of the mask gives a box.

Stages (data flows one way)::

    FileSource → DecodePool (try_load + selection rules, worker processes) → input order → Batcher
             → encode_images (one batch) → per image: similarity_maps(tokens, size=(H, W)) in prompt
             chunks → masks + grounding → writers (atomic) → per-image JSON → report.json

Why it is shaped this way:

* The image tower runs once per batch; prompt embeddings are encoded once per run (the model
  caches them), so many prompts cost only the cheap head and the upsampling.
* Maps are made at each image's own size (radiographs differ: 1955×1841, 3000×2500...), one
  image at a time and in chunks of prompts, so hundreds of open-vocabulary prompts on a large
  image never need a gigabyte-sized float stack.
* Files are decoded by the score pipeline's :class:`radflash.archive.decode_pool.DecodePool` (full
  resolution, since the maps are made at the source size): decoding overlaps the map/writer work
  of earlier images, and a file whose decoder crashes or hangs fails alone. Results are re-ordered
  to input order, so output names (collisions get ``-2``...) do not depend on decode timing.
* One mask rule everywhere: ``mask = prob > threshold`` on the float32 probability, computed by
  :func:`radflash.kernels.upsample_maps` (``output="mask"``). The float16 maps saved to ``.npz``
  agree except for pixels within float16 rounding (≤ 2⁻¹¹ relative) of the threshold.
* A file that cannot be read, or an output that cannot be produced for one image, is recorded
  with its reason and the run goes on; files are written atomically, so whatever was written
  stays valid if the run dies later.
* Memory is bounded by the batch, not the archive: each image's result, each failure and the output
  names handed out go to the run's ledger (a private, already
  unlinked SQLite file in OUTDIR, :mod:`radflash.segment.ledger`), the summary's counts and
  per-prompt statistics are running totals (:class:`radflash.segment.results.Tally`), and
  ``report.json`` is streamed from the ledger, the same text as before.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.archive.options import DecodeOptions, ModelSpec
from radflash.errors import InputError, RadflashError
from radflash.io.decoders import missing_decoder_line
from radflash.io.safe_paths import NameAllocator, image_output_name, inside
from radflash.io.source import peek
from radflash.segment.grounding import ground
from radflash.segment.ledger import RunLedger, SpilledList
from radflash.segment.output import REPORT, OutputWriter, build_report, check_formats, write_report
from radflash.segment.prompts import resolve_prompts
from radflash.segment.results import (
    DecodedItem,
    ImageResult,
    InputFailure,
    PromptSpec,
    SegmentRun,
    Tally,
    failure_from_json,
    failure_to_json,
    image_from_json,
    image_to_json,
)
from radflash.util.watchdog import Watchdog

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.archive.decode_pool import Decoded
    from radflash.archive.dimse_store import DimseStore
    from radflash.archive.ray_executor import Placement, RayOptions
    from radflash.archive.stow import Stower
    from radflash.io.dicomweb import Auth, DicomWebSource
    from radflash.io.dimse import DimseSource
    from radflash.io.selection import SelectionRules
    from radflash.io.source import SourceItem


log = logging.getLogger("radflash.segment")


MAP_BUDGET_BYTES = 256 * 2**20  # float16 maps held at once per image (prompt chunking)


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
    backend: str | None = None,
    batch_size: int = 8,
    formats: Sequence[str] = ("png", "npz"),
    preview: bool = False,
    overlay: str | None = None,
    rules: SelectionRules | None = None,
    workers: int | None = None,
    timeout: float | None = 120.0,
    stall_after: float | None = None,
    progress: bool = True,
    max_pixels: int | None = None,
    ray: RayOptions | None = None,
    auth: Auth | None = None,
    store: str | None = None,
    observer: Callable[[DecodedItem, ImageResult], None] | None = None,
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
            only), ``dicom-sr`` (a TID 1500 report referencing the SEG; DICOM sources only),
            ``nifti`` (needs nibabel). The per-image JSON is always written.
        preview: also write an overlay PNG (image + masks + points + legend) at the source size.
        overlay: ``"sc"``: also write that overlay as a DICOM Secondary Capture (``overlay-sc.dcm``,
            DICOM sources only) in the source's study, a new series, marked derived and not for
            diagnosis, for PACS viewers that show neither SEG nor SR (:mod:`radflash.dicomout.sc`);
            ``store`` sends it with the SEG.
        rules: a :class:`radflash.io.selection.SelectionRules`; ``None`` = the default rules.
        workers: decode processes for files; 0 decodes in-process; ``None`` = one per core as memory
            allows (:func:`radflash.archive.decode_pool.default_workers`) but no more than the files,
            and 0 for a single file (nothing to overlap its decode with).
        timeout: seconds one file may take to decode before its worker is killed and it is failed
            (locally and in Ray decode tasks, which isolate their decoder unless ``workers=0``).
        stall_after: seconds without any finished step before the run stops naming the stalled
            stage (:class:`radflash.util.watchdog.Stalled`); ``None``: 3 × ``timeout``, at least 60 s.
        max_pixels: the pixel budget shared with ``score`` (files above it fail from their header).
        ray: decode files as Ray tasks and encode them in a Ray actor pool on ``device``
            (:func:`radflash.archive.ray_executor.encode_on_ray`); maps, masks and writers stay here.
        auth: credentials for DICOMweb inputs and ``store`` (:class:`radflash.io.dicomweb.Auth`).
        store: STOW-RS each DICOM SEG written (``dicom-seg`` is added to ``formats``) to
            ``dicomweb+http(s)://…``, or ``"same"``: the DICOMweb server the inputs come from. A
            SEG's UIDs derive from its source image, the model and the prompt set, and SEGs the
            server already holds are not sent, so a re-run stores nothing twice.
        observer: called with each segmented image (pixels and result) in the same pass, e.g.
            :class:`radflash.report.gallery.SegmentGallery` keeping thumbnails for the report.

    An input may be one DICOMweb study query (``dicomweb+http(s)://host/dicom-web/studies?…``,
    :class:`radflash.io.dicomweb.DicomWebSource`) instead of files: its instances are retrieved
    one at a time with WADO-RS and segmented exactly as the same files would be.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    if store is not None and "dicom-seg" not in check_formats(formats):
        formats = (*check_formats(formats), "dicom-seg")  # --store sends the SEGs: make them
    formats = check_formats(formats)
    if overlay not in (None, "sc"):
        raise InputError(f"unknown overlay {overlay!r}; choose sc (a DICOM Secondary Capture)")
    if overlay is not None:  # fail before the model loads, not on the first image
        from radflash.util.optional import require

        require("highdicom", extra="seg", purpose="--overlay sc")
    web, inputs = _dicomweb_input(inputs, auth)
    stower = _stower(store, web, auth, outdir)
    decoding = DecodeOptions(workers=workers, timeout=timeout, stall_after=stall_after, rules=rules,
                             max_pixels=max_pixels)
    decoding.check()
    rules = decoding.selection()
    if outdir is not None:
        from radflash.archive.sinks import check_creatable

        check_creatable(outdir)  # a file on the path fails before the model loads
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    if outdir is None and (formats or preview):
        log.debug("no outdir: formats %s and preview are not written", formats)
    if ray is not None:  # before the model loads: a missing ray fails here with its install hint
        from radflash.archive.ray_executor import connect

        connect(ray)
    # under Ray the encoder runs in the actors; this copy makes the maps from their tokens, on CPU
    spec = ModelSpec(model, device, dtype, backend)
    backend = spec.backend  # resolved: "auto" with dtype "auto", else "eager" (the Ray actors get the same)
    rf = spec.load(batch_size=batch_size, on_ray=ray is not None)
    rf.require_maps()  # a family without maps fails once here, not once per image
    specs = resolve_prompts(prompts, thresholds, calibration=rf.calibration, default_prompts=rf.default_prompts)
    rf.encode_text([s.prompt for s in specs])  # validate + cache all prompt embeddings up front

    out = None
    if outdir is not None:
        out = Path(outdir)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: output exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()

    arrays, paths = _split_inputs(inputs) if web is None else ([], [])
    # everything kept per image (results, failures, names handed out) lives in
    # the run's ledger, on disk next to the outputs: memory is bounded by the batch, not the archive
    ledger = RunLedger(out)
    tally = Tally(specs)
    failures = ledger.sequence("failures", failure_to_json, failure_from_json, on_append=tally.add_failure)
    files: Iterator[SourceItem] = iter(())
    if web is not None or paths:
        # streamed: a DICOMweb query is listed and retrieved as the decoders ask, folders are walked
        # as they go; unread entries (hidden files, FIFOs, link loops) hold no image: left out
        files = iter(web.retrieve(web.listing())) if web is not None else _image_files(paths)
    from radflash.archive.decode_pool import default_workers

    # a few files ahead: whether there is anything at all, and how many decoders that is worth
    ahead, files = peek(files, default_workers() if workers is None else max(1, workers))
    if not arrays and not ahead:
        where = web.target.display if web is not None else ", ".join(map(str, paths))
        raise InputError("no input images found" + (f" under {where}" if where else ""))

    header_of = _header_reader(web) if web is not None else None
    writer = (OutputWriter(out, rf, specs, formats, preview, header_of=header_of, overlay=overlay)
              if out is not None else None)
    names = NameAllocator(fallback="image", used=ledger.members("names"))
    images = _image_sequence(ledger, out)
    isolate = workers != 0  # a Ray decode task isolates its decoder unless decoding in-process was asked
    if workers is None:  # a single file has nothing to overlap its decode with: no spawn cost
        workers = ahead if ahead > 1 else 0
    bar = _progress(None if ahead else len(arrays), enabled=progress)  # files: counted as they come
    executor: dict[str, Any] | None = None
    if ray is None:
        items = _decoded(arrays, files, rules, failures, bar, workers=min(workers, ahead), timeout=timeout)
        encoded = _encoded(items, rf, batch_size)
    else:
        from radflash.archive.ray_executor import executor_info, plan, require_ray

        placement = plan(ray, device, require_ray().cluster_resources())
        executor = executor_info(ray, placement, batch_size=batch_size, timeout=timeout, isolate=isolate)
        encoded = _encoded_on_ray(arrays, files, rf, ray, placement, model, failures, bar, dtype=dtype,
                                  backend=backend, batch_size=batch_size, rules=rules, timeout=timeout,
                                  isolate=isolate)
    watchdog = Watchdog(decoding.stall_limit(), what="segment").start()
    # decoding and encoding run on a helper thread that this loop waits for in slices, so a stage
    # that stops delivering ends the run with its name (radflash.util.watchdog)
    guarded = watchdog.guard(encoded, "decode/encode" if ray is None else "ray")
    try:
        for item, tokens in guarded:
            meta = item.meta
            uid = meta.sop_instance_uid if meta is not None else None
            stem = image_output_name(None, item.source if meta is not None else None, item.index)
            name = names.claim(image_output_name(uid, None, item.index) if uid else stem, fallback=stem)
            try:
                with watchdog.step("maps"):
                    result = segment_one(rf, tokens, item, name, uid, specs, writer)
            except (RadflashError, OSError) as exc:  # this image's outputs; the next may still work
                failures.append(InputFailure(item.source, "failed", f"{exc}".splitlines()[0]))
            else:
                images.append(result)  # its files are written: listed even if the run dies now
                tally.add_image(result)
                if observer is not None:
                    observer(item, result)
                if stower is not None and ("dicom-seg" in result.files or "overlay-sc" in result.files):
                    noted = len(result.notes)
                    with watchdog.step("store"):
                        _store_seg(stower, out, result)  # type: ignore[arg-type]
                    if len(result.notes) != noted:  # a refused store is part of the image's record
                        images[-1] = result
                failed = [n for n in result.notes if ": failed" in n]
                if failed:  # the image's other outputs (and its JSON) were written
                    failures.append(InputFailure(item.source, "partial", "; ".join(failed)))
            if bar is not None:
                bar.update(1)
        for key, reason in web.failures if web is not None else ():  # listed, but could not be retrieved
            failures.append(InputFailure(key, "failed", reason))
            if bar is not None:
                bar.update(1)
        if stower is not None:
            log.info("stored %d DICOM SEG objects (%d already on the server)", stower.stored, stower.already)
    finally:
        guarded.close()  # its helper thread closes `encoded`, which stops the decode workers
        watchdog.stop()
        if stower is not None and hasattr(stower, "close"):
            stower.close()  # a DimseStore's association: an archive waits on open ones
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        run = SegmentRun(outdir=out, model_id=rf.model_id, prompts=specs, formats=formats, images=images,
                         failures=failures, elapsed_s=elapsed, tally=tally)
        report = build_report(run, rf, started=started, complete=sys.exc_info()[0] is None, preview=preview)
        if stower is not None:
            url = getattr(stower, "url", None) or "dicomweb+" + stower.target.base  # DimseStore: dimse://
            report["store"] = {"url": url, "stored": stower.stored,
                               "already_on_server": stower.already}
        if executor is not None:  # as score's manifest: Ray's version, the cluster, the actor pool
            report["executor"] = executor
        run.report = report
        missing = missing_decoder_line(f.reason for f in failures if f.status == "skipped")
        if missing:  # the run's last line: what to install to segment the files it had to skip
            log.warning("%s", missing)
        if out is not None:
            run.report_path = write_report(inside(out, REPORT), report)  # streamed from the ledger
    return run


def _image_sequence(ledger: RunLedger, out: Path | None) -> list[ImageResult] | Any:
    """Where the run keeps its images: the ledger (read back as iterated) when they were written to
    ``out``; a list without ``out``, since each result then holds its maps and masks in memory."""
    if out is None:
        return []
    return ledger.sequence("images", image_to_json, image_from_json)


# ---- inputs ------------------------------------------------------------------------------------
def _dicomweb_input(inputs: Any, auth: Auth | None) -> tuple[DicomWebSource | DimseSource | None, Any]:
    """(the PACS source, None) when ``inputs`` is one ``dicomweb+http(s)://`` or ``dimse://`` query;
    else (None, inputs)."""
    from radflash.io.dicomweb import DicomWebSource, is_dicomweb
    from radflash.io.dimse import DimseSource, is_dimse

    def is_url(i: object) -> bool:
        return is_dicomweb(i) or is_dimse(i)

    if is_url(inputs):
        inputs = [inputs]
    elif not isinstance(inputs, (list, tuple)) or not any(is_url(i) for i in inputs):
        return None, inputs
    if len(inputs) > 1:
        raise InputError("a PACS query is segmented on its own: give one dicomweb+http(s):// or dimse:// URL")
    if is_dimse(inputs[0]):
        return DimseSource(str(inputs[0])), None
    return DicomWebSource(str(inputs[0]), auth=auth), None


def _stower(store: str | None, web: DicomWebSource | DimseSource | None, auth: Auth | None,
            outdir: Any) -> Stower | DimseStore | None:
    """Where ``store`` sends the SEGs (checked before the model loads), or None without ``store``."""
    if store is None:
        return None
    if outdir is None:
        raise InputError("--store sends the DICOM SEG files a run writes: give an output folder")
    from radflash.io.dimse import DimseSource, is_dimse

    if store == "same":
        if web is None:
            raise InputError("--store without a URL writes back to the PACS segmented from; "
                             "give --store dicomweb+http(s)://… or dimse://… for file inputs")
        store = web.target.display if isinstance(web, DimseSource) else "dicomweb+" + web.target.base
    if is_dimse(store):  # C-STORE, idempotent like STOW-RS (radflash.archive.dimse_store)
        from radflash.archive.dimse_store import DimseStore

        return DimseStore(store)
    from radflash.archive.stow import Stower

    return Stower(store, auth=auth)


def _header_reader(web: DicomWebSource | DimseSource) -> Any:
    """A PACS item's source header for its SEG (WADO-RS metadata; a DIMSE source keeps the headers
    of what it retrieved): no file is kept to re-read."""
    from radflash.archive.stow import instance_header
    from radflash.io.dicomweb import DicomWebSource

    def header_of(item: DecodedItem) -> Any:
        meta = item.meta
        assert meta is not None
        if not isinstance(web, DicomWebSource):
            return web.header(meta.study_instance_uid or "", meta.series_instance_uid or "",
                              meta.sop_instance_uid or "")
        return instance_header(web, item.source, meta.study_instance_uid or "", meta.series_instance_uid or "",
                               meta.sop_instance_uid or "")
    return header_of


def _store_seg(stower: Stower, out: Path, result: ImageResult) -> None:
    """STOW-RS one image's SEG (and overlay SC) unless the server holds it; a refusal is noted, a
    server gone ends the run."""
    import pydicom

    from radflash.io.dicomweb import DicomWebError, ServerUnavailable
    from radflash.io.dimse import DimseError, DimseUnavailable

    for key in ("dicom-seg", "dicom-sr", "overlay-sc"):
        if key not in result.files:
            continue
        ds = pydicom.dcmread(inside(out, *result.files[key].split("/")))
        try:
            if stower.exists(ds.StudyInstanceUID, ds.SOPInstanceUID):
                stower.already += 1
                continue
            stower.store([ds])
        except (ServerUnavailable, DimseUnavailable):
            raise
        except (DicomWebError, DimseError) as exc:
            result.notes.append(f"store: failed ({str(exc).splitlines()[0]})")
            log.warning("%s: storing its %s failed: %s", result.source, key, exc)


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


def _decoded(arrays: list[np.ndarray], files: Iterable[SourceItem], rules: SelectionRules | None,
             failures: SpilledList[InputFailure], bar: Any, *, workers: int,
             timeout: float | None) -> Iterator[DecodedItem]:
    """In-memory arrays, then the files through the shared decode stage (input order);
    unloadable files are recorded in ``failures``."""
    from radflash.archive.decode_pool import DECODE_NICE, decode_stream
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
        yield DecodedItem(index, f"<array {index}>", img.float().numpy())
    if not files:
        return
    stream, _ = decode_stream(files, workers=workers, rules=rules, timeout=timeout, nice=DECODE_NICE)
    try:
        for d in _in_input_order(stream):
            if d.status != "loaded":
                failures.append(InputFailure(d.path, d.status, d.reason or "no image"))
                if bar is not None:
                    bar.update(1)
                continue
            yield DecodedItem(index + 1 + d.index, d.path, d.pixels, d.meta)
    finally:
        stream.close()  # stops the worker processes when the run ends early


def _encoded(items: Iterator[DecodedItem], rf: RadFlashModel,
             batch_size: int) -> Generator[tuple[DecodedItem, Any], None, None]:
    """Each item with its (1, 1+N, D) tokens: the image tower runs once per batch of ``batch_size``."""
    from radflash.archive.batching import Batcher

    try:
        for batch in Batcher(batch_size, max_wait=None).from_iterable(items):
            tokens = rf.encode_images([item.pixels for item in batch.items])
            for i, item in enumerate(batch.items):
                yield item, tokens[i:i + 1]
            del tokens
    finally:
        items.close()  # type: ignore[attr-defined]


def _encoded_on_ray(arrays: list[np.ndarray], files: Iterator[SourceItem], rf: RadFlashModel, options: RayOptions,
                    placement: Placement, model: Any, failures: SpilledList[InputFailure], bar: Any, *,
                    dtype: str | None, backend: str, batch_size: int, rules: SelectionRules | None,
                    timeout: float | None, isolate: bool) -> Generator[tuple[DecodedItem, Any], None, None]:
    """:func:`_encoded` for a Ray run: files decoded as Ray tasks and encoded by its actor pool, in
    input order (unloadable files recorded in ``failures``); in-memory arrays are encoded here."""
    from radflash.archive.ray_executor import actor_model, encode_on_ray

    yield from _encoded(_decoded(arrays, [], rules, failures, bar, workers=0, timeout=None), rf, batch_size)
    for d, tokens in encode_on_ray(files, actor_model(model, rf), placement, batch_size=batch_size, rules=rules,
                                   dtype=dtype, backend=backend, first_index=len(arrays) + 1, timeout=timeout,
                                   isolate=isolate, window=options.window):
        if tokens is None:
            failures.append(InputFailure(d.path, d.status, d.reason or "no image"))
            if bar is not None:
                bar.update(1)
            continue
        yield DecodedItem(d.index, d.path, d.pixels, d.meta), tokens


def _image_files(paths: list[Path]) -> Iterator[SourceItem]:
    """The files under ``paths``, streamed (:class:`radflash.io.source.FileSource`), without the
    unread entries: segment writes outputs per image and has no status row to give them."""
    from radflash.io.source import FileSource

    return (item for item in FileSource(paths) if item.skip is None)



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
def segment_one(rf: RadFlashModel, tokens: Any, item: DecodedItem, name: str, uid: str | None,
                specs: tuple[PromptSpec, ...], writer: OutputWriter | None) -> ImageResult:
    """One image's maps, masks, grounding and outputs from its image tokens (the stage ``segment``
    and ``serve --segment`` share): prompts in chunks that bound the maps' memory at any image size."""
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


# ---- helpers -----------------------------------------------------------------------------------
def _progress(total: int | None, *, enabled: bool):
    from radflash.util.progress import progress_bar

    return progress_bar(total, desc="segmenting", enabled=enabled)
