"""The Ray executor: the score pipeline's stages scheduled by Ray Data instead of local processes.

Same stages as :func:`radflash.archive.pipeline.run_pipeline`, other scheduling (Ray Data's batch
inference recipe)::

    source ──Arrow chunks──► decode_block (stateless CPU tasks: decode_one + selection + _resized)
          ──Arrow blocks──► ScoreActor (map_batches, an actor pool: Scorer, one actor per GPU)
          ──part-table blocks──► driver: Committer → PartStore (crash-safe parts) → finalize

Why this shape:

* Discovery is streamed, window by window: the driver walks the source as Ray consumes it, packs
  ``CHUNK`` items at a time into an Arrow table, and hands Ray one window of at most
  ``RayOptions.window`` files at a time (a Ray Dataset's input is a list of blocks, so a window is
  the unit that is listed ahead). The driver never holds more than one window, as Arrow, and
  never a list of Python objects; an archive of any size costs the same driver memory. Unread
  entries (hidden files, loops) are committed as *skipped* while walking, as the local verb does.
* Decode runs where the CPUs are, as plain Ray tasks over small blocks (``DECODE_BATCH`` files):
  :func:`radflash.archive.decode_pool.decode_one` and the same resize as the local feed thread, so
  a row's pixels and status cannot differ from a local run's. Only S×S float32 bytes (or nothing,
  for skipped/failed files) travel on; PHI fields are dropped there unless ``include_phi``.
* A hostile file costs only itself, as in a local run: each decode task hands its files to a
  one-process :class:`~radflash.archive.decode_pool.DecodePool` kept in its Ray worker
  (:func:`~radflash.archive.decode_pool.process_pool`), so a decoder that raises, crashes
  (segfault, ``os._exit``) or passes the per-file ``timeout`` fails that file with the local
  pool's reason and the task goes on. A Ray worker that dies anyway (killed by the OOM killer,
  its node lost, or ``workers=0``: decoding in the task itself) is retried once by Ray; a block
  whose task dies twice is dropped (``max_errored_blocks``) and, at the end of its window, the
  driver records each of its files as failed (:data:`LOST_REASON`): never a silent loss, never a
  stopped run. An exception in an inference actor still stops the run (as locally: a scoring
  bug must not turn into failed rows that ``--resume`` would then skip).
* Inference is a callable class in an actor pool (:class:`ScoreActor` holding a
  :class:`radflash.archive.pipeline.Scorer`); Ray Data restarts an actor that dies and retries the
  batch it had in flight (``max_restarts=-1``, ``max_task_retries=-1``, Ray Data's defaults), so a
  killed actor costs its batch's time, never its rows.
* The driver, not the workers, writes the parts: each output block (one row per file: ~100 B plus
  the scores) is committed through the same :class:`~radflash.archive.pipeline.Committer` and
  :class:`~radflash.archive.sinks.PartStore` as a local run. That keeps the one property resume
  relies on (a part is renamed into place only after its rows are durable, by one writer) and works
  on a cluster whose nodes do not share the output folder. A batch retried by Ray is only ever
  returned once, so nothing is committed twice; a driver killed with ``kill -9`` loses only rows
  not yet committed, and ``--resume`` skips exactly the committed ones.
* Backpressure is Ray Data's streaming executor: it bounds the object store bytes each operator
  may hold, so an archive of any size runs in flat memory; the knobs are the batch size, the actor
  count, the window, the decode timeout, ``DECODE_BATCH`` and the object store size
  (``ray start --object-store-memory``). Each window starts its own actor pool (model load), so a
  window should hold minutes of work: the default ``WINDOW`` files do on most clusters.

``segment`` (:func:`encode_on_ray`) uses the same decode tasks at full resolution and an actor pool
that only encodes; the driver makes each image's maps from the tokens and writes, in input order.

``ray`` is an optional dependency (``pip install 'radflash[ray]'``), imported only when asked for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from radflash.archive.decode_pool import DecodeTask, Loader, decode_files, error_line
from radflash.archive.pipeline import (
    Committer,
    DistributedObserver,
    PipelineConfig,
    PipelineStats,
    PromptSet,
    Scorer,
    _resized,
)
from radflash.archive.sinks import FileRecord, Sink, TableSpec, storable
from radflash.errors import InputError
from radflash.util.optional import require
from radflash.util.watchdog import Watchdog, stall_limit

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.io.selection import SelectionRules
    from radflash.io.source import SourceItem
    from radflash.preprocess import Preprocessing

log = logging.getLogger("radflash.ray")

CHUNK = 256  # source items per input block put into the object store by the driver
WINDOW = 1 << 18  # files per Ray Dataset: what the driver lists ahead (≈ 40 MB of Arrow at most)
DECODE_BATCH = 4  # files per decode task: small, so a retried or slow task costs little
DECODE_RETRIES = 1  # times Ray reruns a decode task whose worker process died
LOST_REASON = "decode task died twice (its Ray worker process was lost); not retried again"
# Memory Ray reserves per decode task: a real CR/DX (≤ ~15 MP) decodes in ~25 B/pixel, so ~400 MB;
# it stops Ray packing more decoders on a node than its memory holds. A distinct request also keeps
# decode its own operator (Ray Data fuses operators with equal resource requests, and fused into
# the actor pool decode would run inside the actors, one file at a time, not as CPU tasks beside
# them: seen on Ray 2.60). Ray Data spreads these tasks over the nodes by default (SPREAD).
DECODE_MEMORY = 512 << 20

# What the decode stage hands the actors: identity, status, header facts and the S×S pixels.
META_COLUMNS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "modality", "view_position",
                "decoder", "patient_id", "patient_name")
DECODED_SCHEMA = pa.schema([
    pa.field("key", pa.string()), pa.field("path", pa.string()), pa.field("status", pa.string()),
    pa.field("reason", pa.string()), pa.field("has_meta", pa.bool_()),
    *[pa.field(c, pa.string()) for c in META_COLUMNS],
    pa.field("pixels", pa.binary()), pa.field("decode_s", pa.float64()), pa.field("resize_s", pa.float64()),
])
INPUT_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()),
                          pa.field("data", pa.binary())])
_TIMING_COLUMNS = ("__decode_s", "__resize_s", "__infer_s")  # per-block timings, dropped before commit
_ERROR = "__error"  # set on the rows of a batch an actor failed on: the driver stops the run
_OBSERVED = "__observed"  # an actor's observer delta (JSON, first row of a block): e.g. gallery tiles


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. ``address=None``: start or join a local Ray; else that cluster's address.

    ``actors=None``: one per GPU when the model runs on CUDA, else one CPU actor. ``threads``: torch
    threads per CPU actor (``None``: the actor's CPU share, at least 1). ``cpus_per_actor=None``:
    1, lowered when the cluster would otherwise have no CPU left for decode tasks. ``window``:
    files handed to Ray per Dataset (see the module docstring: more amortises actor start, less
    bounds what the driver lists ahead).
    """

    address: str | None = None
    actors: int | None = None
    threads: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float = 1.0
    window: int = WINDOW


