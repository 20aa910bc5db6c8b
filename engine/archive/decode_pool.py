"""The decode stage: read, select and decode files in N worker processes (or inline), crash-isolated.

Shared by ``score`` (:mod:`radflash.archive.pipeline`) and ``segment``, which both need the
full-resolution pixels. Decoding (JPEG 2000 especially) is single-threaded C code that can crash
or hang on a hostile file, so it runs in spawn processes that import only numpy, pydicom, Pillow
and :mod:`radflash.io.imageio` (never torch: that would cost seconds per worker start). Each
worker is fed over its own pipe with at most ``depth`` tasks, so memory stays bounded and a worker
that dies or passes ``timeout`` fails exactly the file it was on; it is replaced and the files
queued behind it are retried. Each worker's heap is capped as a backstop (:func:`worker_memory_limit`).

Why the pipes cannot deadlock: only the worker → parent direction carries large messages (a
decoded film is 30 MB of float32 at 3000×2500). Parent → worker messages are tasks of a few
hundred bytes: an item that arrives as bytes (a DICOMweb retrieval, ~15 MB) is spooled by the
parent to a private file first (:class:`_Spool`) and the worker is sent its path. At most
``depth`` tasks are ever unread, far below a socket buffer, so the parent's ``send`` never blocks
and the parent is always free to read the large results the workers are blocked sending (and to
enforce the per-file timeout). Sending the bytes themselves deadlocked: the parent blocked
sending a 15 MB task to a worker that was itself blocked sending a 30 MB result to the parent.

Why the workers run at a lower priority (``nice``, :data:`DECODE_NICE` in ``score``, ``segment`` and
``serve``): the encoder in the parent runs one thread per core, and each of its parallel regions
waits for its slowest thread. A decoder sharing a core at equal priority takes half of that core,
so every region runs at the pace of the thread that was preempted, and both cores lose. Niced,
a decoder takes the cycles the encoder leaves (its single-threaded head and Python, and every core
while it waits for input), so the cores stay busy without slowing the encoder's regions. Measured
on 2 cores, base tower in OpenVINO bf16, 12 JPEG 2000 films of 3000×2500 (``python
benchmarks/bench_pipeline_limit.py --backend openvino --dtype bfloat16 --nice-baseline``;
``benchmarks/results/pipeline-limit-cpu.md``): 2 workers at nice 10 scored at 90–99% of the pipeline
limit, at nice 0 at 78–90% (exploratory rounds before: nice 0 77–83%, nice 5–19 86–88%,
``SCHED_IDLE`` 84%); with the cheaper INT8 encoder both reached 89–99%. Nice 10 rather than 19:
a niced worker still gets ~10% of a core against a busy process of normal priority (~1.5% at 19),
so on a machine shared with other jobs a file's decode does not starve into its timeout.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.io.source import SourceItem

if TYPE_CHECKING:
    from radflash.io.imageio import ImageMeta, LoadOutcome
    from radflash.io.selection import SelectionRules
    from radflash.preprocess import Preprocessing


log = logging.getLogger("radflash.pipeline")


WORKER_BYTES_PER_PIXEL = 40

DECODE_NICE = 10  # decode workers' niceness beside an encoder on the same cores (see the module docstring)


# Backstop for what no header check can see (a JPEG 2000 codestream claiming other dimensions than
# its DICOM header): a worker's heap is capped, so such a file fails with MemoryError or kills
# only its worker (→ "decoder process crashed"). Decoding costs ~25 B per pixel of budget.
WORKER_BASE_BYTES = 1 << 30


WORKER_MEMORY = 1 << 30  # what the default worker count reserves per process: its imports, one film, its results


def default_workers() -> int:
    """Decode processes when the user names none: one per usable core, as many as half the available memory
    holds at :data:`WORKER_MEMORY` each, at least one.

    One per core, not a fixed few: the workers run niced (:data:`DECODE_NICE`), so they take only the
    cycles the encoder leaves and idle, holding their ``depth`` results, when it is the slower stage;
    a fixed 4 capped decode at 4 ÷ 0.86 ≈ 4.7 JPEG 2000 films of 3000×2500 per second, whatever the
    core count, below what an INT8 encoder scores on a large server. On the 2-core machines
    measured here both rules give 2.
    """
    from radflash.util.sysinfo import available_memory, usable_cores

    cores, memory = usable_cores(), available_memory()
    return max(1, min(cores, memory // 2 // WORKER_MEMORY if memory else cores))


def worker_memory_limit(rules: SelectionRules | None) -> int:
    """Bytes of data segment a decode worker may use: a base plus a margin per pixel of budget."""
    from radflash.io.selection import DEFAULT_MAX_PIXELS

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


# (path, rules) → LoadOutcome; radflash.io.imageio.try_load by default. Must be importable (spawn).
Loader = Callable[[Path, "SelectionRules | None"], "LoadOutcome"]


# ---- typed hand-offs between stages -----------------------------------------------------------
@dataclass(frozen=True)
class DecodeTask:
    """One :class:`SourceItem` on its way to the decode stage: a file as its path; an item that
    arrived as bytes carries them (decoded in-process, or spooled to a file before it is sent to a
    worker process: see the module doc)."""

    index: int
    key: str
    path: str | None = None
    data: bytes | None = None

    @property
    def name(self) -> str:
        """How messages name the item: its path, or its key when it has none."""
        return self.path if self.path is not None else self.key


@dataclass
class Decoded:
    """One item after the decode stage: H×W float32 pixels in [0, 1] when ``status == "loaded"``
    (the source resolution; :func:`run_pipeline` resizes them to S×S before batching)."""

    index: int
    key: str  # SourceItem.key: the row key
    path: str  # the path as the source gave it, or the key for an item that came as bytes
    status: str  # loaded | skipped | failed
    reason: str | None = None
    pixels: np.ndarray | None = None
    meta: ImageMeta | None = None  # whenever a header was read (skipped files too)
    decode_s: float = 0.0


# ---- decode stage ------------------------------------------------------------------------------
def default_loader() -> Loader:
    from radflash.io.imageio import try_load

    return try_load


def resize_for_model(pixels: np.ndarray, geometry: Preprocessing) -> np.ndarray:
    """H×W [0, 1] → S×S [0, 1] with exactly the resize of :func:`radflash.preprocess.preprocess`.

    ``geometry`` is the model's :attr:`Preprocessing.geometry` (its resize without normalisation:
    RadZero's plain resize, CARZero's letterbox).
    """
    import torch

    from radflash.preprocess import preprocess

    size = geometry.image_size
    if pixels.shape == (size, size):
        return np.ascontiguousarray(pixels, dtype=np.float32).clip(0.0, 1.0)
    with torch.inference_mode():
        out = preprocess(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)), geometry)
    return out[0, 0].numpy().copy()


def error_line(exc: BaseException) -> str:
    """An unexpected exception as a one-line reason: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def decode_one(task: DecodeTask, loader: Loader, rules: SelectionRules | None) -> Decoded:
    """Read, select and decode one item at its own resolution; every failure becomes a record."""
    t0 = time.perf_counter()
    try:
        with _readable(task) as path:
            outcome = loader(path, rules)
        if outcome.status != "loaded":
            return Decoded(task.index, task.key, task.name, outcome.status, outcome.reason, meta=outcome.meta,
                           decode_s=time.perf_counter() - t0)
        image = outcome.image
        pixels = np.ascontiguousarray(image.pixels, dtype=np.float32)
        return Decoded(task.index, task.key, task.name, "loaded", None, pixels, image.meta, time.perf_counter() - t0)
    except Exception as exc:  # the loader promises not to raise; a bug there must not stop the run
        reason = error_line(exc)
        return Decoded(task.index, task.key, task.name, "failed", reason, decode_s=time.perf_counter() - t0)


