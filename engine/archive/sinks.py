"""Result rows, crash-safe part files, consolidated tables and the run manifest.

Layout of a score output folder::

    OUT/
      manifest.json           model id + sha256, prompts, versions, args, counts, timings
      results.parquet|csv     one row per *scored* image: path, UIDs, <finding>.logit/.prob(/.positive)
      status.parquet|csv      one row per *discovered* file: path, status (scored/skipped/failed), reason
      parts/part-00000.parquet ...   committed parts; their union is the source of truth

Every part holds both the statuses and the scores of the files it covers (one row per file), so a
single ``rename`` commits both at once: a run killed with ``kill -9`` leaves either a complete
part or a ``.tmp`` file that resume deletes, never a half-written table or a status without its
scores. Parts are always Parquet (typed, compact); ``fmt`` only chooses the consolidated files.

PHI: patient name and ID are copied from the DICOM header only with ``include_phi``; nothing else
from the header beyond UIDs, modality and view is ever written.

Paths are stored as text (:func:`path_text`): absolute, and a name that is not valid UTF-8 (an
old Windows or Latin-1 archive) keeps its bytes as ``\\xNN`` escapes, with a literal backslash
written ``\\\\``, so every file name is storable and maps back to exactly one file.

``OUT/.radflash.lock`` (:class:`OutputLock`) is held for the whole run: a second run into the same
folder stops with an error naming the holder (pid, host, start time) instead of racing it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from radflash.errors import InputError
from radflash.io.source import path_from_text as path_from_text  # re-exported: rows store path text
from radflash.io.source import path_text as path_text

log = logging.getLogger("radflash.writers")

Status = Literal["scored", "skipped", "failed"]
Format = Literal["parquet", "csv"]
FORMATS = ("parquet", "csv")

PARTS_DIR = "parts"
MANIFEST = "manifest.json"
LOCK_FILE = ".radflash.lock"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")

ID_COLUMNS = ("path", "sop_instance_uid", "study_instance_uid", "series_instance_uid")
PHI_COLUMNS = ("patient_id", "patient_name")
STATUS_COLUMNS = ("path", "status", "reason", "sop_instance_uid", "modality", "view_position", "decoder")
DEBUG_COLUMNS = ("decoder",)  # which library decoded the pixels (radflash.io.decoders): traces a wrong decode


def storable(text: str | None) -> str | None:
    """Free text (a reason) with any undecodable bytes escaped, so a table can always hold it."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class FileRecord:
    """What the run learned about one discovered file; scores are set only when status == scored."""

    path: str
    status: Status
    reason: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    decoder: str | None = None  # the pixel decoder that read the file ("gdcm", "native", ...)
    patient_id: str | None = None
    patient_name: str | None = None
    logits: tuple[float, ...] | None = None
    probs: tuple[float, ...] | None = None
    positive: tuple[bool | None, ...] | None = None


@dataclass(frozen=True)
class TableSpec:
    """Column layout shared by every part of one run (fixed before the first part is written)."""

    names: tuple[str, ...]  # finding names, in prompt order
    include_phi: bool = False
    with_positive: bool = False

    def schema(self) -> pa.Schema:
        fields = [pa.field("path", pa.string(), nullable=False), pa.field("status", pa.string(), nullable=False),
                  pa.field("reason", pa.string())]
        fields += [pa.field(c, pa.string()) for c in (*ID_COLUMNS[1:], "modality", "view_position", *DEBUG_COLUMNS)]
        if self.include_phi:
            fields += [pa.field(c, pa.string()) for c in PHI_COLUMNS]
        for name in self.names:
            fields += [pa.field(f"{name}.logit", pa.float32()), pa.field(f"{name}.prob", pa.float32())]
            if self.with_positive:
                fields.append(pa.field(f"{name}.positive", pa.bool_()))
        return pa.schema(fields)

    def result_columns(self) -> list[str]:
        cols = list(ID_COLUMNS) + (list(PHI_COLUMNS) if self.include_phi else [])
        for name in self.names:
            cols += [f"{name}.logit", f"{name}.prob"] + ([f"{name}.positive"] if self.with_positive else [])
        return cols

    def to_table(self, records: Sequence[FileRecord]) -> pa.Table:
        cols: dict[str, list] = {f.name: [] for f in self.schema()}
        scalar = [c for c in cols if "." not in c]
        for r in records:
            for c in scalar:
                cols[c].append(getattr(r, c))
            for i, name in enumerate(self.names):
                cols[f"{name}.logit"].append(None if r.logits is None else r.logits[i])
                cols[f"{name}.prob"].append(None if r.probs is None else r.probs[i])
                if self.with_positive:
                    cols[f"{name}.positive"].append(None if r.positive is None else r.positive[i])
        return pa.table(cols, schema=self.schema())