def require_ray() -> Any:
    """``ray`` and ``ray.data``, or a one-line :class:`MissingDependency` with the install hint."""
    require("ray.data", extra="ray", purpose="--ray (running on a Ray cluster)")
    import ray

    return ray


def connect(options: RayOptions) -> bool:
    """Join ``options.address`` (or a running local Ray, or start one); True if this call started it.

    A Ray already initialised in this process (a test's ``ray.init(num_cpus=2)``, a notebook) is
    used as it is: the run must not tear down a cluster it did not start.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if options.address is None:
        kwargs["include_dashboard"] = False
    ray.init(address=options.address, **kwargs)
    return True


@dataclass(frozen=True)
class Placement:
    """The actor pool a run gets: what the manifest reports and what ``map_batches`` asks for."""

    device: str
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "actors": self.actors, "cpus_per_actor": self.cpus_per_actor,
                "gpus_per_actor": self.gpus_per_actor, "threads_per_actor": self.threads}


def plan(options: RayOptions, device: str, resources: dict[str, float]) -> Placement:
    """Actors and their resources from the options, the requested device and the cluster.

    ``device`` is the actors' device: ``auto`` means CUDA when the cluster has GPUs. CPU actors get
    1 CPU each unless that would leave no CPU for decode tasks (then the rest is shared among
    them), because Ray schedules by these logical counts and a pool that holds every CPU would
    starve the decode stage and stall the run.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if on_gpu:
        actors = options.actors or max(1, int(gpus / options.gpus_per_actor))
        cpu_share = options.cpus_per_actor if options.cpus_per_actor is not None else 1.0
        return Placement("cuda" if device == "auto" else device, actors, cpu_share, options.gpus_per_actor,
                         options.threads or 1)
    actors = options.actors or 1
    cpu_share = options.cpus_per_actor
    if cpu_share is None:
        cpu_share = 1.0 if cpus - actors >= 1 else max(0.1, round((cpus - 1) / actors, 2))
    threads = options.threads or max(1, int(cpu_share))
    return Placement("cpu", actors, cpu_share, 0.0, threads)


