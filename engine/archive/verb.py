"""``score()``: zero-shot scores for every image in a set of files or folders (a whole archive).

The verb function behind ``radflash score``: it resolves the model, the findings, the source of
items (files: discovery + sharding) and the sink (the output folder), then hands the work to
:func:`radflash.archive.pipeline.run_pipeline`. With ``output=None`` nothing touches the disk and the
tables come back in memory; with a folder, results are committed in crash-safe parts, so a killed
run continues with ``resume=True`` without redoing or duplicating committed files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from radflash.archive.committed import CommittedKeys, read_committed
from radflash.archive.decode_check import PROBES, REDUCED_MARKERS, agreement, decode_settings
from radflash.archive.options import OutputOptions, ScoreOptions
from radflash.archive.pipeline import PipelineConfig, PipelineStats, PromptSet, run_pipeline
from radflash.archive.sinks import (
    FileRecord,
    Finalized,
    MemoryStore,
    OutputLock,
    PartStore,
    TableSpec,
    read_manifest,
    status_counts,
    write_manifest,
)
from radflash.archive.sources import DEMO_ARCHIVE as DEMO_ARCHIVE  # where callers have always found it
from radflash.archive.sources import open_store
from radflash.checkpoints.calibration import score_calibrated
from radflash.errors import InputError
from radflash.io.decoders import missing_decoder_line
from radflash.io.imageio import fast_loader
from radflash.io.source import (
    FileSource,
    Source,
    SourceItem,
    listed_items,
    path_from_text,
    peek,
    retrieval_failures,
    retrieved_items,
)

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.archive.pipeline import BatchObserver
    from radflash.archive.ray_executor import RayOptions
    from radflash.io.selection import SelectionRules

log = logging.getLogger("radflash.score")

MANIFEST_VERSION = 1


@dataclass
class ScoreRun:
    """Summary of a score run; ``results``/``status`` give the full tables.

    Without an output folder they are the tables the run held. With one, the run wrote them to
    ``results_path``/``status_path`` chunk by chunk and never held them: they are read from those
    files on first access (then kept; the same tables and types, CSV included), so a run of any
    size, and the CLI, which never asks, stay in bounded memory.
    """

    output: Path | None
    discovered: int  # files in this shard
    scored: int
    skipped: int
    failed: int
    resumed: int  # files already committed by an earlier, interrupted run
    elapsed_s: float
    images_per_s: float | None  # files processed by *this* invocation / its wall time
    manifest: dict = field(repr=False)
    tables: Finalized = field(repr=False)
    results_path: Path | None = None
    status_path: Path | None = None
    manifest_path: Path | None = None
    demo: bool = False  # True when no inputs were given and the embedded demo archive was scored

    @property
    def results(self) -> pa.Table:
        """One row per scored file (read from ``results_path`` on first access when saved)."""
        return self.tables.table("results")

    @property
    def status(self) -> pa.Table:
        """One row per discovered file (read from ``status_path`` on first access when saved)."""
        return self.tables.table("status")

    @property
    def counts(self) -> dict[str, int]:
        return {"discovered": self.discovered, "scored": self.scored, "skipped": self.skipped,
                "failed": self.failed}


def score(
    inputs: str | Path | Sequence[str | Path] | Source | None = None,
    output: str | Path | None = None,
    *,
    model: str | Path | RadFlashModel | None = None,
    findings: str | Path | Mapping[str, Any] | Sequence[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    backend: str | None = None,
    fmt: str = "parquet",
    include_phi: bool = False,
    resume: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    rules: SelectionRules | None = None,
    progress: bool = True,
    commit_every: int = 256,
    timeout: float | None = 120.0,
    stall_after: float | None = None,
    max_pixels: int | None = None,
    auth: Any = None,
    stow: str | None = None,
    ray: RayOptions | None = None,
    observer: BatchObserver | None = None,
    fast_decode: bool = False,
) -> ScoreRun:
    """Score every image under ``inputs`` (files/folders, searched recursively).

    Args:
        inputs: files or folders; or a :class:`radflash.io.source.Source` (items with a path or
            bytes, e.g. from a network); ``None`` scores the small embedded demo archive.
        output: a folder for results/status/manifest (see :mod:`radflash.archive.sinks`), streamed
            from the parts in bounded memory (``ScoreRun.results`` / ``.status`` read them back on first
            access); ``None`` keeps everything in memory.
        model: checkpoint path or a loaded :class:`RadFlashModel`; ``None`` = embedded demo model.
        findings: ``None`` = the 14 CheXpert findings ("There is {finding}"); a YAML/JSON/TXT prompt
            file; a mapping name → prompt (or → {prompt, threshold}); or a list of prompts.
        workers: decode processes; 0 decodes in-process; ``None`` = one per core as memory allows
            (:func:`radflash.archive.decode_pool.default_workers`). Under
            ``ray`` each decode task keeps one decode process, and 0 decodes inside the task.
        resume: continue an interrupted run in ``output``: committed files are skipped.
        num_parts, part_id: score only shard ``part_id`` of ``num_parts`` (deterministic split of
            files; a :class:`Source` given directly is a shard already).
        rules: a :class:`radflash.io.selection.SelectionRules` (modalities, views...); ``None`` = default.
        commit_every: files per committed part (the most work a crash can lose).
        timeout: seconds one file may take to decode before its worker is killed and it is failed
            (locally and in Ray decode tasks).
        stall_after: seconds without any finished step (an item listed, a file decoded, a batch
            scored, a part written) after which the run stops with :class:`radflash.util.watchdog.Stalled`
            naming the stage; committed parts stay and ``resume`` finishes the run. ``None``:
            :func:`radflash.util.watchdog.stall_limit` (3 × ``timeout``, at least 60 s).
        max_pixels: the pixel budget (default :data:`radflash.io.selection.DEFAULT_MAX_PIXELS`): a
            file whose header claims more pixels is failed before it is decoded.
        auth: a :class:`radflash.io.dicomweb.Auth` for ``dicomweb+http(s)://`` inputs (default: netrc).
        stow: store one DICOM SR per scored image with STOW-RS (:mod:`radflash.archive.stow`): a
            ``dicomweb+http(s)://`` root, or ``"same"`` for the DICOMweb server scored from.
        ray: run the same stages on a Ray cluster (:mod:`radflash.archive.ray_executor`): decode as
            CPU tasks, inference in an actor pool on ``device``; ``None`` runs them locally.
        observer: sees each scored batch with its image tokens in the same pass, e.g.
            :class:`radflash.report.gallery.ScoreGallery`; under Ray it must be a
            :class:`radflash.archive.pipeline.DistributedObserver` (a copy runs in each actor).
        fast_decode: decode JPEG 2000 / 8-bit JPEG films only at the coarsest resolution that still
            covers the model input (:func:`radflash.io.decoders.decode_reduced`); other syntaxes are
            decoded in full. Off by default: the default keeps the reference preprocessing exactly.
            The manifest's ``decode`` records the mode and the probe batch's max |Δprob| against a
            full decode (:mod:`radflash.archive.decode_check`).

    With an output folder the run holds ``OUT/.radflash.lock`` (:class:`radflash.archive.sinks.OutputLock`)
    from before the model loads until the tables are written: a second run into the same folder
    fails at once with the holder's pid, host and start time. Files are matched to an earlier
    run's committed rows by resolved path, so a resume may spell the inputs differently.
    """
    return run_score(ScoreOptions.from_flat(
        inputs, output, model=model, findings=findings, device=device, dtype=dtype, batch_size=batch_size,
        workers=workers, backend=backend, fmt=fmt, include_phi=include_phi, resume=resume, num_parts=num_parts,
        part_id=part_id, rules=rules, progress=progress, commit_every=commit_every, timeout=timeout,
        stall_after=stall_after, max_pixels=max_pixels, fast_decode=fast_decode, auth=auth, stow=stow, ray=ray,
        observer=observer))


def run_score(options: ScoreOptions) -> ScoreRun:
    """:func:`score` on typed options: the run's stages assembled in data-flow order.

    source (:func:`radflash.archive.sources.open_source`) → model (:meth:`ModelSpec.load`) → the
    output folder and what an earlier run committed → sink (+ :func:`~radflash.archive.sources.open_store`)
    → the executor (:func:`radflash.archive.pipeline.run_pipeline` here, or Ray) → consolidated tables
    (streamed into the output folder; counts and checks read back from them a chunk at a time).
    """
    o = options
    with _output_lock(o.output.output, resume=o.output.resume):
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc)
        o.check()
        prompt_set = resolve_findings(o.findings)
        _preflight(o)

        # ---- items: streamed, nothing listed ahead. A file source checks its inputs here, before the
        # model loads; a network source lists cheaply and retrieves only what is still to do (below).
        source, demo = o.source.open()
        intake = _Intake(listed_items(source))

        # ---- model ---------------------------------------------------------------------------
        t_model = time.perf_counter()
        rf_model = o.model.load(batch_size=o.batch_size, on_ray=o.ray is not None)
        load_model_s = time.perf_counter() - t_model
        calibrated = score_calibrated(rf_model.calibration)
        spec = TableSpec(prompt_set.names, include_phi=o.output.include_phi,
                         with_positive=calibrated or any(t is not None for t in prompt_set.thresholds))
        manifest = _manifest(o, rf_model, prompt_set, source, demo, started, calibrated=calibrated)

        # ---- output / resume → sink ----------------------------------------------------------
        table, done, initial_counts = _open_output(o.output, spec, manifest)
        committed_before = sum(initial_counts.values())
        store = table if o.store is None else open_store(o.store, table, source, prompt_set, rf_model, o.source.auth)
        sink = _SerialSink(store)  # unread entries are committed by the walk (the decode feed), rows by the pipeline
        todo = retrieved_items(source, intake.todo(done, sink, group=o.output.commit_every))

        # ---- execute ---------------------------------------------------------------------------
        try:
            stats = _execute(o, todo, rf_model, prompt_set, spec, sink, manifest, initial_counts)
        finally:
            done.close()  # the source has been walked: the committed keys' index is no longer read
        # instances the server would not give, committed a part at a time (a source keeps them on disk)
        failed = (FileRecord(path=key, status="failed", reason=why) for key, why in retrieval_failures(source))
        while group := list(islice(failed, o.output.commit_every)):
            sink.commit(group)
        if intake.already:
            log.info("resumed: %d of %d entries were committed by an earlier run", intake.already, intake.discovered)

        # ---- consolidate ---------------------------------------------------------------------
        # the tables are read back a chunk at a time: a folder run never holds them (ScoreRun reads them on demand)
        tables: Finalized = sink.finalize(o.output.fmt)
        counts = status_counts(_status_values(tables, "status"))
        if o.decode.fast_decode:  # the probe batch: the run's probabilities against a full decode of its files
            manifest["decode"]["agreement"] = agreement(rf_model, prompt_set, *_probe_rows(tables),
                                                        rules=o.decode.selection())
        missing = missing_decoder_line(_status_values(tables, "reason"))
        if missing:  # the run's last line: what to install to score the files it had to skip
            log.warning("%s", missing)
        elapsed = time.perf_counter() - t0
        all_shards = source.entries_all_shards if isinstance(source, FileSource) else intake.discovered
        manifest.update({
            "complete": True,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": {"discovered": intake.discovered, "discovered_all_shards": all_shards, **counts,
                       "committed_before_this_run": committed_before, "processed_this_run": stats.total},
            "timings": {"discover_s": round(intake.walk_s, 3), "load_model_s": round(load_model_s, 3),
                        **_timings(stats), "total_s": round(elapsed, 3)},
        })
        out_dir = o.output.output
        manifest_path = write_manifest(out_dir, manifest) if out_dir is not None else None
        return ScoreRun(
            output=out_dir, discovered=intake.discovered, resumed=committed_before, elapsed_s=elapsed,
            images_per_s=round(stats.total / stats.wall_s, 2) if stats.wall_s > 0 and stats.total else None,
            manifest=manifest, tables=tables, results_path=tables.results_path, status_path=tables.status_path,
            manifest_path=manifest_path, demo=demo, **counts,
        )


def _status_values(tables: Finalized, column: str) -> Iterator[Any]:
    """One column of the status table, value by value, read a chunk at a time."""
    for chunk in tables.chunks("status", [column]):
        yield from chunk.column(column).to_pylist()


def _probe_rows(tables: Finalized, probes: int = PROBES) -> tuple[pa.Table, pa.Table]:
    """The rows :func:`radflash.archive.decode_check.agreement` may probe, read a chunk at a time: the
    first ``probes`` scored files (in path order) still readable that were decoded reduced, and the
    first ``probes`` that were not. ``agreement`` takes reduced files first, so it picks the same files
    from these as from the whole tables, without a set of every reduced path."""
    found = {True: 0, False: 0}  # reduced or not → files picked
    decoders: dict[str, str | None] = {}
    for chunk in tables.chunks("status", ["path", "status", "decoder"]):
        for path, status, decoder in zip(*(chunk.column(c).to_pylist() for c in ("path", "status", "decoder"))):
            reduced = bool(decoder) and any(m in decoder for m in REDUCED_MARKERS)
            if status == "scored" and found[reduced] < probes and path and os.path.isfile(path):
                found[reduced] += 1
                decoders[path] = decoder
        if min(found.values()) >= probes:
            break
    paths = sorted(decoders)
    rows = []
    for chunk in tables.chunks("results") if paths else ():
        rows.append(chunk.filter(pc.is_in(chunk.column("path"), pa.array(paths, pa.string()))))
        if sum(t.num_rows for t in rows) == len(paths):
            break
    results = pa.concat_tables(rows) if rows else tables.schema("results").empty_table()
    return results, pa.table({"path": pa.array(paths, pa.string()),
                              "decoder": pa.array([decoders[p] for p in paths], pa.string())})


def _core_split(config: PipelineConfig) -> dict[str, Any]:
    """How this run shares the cores: the encoder's threads, and decode processes niced beside them
    (why: :mod:`radflash.archive.decode_pool`)."""
    import torch

    from radflash.util.sysinfo import usable_cores

    return {"cores": usable_cores(), "encoder_threads": torch.get_num_threads(),
            "decode_workers": config.workers, "decode_nice": config.decode_nice if config.workers else None}


def _preflight(o: ScoreOptions) -> None:
    """What can fail fast does, before discovery and the model load: the output folder, a missing
    ``ray`` (its install hint) or an absent ``--device``."""
    if o.output.output is not None:
        PartStore.check_output(o.output.output, resume=o.output.resume)
    if o.ray is not None:
        from radflash.archive.ray_executor import connect

        connect(o.ray)
    else:
        o.model.check_device()


def _manifest(o: ScoreOptions, rf_model: RadFlashModel, prompt_set: PromptSet, source: Source, demo: bool,
              started: datetime, *, calibrated: bool) -> dict[str, Any]:
    """The run's manifest as written before the first part (``complete`` False until the end)."""
    described = source.describe()
    return {
        "manifest_version": MANIFEST_VERSION,
        "complete": False,
        "started": started.isoformat(timespec="seconds"),
        "model": {"id": rf_model.model_id, "sha256": rf_model.sha256, "calibrated": calibrated,
                  "image_size": rf_model.config.image_size},
        "findings": {n: {"prompt": p, "threshold": t}
                     for n, p, t in zip(prompt_set.names, prompt_set.prompts, prompt_set.thresholds)},
        "versions": _versions(),
        "device": str(rf_model.device), "dtype": str(rf_model.dtype).removeprefix("torch."),
        "backend": rf_model.backend_name, "precision": rf_model.precision,
        "backend_selection": rf_model.backend_selection,  # auto: candidates' ms/batch, reason, cache hit
        "args": o.manifest_args(described, rf_model),
        "source": described,
        "demo_archive": demo,
        "decode": decode_settings(o.decode.fast_decode, rf_model.preprocessing.geometry),
    }


