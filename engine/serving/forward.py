"""Scored instances → their results (DICOM SR; with ``--segment`` also SEG and overlay SC) held by
every ``--forward`` target.

One :class:`Lane` per target, each with its own thread and retry heap, so a target that is down
delays only its own deliveries. A delivery that fails is retried with exponential backoff
(``backoff``·2ⁿ, at most ``max_backoff``) up to ``retries`` times, then written to the dead-letter
table (``radflash serve --status`` lists it, ``--retry-dead`` resends). Result UIDs are derived
from the source SOP Instance UID and the model hash (:func:`radflash.dicomout.uids.sr_uids`; a SEG's
and an SC's also from the prompt set: :func:`~radflash.dicomout.uids.seg_uids`), so a
resend after a crash or a retry after a lost answer replaces the object, never duplicates it; no
"does it exist" query is needed before sending.

Transports are the ones ``score --store`` uses: :class:`radflash.archive.stow.Stower` (STOW-RS) and
:class:`radflash.archive.dimse_store.DimseStore` (C-STORE), each with its own retries off (this
module owns the retry policy, so a down target never holds a lane in a sleep loop).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radflash.serving.journal import Instance, Journal
from radflash.serving.options import ForwardOptions, forward_kind

log = logging.getLogger("radflash.serving")


class Reports:
    """Each instance's SR, built once and kept as bytes for the other lanes (at most ``size`` of them).

    Building an SR costs ~70 ms of one core and writing highdicom's dataset another ~20 ms, while
    reading the written bytes back and writing them again costs ~1.5 ms (measured 2026-12-08, Zen 4,
    7 findings): with two targets every SR was built twice. Each lane gets its own dataset, read from
    the bytes, so no two threads share one; every target gets the very same SR (one creation time).
    Two lanes that miss at once both build it; the later bytes replace the earlier, harmlessly.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._bytes: dict[str, bytes] = {}  # insertion order: the oldest is evicted first
        self._lock = threading.Lock()
        self.built = 0

    def sr(self, inst: Instance) -> Any:
        import io

        import pydicom

        with self._lock:
            data = self._bytes.get(inst.sop)
        if data is None:
            buf = io.BytesIO()
            _build_sr(inst).save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            with self._lock:
                self.built += 1
                self._bytes[inst.sop] = data
                while len(self._bytes) > self.size:
                    del self._bytes[next(iter(self._bytes))]
        return pydicom.dcmread(io.BytesIO(data))


def _build_sr(inst: Instance) -> Any:
    """One instance's SR (TID 1500) from the journal's result and the spooled header."""
    import pydicom

    from radflash.archive.pipeline import PromptSet
    from radflash.archive.sinks import FileRecord
    from radflash.archive.stow import build_sr

    r = inst.result
    assert r is not None  # results_of refused an instance without one
    header = pydicom.dcmread(inst.file, stop_before_pixels=True, force=True)
    record = FileRecord(path=inst.sop, status="scored", sop_instance_uid=inst.sop, study_instance_uid=inst.study,
                        series_instance_uid=inst.series, logits=tuple(r["logits"]), probs=tuple(r["probs"]),
                        positive=None if r.get("positive") is None else tuple(r["positive"]))
    prompts = PromptSet(tuple(r["names"]), tuple(r["prompts"]), tuple(r["thresholds"]))
    return build_sr(header, record, prompts, model_id=r["model_id"], model_sha256=r["model_sha256"],
                    version=r["version"], family=r.get("family", ""))


def results_of(inst: Instance, root: Path, reports: Reports) -> list[Any]:
    """The DICOM objects for one scored instance: its SR (TID 1500), from the journal's result and
    the spooled header (built once in ``reports``, which every lane shares), then its SEG and overlay SC
    (``--segment``), read from the files the result names under the state folder ``root`` (no model
    needed). A named file that is gone raises: the delivery is retried, then dead-lettered, never
    sent without it."""
    import pydicom

    if inst.result is None:
        raise ValueError(f"instance {inst.sop} has no result")
    return [reports.sr(inst), *(pydicom.dcmread(root / rel) for rel in inst.result.get("objects", ()))]