@contextmanager
def _readable(task: DecodeTask) -> Iterator[Path]:
    """A file the loader can open for ``task``: its own path, or its bytes in a temporary file.

    The loader's defences (header reads bounded by the file size, truncation checks before any
    decode, stat-based refusal of FIFOs) are written against a seekable file, so bytes from a
    network source are spooled to a private temporary file for one decode instead of giving the
    loader a second, less tested code path. The file is removed as soon as the decode returns.
    """
    if task.path is not None:
        yield Path(task.path)
        return
    fd, name = tempfile.mkstemp(prefix="radflash-item-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(task.data or b"")
        yield Path(name)
    finally:
        os.unlink(name)


def _worker_main(conn, loader: Loader | None, rules: SelectionRules | None, nice: int = 0) -> None:
    """Worker process loop (top-level so that ``spawn`` can import it). Imports no torch."""
    import pydicom  # noqa: F401  (imported before READY: a file's timeout must not pay for it)

    if nice > 0 and hasattr(os, "nice"):  # not on Windows: there the OS shares the cores as it likes
        os.nice(nice)
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


_READY = "ready"


class _Spool:
    """Private files holding the bytes of in-flight items, so that only paths cross the pipes.

    One folder per :meth:`DecodePool.run`, removed with everything in it when the run ends; a
    file is removed as soon as its item is decoded, so at most ``workers × depth`` are on disk.
    """

    def __init__(self) -> None:
        self.folder: str | None = None

    def task(self, task: DecodeTask) -> DecodeTask:
        """``task`` as it may cross the pipe: bytes replaced by the path of a spooled copy."""
        if task.data is None:
            return task
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="radflash-spool-")
        fd, name = tempfile.mkstemp(dir=self.folder, prefix="item-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(task.data)
        return DecodeTask(task.index, task.key, name, None)

    def release(self, original: DecodeTask, sent: DecodeTask) -> None:
        if sent is not original and sent.path is not None:
            with suppress(OSError):
                os.unlink(sent.path)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


STARTUP_TIMEOUT = 300.0  # s for a fresh worker to import numpy/pydicom (slow disks, cold caches)


@dataclass
class _Worker:
    proc: Any
    conn: Any
    inflight: deque = field(default_factory=deque)  # (task, as sent: spooled) in the order they were sent
    head_since: float = field(default_factory=time.monotonic)  # when the oldest in-flight task started
    ready: bool = False  # spawn + imports take seconds; that must not count against a file


class DecodePool:
    """``workers`` spawn processes, each fed ``depth`` tasks at a time over its own pipe.

    Items come back at the source resolution (see :class:`Decoded`); callers resize if they need to.
    With ``keep_workers`` the healthy workers outlive a :meth:`run` and serve the next one (a Ray
    decode task decodes a few files per call and must not pay a process start each time);
    :meth:`close` stops them. ``nice``: the workers' niceness (:data:`DECODE_NICE` beside an encoder
    in this process; 0 where decoding is all the process does).
    """

    def __init__(self, workers: int, *, loader: Loader | None = None, rules: SelectionRules | None = None,
                 depth: int = 2, timeout: float | None = 120.0, keep_workers: bool = False, nice: int = 0) -> None:
        if workers < 1:
            raise ValueError("DecodePool needs at least one worker; use decode_inline for workers=0")
        self.n = workers
        self.loader = loader
        self.rules = rules
        self.depth = max(1, depth)
        self.timeout = timeout
        self.restarts = 0
        self.keep_workers = keep_workers
        self.nice = max(0, int(nice))
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker | None] = []
        self._idle: list[_Worker] = []  # kept by the last run (keep_workers): started, nothing in flight

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.loader, self.rules, self.nice),
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

        slots: list[_Worker | None] = [self._reuse_or_start() for _ in range(self.n)]
        self._workers = slots
        spool = _Spool()
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
                        sent = spool.task(task)  # a few hundred bytes: this send never blocks
                        w.inflight.append((task, sent))
                        w.conn.send(sent)
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
                            task, sent = w.inflight.popleft()
                            spool.release(task, sent)
                            item.path = task.name  # the worker saw a spooled copy of an item's bytes
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
                    for task, sent in w.inflight:
                        spool.release(task, sent)
                    culprit = w.inflight.popleft()[0]
                    retry.extendleft(reversed([task for task, _ in w.inflight]))
                    w.inflight.clear()
                    self._stop(w, kill=True)
                    slots[i] = None
                    reason = (f"decoder timed out after {self.timeout:g} s" if late and not dead else
                              f"decoder process crashed (exit code {w.proc.exitcode})")
                    log.warning("%s: %s; the worker is replaced", culprit.name, reason)
                    yield Decoded(culprit.index, culprit.key, culprit.name, "failed", reason)
        finally:
            for w in slots:
                if w is None:
                    continue
                if self.keep_workers and not w.inflight and w.proc.is_alive():
                    self._idle.append(w)
                else:
                    self._stop(w, kill=bool(w.inflight))
            self._workers = []
            spool.close()

    def _reuse_or_start(self) -> _Worker:
        """A worker the last run kept (if it is still alive), else a new one."""
        while self._idle:
            w = self._idle.pop()
            if w.proc.is_alive():
                return w
            self._stop(w, kill=True)
        return self._start()

    def kill(self) -> None:
        """Kill every worker of the current run (a stalled run's last act: see radflash.util.watchdog)."""
        for w in list(self._workers):
            if w is not None and w.proc.is_alive():
                w.proc.kill()

    def close(self) -> None:
        """Stop the workers a ``keep_workers`` pool kept between runs."""
        idle, self._idle = self._idle, []
        for w in idle:
            self._stop(w)


