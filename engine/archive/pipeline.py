"""The archive-scoring pipeline: decode (worker processes) → resize → batched inference → writer.

Stages and what they exchange::

    items ──► DecodePool ──Decoded──► resize ──► [bounded queue] ──► Batcher ──Batch──► inference ──FileRecord──► store
              (N spawn processes:     (feed thread,     │ skipped / failed records bypass inference ───────────┘
               read + select + decode) S×S)

Why this shape:

* Decoding (JPEG 2000 especially) costs as much as a small encoder's forward pass and is
  single-threaded C code, so it runs in worker *processes*; the main process keeps the model.
* Workers import only numpy, pydicom, Pillow and :mod:`radflash.io.imageio` — never torch: a spawn
  worker that imports torch takes 2–6 s to start on a shared 2-core box (0.7 s without; measured),
  which was most of a small run's wall time. So workers return the decoded full-resolution pixels
  and the parent's feed thread resizes them to the model's S×S with :func:`resize_for_model` (the same
  :func:`radflash.preprocess.preprocess` call as every other path, identity normalisation).
  Only S×S images wait in the queue, so memory stays flat; the main thread only normalises
  (bit-identical to ``model.preprocess`` on the original image, on CPU). The pipe carries the
  full-resolution float32 image (4 MB at 1024², 30 MB at 3000×2500: ~10–40 ms, far below the
  decode time of a compressed radiograph).
* :func:`radflash.segment.verb.segment` uses the same :class:`DecodePool` (it needs exactly these
  full-resolution pixels: its maps are made at each image's own size).
* Every hand-off is bounded (``depth`` tasks per worker, ``queue_size`` decoded images), so memory
  stays flat whatever the archive size and decoding overlaps inference.
* Items come from a :class:`radflash.io.source.Source` (files today: a path each, which a worker
  opens itself; bytes from a network source are sent along) and records go to a
  :class:`radflash.archive.sinks.Sink`; the stage functions (:func:`decode_one`, :func:`resize_for_model`,
  :class:`Scorer`, :class:`Committer`) know nothing about the local process pool that drives them
  here, so another executor can drive the same stages.
* Each worker is fed over its own pipe, so the parent always knows which file a worker is on:
  a worker that dies (a decoder segfault) or exceeds ``timeout`` fails exactly that file, is
  restarted, and the files queued behind it are retried. ``workers=0`` decodes in a thread of the
  main process instead (no crash isolation; useful for debugging and tiny inputs).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from radflash.archive.batching import END, Batch, Batcher
from radflash.archive.decode_pool import DECODE_NICE, Decoded, Loader, decode_stream, resize_for_model
from radflash.archive.sinks import FileRecord, Sink, storable
from radflash.checkpoints.calibration import score_calibrated
from radflash.util.watchdog import Watchdog, stall_limit

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.io.selection import SelectionRules
    from radflash.io.source import SourceItem
    from radflash.preprocess import Preprocessing


log = logging.getLogger("radflash.pipeline")


@dataclass(frozen=True)
class PromptSet:
    """Finding names, their prompt texts and optional per-finding decision thresholds."""

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    thresholds: tuple[float | None, ...]


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 16
    workers: int = 2
    commit_every: int = 256  # files per committed part (bounds the work lost to a crash)
    max_wait: float = 0.05  # s a partial batch may wait for more decoded images
    queue_size: int = 0  # decoded images buffered ahead of inference; 0 → 2 × batch_size
    depth: int = 2  # tasks queued per worker: one decoding, one ready to start
    decode_nice: int = DECODE_NICE  # decode workers yield the cores to the encoder's threads (decode_pool)
    timeout: float | None = 120.0  # s per file before its worker is killed and the file failed
    stall_after: float | None = None  # s with no finished step before the run stops; None: stall_limit(timeout)
    include_phi: bool = False
    loader: Loader | None = None  # default radflash.io.imageio.try_load; must be importable (spawn)
    rules: SelectionRules | None = None  # None: the default chest X-ray rules


@dataclass
class PipelineStats:
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    decode_s: float = 0.0  # summed over workers
    resize_s: float = 0.0  # in the parent's feed thread (overlaps inference)
    inference_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    batches: int = 0
    worker_restarts: int = 0
    first_batch_s: float | None = None

    @property
    def total(self) -> int:
        return self.scored + self.skipped + self.failed

    def as_dict(self) -> dict:
        return {
            "scored": self.scored, "skipped": self.skipped, "failed": self.failed,
            "decode_cpu_s": round(self.decode_s, 3), "resize_s": round(self.resize_s, 3),
            "inference_s": round(self.inference_s, 3),
            "write_s": round(self.write_s, 3), "wall_s": round(self.wall_s, 3), "batches": self.batches,
            "worker_restarts": self.worker_restarts,
            "images_per_s": round(self.total / self.wall_s, 2) if self.wall_s > 0 else None,
        }


class BatchObserver(Protocol):
    """Sees every scored batch while its image tokens are still in memory, so a caller can derive
    more from the same pass (e.g. :class:`radflash.report.gallery.ScoreGallery`'s similarity maps)
    without reading the archive again. Called in the inference thread, after scoring."""

    def __call__(self, model: RadFlashModel, prompts: PromptSet, items: Sequence[Decoded], tokens: Any,
                 records: Sequence[FileRecord]) -> None: ...


@runtime_checkable
class DistributedObserver(BatchObserver, Protocol):
    """A :class:`BatchObserver` that can also run where the tokens are: in Ray's inference actors.

    The driver sends each actor a fresh copy (:meth:`for_worker`); after every batch the actor's
    copy hands over what it gained (:meth:`take_delta`: small, JSON-able, e.g. the gallery tiles
    that entered its own top-K), and the driver folds that into the original (:meth:`merge_delta`).
    """

    def for_worker(self) -> DistributedObserver: ...

    def take_delta(self) -> Any: ...

    def merge_delta(self, delta: Any) -> None: ...


class Scorer:
    """Batch of decoded images → records with logits/probabilities (calibrated when the model is)."""

    def __init__(self, model: RadFlashModel, prompts: PromptSet, *, include_phi: bool = False,
                 observer: BatchObserver | None = None) -> None:
        self.model = model
        self.prompts = prompts
        self.include_phi = include_phi
        self.observer = observer
        model.encode_text(list(prompts.prompts))  # once per run; later calls hit the cache
        self.calibrated = score_calibrated(model.calibration)
        self.with_positive = self.calibrated or any(t is not None for t in prompts.thresholds)

    def __call__(self, items: Sequence[Decoded]) -> list[FileRecord]:
        import torch

        pixels = torch.from_numpy(np.stack([d.pixels for d in items]))
        batch = self.model.preprocess(pixels)  # already S×S: normalisation only
        tokens = self.model.encode_images(pixels=batch)
        scores = self.model.score(tokens=tokens, prompts=list(self.prompts.prompts))
        logits = scores.logits.cpu().numpy()
        probs = scores.probs.cpu().numpy()
        positive = None
        if self.calibrated:
            from radflash.checkpoints.calibration import apply

            probs, positive = apply(self.model.calibration, list(self.prompts.names), logits)
            probs = np.asarray(probs, dtype=np.float32)
            positive = None if positive is None else np.asarray(positive)
        positive = self._apply_thresholds(probs, positive)
        records = []
        for i, d in enumerate(items):
            records.append(self._record(d, "scored", None, tuple(logits[i].tolist()), tuple(probs[i].tolist()),
                                        None if positive is None else tuple(positive[i].tolist())))
        if self.observer is not None:  # same pass, tokens still in memory (the report's gallery)
            self.observer(self.model, self.prompts, items, tokens, records)
        return records

    def _apply_thresholds(self, probs: np.ndarray, positive: np.ndarray | None) -> np.ndarray | None:
        thr = self.prompts.thresholds
        if not any(t is not None for t in thr):
            return positive
        out = np.zeros(probs.shape, dtype=object) if positive is None else positive.astype(object)
        if positive is None:
            out[:] = None
        for j, t in enumerate(thr):
            if t is not None:  # a threshold in the findings file wins over the calibration's
                out[:, j] = probs[:, j] >= t
        return out

    def _record(self, d: Decoded, status: str, reason: str | None, logits=None, probs=None,
                positive=None) -> FileRecord:
        m = d.meta  # ImageMeta text fields are already stripped, and None when empty
        phi = self.include_phi and m is not None
        return FileRecord(
            path=storable(d.key), status=status, reason=storable(reason),  # type: ignore[arg-type]
            sop_instance_uid=m and m.sop_instance_uid, study_instance_uid=m and m.study_instance_uid,
            series_instance_uid=m and m.series_instance_uid, modality=m and m.modality,
            view_position=m and m.view_position, decoder=m and m.decoder,
            patient_id=m.patient_id if phi else None, patient_name=m.patient_name if phi else None,
            logits=logits, probs=probs, positive=positive,
        )

    def unscored(self, d: Decoded) -> FileRecord:
        return self._record(d, d.status, d.reason)


class Committer:
    """Buffers records and hands them to the store every ``commit_every`` files.

    Thread-safe: scored records arrive from the inference thread, skipped/failed ones straight
    from the decode feed, so an archive of mostly non-chest files still commits (and stays
    resumable) at a steady pace instead of piling up records in memory. Under a ``watchdog`` each
    record is progress and each write a step of the "sink" stage; once the run has stalled nothing
    more is committed (the records a stall produces, such as files failed because their decoder
    was killed, are not the files' fault: ``--resume`` must do them again).
    """

    def __init__(self, store: Sink, commit_every: int, stats: PipelineStats,
                 on_record: Callable[[FileRecord], None] | None = None, watchdog: Watchdog | None = None) -> None:
        self.store = store
        self.commit_every = max(1, commit_every)
        self.stats = stats
        self.on_record = on_record
        self.watchdog = watchdog or Watchdog(None)
        self.pending: list[FileRecord] = []
        self._lock = threading.Lock()

    def add(self, records: Iterable[FileRecord]) -> None:
        self.watchdog.check()
        self.watchdog.beat()
        with self._lock:
            for r in records:
                self.pending.append(r)
                setattr(self.stats, r.status, getattr(self.stats, r.status) + 1)
                if self.on_record is not None:
                    self.on_record(r)
            if len(self.pending) >= self.commit_every:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.watchdog.check()
            t0 = time.perf_counter()
            with self.watchdog.step("sink"):
                self.store.commit(self.pending)
            self.stats.write_s += time.perf_counter() - t0
            self.pending = []


def run_pipeline(
    items: Iterable[SourceItem | str | os.PathLike],
    model: RadFlashModel,
    prompts: PromptSet,
    store: Sink,
    config: PipelineConfig,
    *,
    on_record: Callable[[FileRecord], None] | None = None,
    observer: BatchObserver | None = None,
) -> PipelineStats:
    """Score ``items`` (source items, or plain paths) into ``store``; returns counts and timings.

    One record per item reaches the store, keyed by the item's key, whatever the decoders do.
    Records of items that need no inference (skipped/failed) go straight to the writer so they
    never occupy a batch slot. Unread entries (``SourceItem.skip``) are the caller's to record.
    ``observer`` (:class:`BatchObserver`) sees each scored batch with its image tokens.
    """
    stats = PipelineStats()
    t_start = time.perf_counter()
    with Watchdog(stall_limit(config.timeout, config.stall_after), what="score") as watchdog:
        _run(items, model, prompts, store, config, stats, watchdog, on_record=on_record, observer=observer)
    stats.wall_s = time.perf_counter() - t_start
    return stats


def _run(items: Iterable[SourceItem | str | os.PathLike], model: RadFlashModel, prompts: PromptSet, store: Sink,
         config: PipelineConfig, stats: PipelineStats, watchdog: Watchdog, *,
         on_record: Callable[[FileRecord], None] | None, observer: BatchObserver | None) -> None:
    """The stages of :func:`run_pipeline`, each step reported to ``watchdog`` under its stage's name."""
    t_start = time.perf_counter()
    geometry = model.preprocessing.geometry  # the model's resize (CARZero letterboxes), in the feed thread
    scorer = Scorer(model, prompts, include_phi=config.include_phi, observer=observer)
    committer = Committer(store, config.commit_every, stats, on_record, watchdog)
    decoded_stream, pool = decode_stream(watchdog.track(items, "source"), workers=config.workers,
                                         loader=config.loader, rules=config.rules, depth=config.depth,
                                         timeout=config.timeout, nice=config.decode_nice)
    if pool is not None:
        watchdog.on_stall(pool.kill)  # frees a feed thread waiting on a worker; its records are not committed

    loaded_q: queue.Queue = queue.Queue(maxsize=config.queue_size or 2 * config.batch_size)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for d in watchdog.track(decoded_stream, "decode"):
                stats.decode_s += d.decode_s
                if d.status == "loaded":
                    with watchdog.step("resize"):
                        d = _resized(d, geometry, stats)
                if d.status == "loaded":
                    while not stop.is_set():
                        try:
                            loaded_q.put(d, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                else:  # skipped/failed: nothing to infer, record it right away
                    committer.add([scorer.unscored(d)])
                if stop.is_set():
                    break
        except BaseException as exc:  # re-raised in the main thread
            failure.append(exc)
        finally:
            decoded_stream.close()  # stops worker processes promptly even when we leave early
            while not stop.is_set():  # the consumer may already be gone (error or Ctrl-C)
                try:
                    loaded_q.put(END, timeout=0.2)
                    break
                except queue.Full:
                    continue

    producer = threading.Thread(target=produce, name="radflash-decode-feed", daemon=True)
    producer.start()
    batcher: Batcher[Decoded] = Batcher(config.batch_size, config.max_wait)
    try:
        for batch in batcher.from_queue(loaded_q, idle=watchdog.check):
            with watchdog.step("inference"):
                _infer(batch, scorer, committer, stats)
            if stats.first_batch_s is None:
                stats.first_batch_s = time.perf_counter() - t_start
        while producer.is_alive():  # the feed may still be committing skipped/failed records
            producer.join(timeout=0.5)
            watchdog.check()
        if failure:
            raise failure[0]
        committer.flush()
    finally:
        stop.set()
        producer.join(timeout=0 if watchdog.stalled else 30)  # a stalled feed may never return
    if pool is not None:
        stats.worker_restarts = pool.restarts


def _resized(d: Decoded, geometry: Preprocessing, stats: PipelineStats) -> Decoded:
    """The S×S model input of a loaded item (runs in the feed thread, overlapping inference)."""
    from radflash.errors import InputError

    t0 = time.perf_counter()
    try:
        pixels = resize_for_model(d.pixels, geometry)
    except InputError as exc:  # e.g. a 1-pixel-high image: nothing to resize from
        return Decoded(d.index, d.key, d.path, "failed", str(exc).splitlines()[0], meta=d.meta, decode_s=d.decode_s)
    finally:
        stats.resize_s += time.perf_counter() - t0
    return Decoded(d.index, d.key, d.path, "loaded", None, pixels, d.meta, d.decode_s)


def _infer(batch: Batch[Decoded], scorer: Scorer, committer: Committer, stats: PipelineStats) -> None:
    t0 = time.perf_counter()
    records = scorer(batch.items)
    stats.inference_s += time.perf_counter() - t0
    stats.batches += 1
    committer.add(records)
