"""The stall watchdog: a run that stops moving ends with one line naming the stage (never hangs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from radflash.util.watchdog import MIN_STALL_S, STALL_FACTOR, Stalled, Watchdog, stall_limit


def test_stall_limit_is_a_multiple_of_the_timeout_with_a_floor() -> None:
    assert stall_limit(300.0) == STALL_FACTOR * 300.0
    assert stall_limit(1.0) == MIN_STALL_S
    assert stall_limit(None) == stall_limit(0) == STALL_FACTOR * 120.0


def wait_for_stall(dog: Watchdog, within: float) -> str:
    deadline = time.monotonic() + within
    while dog.stalled is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dog.stalled is not None, f"no stall reported within {within} s"
    return dog.stalled


def test_progress_keeps_a_run_alive_and_silence_stops_it() -> None:
    with Watchdog(0.6, what="score") as dog:
        for _ in range(8):  # 1.6 s of steady progress: never stalled
            with dog.step("decode"):
                time.sleep(0.2)
            dog.check()
        release = threading.Event()

        def stuck_write() -> None:
            with dog.step("sink"):
                release.wait(30)

        busy = threading.Thread(target=stuck_write)
        busy.start()
        message = wait_for_stall(dog, 5.0)
        release.set()
        busy.join()
    assert message.startswith("score stalled: nothing finished for ") and "the sink stage has been busy" in message
    assert "--resume" in message and "\n" not in message
    with pytest.raises(Stalled, match="sink stage"):
        dog.check()


def test_the_innermost_step_of_a_thread_is_named() -> None:
    """A source retrieval inside a decode wait is the source's fault, not the decoder's."""
    release = threading.Event()

    def nested() -> None:
        with dog.step("decode"), dog.step("source"):
            release.wait(30)

    with Watchdog(0.5) as dog:
        worker = threading.Thread(target=nested)
        worker.start()
        message = wait_for_stall(dog, 5.0)
        release.set()
        worker.join()
    assert "the source stage" in message


def test_on_stall_callbacks_run_and_a_failing_one_does_not_hide_the_stall() -> None:
    called: list[str] = []

    def broken() -> None:
        raise OSError("cannot")

    with Watchdog(0.3) as dog:
        dog.on_stall(broken)
        dog.on_stall(lambda: called.append("killed"))
        wait_for_stall(dog, 5.0)
        deadline = time.monotonic() + 5
        while not called and time.monotonic() < deadline:
            time.sleep(0.05)
    assert called == ["killed"]


def forever(first: list[int], gate: threading.Event) -> Iterator[int]:
    yield from first
    gate.wait(60)  # a producer that stops delivering (a stuck network read, a dead cluster)
    yield -1


def test_guard_frees_the_consumer_of_a_producer_that_blocks() -> None:
    gate = threading.Event()
    got: list[int] = []
    t0 = time.monotonic()
    with Watchdog(0.8, what="segment") as dog, pytest.raises(Stalled, match="the ray stage"):
        for item in dog.guard(forever([1, 2, 3], gate), "ray"):
            got.append(item)
    gate.set()
    assert got == [1, 2, 3]
    assert time.monotonic() - t0 < 10


def test_guard_passes_items_errors_and_closes_its_source_on_its_own_thread() -> None:
    closed_on: list[str] = []

    def numbers() -> Iterator[int]:
        try:
            yield from range(5)
            raise ValueError("bad item")
        finally:
            closed_on.append(threading.current_thread().name)

    with Watchdog(5.0) as dog:
        got = []
        with pytest.raises(ValueError, match="bad item"):
            for item in dog.guard(numbers(), "decode"):
                got.append(item)
        assert got == [0, 1, 2, 3, 4]
        stream = dog.guard(numbers(), "decode")
        assert next(stream) == 0
        stream.close()  # the consumer stops early: the producer thread closes the generator
        deadline = time.monotonic() + 5
        while len(closed_on) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert closed_on == ["radflash-decode", "radflash-decode"]


def test_no_limit_watches_nothing() -> None:
    with Watchdog(None) as dog:
        with dog.step("inference"):
            time.sleep(0.05)
        dog.check()
        assert list(dog.guard(iter([1, 2]), "x")) == [1, 2]
    assert dog.stalled is None