def cluster_info(ray: Any) -> dict[str, Any]:
    """The manifest's description of the cluster: Ray's version, the nodes and total resources."""
    resources = ray.cluster_resources()
    return {"ray_version": ray.__version__, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "resources": {k: v for k, v in resources.items() if not k.startswith("node:")}}


def executor_info(options: RayOptions, placement: Placement, *, batch_size: int, timeout: float | None,
                  isolate: bool) -> dict[str, Any]:
    """How a run was executed on Ray, for ``score``'s manifest and ``segment``'s report: the
    cluster (:func:`cluster_info`), the actor pool and the knobs that shaped the run."""
    return {"kind": "ray", "address": options.address, **cluster_info(require_ray()), **placement.as_dict(),
            "decode_batch": DECODE_BATCH, "batch_size": batch_size, "window": options.window,
            "decode_timeout_s": timeout if isolate else None, "decode_isolated": isolate}


# ---- stage 1: source → Arrow chunks in the object store ---------------------------------------
def input_chunks(items: Iterable[SourceItem], *, is_done: Callable[[SourceItem], bool], sink: Sink,
                 chunk: int = CHUNK) -> Iterator[tuple[pa.Table, int]]:
    """Walk ``items`` once: yield (Arrow table of up to ``chunk`` items to decode, items seen).

    Unread entries are committed as *skipped* in groups as they are met; items an earlier run
    committed (``is_done``) are left out. Only one chunk is held as Python objects at a time.
    Keys go in as the rows will store them (:func:`storable`), so the driver can tell by key which
    files a window lost.
    """
    rows: dict[str, list] = {"key": [], "path": [], "data": []}
    unread: list[FileRecord] = []
    seen = 0
    for item in items:
        seen += 1
        if is_done(item):
            continue
        if item.skip is not None:
            unread.append(FileRecord(path=item.key, status="skipped", reason=item.skip))
            if len(unread) >= chunk:
                sink.commit(unread)
                unread = []
            continue
        rows["key"].append(item.key if item.key.isascii() else storable(item.key))
        rows["path"].append(None if item.path is None else str(item.path))
        rows["data"].append(item.data)
        if len(rows["key"]) >= chunk:
            yield pa.table(rows, schema=INPUT_SCHEMA), seen
            rows = {"key": [], "path": [], "data": []}
    if unread:
        sink.commit(unread)
    if rows["key"]:
        yield pa.table(rows, schema=INPUT_SCHEMA), seen
    yield INPUT_SCHEMA.empty_table(), seen


def windows(chunks: Iterable[tuple[pa.Table, int]], files: int) -> Iterator[list[pa.Table]]:
    """Group :func:`input_chunks` into windows of at most ``files`` items (at least one chunk each):
    what one Ray Dataset gets. Only the window being filled is held."""
    window: list[pa.Table] = []
    held = 0
    for table, _ in chunks:
        if not table.num_rows:
            continue
        if window and held + table.num_rows > files:
            yield window
            window, held = [], 0
        window.append(table)
        held += table.num_rows
    if window:
        yield window


def lost_keys(window: list[pa.Table], returned: list[pa.Array]) -> list[str]:
    """Keys fed in ``window`` that never came back: their decode block was dropped (its task died
    twice). Computed in Arrow, so a window's keys never become Python objects unless lost."""
    fed = pa.concat_arrays([t.column("key").combine_chunks() for t in window])
    back = pa.concat_arrays(returned) if returned else pa.array([], pa.string())
    return fed.filter(pc.invert(pc.is_in(fed, value_set=back))).to_pylist()


@contextmanager
def _tolerant_context(*, preserve_order: bool) -> Iterator[None]:
    """Ray Data settings for one of our datasets, restored afterwards (a later run in this process
    gets Ray's defaults): a block whose task failed for good is dropped, not fatal (its files are
    found by :func:`lost_keys`); ``preserve_order`` for ``segment``, whose output names are
    claimed in input order. Set before the dataset is built, which copies the context."""
    ctx = require_ray().data.DataContext.get_current()
    before = (ctx.max_errored_blocks, ctx.execution_options.preserve_order)
    ctx.max_errored_blocks = -1
    ctx.execution_options.preserve_order = preserve_order
    try:
        yield
    finally:
        ctx.max_errored_blocks, ctx.execution_options.preserve_order = before


