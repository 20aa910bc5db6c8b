"""``radflash serve``: a hospital AI node. Intake → journal → groups → batches → model → forward.

::

    C-STORE SCP ─┐                         ┌─ Scheduler ──────────┐
                 ├─► receive ─► Journal ──►│ groups (quiet period) │─► Batcher ─► decode ─► Scorer ─┐
    STOW-RS  ────┘   (admit, header       │ priority queue        │   (max batch,  (DecodePool)     │
                      check, spool+fsync,  └───────────────────────┘    max delay)                   │
                      row committed,                                                                 ▼
                      then "stored")              Forwarder lanes (SR per instance, retries) ◄── Journal.scored
                                                    └─► STOW-RS / C-STORE targets; dead letters

The stages are ``score``'s: :func:`radflash.archive.decode_pool.decode_one` in a
:class:`~radflash.archive.decode_pool.DecodePool` (crash-isolated, per-file timeout),
:func:`~radflash.archive.decode_pool.resize_for_model`, :class:`radflash.archive.batching.Batcher`
and :class:`radflash.archive.pipeline.Scorer`, and the SR builder and stores of ``score --store``;
only the scheduling differs (a queue fed by the network, a latency bound on partial batches).

With ``--segment PROMPT…`` each scored instance also gets a DICOM SEG (one segment per prompt) and,
with ``--overlay sc``, an overlay Secondary Capture. They are ``segment``'s: the Scorer's batch
observer hands over the image tokens the scorer has just computed, and
:func:`radflash.segment.verb.segment_one` makes the maps and masks from them at the source's own
size and writes both objects through ``segment``'s :class:`~radflash.segment.output.OutputWriter`
(built by :mod:`radflash.dicomout`, UIDs from the source instance, the model hash and the prompt set:
:func:`radflash.dicomout.uids.seg_uids`). The files go to ``STATE/results/<key>/`` and are fsync'd
before the instance is journaled as scored, so a restart or ``--retry-dead`` resends the same
objects without the model, and a resend replaces them on the target, never duplicates them.

Nothing acknowledged is lost: the journal holds every accepted instance until its results are held
by every target; :meth:`Node.start` re-queues whatever a crash interrupted (queued, assembling, in a
batch, or scored and not yet forwarded). :meth:`Node.drain` (SIGTERM) stops intake, finishes and
forwards what is in flight within a grace period, and leaves the rest to the next start. A batch
that stalls (no decode or inference step finished for the watchdog's limit) marks the node
unhealthy (``/health`` 503) and, under the CLI, ends the process so a supervisor restarts it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from radflash.serving.forward import Forwarder
from radflash.serving.intake import OUT_OF_RESOURCES, inspect
from radflash.serving.journal import Instance, Journal
from radflash.serving.metrics import Metrics
from radflash.serving.options import ServeOptions
from radflash.serving.scheduler import Scheduler, Work

log = logging.getLogger("radflash.serving")
SCORE_TIMEOUT_S = 300.0  # POST /v1/score waits at most this long for its batch


@dataclass(frozen=True)
class Receipt:
    """What intake answers for one instance: ``code`` 0 stored, else a C-STORE failure status."""

    code: int
    reason: str | None = None
    sop: str | None = None
    sop_class: str | None = None
    outcome: str = "stored"  # stored | duplicate | refused | busy


class Node:
    """One serving node over one state folder (see the module doc)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.journal: Journal | None = None
        self.model: Any = None
        self.scheduler = Scheduler(options.schedule.group, options.schedule.quiet_period)
        self.forwarder: Forwarder | None = None
        self.dimse: Any = None
        self.http: Any = None
        self.accepting = False
        self.stalled: str | None = None
        self._waiting = 0  # admitted and not yet through the model (what --max-queue caps)
        self._admit = threading.Lock()
        self._infer_thread: threading.Thread | None = None
        self._busy_batch = 0
        self._pool: Any = None
        self._watchdog: Any = None
        self._stopping = False
        self.metrics.queue_depth.set_function(lambda: self._waiting)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> Node:
        from radflash import __version__
        from radflash.archive.pipeline import Scorer
        from radflash.archive.verb import resolve_findings
        from radflash.io.selection import SelectionRules
        from radflash.util.watchdog import Watchdog, stall_limit

        o = self.options
        _import_before_threads(o)
        self.journal = Journal(o.state)
        self.prompts = resolve_findings(o.findings)
        self.model = o.model.load(batch_size=o.schedule.max_batch)  # auto: timed at the largest batch
        self.seg_specs: tuple[Any, ...] = ()
        if o.segment:
            from radflash.segment.prompts import resolve_prompts

            self.model.require_maps()  # a family without maps fails at start, not once per instance
            self.seg_specs = resolve_prompts(list(o.segment), calibration=self.model.calibration,
                                             default_prompts=self.model.default_prompts)
            self.model.encode_text([s.prompt for s in self.seg_specs])  # validated and cached once
        self._batch: dict[int, tuple[Work, Any]] = {}  # this batch's index → (work, full-size pixels)
        self._objects: dict[int, dict[str, Any]] = {}  # index → SEG/SC files (relative to STATE), notes
        self.scorer = Scorer(self.model, self.prompts, observer=self._segment_batch if self.seg_specs else None)
        self.rules = SelectionRules() if o.max_pixels is None else SelectionRules(max_pixels=o.max_pixels)
        self._result_base = {"model_id": self.model.model_id, "model_sha256": self.model.sha256,
                             "family": getattr(self.model, "family", ""), "version": __version__,
                             "names": list(self.prompts.names), "prompts": list(self.prompts.prompts),
                             "thresholds": list(self.prompts.thresholds)}
        if o.workers > 0:
            from radflash.archive.decode_pool import DECODE_NICE, DecodePool

            self._pool = DecodePool(o.workers, rules=self.rules, timeout=o.decode_timeout, keep_workers=True,
                                    nice=DECODE_NICE)  # the encoder's threads keep their cores (decode_pool)
        self.forwarder = Forwarder(self.journal, o.forward, self.metrics, self._delivered)
        requeued = 0
        for inst in self.journal.unfinished():  # queued, assembling or in a batch when the node stopped
            self._waiting += 1
            self.scheduler.add(self._work(inst))
            requeued += 1
        pending = self.journal.pending_forwards(o.forward.targets)
        for sop, target, attempts in pending:
            if target in self.forwarder.lanes:
                self.forwarder.lanes[target].submit(sop, attempts)
        if requeued or pending:
            log.warning("resuming: %d instance(s) re-queued, %d result deliver(ies) pending", requeued, len(pending))
        self._watchdog = Watchdog(stall_limit(o.decode_timeout), what="serve")
        self._watchdog.on_stall(self._on_stall)
        self._watchdog.start()
        if self._pool is not None:
            self._watchdog.on_stall(self._pool.kill)
        self.scheduler.start()
        self.forwarder.start()
        self._infer_thread = threading.Thread(target=self._infer_loop, name="radflash-serve-infer", daemon=True)
        self._infer_thread.start()
        self.accepting = True
        if o.intake.dicom_port is not None:
            from radflash.serving.intake_dimse import DimseIntake

            self.dimse = DimseIntake(self, o.intake)
            self.dimse.start()
        if o.intake.http_port is not None:
            from radflash.serving.http import HttpIntake

            self.http = HttpIntake(self, o.intake)
            self.http.start()
        self._write_node_file()
        return self

    def _write_node_file(self) -> None:
        info = {"dicom_port": self.dimse.port if self.dimse else None,
                "http_port": self.http.port if self.http else None,
                "model": {"id": self.model.model_id, "sha256": self.model.sha256},
                "options": dataclasses.asdict(self.options), "started": time.time()}
        (self.options.state / "node.json").write_text(json.dumps(info, indent=1, default=str))

    def _on_stall(self) -> None:
        self.stalled = self._watchdog.stalled if self._watchdog is not None else "stalled"

    def drain(self, grace: float | None = None) -> bool:
        """Stop intake, then finish and forward what is in flight for at most ``grace`` s.
        Returns True when nothing was left (the rest stays in the journal for the next start)."""
        grace = self.options.grace if grace is None else grace
        deadline = time.monotonic() + grace
        self.accepting = False
        if self.dimse is not None:
            self.dimse.stop()  # new associations are refused from here on
        self.scheduler.release_due(everything=True)  # no group waits for its quiet period any more
        clean = False
        while time.monotonic() < deadline:
            if self._waiting == 0 and not (self.forwarder and self._forwards_due_before(deadline)):
                clean = self._waiting == 0 and not (self.forwarder and self.forwarder.busy())
                break
            time.sleep(0.05)
        left = self._waiting
        log.warning("drained: %s", "nothing left" if clean else
                    f"{left} instance(s) not scored and some results not forwarded; they resume on the next start")
        return clean

    def _forwards_due_before(self, deadline: float) -> bool:
        """Whether a delivery is in progress or due before ``deadline`` (a retry due later is left)."""
        assert self.forwarder is not None
        for lane in self.forwarder.lanes.values():
            due = lane.next_due()
            if lane._sending or (due is not None and due < deadline):
                return True
        return False

    def stop(self) -> None:
        """Close intake and stop; what is still queued stays in the journal (re-queued on the next start)."""
        self.accepting = False
        self._stopping = True
        if self.dimse is not None:
            self.dimse.stop()
        if self.http is not None:
            self.http.stop()
        self.scheduler.close(abandon=True)
        if self._infer_thread is not None:
            self._infer_thread.join(timeout=30)
        if self.forwarder is not None:
            self.forwarder.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._pool is not None:
            self._pool.close()
        if self.journal is not None:
            self.journal.close()

    # ---- intake -------------------------------------------------------------------------------
    def busy(self) -> str | None:
        """Why the node cannot take an instance now (None: it can)."""
        if not self.accepting:
            return "not accepting (starting or draining)"
        if self._waiting >= self.options.schedule.max_queue:
            return f"queue full ({self._waiting} waiting)"
        free = shutil.disk_usage(self.options.state).free
        if free < self.options.intake.min_free_bytes:
            return f"disk below its watermark ({free >> 20} MB free)"
        return None

    def ready(self) -> tuple[bool, str | None]:
        if self.model is None:
            return False, "model not loaded"
        if self.stalled:
            return False, self.stalled
        why = self.busy()
        return why is None, why

    def refused(self, source: str, caller: str | None, reason: str, *, counted_as: str = "refused",
                sop: str | None = None) -> None:
        self.metrics.requests.labels(source, counted_as).inc()
        log.info("%s from %s refused: %s", source, caller, reason)
        if self.journal is not None:
            self.journal.reject(source=source, caller=caller, sop=sop, reason=reason)

    def _take_slot(self) -> str | None:
        with self._admit:
            why = self.busy()
            if why is None:
                self._waiting += 1
            return why

    def _free_slot(self) -> None:
        with self._admit:
            self._waiting -= 1

    def receive(self, data: bytes, *, source: str, caller: str | None, priority: int = 1) -> Receipt:
        """One instance's bytes from an intake → a durable, queued instance (or a refusal). Returns
        only once the bytes are fsync'd and the journal row is committed; never waits for the model."""
        assert self.journal is not None
        why = self._take_slot()
        if why is not None:
            self.metrics.requests.labels(source, "busy").inc()
            return Receipt(OUT_OF_RESOURCES, why, outcome="busy")
        queued = False
        try:
            limit = self.options.intake.max_instance_bytes
            if len(data) > limit:
                reason = f"instance of {len(data)} bytes is over the limit of {limit}"
                self.refused(source, caller, reason, counted_as="too_large")
                return Receipt(0xC000, reason, outcome="refused")
            tmp = self.journal.spool_bytes(data)
            seen = inspect(tmp, max_pixels=self.options.max_pixels)
            if seen.code:
                tmp.unlink(missing_ok=True)
                self.refused(source, caller, seen.reason or "refused", sop=seen.sop)
                return Receipt(seen.code, seen.reason, seen.sop, seen.sop_class, "refused")
            assert seen.sop and seen.study and seen.series
            outcome = self.journal.accept(tmp, sop=seen.sop, study=seen.study, series=seen.series,
                                          sop_class=seen.sop_class, priority=priority, source=source, caller=caller)
            self.metrics.requests.labels(source, "stored" if outcome != "duplicate" else "duplicate").inc()
            if outcome in ("new", "requeued"):
                inst = Instance(seen.sop, seen.study, seen.series, str(self.journal.path_of(seen.sop)), priority,
                                time.time())
                self.scheduler.add(self._work(inst))
                queued = True
            return Receipt(0, None, seen.sop, seen.sop_class, "stored" if outcome != "duplicate" else "duplicate")
        except OSError as exc:  # a full disk, a vanished state folder: the sender retries later
            log.error("%s intake: cannot keep an instance (%s)", source, exc.strerror or exc)
            self.metrics.requests.labels(source, "busy").inc()
            return Receipt(OUT_OF_RESOURCES, f"cannot store ({exc.strerror or type(exc).__name__})", outcome="busy")
        finally:
            if not queued:
                self._free_slot()

    @staticmethod
    def _work(inst: Instance) -> Work:
        return Work(inst.sop, inst.study, inst.series, inst.file, inst.priority, inst.received)

    def score_now(self, data: bytes, *, priority: int = 1) -> tuple[int, dict[str, Any]]:
        """``POST /v1/score``: one image through the same batches, answered with its probabilities."""
        why = self._take_slot()
        if why is not None:
            self.metrics.requests.labels("score", "busy").inc()
            return 503, {"error": why}
        w = Work(f"score-{uuid.uuid4().hex}", "", "", None, priority, time.time(), data=data, future=Future())
        self.metrics.requests.labels("score", "stored").inc()
        self.scheduler.add(w, group=False)
        try:
            status, reason, record = w.future.result(timeout=SCORE_TIMEOUT_S)  # type: ignore[union-attr]
        except FutureTimeout:
            return 504, {"error": f"no result within {SCORE_TIMEOUT_S:g} s"}
        if status != "scored":
            return 422, {"status": status, "reason": reason}
        findings = {}
        for i, name in enumerate(self.prompts.names):
            findings[name] = {"prompt": self.prompts.prompts[i], "logit": record.logits[i],
                              "probability": record.probs[i]}
            if record.positive is not None:
                findings[name]["positive"] = record.positive[i]
        return 200, {"status": "scored", "model": {"id": self.model.model_id, "sha256": self.model.sha256},
                     "findings": findings}

    # ---- the model ----------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        from radflash.archive.batching import Batcher

        s = self.options.schedule
        batcher: Batcher[Work] = Batcher(s.max_batch, s.max_queue_delay_ms / 1000.0)
        dog = self._watchdog
        for batch in batcher.from_queue(self.scheduler.ready, idle=dog.beat):
            if self._stopping:  # stop() abandons the queue: its instances stay queued in the journal
                return
            try:
                self._process(list(batch.items))
            except Exception as exc:  # a bug in one batch must not stop the node
                log.exception("batch of %d failed: %s", len(batch), exc)
                for w in batch.items:
                    self._finish(w, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0], None)

    def _process(self, items: list[Work]) -> None:
        from radflash.archive.decode_pool import Decoded, DecodeTask, decode_one, default_loader, resize_for_model
        from radflash.errors import InputError

        dog = self._watchdog
        t0 = time.monotonic()
        self._busy_batch = len(items)
        self.metrics.in_batch.set(len(items))
        self.metrics.batch_size.observe(len(items))
        for w in items:
            self.metrics.queue_time.observe(max(0.0, t0 - w.ready_at))
        tasks = [DecodeTask(i, w.sop, w.path, w.data) for i, w in enumerate(items)]
        with dog.step("decode"):
            if self._pool is not None:
                decoded = {d.index: d for d in self._pool.run(tasks)}
            else:
                loader = default_loader()
                decoded = {t.index: decode_one(t, loader, self.rules) for t in tasks}
        geometry = self.model.preprocessing.geometry
        loaded: list[Decoded] = []
        self._batch, self._objects = {}, {}
        for i in range(len(items)):
            d = decoded[i]
            if d.status == "loaded" and self.seg_specs and items[i].future is None:
                self._batch[i] = (items[i], d.pixels)  # SEG masks are made at the source's own size
            if d.status == "loaded":
                try:
                    d = Decoded(d.index, d.key, d.path, "loaded", None, resize_for_model(d.pixels, geometry),
                                d.meta, d.decode_s)
                except InputError as exc:
                    d = Decoded(d.index, d.key, d.path, "failed", str(exc).splitlines()[0], meta=d.meta)
                decoded[i] = d
            if d.status == "loaded":
                loaded.append(d)
        records = {}
        if loaded:
            with dog.step("inference"):
                for d, r in zip(loaded, self.scorer(loaded)):
                    records[d.index] = r
        self.metrics.compute_time.observe(time.monotonic() - t0)
        objects, self._batch, self._objects = self._objects, {}, {}
        for i, w in enumerate(items):
            d = decoded[i]
            self._finish(w, "scored" if i in records else d.status, d.reason, records.get(i), objects.get(i))
        self._busy_batch = 0
        self.metrics.in_batch.set(0)

    def _segment_batch(self, model: Any, prompts: Any, items: list[Any], tokens: Any, records: Any) -> None:
        """The Scorer's observer (same pass, tokens still in memory): each instance's SEG (and overlay
        SC) under ``STATE/results/<key>/``, made by ``segment``'s own functions, fsync'd. A failure
        is noted for that instance, whose SR still goes out."""
        import pydicom

        from radflash.segment.output import OutputWriter
        from radflash.segment.results import DecodedItem
        from radflash.segment.verb import segment_one

        assert self.journal is not None

        def header_of(item: DecodedItem) -> Any:  # the spooled instance's own header
            return pydicom.dcmread(item.source, stop_before_pixels=True, force=True)

        # one writer per batch; it keeps no per-study state (instance numbers derive from each source image)
        writer = OutputWriter(self.journal.results_root, model, self.seg_specs, ("dicom-seg",), False,
                              header_of=header_of, overlay=self.options.overlay)
        for j, d in enumerate(items):
            if d.index not in self._batch:
                continue
            w, pixels = self._batch[d.index]
            folder = self.journal.results_dir(w.sop)
            item = DecodedItem(d.index, str(w.path), pixels, d.meta)
            files: list[str] = []
            notes: list[str] = []
            try:
                result = segment_one(model, tokens[j:j + 1], item, folder.name, w.sop, self.seg_specs, writer)
                notes = [n for n in result.notes if "failed" in n]
                files = [f"{self.journal.results_root.name}/{result.files[k]}"
                         for k in ("dicom-seg", "overlay-sc") if k in result.files]
                _fsync_files([self.journal.root / f for f in files])
            except Exception as exc:  # this instance's SEG; its SR and the batch's others still go out
                notes.append(f"segment: failed ({type(exc).__name__}: {exc})".splitlines()[0])
            for n in notes:
                log.warning("instance %s: %s", folder.name[:12], n)  # the spool key, never patient data
            self._objects[d.index] = {"objects": files, "notes": notes}

    def _finish(self, w: Work, status: str, reason: str | None, record: Any,
                objects: dict[str, Any] | None = None) -> None:
        """One instance out of the model: journal it, start its deliveries, free its queue slot."""
        assert self.journal is not None and self.forwarder is not None
        if self._stopping and w.future is None:
            self._free_slot()  # past stop(): the journal keeps it queued for the next start
            return
        try:
            self.metrics.results.labels(status).inc()
            if w.future is not None:
                w.future.set_result((status, reason, record))
                return
            if status == "scored":
                result = dict(self._result_base, logits=list(record.logits), probs=list(record.probs),
                              positive=None if record.positive is None else list(record.positive))
                if objects is not None:  # SEG/overlay files, sent with the SR (radflash.serving.forward)
                    result.update(objects)
                targets = self.options.forward.targets
                self.journal.scored(w.sop, result, targets)
                if targets:
                    self.forwarder.submit(w.sop)
                else:
                    self.metrics.e2e.observe(max(0.0, time.time() - w.received))
            else:
                self.journal.finished(w.sop, status, reason)
        finally:
            self._free_slot()

    def _delivered(self, inst: Instance) -> None:
        self.metrics.e2e.observe(max(0.0, time.time() - inst.received))


