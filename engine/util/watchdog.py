"""A stall watchdog over a whole run: no verb may hang, and a stalled run names the stage that stalled.

Every wait in a run has its own bound where one can be set (a file's decode ``--timeout``, HTTP
timeouts, worker start-up), but a run is more than its waits: a stage can block in a library
call that offers no timeout (an NFS write, a Ray pipeline whose actors never get a CPU, a native
deadlock), and everything downstream of it then waits politely forever. The watchdog is the
backstop: stages report each step they take (:meth:`Watchdog.step`, :meth:`Watchdog.beat`), and
when **no stage has finished a step for** :func:`stall_limit` seconds — 3 × ``--timeout``, at
least 60 s — the run is stopped with one line naming the stage that has been busy longest (the
innermost step of its thread: a source retrieval inside a decode wait is the source's fault).

How the run is stopped: the consumer loops of the verbs wait in slices (:meth:`Watchdog.guard`,
:meth:`Watchdog.check`) and raise :class:`Stalled` on their own thread, so committed parts stay
as they are and ``--resume`` finishes the run; ``on_stall`` callbacks unblock what they can (the
decode pool kills its workers). A thread stuck in native code cannot be interrupted at all, so
with ``hard_exit_after`` the watchdog prints the same line and ends the process (exit code
:data:`STALL_EXIT_CODE`) if the run has not stopped that many seconds after the stall: what was
committed is on disk either way.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from radflash.errors import RadflashError

log = logging.getLogger("radflash.watchdog")

T = TypeVar("T")

STALL_FACTOR = 3  # × --timeout: a stage may take a few per-file timeouts' worth before it counts as stalled
MIN_STALL_S = 60.0  # never less: worker start-up and a first batch on a slow CPU take tens of seconds
DEFAULT_TIMEOUT_S = 120.0  # the per-file timeout the limit derives from when a run has none
STALL_EXIT_CODE = 70  # EX_SOFTWARE: the process was ended by the watchdog (hard_exit_after)

# Seconds a stalled run gets to stop on its own before the watchdog ends the process: as long again
# as the stall limit, at most this. None in a library (ending a caller's process is not radflash's
# to decide); the `radflash` command owns its process and sets CLI_HARD_EXIT_S (radflash.cli.main).
HARD_EXIT_AFTER: float | None = None
CLI_HARD_EXIT_S = 30.0


class Stalled(RadflashError):
    """A run made no progress for :func:`stall_limit` seconds; the message names the stage."""


def stall_limit(timeout: float | None, stall_after: float | None = None) -> float:
    """Seconds without any finished step after which a run counts as stalled (see the module doc):
    ``stall_after`` when the run names one, else derived from its per-file ``timeout``."""
    if stall_after is not None:
        return stall_after
    per_file = timeout if timeout is not None and timeout > 0 else DEFAULT_TIMEOUT_S
    return max(STALL_FACTOR * per_file, MIN_STALL_S)


class Watchdog:
    """Watches one run; use as a context manager (``with Watchdog(limit) as dog:``).

    ``limit=None`` watches nothing (every method still works, :meth:`check` never raises).
    """

    def __init__(self, limit: float | None, *, what: str = "run", hard_exit_after: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.what = what
        if hard_exit_after is None and HARD_EXIT_AFTER is not None and limit is not None:
            hard_exit_after = min(HARD_EXIT_AFTER, limit)
        self.hard_exit_after = hard_exit_after
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        self._busy: dict[int, list[tuple[str, float]]] = {}  # thread id → its nested steps (stage, since)
        self._on_stall: list[Callable[[], None]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalled: str | None = None  # the one-line message once the run has stalled

    # ---- reporting -----------------------------------------------------------------------------
    def beat(self) -> None:
        """Something moved (a file decoded, a record committed, …)."""
        self._last = self._clock()

    @contextmanager
    def step(self, stage: str) -> Iterator[None]:
        """One step of ``stage`` on this thread: busy inside, a beat when it ends."""
        me = threading.get_ident()
        with self._lock:
            self._busy.setdefault(me, []).append((stage, self._clock()))
        try:
            yield
        finally:
            with self._lock:
                steps = self._busy.get(me)
                if steps:
                    steps.pop()
                    if not steps:
                        del self._busy[me]
            self.beat()

    def track(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """``items``, each ``next`` a :meth:`step` of ``stage`` (on the consuming thread)."""
        it = iter(items)
        end = object()
        while True:
            with self.step(stage):
                item = next(it, end)
            if item is end:
                return
            yield item  # type: ignore[misc]

    def on_stall(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the watchdog's thread) when the run stalls: unblock what can be."""
        self._on_stall.append(callback)

    # ---- acting ----------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`Stalled` on the calling thread once the run has stalled."""
        if self.stalled is not None:
            raise Stalled(self.stalled)

    def guard(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """``items``, produced on a helper thread (each ``next`` a :meth:`step` of ``stage``) and
        waited for here in slices, so a producer that blocks forever cannot take the caller with it.

        The helper thread closes ``items`` (a generator's ``finally`` runs there, where it ran)
        when the caller stops early; after :class:`Stalled` it is abandoned where it blocks (a daemon).
        """
        handoff: queue.Queue = queue.Queue(maxsize=1)
        done, failed = object(), object()
        leave = threading.Event()

        def produce() -> None:
            it = iter(items)
            try:
                while not leave.is_set():
                    try:
                        with self.step(stage):
                            item = next(it, done)
                    except BaseException as exc:  # re-raised on the consumer's thread
                        item, payload = failed, exc
                    else:
                        payload = None
                    while not leave.is_set():
                        try:
                            handoff.put((item, payload), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if item is done or item is failed:
                        return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        worker = threading.Thread(target=produce, name=f"radflash-{stage}", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    item, payload = handoff.get(timeout=0.5)
                except queue.Empty:
                    self.check()
                    continue
                self.check()  # once stalled, a run is stopped: the consumer's own step may have stalled it
                if item is done:
                    return
                if item is failed:
                    raise payload
                yield item
        finally:
            leave.set()

    def _culprit(self, now: float) -> tuple[str, float] | None:
        """The stage busy longest, counting only each thread's innermost step."""
        with self._lock:
            innermost = [steps[-1] for steps in self._busy.values() if steps]
        if not innermost:
            return None
        stage, since = min(innermost, key=lambda s: s[1])
        return stage, now - since

    def _watch(self) -> None:
        assert self.limit is not None
        tick = min(1.0, self.limit / 10)
        while not self._done.wait(tick):
            now = self._clock()
            idle = now - self._last
            if idle < self.limit:
                continue
            culprit = self._culprit(now)
            where = (f"the {culprit[0]} stage has been busy for {culprit[1]:.0f} s" if culprit is not None
                     else "every stage is waiting on another")
            self.stalled = (f"{self.what} stalled: nothing finished for {idle:.0f} s ({where}); "
                            f"committed results are kept, rerun with --resume to finish")
            log.error("%s", self.stalled)
            for callback in self._on_stall:
                try:
                    callback()
                except Exception as exc:  # unblocking is best effort; the stall is reported anyway
                    log.debug("on_stall callback failed: %s", exc)
            if self.hard_exit_after is not None and not self._done.wait(self.hard_exit_after):
                # a thread is stuck where no exception reaches it: end the process, saying why
                print(f"Error: {self.stalled} (the process was ended)", file=sys.stderr, flush=True)
                os._exit(STALL_EXIT_CODE)
            return

    def start(self) -> Watchdog:
        """Start watching (a no-op without a limit); :meth:`stop` ends it."""
        if self.limit is not None and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="radflash-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
