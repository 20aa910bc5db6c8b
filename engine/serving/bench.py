"""``radflash bench serve``: load on a real node, receive → result-forwarded latency and throughput.

A node runs in this process on loopback with one forward target: a STOW-RS receiver in this process
that notes when each SR arrives (so the latency is the hospital's: from the first byte sent to
the result held by the target). Load is the demo chest films, each request a fresh SOP Instance
UID, over STOW-RS (one instance per request) or C-STORE (one association per sender):

* closed loop (``concurrency=N``): N senders, each waits for its result before sending again;
* open loop (``rates=[R, …]``): Poisson arrivals at R instances/s, whatever the node does.

Each load runs in windows of ``window`` s until it settles (:func:`verdict`) or ``max_windows``
have passed; the percentiles are over the results of its last three windows. A load is *steady*
when the throughputs of the last three windows agree within 10%, or, for an open loop, within the
spread Poisson arrivals alone give three windows of that many results (so a light load is not
called unsettled for its own randomness), and its queue gained no more than that noise; an open loop
is *overloaded* (and stops there) when its queue grew through the last three windows by more than
one window's arrivals: it would never settle, and its latencies only grow with the run's length.
Every load runs twice in the same process: as configured and with ``max_batch=1``, and the
throughput ratio (batching / no batching) is reported. With ``fractions`` the closed loop first
measures the batched node's capacity and the open loops run at those fractions of it (the same
rates at ``max_batch=1``). Each load gets a fresh node (a fresh state folder): an overloaded
load's backlog is abandoned with its node, never carried into the next load's numbers; what was
still waiting when a load ended is reported (``backlog``).
"""

from __future__ import annotations

import functools
import io
import json
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class LoadResult:
    label: str  # "closed N" or "open R/s"
    max_batch: int
    offered: float | None  # instances/s offered (open loop)
    throughput: float  # results/s over the last three windows
    p50: float
    p90: float
    p95: float
    p99: float
    windows: list[float] = field(default_factory=list)
    completed: int = 0
    converged: bool = False  # state == "steady"
    wall_s: float = 0.0  # how long the load ran before its windows agreed (or max_windows)
    backlog: int = 0  # instances accepted but not yet through the model when the load ended
    state: str = "unsettled"  # "steady", "overloaded" or "unsettled" (max_windows ran out): verdict()
    sent: float = 0.0  # instances/s actually sent over the last three windows (an open loop's draws vary)


class _Receiver:
    """A STOW-RS endpoint that records when each SR arrived (by its SOP Instance UID)."""

    def __init__(self) -> None:
        from radflash.serving.http import multipart_parts

        arrived: dict[str, float] = {}
        cond = threading.Condition()
        self.arrived, self.cond = arrived, cond

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                import pydicom

                body = self.rfile.read(int(self.headers["Content-Length"]))
                now = time.monotonic()
                for part in multipart_parts(body, self.headers["Content-Type"]):
                    sop = str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)
                    with cond:
                        arrived[sop] = now
                        cond.notify_all()
                reply = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"dicomweb+http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def wait(self, sop: str, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: sop in self.arrived, timeout=timeout)
            return self.arrived.get(sop)

    def close(self) -> None:
        self.server.shutdown()


class _Films:
    """Demo chest films re-identified per request (fresh SOP UIDs), with the SR UID each will get."""

    def __init__(self, sha: str) -> None:
        import pydicom

        from radflash.archive.verb import DEMO_ARCHIVE

        self.sha = sha
        self.films = [pydicom.dcmread(p) for p in sorted(DEMO_ARCHIVE.glob("patient*/*/*"))]
        self._n = 0
        self._lock = threading.Lock()

    def next(self) -> tuple[bytes, Any, str]:
        from pydicom.uid import generate_uid

        from radflash.dicomout.uids import sr_uids

        with self._lock:
            self._n += 1
            n = self._n
        ds = self.films[n % len(self.films)].copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue(), ds, sr_uids(ds.SOPInstanceUID, ds.StudyInstanceUID, self.sha)[1]