def _decode_stage(ds: Any, fn: Callable[..., pa.Table], fn_kwargs: dict[str, Any]) -> Any:
    """Input windows re-cut (streaming, no shuffle) into ``DECODE_BATCH``-file blocks, one decode
    task each, retried once if its worker process dies."""
    import warnings

    with warnings.catch_warnings():  # Ray ≥ 2.6x names most task options, but not retries on worker death
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.repartition(target_num_rows_per_block=DECODE_BATCH).map_batches(
            fn, batch_size=DECODE_BATCH, batch_format="pyarrow", num_cpus=1, memory=DECODE_MEMORY,
            max_retries=DECODE_RETRIES, fn_kwargs=fn_kwargs)


# ---- stage 2: decode (stateless, CPU tasks) -----------------------------------------------------
def decode_block(block: pa.Table, *, geometry: Preprocessing, rules: SelectionRules | None, include_phi: bool,
                 loader: Loader | None = None, timeout: float | None = 120.0, isolate: bool = True) -> pa.Table:
    """Decode + select + resize each file of ``block`` exactly as a local run's worker and feed
    thread do (:func:`decode_one` in a kept decode process, :func:`radflash.archive.pipeline._resized`)."""
    out: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA}
    tasks = [DecodeTask(i, row["key"], row["path"], row["data"]) for i, row in enumerate(block.to_pylist())]
    for d in decode_files(tasks, loader=loader, rules=rules, timeout=timeout, isolate=isolate):
        stats = PipelineStats()
        if d.status == "loaded":
            d = _resized(d, geometry, stats)
        m = d.meta
        out["key"].append(d.key)
        out["path"].append(d.path)
        out["status"].append(d.status)
        out["reason"].append(d.reason)
        out["has_meta"].append(m is not None)
        for c in META_COLUMNS:
            phi = c in ("patient_id", "patient_name")
            out[c].append(None if m is None or (phi and not include_phi) else getattr(m, c))
        out["pixels"].append(d.pixels.astype(np.float32, copy=False).tobytes() if d.status == "loaded" else None)
        out["decode_s"].append(d.decode_s)
        out["resize_s"].append(stats.resize_s)
    return pa.table(out, schema=DECODED_SCHEMA)


# ---- stage 3: inference (an actor pool) ---------------------------------------------------------
class ScoreActor:
    """Holds the model and a :class:`Scorer`; one per GPU (or a configured number of CPU actors).

    Built once per actor (model load, prompt encoding); each call scores one batch of decoded rows
    and returns them as part-table rows (``TableSpec.schema()``, plus per-block timings).
    """

    def __init__(self, model: str | RadFlashModel | None, device: str, dtype: str | None, backend: str,
                 prompts: PromptSet, spec: TableSpec, include_phi: bool, threads: int | None,
                 observer: DistributedObserver | None = None) -> None:
        import torch

        from radflash.api import as_model

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        rf = as_model(model, device=device, dtype=dtype, backend="eager" if backend == "auto" else backend)
        self.image_size = rf.config.image_size
        self.observer = observer  # this actor's own copy (DistributedObserver.for_worker)
        self.scorer = Scorer(rf, prompts, include_phi=include_phi, observer=observer)
        self.spec = spec

    def __call__(self, block: pa.Table) -> pa.Table:
        try:
            table = self._score(block)
            table = table.append_column(_OBSERVED, self._observed(table.num_rows))
            return table.append_column(_ERROR, pa.nulls(table.num_rows, pa.string()))
        except Exception as exc:  # reported to the driver, which stops the run (see module docstring)
            records = [FileRecord(path=key, status="failed", reason="inference failed")
                       for key in block.column("key").to_pylist()]
            table = self.spec.to_table(records)
            for name in _TIMING_COLUMNS:
                table = table.append_column(name, pa.array([0.0] * table.num_rows, pa.float64()))
            table = table.append_column(_OBSERVED, pa.nulls(table.num_rows, pa.string()))
            return table.append_column(_ERROR, pa.array([error_line(exc)] * table.num_rows, pa.string()))

    def _observed(self, n: int) -> pa.Array:
        """The observer's delta for this block as JSON on the first row (nulls without an observer)."""
        if self.observer is None or not n:
            return pa.nulls(n, pa.string())
        return pa.array([json.dumps(self.observer.take_delta())] + [None] * (n - 1), pa.string())

    def _score(self, block: pa.Table) -> pa.Table:
        from radflash.archive.decode_pool import Decoded
        from radflash.io.imageio import ImageMeta

        s = self.image_size
        loaded: list[Decoded] = []
        records: list[FileRecord] = []
        for row in block.to_pylist():
            meta = ImageMeta(path=row["path"], kind="", **{c: row[c] for c in META_COLUMNS}) \
                if row["has_meta"] else None
            if row["status"] == "loaded":
                pixels = np.frombuffer(row["pixels"], dtype=np.float32).reshape(s, s)
                loaded.append(Decoded(0, row["key"], row["path"], "loaded", None, pixels, meta))
            else:
                records.append(self.scorer.unscored(Decoded(0, row["key"], row["path"], row["status"],
                                                            row["reason"], meta=meta)))
        t0 = time.perf_counter()
        if loaded:
            records.extend(self.scorer(loaded))
        infer_s = time.perf_counter() - t0
        table = self.spec.to_table(records)
        n = table.num_rows
        timings = (sum(block.column("decode_s").to_pylist()), sum(block.column("resize_s").to_pylist()), infer_s)
        for name, value in zip(_TIMING_COLUMNS, timings):
            table = table.append_column(name, pa.array([value] + [0.0] * (n - 1) if n else [], pa.float64()))
        return table