def _open_output(out: OutputOptions, spec: TableSpec, manifest: dict[str, Any]
                 ) -> tuple[PartStore | MemoryStore, CommittedKeys, dict[str, int]]:
    """The table sink, the keys an earlier run committed (on disk: :mod:`radflash.archive.committed`)
    and its committed rows per status (empty without a folder).

    A folder run checks a resumed run's settings against the earlier manifest, opens the
    committed parts and writes this run's manifest before anything new is committed.
    """
    if out.output is None:
        return MemoryStore(spec), CommittedKeys(None), {}
    previous = read_manifest(out.output) if out.resume else None
    if previous is not None:
        _check_resumable(previous, manifest, out.output)
        manifest["resumed_from"] = previous.get("started")
        manifest["runs"] = int(previous.get("runs", 1)) + 1
    store = PartStore(out.output, spec)
    store.open()
    # files by resolved path (see _done_key); items without a path by their key
    done, counts = read_committed(store, lambda key: resume_key(path_from_text(key)))
    write_manifest(out.output, manifest)
    return store, done, counts


def _execute(o: ScoreOptions, todo: Iterable[SourceItem], rf_model: RadFlashModel, prompt_set: PromptSet,
             spec: TableSpec, sink: _SerialSink, manifest: dict[str, Any],
             initial_counts: Mapping[str, int]) -> PipelineStats:
    """Run the stages on this machine (:func:`run_pipeline`) or on Ray, with the progress bar."""
    n_workers = o.decode.processes()
    if o.ray is None:
        ahead, todo = peek(todo, n_workers)
        n_workers = min(n_workers, ahead)  # no point spawning idle decoders for a handful of files
    else:  # Ray decode tasks each keep one decode process (crash isolation), unless workers=0
        n_workers = int(n_workers > 0)
    d = o.decode
    config = PipelineConfig(batch_size=o.batch_size, workers=n_workers, commit_every=o.output.commit_every,
                            timeout=d.timeout, stall_after=d.stall_after, include_phi=o.output.include_phi,
                            rules=d.selection(),
                            loader=fast_loader(manifest["decode"]["min_size"]) if d.fast_decode else None)
    if o.ray is None:
        manifest["cores"] = _core_split(config)
    bar = _progress_bar(None, enabled=o.progress, initial_counts=initial_counts)  # total: known at the end
    on_record = bar.update if bar is not None else None
    try:
        if o.ray is None:
            return run_pipeline(todo, rf_model, prompt_set, sink, config, on_record=on_record, observer=o.observer)
        from radflash.archive.ray_executor import run_on_ray

        m = o.model
        return run_on_ray(todo, m.model, rf_model, prompt_set, spec, sink, config, manifest, o.ray,
                          device=m.device, dtype=m.dtype, backend=m.backend, out_dir=o.output.output,
                          on_record=on_record, observer=o.observer)
    finally:
        if bar is not None:
            bar.close()


