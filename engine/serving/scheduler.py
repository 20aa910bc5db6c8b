"""Accepted instances → groups (quiet period) → a priority queue the :class:`Batcher` drains.

Instances wait in their group (the instance itself, its series or its study) until no instance of
that group has arrived for ``quiet_period`` seconds; the group is then released into a priority
queue, highest priority first (C-STORE Priority HIGH, an HTTP ``X-Priority: high``), arrival order
within a priority. The inference loop takes batches from that queue with
:meth:`radflash.archive.batching.Batcher.from_queue` (the same batcher as ``score``: up to
``max_batch`` items, waiting at most ``max_queue_delay_ms`` for a fuller batch).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from radflash.archive.batching import END


@dataclass
class Work:
    """One instance on its way to the model: a journal row (``path``), or for ``POST /v1/score``
    the request's bytes and the future its caller waits on (never journaled)."""

    sop: str
    study: str
    series: str
    path: str | None
    priority: int  # rank: 0 high, 1 medium, 2 low
    received: float  # epoch s (end-to-end latency starts here)
    data: bytes | None = None
    future: Future | None = field(default=None, repr=False)
    ready_at: float = 0.0  # monotonic s when released to the queue (queue time starts here)


class ReadyQueue(queue.PriorityQueue):
    """A priority queue whose ``get`` returns the item itself, so :meth:`Batcher.from_queue` can use
    it unchanged; entries are ``(rank, seq, item)``."""

    def _get(self) -> Any:
        return heapq.heappop(self.queue)[-1]


class Scheduler:
    """Groups with a quiet period in front of a :class:`ReadyQueue`; thread-safe."""

    def __init__(self, group: str, quiet_period: float) -> None:
        self.group = group
        self.quiet = quiet_period
        self.ready = ReadyQueue()
        self._seq = itertools.count()
        self._groups: dict[str, tuple[float, list[Work]]] = {}  # key → (last arrival, members)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def key(self, w: Work) -> str:
        return {"instance": w.sop, "series": w.series, "study": w.study}[self.group] or w.sop

    def add(self, w: Work, *, group: bool = True) -> None:
        """Queue ``w``: in its group, or (``group=False``, or no quiet period) straight to the queue."""
        if not group or self.quiet <= 0:
            self._release([w])
            return
        with self._lock:
            _, members = self._groups.get(self.key(w), (0.0, []))
            members.append(w)
            self._groups[self.key(w)] = (time.monotonic(), members)

    def _release(self, members: list[Work]) -> None:
        rank = min(w.priority for w in members)  # a group goes as fast as its most urgent member
        now = time.monotonic()
        for w in members:
            w.ready_at = now
            self.ready.put((rank, next(self._seq), w))

    def release_due(self, *, everything: bool = False) -> int:
        """Release the groups that have been quiet long enough (all of them with ``everything``)."""
        now = time.monotonic()
        with self._lock:
            due = [k for k, (last, _) in self._groups.items() if everything or now - last >= self.quiet]
            released = [self._groups.pop(k)[1] for k in due]
        for members in released:
            self._release(members)
        return sum(len(m) for m in released)

    def assembling(self) -> int:
        with self._lock:
            return sum(len(m) for _, m in self._groups.values())

    def depth(self) -> int:
        """Instances waiting: in groups still assembling and in the queue."""
        return self.assembling() + self.ready.qsize()

    def start(self) -> None:
        tick = max(0.01, min(0.1, self.quiet / 4 if self.quiet > 0 else 0.1))

        def run() -> None:
            while not self._stop.wait(tick):
                self.release_due()

        self._thread = threading.Thread(target=run, name="radflash-serve-groups", daemon=True)
        self._thread.start()

    def close(self, *, abandon: bool = False) -> None:
        """No more instances: stop the group timer and end the batcher's stream after what is queued
        (``abandon``: before it; what is left stays in the journal for the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.ready.put((-1 if abandon else 1 << 30, next(self._seq), END))
