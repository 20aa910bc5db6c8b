"""The archive-scoring pipeline: decode (worker processes) → resize → batched inference → writer.

Stages and what they exchange::

    paths ──► DecodePool ──Decoded──► resize ──► [bounded queue] ──► Batcher ──Batch──► inference ──FileRecord──► store
              (N spawn processes:     (feed thread,     │ skipped / failed records bypass inference ───────────┘
               read + select + decode) S×S)

Why this shape:

* Decoding (JPEG 2000 especially) costs as much as a small encoder's forward pass and is
  single-threaded C code, so it runs in worker *processes*; the main process keeps the model.
* Workers import only numpy, pydicom, Pillow and :mod:`radflash.imageio` — never torch: a spawn
  worker that imports torch takes 2–6 s to start on a shared 2-core box (0.7 s without; measured),
  which was most of a small run's wall time. So workers return the decoded full-resolution pixels
  and the parent's feed thread resizes them to the model's S×S with :func:`resize_for_model` (the same
  :func:`radflash.preprocess.preprocess` call as every other path, identity normalisation).
  Only S×S images wait in the queue, so memory stays flat; the main thread only normalises
  (bit-identical to ``model.preprocess`` on the original image, on CPU). The pipe carries the
  full-resolution float32 image (4 MB at 1024², 30 MB at 3000×2500: ~10–40 ms, far below the
  decode time of a compressed radiograph).
* :func:`radflash.segment.segment` uses the same :class:`DecodePool` (it needs exactly these
  full-resolution pixels: its maps are made at each image's own size).
* Every hand-off is bounded (``depth`` tasks per worker, ``queue_size`` decoded images), so memory
  stays flat whatever the archive size and decoding overlaps inference.
* Each worker is fed over its own pipe, so the parent always knows which file a worker is on:
  a worker that dies (a decoder segfault) or exceeds ``timeout`` fails exactly that file, is
  restarted, and the files queued behind it are retried. ``workers=0`` decodes in a thread of the
  main process instead (no crash isolation; useful for debugging and tiny inputs).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.batching import END, Batch, Batcher
from radflash.writers import FileRecord, path_text, storable

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.imageio import ImageMeta, LoadOutcome
    from radflash.selection import SelectionRules

log = logging.getLogger("radflash.pipeline")

# (path, rules) → LoadOutcome; radflash.imageio.try_load by default. Must be importable (spawn).
Loader = Callable[[Path, "SelectionRules | None"], "LoadOutcome"]


# ---- typed hand-offs between stages -----------------------------------------------------------
@dataclass(frozen=True)
class DecodeTask:
    index: int
    path: str


@dataclass
class Decoded:
    """One file after the decode stage: H×W float32 pixels in [0, 1] when ``status == "loaded"``
    (the source resolution; :func:`run_pipeline` resizes them to S×S before batching)."""

    index: int
    path: str
    status: str  # loaded | skipped | failed
    reason: str | None = None
    pixels: np.ndarray | None = None
    meta: ImageMeta | None = None  # whenever a header was read (skipped files too)
    decode_s: float = 0.0


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
    timeout: float | None = 120.0  # s per file before its worker is killed and the file failed
    include_phi: bool = False
    loader: Loader | None = None  # default radflash.imageio.try_load; must be importable (spawn)
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


# ---- decode stage ------------------------------------------------------------------------------
def default_loader() -> Loader:
    from radflash.imageio import try_load

    return try_load


def resize_for_model(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """H×W [0, 1] → S×S [0, 1] with exactly the resize of :func:`radflash.preprocess.preprocess`."""
    import torch

    from radflash.preprocess import Preprocessing, preprocess

    if pixels.shape == (image_size, image_size):
        return np.ascontiguousarray(pixels, dtype=np.float32).clip(0.0, 1.0)
    identity = Preprocessing(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with torch.inference_mode():
        out = preprocess(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), identity)
    return out[0, 0].numpy().copy()


def decode_one(task: DecodeTask, loader: Loader, rules: SelectionRules | None) -> Decoded:
    """Read, select and decode one file at its own resolution; every failure becomes a record."""
    t0 = time.perf_counter()
    try:
        outcome = loader(Path(task.path), rules)
        if outcome.status != "loaded":
            return Decoded(task.index, task.path, outcome.status, outcome.reason, meta=outcome.meta,
                           decode_s=time.perf_counter() - t0)
        image = outcome.image
        pixels = np.ascontiguousarray(image.pixels, dtype=np.float32)
        return Decoded(task.index, task.path, "loaded", None, pixels, image.meta, time.perf_counter() - t0)
    except Exception as exc:  # the loader promises not to raise; a bug there must not stop the run
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return Decoded(task.index, task.path, "failed", reason, decode_s=time.perf_counter() - t0)


def _worker_main(conn, loader: Loader | None, rules: SelectionRules | None) -> None:
    """Worker process loop (top-level so that ``spawn`` can import it). Imports no torch."""
    import pydicom  # noqa: F401  (imported before READY: a file's timeout must not pay for it)

    _limit_memory(rules)
    loader = loader or default_loader()
    try:
        conn.send(_READY)  # imports done: per-file timeouts start counting now
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(decode_one(task, loader, rules))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


# Backstop for what no header check can see (a JPEG 2000 codestream claiming other dimensions than
# its DICOM header): a worker's heap is capped, so such a file fails with MemoryError or kills
# only its worker (→ "decoder process crashed"). Decoding costs ~25 B per pixel of budget.
WORKER_BASE_BYTES = 1 << 30
WORKER_BYTES_PER_PIXEL = 40


def worker_memory_limit(rules: SelectionRules | None) -> int:
    """Bytes of data segment a decode worker may use: a base plus a margin per pixel of budget."""
    from radflash.selection import DEFAULT_MAX_PIXELS

    budget = rules.max_pixels if rules is not None else DEFAULT_MAX_PIXELS
    return WORKER_BASE_BYTES + WORKER_BYTES_PER_PIXEL * budget


def _limit_memory(rules: SelectionRules | None) -> None:
    try:
        import resource
    except ImportError:  # not on Windows: the pixel budget alone bounds memory there
        return
    limit = worker_memory_limit(rules)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ValueError, OSError) as exc:
        log.debug("decode worker memory limit not set: %s", exc)


_READY = "ready"
STARTUP_TIMEOUT = 300.0  # s for a fresh worker to import numpy/pydicom (slow disks, cold caches)


@dataclass
class _Worker:
    proc: Any
    conn: Any
    inflight: deque = field(default_factory=deque)  # DecodeTasks in the order they were sent
    head_since: float = field(default_factory=time.monotonic)  # when the oldest in-flight task started
    ready: bool = False  # spawn + imports take seconds; that must not count against a file


class DecodePool:
    """``workers`` spawn processes, each fed ``depth`` tasks at a time over its own pipe.

    Items come back at the source resolution (see :class:`Decoded`); callers resize if they need to.
    """

    def __init__(self, workers: int, *, loader: Loader | None = None, rules: SelectionRules | None = None,
                 depth: int = 2, timeout: float | None = 120.0) -> None:
        if workers < 1:
            raise ValueError("DecodePool needs at least one worker; use decode_inline for workers=0")
        self.n = workers
        self.loader = loader
        self.rules = rules
        self.depth = max(1, depth)
        self.timeout = timeout
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.loader, self.rules),
                                 daemon=True, name="radflash-decode")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, w: _Worker, *, kill: bool = False) -> None:
        kill = kill or not w.ready  # still importing: nothing to finish, don't wait for it
        if not kill:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                kill = True
            w.proc.join(timeout=5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)
        w.conn.close()

    def _limit(self, w: _Worker) -> float:
        return (self.timeout or 0.0) if w.ready else STARTUP_TIMEOUT

    def run(self, tasks: Iterable[DecodeTask]) -> Generator[Decoded, None, None]:
        """Decoded items in completion order; exactly one per task, whatever happens to workers."""
        source = iter(tasks)
        retry: deque[DecodeTask] = deque()  # tasks queued behind a crashed file: not its fault
        exhausted = False

        def next_task() -> DecodeTask | None:
            nonlocal exhausted
            if retry:
                return retry.popleft()
            if not exhausted:
                task = next(source, None)
                if task is not None:
                    return task
                exhausted = True
            return None

        slots: list[_Worker | None] = [self._start() for _ in range(self.n)]
        self._workers = slots
        try:
            while True:
                # feed: keep every worker `depth` deep so a finished decode is followed immediately
                for i in range(len(slots)):
                    if slots[i] is None and (retry or not exhausted):
                        slots[i] = self._start()  # replaces a crashed worker once there is work for it
                        self.restarts += 1
                    w = slots[i]
                    while w is not None and len(w.inflight) < self.depth:
                        task = next_task()
                        if task is None:
                            break
                        if not w.inflight and w.ready:
                            w.head_since = time.monotonic()
                        w.inflight.append(task)
                        w.conn.send(task)
                busy = [w for w in slots if w is not None and w.inflight]
                if not busy:
                    return
                wait_s = 1.0
                if self.timeout is not None:
                    wait_s = max(0.0, min(self._limit(w) - (time.monotonic() - w.head_since) for w in busy))
                ready = set(mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=wait_s))
                for i, w in enumerate(slots):
                    if w is None or not w.inflight:
                        continue
                    if w.conn in ready:
                        try:
                            item = w.conn.recv()
                        except (EOFError, OSError):
                            item = None  # died mid-message; handled as a crash below
                        if isinstance(item, str) and item == _READY:
                            w.ready, w.head_since = True, time.monotonic()
                            continue
                        if item is not None:
                            w.inflight.popleft()
                            w.head_since = time.monotonic()
                            paused = time.monotonic()
                            yield item
                            # time spent blocked on the consumer is not decode time
                            pause = time.monotonic() - paused
                            for other in slots:
                                if other is not None:
                                    other.head_since += pause
                            continue
                    dead = not w.proc.is_alive() or w.proc.sentinel in ready or w.conn in ready
                    late = self.timeout is not None and time.monotonic() - w.head_since > self._limit(w)
                    if not (dead or late):
                        continue
                    if not w.ready:  # not a file's fault: a broken environment
                        raise RuntimeError(f"decode worker failed to start (exit code {w.proc.exitcode}); "
                                           f"try --workers 0 to see the error in-process")
                    culprit = w.inflight.popleft()
                    retry.extendleft(reversed(w.inflight))
                    w.inflight.clear()
                    self._stop(w, kill=True)
                    slots[i] = None
                    reason = (f"decoder timed out after {self.timeout:g} s" if late and not dead else
                              f"decoder process crashed (exit code {w.proc.exitcode})")
                    log.warning("%s: %s; the worker is replaced", culprit.path, reason)
                    yield Decoded(culprit.index, culprit.path, "failed", reason)
        finally:
            for w in slots:
                if w is not None:
                    self._stop(w, kill=bool(w.inflight))
            self._workers = []


def decode_inline(tasks: Iterable[DecodeTask], *, loader: Loader | None = None,
                  rules: SelectionRules | None = None) -> Generator[Decoded, None, None]:
    """``workers=0``: decode in the calling process (no crash isolation)."""
    loader = loader or default_loader()
    for task in tasks:
        yield decode_one(task, loader, rules)


def decode_stream(paths: Sequence[str | Path], *, workers: int, loader: Loader | None = None,
                  rules: SelectionRules | None = None, depth: int = 2,
                  timeout: float | None = 120.0) -> tuple[Generator[Decoded, None, None], DecodePool | None]:
    """One :class:`Decoded` per path (completion order with workers, input order without) and the
    pool (``None`` for ``workers=0``), whose ``restarts`` count is valid once the stream is done."""
    tasks = (DecodeTask(i, str(p)) for i, p in enumerate(paths))
    if workers > 0:
        pool = DecodePool(workers, loader=loader, rules=rules, depth=depth, timeout=timeout)
        return pool.run(tasks), pool
    return decode_inline(tasks, loader=loader, rules=rules), None


# ---- inference + writing -----------------------------------------------------------------------
def score_calibrated(calibration: dict | None) -> bool:
    """Whether a checkpoint carries image-level score calibration (:mod:`radflash.calibration.scores`:
    per-finding ``temperature``/``threshold``). The same dict may hold only the trainer's
    segmentation-map ``thresholds``, which say nothing about image-level probabilities."""
    return bool(calibration) and bool(calibration.get("temperature") or calibration.get("threshold"))


class Scorer:
    """Batch of decoded images → records with logits/probabilities (calibrated when the model is)."""

    def __init__(self, model: RadFlashModel, prompts: PromptSet, *, include_phi: bool = False) -> None:
        self.model = model
        self.prompts = prompts
        self.include_phi = include_phi
        model.encode_text(list(prompts.prompts))  # once per run; later calls hit the cache
        self.calibrated = score_calibrated(model.calibration)
        self.with_positive = self.calibrated or any(t is not None for t in prompts.thresholds)

    def __call__(self, items: Sequence[Decoded]) -> list[FileRecord]:
        import torch

        pixels = torch.from_numpy(np.stack([d.pixels for d in items]))
        batch = self.model.preprocess(pixels)  # already S×S: normalisation only
        scores = self.model.score(tokens=self.model.encode_images(pixels=batch), prompts=list(self.prompts.prompts))
        logits = scores.logits.cpu().numpy()
        probs = scores.probs.cpu().numpy()
        positive = None
        if self.calibrated:
            from radflash.calibration.scores import apply

            probs, positive = apply(self.model.calibration, list(self.prompts.names), logits)
            probs = np.asarray(probs, dtype=np.float32)
            positive = None if positive is None else np.asarray(positive)
        positive = self._apply_thresholds(probs, positive)
        records = []
        for i, d in enumerate(items):
            records.append(self._record(d, "scored", None, tuple(logits[i].tolist()), tuple(probs[i].tolist()),
                                        None if positive is None else tuple(positive[i].tolist())))
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
            path=path_text(d.path), status=status, reason=storable(reason),  # type: ignore[arg-type]
            sop_instance_uid=m and m.sop_instance_uid, study_instance_uid=m and m.study_instance_uid,
            series_instance_uid=m and m.series_instance_uid, modality=m and m.modality,
            view_position=m and m.view_position,
            patient_id=m.patient_id if phi else None, patient_name=m.patient_name if phi else None,
            logits=logits, probs=probs, positive=positive,
        )

    def unscored(self, d: Decoded) -> FileRecord:
        return self._record(d, d.status, d.reason)


class Committer:
    """Buffers records and hands them to the store every ``commit_every`` files.

    Thread-safe: scored records arrive from the inference thread, skipped/failed ones straight
    from the decode feed, so an archive of mostly non-chest files still commits (and stays
    resumable) at a steady pace instead of piling up records in memory.
    """

    def __init__(self, store: Any, commit_every: int, stats: PipelineStats,
                 on_record: Callable[[FileRecord], None] | None = None) -> None:
        self.store = store
        self.commit_every = max(1, commit_every)
        self.stats = stats
        self.on_record = on_record
        self.pending: list[FileRecord] = []
        self._lock = threading.Lock()

    def add(self, records: Iterable[FileRecord]) -> None:
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
            t0 = time.perf_counter()
            self.store.commit(self.pending)
            self.stats.write_s += time.perf_counter() - t0
            self.pending = []


def run_pipeline(
    paths: Sequence[str | Path],
    model: RadFlashModel,
    prompts: PromptSet,
    store: Any,
    config: PipelineConfig,
    *,
    on_record: Callable[[FileRecord], None] | None = None,
) -> PipelineStats:
    """Score ``paths`` into ``store`` (``.commit(records)``); returns counts and timings.

    One record per path reaches the store, whatever the decoders do. Records of files that need no
    inference (skipped/failed) go straight to the writer so they never occupy a batch slot.
    """
    stats = PipelineStats()
    t_start = time.perf_counter()
    image_size = model.config.image_size
    scorer = Scorer(model, prompts, include_phi=config.include_phi)
    committer = Committer(store, config.commit_every, stats, on_record)
    decoded_stream, pool = decode_stream(paths, workers=config.workers, loader=config.loader, rules=config.rules,
                                         depth=config.depth, timeout=config.timeout)

    loaded_q: queue.Queue = queue.Queue(maxsize=config.queue_size or 2 * config.batch_size)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for d in decoded_stream:
                stats.decode_s += d.decode_s
                if d.status == "loaded":
                    d = _resized(d, image_size, stats)
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
        for batch in batcher.from_queue(loaded_q):
            _infer(batch, scorer, committer, stats)
            if stats.first_batch_s is None:
                stats.first_batch_s = time.perf_counter() - t_start
        producer.join()
        if failure:
            raise failure[0]
        committer.flush()
    finally:
        stop.set()
        producer.join(timeout=30)
    if pool is not None:
        stats.worker_restarts = pool.restarts
    stats.wall_s = time.perf_counter() - t_start
    return stats


def _resized(d: Decoded, image_size: int, stats: PipelineStats) -> Decoded:
    """The S×S model input of a loaded item (runs in the feed thread, overlapping inference)."""
    from radflash.errors import InputError

    t0 = time.perf_counter()
    try:
        pixels = resize_for_model(d.pixels, image_size)
    except InputError as exc:  # e.g. a 1-pixel-high image: nothing to resize from
        return Decoded(d.index, d.path, "failed", str(exc).splitlines()[0], meta=d.meta, decode_s=d.decode_s)
    finally:
        stats.resize_s += time.perf_counter() - t0
    return Decoded(d.index, d.path, "loaded", None, pixels, d.meta, d.decode_s)


def _infer(batch: Batch[Decoded], scorer: Scorer, committer: Committer, stats: PipelineStats) -> None:
    t0 = time.perf_counter()
    records = scorer(batch.items)
    stats.inference_s += time.perf_counter() - t0
    stats.batches += 1
    committer.add(records)