def load_count(*, concurrency: int | None, rates: tuple[float, ...], fractions: tuple[float, ...]) -> int:
    """How many loads :func:`bench_serve` runs for these options (each at both batch bounds)."""
    return 2 * ((concurrency is not None) + len(rates) + (len(fractions) if concurrency is not None else 0))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


SPREAD = 0.10  # the most the last three windows' throughputs may differ (relative to their mean) to agree
RANGE_95 = 3.31  # the 95th percentile of the range of three normal samples, in standard deviations


def verdict(rates: list[float], queued: list[int], *, window: float, offered: float | None) -> str | None:
    """Whether a load has settled after these windows: ``"steady"``, ``"overloaded"`` (open loops
    only) or ``None`` (not yet). ``rates`` are the results/s of each window, ``queued`` the node's
    queue at the start of the load and at the end of each window, ``offered`` the open loop's rate.

    The three windows of a steady open loop count Poisson arrivals, whose standard deviation is the
    square root of the count: their spread is allowed RANGE_95 of those (a 2.7/s load in 15-s windows
    holds ~40 arrivals each, ±16%, and failed the plain 10% most of the time although nothing
    changed), and its queue may gain no more than RANGE_95 standard deviations of one window's
    arrivals over the three; a closed loop's senders wait for their results, so its windows get
    SPREAD only.
    """
    if len(rates) < 3:
        return None
    last, q = rates[-3:], queued[-4:]
    growing = len(q) == 4 and q[0] < q[1] < q[2] < q[3]
    if offered is not None and growing and q[3] - q[0] > offered * window:
        return "overloaded"
    mean = sum(last) / 3
    if min(last) <= 0:
        return None
    spread = SPREAD if offered is None else max(SPREAD, RANGE_95 / (mean * window) ** 0.5)
    if (max(last) - min(last)) / mean > spread:
        return None
    # an open loop's queue may wander by the arrivals' own noise, not gain more over the three windows
    if offered is not None and q[-1] - q[0] > RANGE_95 * (offered * window) ** 0.5:
        return None
    return "steady"