def decode_inline(tasks: Iterable[DecodeTask], *, loader: Loader | None = None,
                  rules: SelectionRules | None = None) -> Generator[Decoded, None, None]:
    """``workers=0``: decode in the calling process (no crash isolation)."""
    loader = loader or default_loader()
    for task in tasks:
        yield decode_one(task, loader, rules)


_PROCESS_POOL: tuple[bytes, DecodePool] | None = None


def process_pool(loader: Loader | None, rules: SelectionRules | None, timeout: float | None) -> DecodePool:
    """This process's one-worker :class:`DecodePool`, kept across calls (``keep_workers``).

    A Ray decode task decodes a handful of files per call in a Ray worker process that lives on
    for later tasks; its files go through this pool so that a decoder that crashes or hangs fails
    only its file, with the local pool's reasons, instead of killing the Ray task. The worker is
    started once per process (Ray reuses its worker processes) and replaced when it dies or when
    a call brings other settings.
    """
    import pickle

    global _PROCESS_POOL
    key = pickle.dumps((loader, rules, timeout))
    if _PROCESS_POOL is not None and _PROCESS_POOL[0] != key:
        _PROCESS_POOL[1].close()
        _PROCESS_POOL = None
    if _PROCESS_POOL is None:
        _PROCESS_POOL = (key, DecodePool(1, loader=loader, rules=rules, timeout=timeout, keep_workers=True))
    return _PROCESS_POOL[1]