def _merge_observed(block: pa.Table, observer: DistributedObserver | None) -> None:
    """Fold the actors' observer deltas carried by ``block`` into the driver's observer."""
    if observer is None:
        return
    for delta in block.column(_OBSERVED).drop_null().to_pylist():
        observer.merge_delta(json.loads(delta))


def _raise_actor_error(block: pa.Table) -> None:
    """Stop the run when an actor failed on this block (the rows were not scored)."""
    errors = block.column(_ERROR).drop_null()
    if len(errors):
        raise RuntimeError(f"inference failed in a Ray actor: {errors[0].as_py()}")


def records_of(table: pa.Table, spec: TableSpec) -> list[FileRecord]:
    """Part-table rows back into :class:`FileRecord` s, so the driver commits through the same
    :class:`Committer` (progress, counts, commit cadence) as a local run."""
    rows = table.to_pylist()
    scalar = [f.name for f in spec.schema() if "." not in f.name]
    out = []
    for r in rows:
        logits = tuple(r[f"{n}.logit"] for n in spec.names) if r["status"] == "scored" else None
        probs = tuple(r[f"{n}.prob"] for n in spec.names) if r["status"] == "scored" else None
        positive = tuple(r[f"{n}.positive"] for n in spec.names) if spec.with_positive and logits else None
        out.append(FileRecord(**{c: r[c] for c in scalar}, logits=logits, probs=probs, positive=positive))
    return out


def run_ray_pipeline(
    items: Iterable[SourceItem],
    model: str | RadFlashModel | None,
    prompts: PromptSet,
    spec: TableSpec,
    store: Sink,
    config: PipelineConfig,
    *,
    geometry: Preprocessing,  # the model's resize, Preprocessing.geometry (CARZero letterboxes)
    placement: Placement,
    dtype: str | None = None,
    backend: str = "eager",
    window: int = WINDOW,
    is_done: Callable[[SourceItem], bool] = lambda item: False,
    on_record: Callable[[FileRecord], None] | None = None,
    observer: DistributedObserver | None = None,
) -> tuple[PipelineStats, int]:
    """Score ``items`` on the connected Ray cluster into ``store``; returns stats and items seen.

    Ray must be connected (:func:`connect`). Every item that is not ``is_done`` ends as exactly one
    committed record: unread entries while walking the source, the rest as blocks returned by the
    actor pool, or as failed when their decode block was lost (:func:`lost_keys`). The source is
    walked as the windows are consumed, so the total is known only at the end. ``config.timeout``
    is the per-file decode timeout and ``config.workers == 0`` decodes inside the Ray tasks
    (no crash isolation), as ``workers=0`` does locally.
    """
    ray = require_ray()  # also imports ray.data

    with Watchdog(stall_limit(config.timeout, config.stall_after), what="score --ray") as watchdog:
        return _run_windows(ray, items, model, prompts, spec, store, config, geometry=geometry, placement=placement,
                            dtype=dtype, backend=backend, window=window, is_done=is_done, on_record=on_record,
                            observer=observer, watchdog=watchdog)