class Transport:
    """``send(datasets)`` to one target; raises on failure (the lane decides about retries)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.kind = forward_kind(url)
        self.timeout = timeout
        self._store: Any = None

    def _open(self) -> Any:
        if self.kind == "stow":
            from radflash.archive.stow import Stower
            from radflash.io.dicomweb import Policy

            return Stower(self.url, policy=Policy(timeout=self.timeout, retries=0))
        from radflash.archive.dimse_store import DimseStore
        from radflash.io.dimse import Policy as DimsePolicy

        t = self.timeout
        return DimseStore(self.url, policy=DimsePolicy(connect_timeout=min(10.0, t), acse_timeout=t, dimse_timeout=t,
                                                       network_timeout=t, retries=0, associations=1))

    def send(self, datasets: list[Any]) -> None:
        if self._store is None:
            self._store = self._open()
        try:
            self._store.store(datasets)
        except Exception:
            self.close()  # a fresh connection for the next attempt
            raise

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None and hasattr(store, "close"):
            try:
                store.close()
            except Exception as exc:  # closing a broken association is best effort
                log.debug("closing %s: %s", self.url, exc)


class Lane:
    """Deliveries to one target, in due order, on one thread."""

    def __init__(self, url: str, journal: Journal, options: ForwardOptions, metrics: Any,
                 on_done: Callable[[Instance], None], reports: Reports) -> None:
        self.url = url
        self.transport = Transport(url, options.timeout)
        self.reports = reports
        self.journal, self.options, self.metrics, self.on_done = journal, options, metrics, on_done
        self._heap: list[tuple[float, int, str, int]] = []  # (due, seq, sop, attempts so far)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._sending = 0
        self._thread = threading.Thread(target=self._run, name="radflash-serve-forward", daemon=True)

    def submit(self, sop: str, attempts: int = 0, delay: float = 0.0) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), sop, attempts))
            self._cond.notify()

    def busy(self) -> bool:
        with self._cond:
            return bool(self._heap) or self._sending > 0

    def next_due(self) -> float | None:
        with self._cond:
            return self._heap[0][0] if self._heap else None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout)
        self.transport.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._cond.wait(timeout=1.0 if wait is None else max(0.0, min(wait, 1.0)))
                if self._stop:
                    return
                _, _, sop, attempts = heapq.heappop(self._heap)
                self._sending += 1
            try:
                self._deliver(sop, attempts)
            finally:
                with self._cond:
                    self._sending -= 1

    def _deliver(self, sop: str, attempts: int) -> None:
        inst = self.journal.instance(sop)
        if inst is None or inst.state not in ("scored", "dead"):
            return  # already delivered (a duplicate submission) or gone
        try:
            self.transport.send(results_of(inst, self.journal.root, self.reports))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            dead = attempts >= self.options.retries
            self.journal.forward_failed(sop, self.url, reason, dead=dead)
            if dead:
                self.metrics.dead_letters.labels(self.url).inc()
                log.warning("forward to %s: %s; given up after %d attempts (dead letter; --retry-dead resends)",
                            self.url, reason, attempts + 1)
                return
            delay = min(self.options.max_backoff, self.options.backoff * 2 ** attempts)
            self.metrics.forward_retries.labels(self.url).inc()
            log.info("forward to %s: %s; retry %d in %.1f s", self.url, reason, attempts + 1, delay)
            self.submit(sop, attempts + 1, delay)
            return
        self.metrics.forwarded.labels(self.url).inc()
        if self.journal.forward_done(sop, self.url):
            self.on_done(inst)


class Forwarder:
    """One :class:`Lane` per target."""

    def __init__(self, journal: Journal, options: ForwardOptions, metrics: Any,
                 on_done: Callable[[Instance], None]) -> None:
        self.reports = Reports()  # one SR per instance, whatever the number of targets
        self.lanes = {url: Lane(url, journal, options, metrics, on_done, self.reports) for url in options.targets}

    def submit(self, sop: str, target: str | None = None, attempts: int = 0) -> None:
        for url, lane in self.lanes.items():
            if target is None or target == url:
                lane.submit(sop, attempts)

    def busy(self) -> bool:
        return any(lane.busy() for lane in self.lanes.values())

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()

    def stop(self, timeout: float = 10.0) -> None:
        for lane in self.lanes.values():
            lane.stop(timeout)


def resend_dead(journal: Journal, options: ForwardOptions, *, metrics: Any = None) -> dict[str, int]:
    """``--retry-dead``: every dead delivery once more, now, in this process (no model needed);
    what fails again stays dead. Returns counts."""
    from radflash.serving.metrics import Metrics

    metrics = metrics or Metrics()
    dead = journal.dead()
    journal.retry_dead()
    sent = failed = 0
    reports = Reports()
    transports: dict[str, Transport] = {}
    for sop, target, _, _ in dead:
        inst = journal.instance(sop)
        if inst is None:
            continue
        transport = transports.setdefault(target, Transport(target, options.timeout))
        try:
            transport.send(results_of(inst, journal.root, reports))
        except Exception as exc:
            journal.forward_failed(sop, target, f"{type(exc).__name__}: {exc}".splitlines()[0], dead=True)
            failed += 1
            continue
        journal.forward_done(sop, target)
        sent += 1
    for t in transports.values():
        t.close()
    return {"resent": sent, "still_dead": failed}