def _run_load(node: Any, receiver: _Receiver, films: _Films, *, transport: str, concurrency: int | None,
              rate: float | None, window: float, max_windows: int, ae_port: int | None,
              on_window: Callable[[int, float, int], None] | None = None) -> tuple[list, list, str, float]:
    """Drive one load; returns (per-window throughputs, latencies of the last three windows, its state:
    :func:`verdict`, or ``"unsettled"`` when ``max_windows`` ran out first, instances/s sent in those
    windows). Open loops draw their arrivals from one fixed seed, so the batched node and its
    ``max_batch=1`` twin get the same sequence. ``on_window(n, results/s, queued)`` after each window."""
    done: list[tuple[float, float]] = []  # (arrival, latency)
    done_lock = threading.Lock()
    stop = threading.Event()

    def send(data: bytes, ds: Any) -> None:
        if transport == "stow":

            boundary = "radflash-bench"
            body = (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + data +
                    b"\r\n--" + boundary.encode() + b"--\r\n")
            req = urllib.request.Request(f"http://127.0.0.1:{node.http.port}/dicom-web/studies", data=body,
                                         method="POST", headers={"Content-Type": f'multipart/related; '
                                                                 f'type="application/dicom"; boundary={boundary}'})
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
        else:
            assoc = _assoc(ae_port)
            status = assoc.send_c_store(ds)
            assoc.release()
            if int(status.Status) != 0:
                raise RuntimeError(f"C-STORE status 0x{int(status.Status):04X}")

    sent: list[float] = []  # when each instance was sent

    def one(data: bytes, ds: Any, sr: str) -> None:
        t0 = time.monotonic()
        with done_lock:
            sent.append(t0)
        try:
            send(data, ds)
        except Exception:  # a refused instance (queue full) is not a result; the load goes on
            return
        arrived = receiver.wait(sr, timeout=300)
        if arrived is not None:
            with done_lock:
                done.append((arrived, arrived - t0))

    threads: list[threading.Thread] = []
    if concurrency is not None:
        def closed() -> None:
            while not stop.is_set():
                one(*films.next())
        threads = [threading.Thread(target=closed, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
    else:
        assert rate is not None

        def open_loop() -> None:
            rng = random.Random(0)
            nxt = time.monotonic()
            while not stop.is_set():
                nxt += rng.expovariate(rate)
                time.sleep(max(0.0, nxt - time.monotonic()))
                threading.Thread(target=one, args=films.next(), daemon=True).start()
        threads = [threading.Thread(target=open_loop, daemon=True)]
        threads[0].start()

    start = time.monotonic()
    rates: list[float] = []
    queued = [node._waiting]  # the node's queue at the start and at the end of each window
    state = "unsettled"
    for w in range(max_windows):
        end = start + (w + 1) * window
        time.sleep(max(0.0, end - time.monotonic()))
        with done_lock:
            n = sum(1 for a, _ in done if end - window <= a < end)
        rates.append(n / window)
        queued.append(node._waiting)
        if on_window is not None:
            on_window(w + 1, rates[-1], queued[-1])
        state = verdict(rates, queued, window=window, offered=rate) or "unsettled"
        if state != "unsettled":
            break
    stop.set()
    t_from = start + (len(rates) - min(3, len(rates))) * window
    t_to = start + len(rates) * window
    with done_lock:
        latencies = [lat for a, lat in done if t_from <= a < t_to]
        sent_rate = sum(1 for t in sent if t_from <= t < t_to) / max(t_to - t_from, 1e-9)
    for t in threads:
        t.join(timeout=60)
    # No pause for the in-flight tail: the caller stops this load's node at once (its inference thread
    # joined, its queue abandoned), so nothing of this load runs into the next one.
    return rates, latencies, state, sent_rate


def _assoc(port: int | None) -> Any:
    from pynetdicom import AE
    from pynetdicom.presentation import StoragePresentationContexts

    ae = AE(ae_title="BENCHSCU")
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFLASH")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    return assoc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_serve(*, transport: str = "stow", concurrency: int | None = None, rates: tuple[float, ...] = (),
                fractions: tuple[float, ...] = (), max_batch: int = 8, max_queue_delay_ms: float = 50.0,
                window: float = 10.0, max_windows: int = 8, model: str | None = None, workers: int = 1,
                on_window: Callable[[str, int, int, float, int], None] | None = None,
                on_load: Callable[[LoadResult], None] | None = None) -> list[LoadResult]:
    """Every load (closed loop at ``concurrency``, open loop at each of ``rates`` and at each of
    ``fractions`` × the closed loop's throughput on the batched node) against a node with
    ``max_batch`` and against one with ``max_batch=1``; see the module doc. A run takes minutes:
    ``on_window(label, max_batch, window, results/s, queued)`` hears each window as it ends and
    ``on_load`` each load's result (the CLI's progress)."""
    from radflash.serving.node import Node
    from radflash.serving.options import ForwardOptions, IntakeOptions, ModelSpec, ScheduleOptions, ServeOptions

    if fractions and concurrency is None:
        raise ValueError("fractions need a closed loop (concurrency) to measure the capacity")
    closed = [(f"closed {concurrency}", concurrency, None)] if concurrency is not None else []
    opened: list[tuple[str, int | None, float | None]] = [(f"open {r:g}/s", None, r) for r in rates]
    receiver = _Receiver()
    results: list[LoadResult] = []
    spec = ModelSpec(model, device="cpu").load(batch_size=max_batch)  # loaded once, shared by every node
    films = _Films(spec.sha256)
    derived: list[tuple[str, int | None, float | None]] = []  # from the measured capacity (fractions)
    try:
        for batch in (max_batch, 1):
            loads = closed + opened + derived
            for label, conc, rate in loads:  # a list iterated while the capacity load extends it
                with tempfile.TemporaryDirectory(prefix="radflash-bench-serve-") as state:
                    options = ServeOptions(
                        state=Path(state), model=ModelSpec(spec, device="cpu"),
                        intake=IntakeOptions(dicom_port=_free_port(), http_port=_free_port(), min_free_bytes=0),
                        schedule=ScheduleOptions(max_batch=batch, max_queue_delay_ms=max_queue_delay_ms,
                                                 max_queue=100_000),
                        forward=ForwardOptions(targets=(receiver.url,)), workers=workers)
                    node = Node(options).start()
                    try:
                        t0 = time.monotonic()
                        windows, lat, state, sent = _run_load(node, receiver, films, transport=transport,
                                                              concurrency=conc, rate=rate, window=window,
                                                              max_windows=max_windows,
                                                              ae_port=node.dimse.port if node.dimse else None,
                                                              on_window=None if on_window is None else
                                                              functools.partial(on_window, label, batch))
                        wall = time.monotonic() - t0
                        backlog = node._waiting
                    finally:
                        node.stop()  # an overloaded load's backlog goes with its node
                tail = windows[-3:]
                r = LoadResult(label, batch, rate, sum(tail) / len(tail), _percentile(lat, 50),
                               _percentile(lat, 90), _percentile(lat, 95), _percentile(lat, 99),
                               windows, len(lat), state == "steady", round(wall, 1), backlog, state,
                               round(sent, 3))
                results.append(r)
                if on_load is not None:
                    on_load(r)
                if batch == max_batch and conc is not None and fractions:  # the capacity: derive the loads
                    derived = [(f"open {f:g}× ({f * r.throughput:.2f}/s)", None, round(f * r.throughput, 2))
                               for f in fractions]
                    loads += derived
    finally:
        receiver.close()
    return results


def table(results: list[LoadResult], *, batched: int) -> str:
    """A Markdown table: each load with and without batching, and their throughput ratio."""
    rows = ["| load | max batch | offered /s | sent /s | results /s | p50 s | p90 s | p95 s | p99 s "
            "| windows (results/s) | state | ran s | backlog |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in results:
        rows.append(f"| {r.label} | {r.max_batch} | {'' if r.offered is None else f'{r.offered:g}'} | "
                    f"{r.sent:.2f} | {r.throughput:.2f} | {r.p50:.3f} | {r.p90:.3f} | {r.p95:.3f} | {r.p99:.3f} | "
                    f"{', '.join(f'{w:.1f}' for w in r.windows)} | {r.state} | "
                    f"{r.wall_s:.0f} | {r.backlog} |")
    rows.append("")
    for r in results:
        if r.max_batch != batched:
            continue
        other = next((o for o in results if o.label == r.label and o.max_batch == 1), None)
        if other is not None and other.throughput > 0:
            rows.append(f"- {r.label}: batching (max batch {batched}) / no batching: throughput "
                        f"{r.throughput / other.throughput:.2f}×, p50 {r.p50 / other.p50:.2f}×, "
                        f"p99 {r.p99 / other.p99:.2f}×")
    return "\n".join(rows) + "\n"


def plot(results: list[LoadResult], path: str | Path, *, batched: int) -> Path:
    """Throughput and p50/p99 against the load sent (open-loop loads), batching vs not."""
    from radflash.util.plotting import pyplot, save_figure

    plt = pyplot("bench serve --plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in (batched, 1):
        rs = [r for r in results if r.max_batch == batch and r.offered is not None]
        if not rs:
            continue
        x = [r.sent or r.offered for r in rs]  # what was sent: the diagonal is then "keeps up"
        name = f"max batch {batch}"
        ax1.plot(x, [r.throughput for r in rs], marker="o", label=name)
        ax2.plot(x, [r.p50 for r in rs], marker="o", label=f"p50, {name}")
        ax2.plot(x, [r.p99 for r in rs], marker="x", linestyle="--", label=f"p99, {name}")
    ax1.plot(ax1.get_xlim(), ax1.get_xlim(), color="grey", linewidth=0.5)
    ax1.set(xlabel="sent instances/s (open loops)", ylabel="results/s", title="throughput")
    ax2.set(xlabel="sent instances/s (open loops)", ylabel="receive → forwarded, s", title="latency", yscale="log")
    ax1.legend()
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


def as_json(results: list[LoadResult]) -> str:
    from dataclasses import asdict

    return json.dumps([asdict(r) for r in results], indent=1)
