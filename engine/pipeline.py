"""The archive-scoring pipeline: decode (worker processes) → preprocess → batched inference → writer.

Stages and what they exchange::

    paths ──► DecodePool ──Decoded──► [bounded queue] ──► Batcher ──Batch──► inference ──FileRecord──► store
              (N spawn processes:          │ skipped / failed records bypass inference ───────────────┘
               read + decode + resize)

Why this shape:

* Decoding (JPEG 2000 especially) costs as much as a small encoder's forward pass and is
  single-threaded C code, so it runs in worker *processes*; the main process keeps the model.
* Workers also do the resize to the model's S×S (the same :func:`radflash.preprocess.preprocess`
  call, with identity normalisation), so only S×S float32 crosses the process boundary — a
  3000×2500 radiograph would otherwise cost 30 MB of pickling per image — and the main process
  only normalises (bit-identical to ``model.preprocess`` on the original image, on CPU).
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.batching import END, Batch, Batcher
from radflash.writers import FileRecord

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.pipeline")

Loader = Callable[[Path, Any], Any]  # (path, rules) → LoadOutcome(status, reason, image)


# ---- typed hand-offs between stages -----------------------------------------------------------
@dataclass(frozen=True)
class DecodeTask:
    index: int
    path: str


@dataclass
class Decoded:
    """One file after the decode stage: S×S pixels in [0, 1] when ``status == "loaded"``."""

    index: int
    path: str
    status: str  # loaded | skipped | failed
    reason: str | None = None
    pixels: np.ndarray | None = None
    meta: Any = None  # radflash.imageio.ImageMeta
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
    rules: Any = None  # radflash.selection.SelectionRules


@dataclass
class PipelineStats:
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    decode_s: float = 0.0  # summed over workers
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
            "decode_cpu_s": round(self.decode_s, 3), "inference_s": round(self.inference_s, 3),
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


def decode_one(task: DecodeTask, loader: Loader, rules: Any, image_size: int) -> Decoded:
    """Read, select, decode and resize one file; every failure becomes a ``failed`` record."""
    t0 = time.perf_counter()
    try:
        outcome = loader(Path(task.path), rules)
        if outcome.status != "loaded":
            return Decoded(task.index, task.path, outcome.status, outcome.reason,
                           decode_s=time.perf_counter() - t0)
        image = outcome.image
        pixels = resize_for_model(image.pixels, image_size)
        return Decoded(task.index, task.path, "loaded", None, pixels, image.meta, time.perf_counter() - t0)
    except Exception as exc:  # the loader promises not to raise; a bug there must not stop the run
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return Decoded(task.index, task.path, "failed", reason, decode_s=time.perf_counter() - t0)


def _worker_main(conn, loader: Loader | None, rules: Any, image_size: int) -> None:
    """Worker process loop (top-level so that ``spawn`` can import it)."""
    import torch

    torch.set_num_threads(1)  # one core per worker; the parent's inference gets the rest
    loader = loader or default_loader()
    try:
        conn.send(_READY)  # imports done: per-file timeouts start counting now
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(decode_one(task, loader, rules, image_size))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


_READY = "ready"
STARTUP_TIMEOUT = 300.0  # s for a fresh worker to import torch/pydicom (slow disks, cold caches)


@dataclass
class _Worker:
    proc: Any
    conn: Any
    inflight: deque = field(default_factory=deque)  # DecodeTasks in the order they were sent
    head_since: float = field(default_factory=time.monotonic)  # when the oldest in-flight task started
    ready: bool = False  # spawn + imports take seconds; that must not count against a file


class DecodePool:
    """``workers`` spawn processes, each fed ``depth`` tasks at a time over its own pipe."""

    def __init__(self, workers: int, *, image_size: int, loader: Loader | None = None, rules: Any = None,
                 depth: int = 2, timeout: float | None = 120.0) -> None:
        if workers < 1:
            raise ValueError("DecodePool needs at least one worker; use decode_inline for workers=0")
        self.n = workers
        self.image_size = image_size
        self.loader = loader
        self.rules = rules
        self.depth = max(1, depth)
        self.timeout = timeout
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.loader, self.rules, self.image_size),
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

    def run(self, tasks: Iterable[DecodeTask]) -> Iterator[Decoded]:
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


def decode_inline(tasks: Iterable[DecodeTask], *, image_size: int, loader: Loader | None = None,
                  rules: Any = None) -> Iterator[Decoded]:
    """``workers=0``: decode in the calling process (no crash isolation)."""
    loader = loader or default_loader()
    for task in tasks:
        yield decode_one(task, loader, rules, image_size)


# ---- inference + writing -----------------------------------------------------------------------
class Scorer:
    """Batch of decoded images → records with logits/probabilities (calibrated when the model is)."""

    def __init__(self, model: RadFlashModel, prompts: PromptSet, *, include_phi: bool = False) -> None:
        self.model = model
        self.prompts = prompts
        self.include_phi = include_phi
        model.encode_text(list(prompts.prompts))  # once per run; later calls hit the cache
        self.calibrated = bool(model.calibration)
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
        m = d.meta
        get = (lambda name: _text(getattr(m, name, None))) if m is not None else (lambda name: None)
        return FileRecord(
            path=d.path, status=status, reason=reason,  # type: ignore[arg-type]
            sop_instance_uid=get("sop_instance_uid"), study_instance_uid=get("study_instance_uid"),
            series_instance_uid=get("series_instance_uid"), modality=get("modality"),
            view_position=get("view_position"),
            patient_id=get("patient_id") if self.include_phi else None,
            patient_name=get("patient_name") if self.include_phi else None,
            logits=logits, probs=probs, positive=positive,
        )

    def unscored(self, d: Decoded) -> FileRecord:
        return self._record(d, d.status, d.reason)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


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
    tasks = (DecodeTask(i, str(p)) for i, p in enumerate(paths))
    pool = None
    if config.workers > 0:
        pool = DecodePool(config.workers, image_size=image_size, loader=config.loader, rules=config.rules,
                          depth=config.depth, timeout=config.timeout)
        decoded_stream: Iterator[Decoded] = pool.run(tasks)
    else:
        decoded_stream = decode_inline(tasks, image_size=image_size, loader=config.loader, rules=config.rules)

    loaded_q: queue.Queue = queue.Queue(maxsize=config.queue_size or 2 * config.batch_size)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for d in decoded_stream:
                stats.decode_s += d.decode_s
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
            close = getattr(decoded_stream, "close", None)
            if close is not None:
                close()  # stops worker processes promptly even when we leave early
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


def _infer(batch: Batch[Decoded], scorer: Scorer, committer: Committer, stats: PipelineStats) -> None:
    t0 = time.perf_counter()
    records = scorer(batch.items)
    stats.inference_s += time.perf_counter() - t0
    stats.batches += 1
    committer.add(records)