@contextmanager
def _output_lock(output: str | Path | None, *, resume: bool) -> Iterator[None]:
    """Hold ``OUT/.radflash.lock`` around a run into a folder (nothing for an in-memory run).

    The folder is checked first, so a non-empty OUT without ``resume`` fails at once rather than
    after waiting on anything; it is checked again under the lock, where nothing can race it.
    """
    if output is None:
        yield
        return
    PartStore.check_output(Path(output), resume=resume)
    with OutputLock(Path(output)):
        yield


def _done_key(item: SourceItem) -> str:
    """What ties an item to a row committed by an earlier run: a file's resolved path (so a
    resume may spell the inputs differently: relative, absolute, through a symlink), else its key."""
    return resume_key(item.path) if item.path is not None else item.key


def _absolute(item: SourceItem) -> SourceItem:
    """The item with an absolute path: files are decoded (and named in messages) by absolute path."""
    if item.path is None:
        return item
    return dataclasses.replace(item, path=Path(os.path.abspath(item.path)))


class _Intake:
    """The run's one pass over its source, as the run consumes it: counts every item, leaves out
    what an earlier run committed, commits unread entries as *skipped* rows in groups, and hands
    on the rest with absolute paths. Nothing is kept, so an archive of any size streams through;
    the counts are final once the pass has ended."""

    def __init__(self, items: Iterator[SourceItem]) -> None:
        _, self.items = peek(items, 1)  # the first item now: a failing listing fails before the model loads
        self.discovered = 0  # every item, unread and already committed ones included
        self.already = 0  # items an earlier run committed
        self.walk_s = 0.0  # time spent waiting on the source (discovery, listing)

    def todo(self, done: Container[str], sink: Any, *, group: int) -> Iterator[SourceItem]:
        """The items still to decode; unread entries go to ``sink`` ``group`` at a time."""
        unread: list[FileRecord] = []
        while True:
            t0 = time.perf_counter()
            item = next(self.items, None)
            self.walk_s += time.perf_counter() - t0
            if item is None:
                break
            self.discovered += 1
            if done and _done_key(item) in done:  # realpath only on a resume: it costs system calls
                self.already += 1
            elif item.skip is not None:
                unread.append(FileRecord(path=item.key, status="skipped", reason=item.skip))
                if len(unread) >= group:
                    sink.commit(unread)
                    unread = []
            else:
                yield _absolute(item)
        sink.commit(unread)