def split_tables(parts: pa.Table, spec: TableSpec) -> tuple[pa.Table, pa.Table]:
    """All part rows → (results of scored files, status of every file), both sorted by path.

    Sorting makes the consolidated output independent of decode completion order, so a resumed
    or sharded run produces the same files as an uninterrupted one.
    """
    if parts.num_rows:
        paths = parts.column("path").to_pylist()
        if len(set(paths)) != len(paths):
            # Cannot happen with correct resume logic; keep the output usable if it ever does.
            log.warning("duplicate paths across parts; keeping the first row of each")
            seen: set[str] = set()
            keep = [not (p in seen or seen.add(p)) for p in paths]
            parts = parts.filter(pa.array(keep))
        parts = parts.sort_by("path")
    scored = parts.filter(pc.equal(parts.column("status"), "scored")) if parts.num_rows else parts
    return scored.select(spec.result_columns()), parts.select(list(STATUS_COLUMNS))


# (results path, status path, results, status); the paths are None for a sink that writes no tables
Finalized = tuple[Path | None, Path | None, pa.Table, pa.Table]


class Sink(Protocol):
    """Where a run's rows go: the pipeline commits batches, the verb finalises once at the end.

    A batch mixes scored rows and status-only rows (skipped/failed), and one ``commit`` must make
    all of them durable together or not at all: that is what lets a killed run resume without
    losing or duplicating a file. :class:`PartStore` (crash-safe Parquet parts, consolidated to
    Parquet/CSV) and :class:`MemoryStore` implement it; a DICOMweb STOW-RS sink would too.
    """

    def commit(self, records: Sequence[FileRecord]) -> object:
        """Store ``records`` durably (all or none); an empty batch is a no-op."""
        ...

    def finalize(self, fmt: Format) -> Finalized:
        """After the last commit: the consolidated results and status tables (and where they went)."""
        ...