def _run_windows(ray: Any, items: Iterable[SourceItem], model: str | RadFlashModel | None, prompts: PromptSet,
                 spec: TableSpec, store: Sink, config: PipelineConfig, *, geometry: Preprocessing,
                 placement: Placement, dtype: str | None, backend: str, window: int,
                 is_done: Callable[[SourceItem], bool], on_record: Callable[[FileRecord], None] | None,
                 observer: DistributedObserver | None, watchdog: Watchdog) -> tuple[PipelineStats, int]:
    """The driver loop of :func:`run_ray_pipeline`: window by window, Ray's output waited for in
    slices (:meth:`Watchdog.guard`), so a cluster that stops delivering cannot hang the driver."""
    stats = PipelineStats()
    t_start = time.perf_counter()
    committer = Committer(store, config.commit_every, stats, on_record, watchdog)
    walked = [0]

    def counted() -> Iterator[tuple[pa.Table, int]]:
        for table, seen in input_chunks(items, is_done=is_done, sink=store):
            walked[0] = seen
            yield table, seen

    decode_kwargs = {"geometry": geometry, "rules": config.rules, "include_phi": config.include_phi,
                     "loader": config.loader, "timeout": config.timeout, "isolate": config.workers > 0}
    actor_kwargs = {"model": model, "device": placement.device, "dtype": dtype, "backend": backend,
                    "prompts": prompts, "spec": spec, "include_phi": config.include_phi,
                    "threads": placement.threads,
                    "observer": None if observer is None else observer.for_worker()}
    for chunks in windows(watchdog.track(counted(), "source"), window):
        returned: list[pa.Array] = []
        with _tolerant_context(preserve_order=False):
            ds = _decode_stage(ray.data.from_arrow_refs([ray.put(t) for t in chunks]), decode_block, decode_kwargs)
            ds = ds.map_batches(
                ScoreActor, batch_size=config.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=placement.actors),
                num_cpus=placement.cpus_per_actor, num_gpus=placement.gpus_per_actor or None,
                fn_constructor_kwargs=actor_kwargs)
            for block in watchdog.guard(ds.iter_batches(batch_size=None, batch_format="pyarrow"), "ray"):
                if not block.num_rows:
                    continue
                _raise_actor_error(block)
                stats.decode_s += float(pc.sum(block.column("__decode_s")).as_py() or 0.0)
                stats.resize_s += float(pc.sum(block.column("__resize_s")).as_py() or 0.0)
                stats.inference_s += float(pc.sum(block.column("__infer_s")).as_py() or 0.0)
                stats.batches += 1
                if stats.first_batch_s is None:
                    stats.first_batch_s = time.perf_counter() - t_start
                returned.append(block.column("path").combine_chunks())
                _merge_observed(block, observer)
                committer.add(records_of(block.drop_columns([*_TIMING_COLUMNS, _ERROR, _OBSERVED]), spec))
        lost = lost_keys(chunks, returned)
        if lost:
            log.warning("ray: %d file(s) lost with their decode task (worker died twice); recorded as failed",
                        len(lost))
            committer.add([FileRecord(path=key, status="failed", reason=LOST_REASON) for key in lost])
    committer.flush()
    stats.wall_s = time.perf_counter() - t_start
    return stats, walked[0]


def run_on_ray(
    todo: Iterable[SourceItem],
    model: Any,
    rf_model: RadFlashModel,
    prompts: PromptSet,
    spec: TableSpec,
    store: Sink,
    config: PipelineConfig,
    manifest: dict[str, Any],
    options: RayOptions,
    *,
    device: str,
    dtype: str | None,
    backend: str,
    out_dir: Path | None,
    on_record: Callable[[FileRecord], None] | None = None,
    observer: Any = None,
) -> PipelineStats:
    """The ``score`` verb's Ray branch: plan the actor pool, record it in the manifest, run.

    An ``observer`` that can run in the actors (:class:`DistributedObserver`, e.g. the report's
    gallery) runs there on every batch; any other one cannot see Ray's batches and is refused.

    ``model`` is what the caller gave (a path or ``None`` travels as text and every actor loads it
    itself; an in-memory model is pickled to the actors); ``rf_model`` is the driver's copy.
    """
    ray = require_ray()
    from radflash.archive.sinks import write_manifest

    placement = plan(options, device, ray.cluster_resources())
    manifest["device"] = placement.device
    manifest["executor"] = executor_info(options, placement, batch_size=config.batch_size,
                                         timeout=config.timeout, isolate=config.workers > 0)
    if out_dir is not None:  # a run killed mid-way still says how it was executed
        write_manifest(out_dir, manifest)
    log.info("ray: %d %s actor(s), %s CPU / %s GPU each", placement.actors, placement.device,
             placement.cpus_per_actor, placement.gpus_per_actor)
    if observer is not None and not isinstance(observer, DistributedObserver):
        raise InputError(f"{type(observer).__name__} cannot observe a Ray run: it has no for_worker/take_delta/"
                         "merge_delta (radflash.archive.pipeline.DistributedObserver)")
    stats, _ = run_ray_pipeline(todo, actor_model(model, rf_model), prompts, spec, store, config,
                                geometry=rf_model.preprocessing.geometry, placement=placement, dtype=dtype,
                                backend=backend, window=options.window, on_record=on_record, observer=observer)
    return stats