class _SerialSink:
    """A sink whose commits are serialised: the walk commits unread entries from whichever thread
    consumes the source (the local decode feed), while the pipeline commits rows from its own."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def commit(self, records: Sequence[FileRecord]) -> object:
        if not records:
            return None
        with self._lock:
            return self.inner.commit(records)

    def finalize(self, fmt: Any) -> Any:
        with self._lock:
            return self.inner.finalize(fmt)



def resolve_findings(findings: str | Path | Mapping[str, Any] | Sequence[str] | None) -> PromptSet:
    """Any accepted ``findings`` form → names, prompts and thresholds (validated, non-empty)."""
    from radflash.findings import default_prompts, load_prompt_file

    if findings is None:
        entries: dict[str, Any] = dict(default_prompts())
    elif isinstance(findings, (str, Path)):
        entries = load_prompt_file(findings)
    elif isinstance(findings, Mapping):
        entries = dict(findings)
    elif isinstance(findings, Sequence):
        entries = {str(p): str(p) for p in findings}
    else:
        raise InputError(f"findings must be a prompt file, a mapping or a list of prompts, "
                         f"got {type(findings).__name__}")
    if not entries:
        raise InputError("no findings given")
    names, prompts, thresholds = [], [], []
    for name, value in entries.items():
        if isinstance(value, Mapping):
            prompt, threshold = value.get("prompt"), value.get("threshold")
        else:
            prompt, threshold = value, None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"finding {name!r} has no prompt text")
        if "." in str(name):
            # result columns are "<finding>.logit"; a dot in the name would make them ambiguous
            raise InputError(f"finding name {name!r} contains '.'; use another name for it")
        names.append(str(name))
        prompts.append(prompt.strip())
        thresholds.append(None if threshold is None else float(threshold))
    return PromptSet(tuple(names), tuple(prompts), tuple(thresholds))


def resume_key(path: str | os.PathLike) -> str:
    """The identity of a file across runs: its absolute path with symlinks resolved (never raises,
    even for a symlink loop), so ``data/x.dcm`` and ``/home/u/data/x.dcm`` are one file."""
    return os.path.realpath(path)


def _check_resumable(previous: dict, current: dict, out_dir: Path) -> None:
    """A resumed run must produce the same columns from the same model and select files by the
    same rules, or parts would disagree; each difference is named with both values."""
    problems = []
    old_model, new_model = previous.get("model", {}), current["model"]
    if old_model.get("sha256") != new_model["sha256"]:
        problems.append(f"model {old_model.get('id')!r} sha256 {str(old_model.get('sha256'))[:12]} ≠ "
                        f"{new_model['id']!r} sha256 {str(new_model['sha256'])[:12]}")
    if previous.get("findings") != current["findings"]:
        problems.append("findings/prompts differ")
    old_mode, new_mode = previous.get("decode", {}).get("mode", "full"), current["decode"]["mode"]
    if old_mode != new_mode:  # rows of a full and a fast decode must not mix in one table
        problems.append(f"decode {old_mode} ≠ {new_mode} (--fast-decode)")
    old_args = previous.get("args", {})
    for key in ("include_phi", "num_parts", "part_id"):
        if old_args.get(key) != current["args"][key]:
            problems.append(f"{key} {old_args.get(key)!r} ≠ {current['args'][key]!r}")
    # selection rules (modalities, views, pixel budget...) decide which files get scored
    old_rules, new_rules = old_args.get("rules"), json.loads(json.dumps(current["args"]["rules"]))
    if isinstance(old_rules, dict) and isinstance(new_rules, dict):
        for key in sorted(set(old_rules) | set(new_rules)):
            if old_rules.get(key) != new_rules.get(key):
                problems.append(f"rules.{key} {old_rules.get(key)!r} ≠ {new_rules.get(key)!r}")
    elif old_rules != new_rules:
        problems.append(f"rules {old_rules!r} ≠ {new_rules!r}")
    if problems:
        raise InputError(f"{out_dir}: cannot resume, the earlier run used other settings ({'; '.join(problems)})")
    if previous.get("args", {}).get("inputs") != current["args"]["inputs"]:
        log.warning("resuming with other inputs than the earlier run (%s); committed files are kept",
                    previous.get("args", {}).get("inputs"))


def _timings(stats: PipelineStats) -> dict[str, Any]:
    d = stats.as_dict()
    return {"pipeline_wall_s": d["wall_s"], **{k: d[k] for k in (
        "decode_cpu_s", "resize_s", "inference_s", "write_s", "images_per_s", "batches", "worker_restarts")}}


def _versions() -> dict[str, str]:
    import numpy
    import pydicom
    import torch

    from radflash import __version__

    return {"radflash": __version__, "torch": torch.__version__, "pydicom": pydicom.__version__,
            "pyarrow": pa.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


class _Progress:
    """The shared rich bar (radflash.util.progress) with images/s and live scored/skipped/failed counts."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, record: Any) -> None:
        self.bar.update(count=record.status)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(total: int | None, *, enabled: bool, initial_counts: Mapping[str, int]) -> _Progress | None:
    from radflash.util.progress import progress_bar

    bar = progress_bar(total, desc="scoring", enabled=enabled,
                       fields={"scored": 0, "skipped": 0, "failed": 0, **initial_counts})
    return None if bar is None else _Progress(bar)
