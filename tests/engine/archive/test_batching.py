"""Batcher: full batches, the latency bound for streams, and no lost/reordered/mixed items."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from radflash.archive.batching import END, Batcher


@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (17, 4), (16, 4), (5, 1), (3, 16)])
def test_from_iterable_sizes_and_order(n: int, size: int) -> None:
    batches = list(Batcher(size).from_iterable(range(n)))
    assert [x for b in batches for x in b.items] == list(range(n))
    assert all(1 <= len(b) <= size for b in batches)
    assert all(len(b) == size for b in batches[:-1])  # only the last may be short
    assert [b.index for b in batches] == list(range(len(batches)))


def test_from_queue_full_batches_when_items_are_ready() -> None:
    q: queue.Queue = queue.Queue()
    for i in range(10):
        q.put(i)
    q.put(END)
    batches = list(Batcher(4, max_wait=10.0).from_queue(q))
    assert [b.items for b in batches] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]


def test_from_queue_latency_bound_closes_partial_batch() -> None:
    """A trickling stream must not wait for a full batch: the first batch leaves after ~max_wait."""
    q: queue.Queue = queue.Queue()
    out: list[tuple[float, tuple]] = []
    t0 = time.monotonic()

    def consume() -> None:
        for b in Batcher(8, max_wait=0.1).from_queue(q):
            out.append((time.monotonic() - t0, b.items))

    th = threading.Thread(target=consume)
    th.start()
    q.put("a")
    q.put("b")
    time.sleep(0.6)  # far longer than max_wait: the partial batch must already be out
    assert len(out) == 1 and out[0][1] == ("a", "b")
    assert out[0][0] < 0.5
    q.put("c")
    q.put(END)
    th.join(timeout=5)
    assert [items for _, items in out] == [("a", "b"), ("c",)]


def test_from_queue_no_max_wait_waits_for_full_batch() -> None:
    q: queue.Queue = queue.Queue()
    out: list[tuple] = []
    th = threading.Thread(target=lambda: out.extend(b.items for b in Batcher(3, max_wait=None).from_queue(q)))
    th.start()
    q.put(1)
    q.put(2)
    time.sleep(0.2)
    assert out == []
    q.put(3)
    q.put(4)
    q.put(END)
    th.join(timeout=5)
    assert out == [(1, 2, 3), (4,)]


def test_from_queue_concurrent_producers_never_lose_or_duplicate() -> None:
    q: queue.Queue = queue.Queue(maxsize=5)  # bounded, as in the pipeline

    def produce(start: int) -> None:
        for i in range(start, start + 200):
            q.put(i)
            if i % 37 == 0:
                time.sleep(0.01)

    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(3)]
    for p in producers:
        p.start()
    closer = threading.Thread(target=lambda: ([p.join() for p in producers], q.put(END)))
    closer.start()
    batches = list(Batcher(7, max_wait=0.005).from_queue(q))
    closer.join()
    items = [x for b in batches for x in b.items]
    assert sorted(items) == sorted(k * 1000 + i for k in range(3) for i in range(200))
    assert all(1 <= len(b) <= 7 for b in batches)
    for k in range(3):  # each producer's items keep their order
        mine = [x for x in items if x // 1000 == k]
        assert mine == sorted(mine)


def test_empty_stream_yields_nothing() -> None:
    q: queue.Queue = queue.Queue()
    q.put(END)
    assert list(Batcher(4).from_queue(q)) == []


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2, "max_wait": -1.0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Batcher(**kwargs)