def actor_model(model: Any, rf_model: Any) -> Any:
    """What the actors load: a checkpoint path as text, ``None`` (the demo model) as is, else the
    driver's loaded model (pickled to them)."""
    from radflash.io.source import path_text

    return model if model is None else path_text(model) if isinstance(model, (str, Path)) else rf_model


# ---- segment: decode tasks + an encoder actor pool; the driver makes the maps and writes ------------
SEGMENT_SCHEMA = pa.schema([
    pa.field("index", pa.int64()), pa.field("key", pa.string()), pa.field("path", pa.string()),
    pa.field("status", pa.string()), pa.field("reason", pa.string()), pa.field("meta", pa.binary()),
    pa.field("pixels", pa.binary()), pa.field("rows", pa.int64()), pa.field("cols", pa.int64()),
])


def decode_full(block: pa.Table, *, rules: SelectionRules | None, loader: Loader | None = None,
                timeout: float | None = 120.0, isolate: bool = True) -> pa.Table:
    """``segment``'s decode task: :func:`decode_one` at the source resolution (maps are made at
    each image's own size), crash-isolated like :func:`decode_block`. The header facts travel
    pickled: the writers (DICOM SEG) need all of them, and they stay inside this run's object store."""
    import pickle

    out: dict[str, list] = {f.name: [] for f in SEGMENT_SCHEMA}
    tasks = [DecodeTask(row["index"], row["key"], row["path"], row["data"]) for row in block.to_pylist()]
    for d in decode_files(tasks, loader=loader, rules=rules, timeout=timeout, isolate=isolate):
        loaded = d.status == "loaded"
        for name, value in (("index", d.index), ("key", d.key), ("path", d.path), ("status", d.status),
                            ("reason", d.reason), ("meta", None if d.meta is None else pickle.dumps(d.meta)),
                            ("pixels", d.pixels.astype(np.float32, copy=False).tobytes() if loaded else None),
                            ("rows", d.pixels.shape[0] if loaded else 0), ("cols", d.pixels.shape[1] if loaded else 0)):
            out[name].append(value)
    return pa.table(out, schema=SEGMENT_SCHEMA)


def _pixels(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["pixels"], dtype=np.float32).reshape(row["rows"], row["cols"])


class EncodeActor:
    """Holds the model; encodes the loaded images of each batch (the expensive, GPU part of
    ``segment``) and adds their tokens as float32 bytes (``tokens``, ``token_shape``)."""

    def __init__(self, model: str | RadFlashModel | None, device: str, dtype: str | None, backend: str,
                 threads: int | None) -> None:
        import torch

        from radflash.api import as_model

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        self.model = as_model(model, device=device, dtype=dtype, backend=backend)

    def __call__(self, block: pa.Table) -> pa.Table:
        error = None
        try:
            tokens, shape = self._encode(block.to_pylist())
        except Exception as exc:  # reported to the driver, which stops the run
            tokens, shape, error = [None] * block.num_rows, [None] * block.num_rows, error_line(exc)
        return block.append_column("tokens", pa.array(tokens, pa.binary())) \
                    .append_column("token_shape", pa.array(shape, pa.list_(pa.int64()))) \
                    .append_column(_ERROR, pa.array([error] * block.num_rows, pa.string()))

    def _encode(self, rows: list[dict[str, Any]]) -> tuple[list[bytes | None], list[list[int] | None]]:
        import torch

        loaded = [i for i, r in enumerate(rows) if r["status"] == "loaded"]
        tokens: list[bytes | None] = [None] * len(rows)
        shape: list[list[int] | None] = [None] * len(rows)
        if loaded:
            with torch.inference_mode():
                out = self.model.encode_images([_pixels(rows[i]) for i in loaded]).float().cpu().numpy()
            for j, i in enumerate(loaded):
                tokens[i], shape[i] = out[j].tobytes(), list(out[j].shape)
        return tokens, shape