class MemoryStore:
    """Collects records in memory: used when ``score()`` is called without an output folder."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self._tables: list[pa.Table] = []

    def commit(self, records: Sequence[FileRecord]) -> None:
        if records:
            self._tables.append(self.spec.to_table(records))

    def table(self) -> pa.Table:
        if not self._tables:
            return self.spec.schema().empty_table()
        return pa.concat_tables(self._tables)

    def finalize(self, fmt: Format) -> Finalized:
        """The tables :meth:`PartStore.finalize` would write; nothing is written (``fmt`` unused)."""
        results, status = split_tables(self.table(), self.spec)
        return None, None, results, status


class PartStore:
    """Atomic part files under ``OUT/parts``; see the module docstring for the layout."""

    def __init__(self, out_dir: str | Path, spec: TableSpec) -> None:
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / PARTS_DIR
        self.spec = spec
        self._next = 0

    # ---- opening ----------------------------------------------------------------------------
    @staticmethod
    def check_output(out_dir: str | Path, *, resume: bool) -> None:
        """Refuse to overwrite: a non-empty OUT is only accepted with ``resume``; an OUT that cannot
        be created (a file on its path, no write permission) is refused before any work starts."""
        out = Path(out_dir)
        check_creatable(out)
        if not out.is_dir():
            return
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{out}: output folder is not writable")
        used = any(entry.name != LOCK_FILE for entry in out.iterdir())
        if used and not resume:
            raise InputError(f"{out}: output folder is not empty; pass --resume to continue that run "
                             f"or choose a new folder")
        if resume and used and not (out / MANIFEST).is_file():
            raise InputError(f"{out}: not a radflash score output (no {MANIFEST}); refusing to resume into it")

    def open(self) -> None:
        """Create the folders, delete uncommitted ``.tmp`` files and check the committed parts' columns.

        Only the parts' footers are read: a resume reads its committed rows part by part
        (:meth:`committed`), so opening a folder of any size costs no more memory than one part.
        """
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.parts_dir.glob(".*.tmp"):
            tmp.unlink()
        for p in self.part_files():
            self._check_columns(p, pq.read_schema(p).names)
        self._next = max((int(m.group(1)) + 1 for p in self.part_files() if (m := _PART_RE.match(p.name))),
                         default=0)

    def part_files(self) -> list[Path]:
        return sorted(p for p in self.parts_dir.glob("part-*.parquet") if _PART_RE.match(p.name))

    def committed(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """The committed rows' ``columns`` (``path``, ``status``...), one part at a time."""
        for p in self.part_files():
            yield pq.read_table(p, columns=list(columns))

    def read_parts(self) -> pa.Table:
        schema = self.spec.schema()
        tables = []
        for p in self.part_files():
            t = pq.read_table(p)
            for c in DEBUG_COLUMNS:  # a part written before the debug column existed: unknown there
                if c not in t.schema.names and c in schema.names:
                    t = t.add_column(schema.get_field_index(c), c, pa.nulls(t.num_rows, pa.string()))
            self._check_columns(p, t.schema.names)
            tables.append(t.cast(schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def _check_columns(self, part: Path, names: Sequence[str]) -> None:
        """A part's columns must be this run's (a missing debug column is allowed: read as unknown)."""
        expected = self.spec.schema().names
        names = list(names)
        for c in DEBUG_COLUMNS:
            if c not in names and c in expected:
                names.insert(expected.index(c), c)
        if names != expected:
            raise InputError(f"{part}: columns differ from this run's (other findings or --include-phi?); "
                             f"resume with the original options or use a new output folder")

    # ---- writing ----------------------------------------------------------------------------
    def commit(self, records: Sequence[FileRecord]) -> Path | None:
        """Write one part durably: tmp file → fsync → rename → fsync(dir)."""
        if not records:
            return None
        final = self.parts_dir / f"part-{self._next:05d}.parquet"
        tmp = self.parts_dir / f".{final.name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(self.spec.to_table(records), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.parts_dir)
        self._next += 1
        return final

    def finalize(self, fmt: Format) -> Finalized:
        """Consolidate all parts into ``results.<fmt>`` and ``status.<fmt>``."""
        results, status = split_tables(self.read_parts(), self.spec)
        ext = "parquet" if fmt == "parquet" else "csv"
        res_path, status_path = self.out_dir / f"results.{ext}", self.out_dir / f"status.{ext}"
        write_table(results, res_path, fmt)
        write_table(status, status_path, fmt)
        return res_path, status_path, results, status


def check_creatable(out_dir: str | Path) -> None:
    """Raise a one-line :class:`InputError` when ``out_dir`` cannot be (or be used as) a folder:
    a file on its path (``-o afile/sub``) or a read-only parent. Cheap: call it before loading models."""
    out = Path(out_dir)
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "a file with that name exists" if folder == out else f"{folder} is a file"
                raise InputError(f"{out}: output must be a folder, but {what}")
            if folder != out and not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"{out}: cannot create the output folder ({folder} is not writable)")
            return


class OutputLock:
    """An exclusive ``flock`` on ``OUT/.radflash.lock`` for the duration of a run.

    Two runs into one folder (two fresh runs, or a resume racing the original) would interleave
    part numbers and overwrite each other's consolidated tables; the second one therefore stops
    at once with an error naming the holder. The file holds only pid, host and start time (no
    PHI) and is never deleted: the kernel drops the lock when its holder exits or is killed, so
    a stale file left by a dead run blocks nothing, and unlinking it could let a third run lock
    a fresh inode while the second still holds the old one.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the run proceeds unguarded
            log.warning("no file locking on this platform: do not start two runs into %s", self.path.parent)
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"{self.path.parent}: cannot create the output folder or its lock "
                             f"({exc.strerror or type(exc).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise InputError(f"{self.path.parent}: another radflash run is writing to this folder "
                             f"({holder}); wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder still starting"


def write_table(table: pa.Table, path: str | Path, fmt: Format) -> Path:
    """Atomically write ``table`` as Parquet or CSV (header always present, even with 0 rows)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        if fmt == "parquet":
            pq.write_table(table, fh)
        else:
            pacsv.write_csv(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_table(path: str | Path) -> pa.Table:
    """Read a results/status file written by :func:`write_table` (format from the suffix)."""
    path = Path(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path)
    return pq.read_table(path)


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Atomic JSON write: a manifest is either the old one or the new one, never truncated."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc})") from None


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts = {"scored": 0, "skipped": 0, "failed": 0}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return counts


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem (e.g. Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