def decode_files(tasks: list[DecodeTask], *, loader: Loader | None, rules: SelectionRules | None,
                 timeout: float | None, isolate: bool) -> list[Decoded]:
    """One :class:`Decoded` per task, in task order: through :func:`process_pool` (crash-isolated,
    ``timeout`` per file) or, without ``isolate``, in this process (as ``workers=0`` does locally)."""
    if not isolate:
        return list(decode_inline(tasks, loader=loader, rules=rules))
    by_index = {d.index: d for d in process_pool(loader, rules, timeout).run(tasks)}
    return [by_index[t.index] for t in tasks]


def decode_stream(items: Iterable[SourceItem | str | os.PathLike], *, workers: int, loader: Loader | None = None,
                  rules: SelectionRules | None = None, depth: int = 2, timeout: float | None = 120.0,
                  nice: int = 0) -> tuple[Generator[Decoded, None, None], DecodePool | None]:
    """One :class:`Decoded` per item (completion order with workers, input order without) and the
    pool (``None`` for ``workers=0``), whose ``restarts`` count is valid once the stream is done.
    ``nice``: the worker processes' niceness (:class:`DecodePool`).

    A plain path stands for :meth:`SourceItem.of_path` (its key is the path's text, as given).
    """
    tasks = (to_task(i, item) for i, item in enumerate(items))
    if workers > 0:
        pool = DecodePool(workers, loader=loader, rules=rules, depth=depth, timeout=timeout, nice=nice)
        return pool.run(tasks), pool
    return decode_inline(tasks, loader=loader, rules=rules), None


def to_task(index: int, item: SourceItem | str | os.PathLike) -> DecodeTask:
    """The worker's view of an item: path as text or the bytes, never the item's other fields."""
    if not isinstance(item, SourceItem):
        item = SourceItem.of_path(item)
    if item.skip is not None:
        raise ValueError(f"{item.key}: an unread entry ({item.skip}) is not decoded; record it instead")
    return DecodeTask(index, item.key, None if item.path is None else str(item.path), item.data)