def segment_chunks(files: Iterable[SourceItem], *, first_index: int = 0,
                   chunk: int = CHUNK) -> Iterator[tuple[pa.Table, int]]:
    """``segment``'s input blocks: up to ``chunk`` files each, numbered in input order from
    ``first_index`` (the driver re-assembles outputs and names them in that order)."""
    rows: dict[str, list] = {"index": [], "key": [], "path": [], "data": []}
    index = first_index
    for f in files:
        for name, value in (("index", index), ("key", storable(f.key)),
                            ("path", None if f.path is None else str(f.path)), ("data", f.data)):
            rows[name].append(value)
        index += 1
        if len(rows["index"]) >= chunk:
            yield pa.table(rows, schema=_SEGMENT_INPUT), index - first_index
            rows = {k: [] for k in rows}
    if rows["index"]:
        yield pa.table(rows, schema=_SEGMENT_INPUT), index - first_index


_SEGMENT_INPUT = pa.schema([pa.field("index", pa.int64()), pa.field("key", pa.string()),
                            pa.field("path", pa.string()), pa.field("data", pa.binary())])


def encode_on_ray(files: Iterable[SourceItem], model: Any, placement: Placement, *, batch_size: int,
                  rules: SelectionRules | None, dtype: str | None = None, backend: str = "eager",
                  first_index: int = 0, timeout: float | None = 120.0, isolate: bool = True,
                  window: int = WINDOW) -> Iterator[tuple[Any, Any]]:
    """``(Decoded, tokens of shape (1, 1+N, D) or None)`` per file, in input order, from a Ray run of
    decode tasks and an encoder actor pool, window by window over the streamed ``files``. A file
    whose decode block was lost comes back failed (:data:`LOST_REASON`) at the end of its window.
    Ray must be connected (:func:`connect`)."""
    ray = require_ray()
    from radflash.archive.decode_pool import Decoded

    decode_kwargs = {"rules": rules, "loader": None, "timeout": timeout, "isolate": isolate}
    actor_kwargs = {"model": model, "device": placement.device, "dtype": dtype, "backend": backend,
                    "threads": placement.threads}
    for chunks in windows(segment_chunks(files, first_index=first_index), window):
        returned: list[pa.Array] = []
        with _tolerant_context(preserve_order=True):  # output names are claimed in input order
            ds = _decode_stage(ray.data.from_arrow_refs([ray.put(t) for t in chunks]), decode_full, decode_kwargs)
            ds = ds.map_batches(EncodeActor, batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=placement.actors),
                                num_cpus=placement.cpus_per_actor, num_gpus=placement.gpus_per_actor or None,
                                fn_constructor_kwargs=actor_kwargs)
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                _raise_actor_error(block)
                returned.append(block.column("key").combine_chunks())
                for row in block.to_pylist():
                    yield _decoded_row(row)
        lost = set(lost_keys(chunks, returned))
        for table in chunks if lost else ():
            for row in table.select(["index", "key", "path"]).to_pylist():
                if row["key"] in lost:
                    yield Decoded(row["index"], row["key"], row["path"] or row["key"], "failed", LOST_REASON), None


def _decoded_row(row: dict[str, Any]) -> tuple[Any, Any]:
    """One output row of the encoder pool → (Decoded, its tokens as a (1, 1+N, D) tensor, or None)."""
    import pickle

    import torch

    from radflash.archive.decode_pool import Decoded

    meta = None if row["meta"] is None else pickle.loads(row["meta"])  # our own decode task's bytes
    if row["status"] != "loaded":
        return Decoded(row["index"], row["key"], row["path"], row["status"], row["reason"], meta=meta), None
    tokens = np.frombuffer(row["tokens"], dtype=np.float32).reshape(row["token_shape"])
    decoded = Decoded(row["index"], row["key"], row["path"], "loaded", None, _pixels(row).copy(), meta)
    return decoded, torch.from_numpy(tokens.copy()).unsqueeze(0)
