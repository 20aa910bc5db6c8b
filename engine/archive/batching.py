"""Group a stream of decoded items into inference batches.

Two pressures pull in opposite directions: the encoder is most efficient on full batches, but a
streaming caller (a PACS listener, or the tail of an archive while the decoders drain) must not
wait forever for a batch to fill. :class:`Batcher` therefore closes a batch when it is full *or*
when ``max_wait`` seconds have passed since its first item arrived, whichever comes first.

Items are never reordered, split or duplicated: a batch is a tuple of the original items, so the
inference stage attaches row ``i`` of the model output to ``batch.items[i]`` and results can
never be attributed to another image.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

#: Put this on the queue to tell :meth:`Batcher.from_queue` that the stream has ended.
END = object()
IDLE_POLL_S = 0.5  # s between ``idle`` calls while :meth:`Batcher.from_queue` waits


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Consecutive stream items (1 ≤ len ≤ batch_size), in arrival order."""

    items: tuple[T, ...]
    index: int  # 0, 1, 2, ... in the order batches were closed

    def __len__(self) -> int:
        return len(self.items)


class Batcher(Generic[T]):
    """Closes a batch when ``batch_size`` items are collected or ``max_wait`` s after its first item."""

    def __init__(self, batch_size: int, max_wait: float | None = 0.05) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if max_wait is not None and max_wait < 0:
            raise ValueError(f"max_wait must be ≥ 0 or None, got {max_wait}")
        self.batch_size = batch_size
        self.max_wait = max_wait
        self._count = 0

    def _close(self, items: list[T]) -> Batch[T]:
        batch = Batch(tuple(items), self._count)
        self._count += 1
        return batch

    def from_iterable(self, items: Iterable[T]) -> Iterator[Batch[T]]:
        """Batches from a pull-based source; no latency bound is needed since pulling never idles."""
        buf: list[T] = []
        for item in items:
            buf.append(item)
            if len(buf) == self.batch_size:
                yield self._close(buf)
                buf = []
        if buf:
            yield self._close(buf)

    def from_queue(self, q: queue.Queue, end: object = END, *,
                   idle: Callable[[], None] | None = None) -> Iterator[Batch[T]]:
        """Batches from a push-based queue, ending when ``end`` is received.

        Waits as long as it takes for the *first* item of a batch (an idle stream yields nothing),
        then at most ``max_wait`` seconds for the rest; ``max_wait=None`` waits for full batches.
        ``idle`` is called every :data:`IDLE_POLL_S` of waiting and may raise to end the wait (a
        stall watchdog's check: an upstream stage that never delivers must not hang the consumer).
        """

        def get(timeout: float | None = None) -> object:
            if timeout is not None or idle is None:
                return q.get(timeout=timeout)
            while True:
                try:
                    return q.get(timeout=IDLE_POLL_S)
                except queue.Empty:
                    idle()

        while True:
            first = get()
            if first is end:
                return
            buf: list[T] = [first]
            deadline = None if self.max_wait is None else time.monotonic() + self.max_wait
            ended = False
            while len(buf) < self.batch_size:
                try:
                    if deadline is None:
                        item = get()
                    else:
                        left = deadline - time.monotonic()
                        item = q.get_nowait() if left <= 0 else q.get(timeout=left)
                except queue.Empty:
                    break
                if item is end:
                    ended = True
                    break
                buf.append(item)
            yield self._close(buf)
            if ended:
                return