def _fsync_files(paths: list[Any]) -> None:
    """Each file and its folder on disk before the journal says "scored": a crash after that commit
    must find the objects it names (they cannot be remade without the model)."""
    import os

    for path in paths:
        for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
            fd = os.open(target, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _import_before_threads(options: ServeOptions) -> None:
    """Import the DICOM stack on this thread before any worker thread starts: two threads importing
    pydicom at once can see it half-initialised (``module 'pydicom' has no attribute 'dcmread'``)."""
    import importlib

    import pydicom
    import pydicom.dataset  # noqa: F401

    from radflash.util.optional import require

    if options.intake.dicom_port is not None or any(t.lower().startswith("dimse://") for t in options.forward.targets):
        require("pynetdicom", extra="serve", purpose="radflash serve's C-STORE SCP and dimse:// targets")
    if options.forward.targets:
        require("highdicom", extra="serve", purpose="radflash serve's structured reports")
        importlib.import_module("radflash.archive.stow")
        importlib.import_module("radflash.archive.dimse_store")
        importlib.import_module("radflash.dicomout.sr")
    if options.segment:
        require("highdicom", extra="serve", purpose="radflash serve --segment (DICOM SEG)")
        for module in ("highdicom", "radflash.dicomout.seg", "radflash.dicomout.sc", "radflash.segment.verb",
                       "radflash.segment.output", "radflash.segment.writers"):
            importlib.import_module(module)
    if any(t.lower().startswith("dicomweb") for t in options.forward.targets):
        require("dicomweb_client", extra="serve", purpose="radflash serve's STOW-RS targets")
