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

The consolidated files are streamed from the parts (:meth:`PartStore.finalize`, sorted on disk by
:class:`_PathOrder`), so finishing a run holds one part or one chunk of rows, never the archive;
:class:`Finalized` reads them back on demand.

PHI: patient name and ID are copied from the DICOM header only with ``include_phi``; nothing else
from the header beyond UIDs, modality and view is ever written.

Paths are stored as text (:func:`path_text`): absolute, and a name that is not valid UTF-8 (an
old Windows or Latin-1 archive) keeps its bytes as ``\\xNN`` escapes, with a literal backslash
written ``\\\\``, so every file name is storable and maps back to exactly one file.

``OUT/.radflash.lock`` (:class:`OutputLock`) is held for the whole run: a second run into the same
folder stops with an error naming the holder (pid, host, start time) instead of racing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from radflash.errors import InputError
from radflash.io.source import path_from_text as path_from_text  # re-exported: rows store path text
from radflash.io.source import path_text as path_text
from radflash.util.scratch import ScratchDB

log = logging.getLogger("radflash.writers")

Status = Literal["scored", "skipped", "failed"]
Format = Literal["parquet", "csv"]
TableName = Literal["results", "status"]
FORMATS = ("parquet", "csv")

PARTS_DIR = "parts"
MANIFEST = "manifest.json"
LOCK_FILE = ".radflash.lock"
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
CHUNK_ROWS = 4096  # rows per consolidated chunk (a Parquet row group): what finalize holds besides one part

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


class Finalized:
    """A finished run's ``results`` and ``status`` tables: in memory, or in the files a folder run wrote.

    A folder run's tables are read from its files only when asked for (:meth:`table`, then kept),
    so consolidating an archive of any size never holds it; :meth:`chunks` reads them a chunk at a
    time, which is how the verb takes its counts and checks from them. A CSV file is read back
    with the run's column types, so both formats give the tables :func:`split_tables` would.
    """

    def __init__(self, spec: TableSpec, results_path: Path | None = None, status_path: Path | None = None, *,
                 results: pa.Table | None = None, status: pa.Table | None = None) -> None:
        self.spec = spec
        self.results_path, self.status_path = results_path, status_path
        self._tables: dict[str, pa.Table | None] = {"results": results, "status": status}

    def schema(self, name: TableName) -> pa.Schema:
        full = self.spec.schema()
        return pa.schema([full.field(c) for c in self.columns(name)])

    def table(self, name: TableName) -> pa.Table:
        """The whole table: held already, else read from its file now and kept."""
        table = self._tables[name]
        if table is None:
            table = self._tables[name] = read_table(self._path(name), self.schema(name))
        return table

    def chunks(self, name: TableName, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The table's ``columns`` (all by default) in row order, a chunk at a time (:data:`CHUNK_ROWS`
        rows, or a CSV reader's block)."""
        columns = list(self.columns(name) if columns is None else columns)
        held = self._tables[name]
        if held is not None:
            yield from (pa.Table.from_batches([b]) for b in held.select(columns).to_batches(CHUNK_ROWS))
            return
        path = self._path(name)
        if path.suffix == ".csv":
            reader: Any = pacsv.open_csv(path, parse_options=_CSV_PARSE,
                                         convert_options=_csv_types(self.schema(name), columns))
        else:
            reader = pq.ParquetFile(path).iter_batches(CHUNK_ROWS, columns=columns)
        for batch in reader:
            yield pa.Table.from_batches([batch])

    def columns(self, name: TableName) -> list[str]:
        return self.spec.result_columns() if name == "results" else list(STATUS_COLUMNS)

    def _path(self, name: TableName) -> Path:
        path = self.results_path if name == "results" else self.status_path
        assert path is not None, "a table held in memory is never read from a file"
        return path


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
        """After the last commit: the consolidated results and status tables, held or written."""
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
        return Finalized(self.spec, results=results, status=status)


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

    def _read_part(self, part: Path) -> pa.Table:
        """One committed part in this run's schema (checked)."""
        schema = self.spec.schema()
        t = pq.read_table(part)
        for c in DEBUG_COLUMNS:  # a part written before the debug column existed: unknown there
            if c not in t.schema.names and c in schema.names:
                t = t.add_column(schema.get_field_index(c), c, pa.nulls(t.num_rows, pa.string()))
        self._check_columns(part, t.schema.names)
        return t.cast(schema)

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
        """Stream all parts into ``results.<fmt>`` and ``status.<fmt>``: the files :func:`split_tables`
        of every part's rows would give (sorted by path, the first row of a path kept), chunk by chunk.

        Memory holds one part or one chunk, never the archive (:class:`_PathOrder`); the tables
        come back unread (:class:`Finalized` reads them on demand).
        """
        check_format(fmt)
        res_path, status_path = self.out_dir / f"results.{fmt}", self.out_dir / f"status.{fmt}"
        done = Finalized(self.spec, res_path, status_path)
        with _PathOrder(self) as rows, TableWriter(res_path, fmt, done.schema("results")) as results, \
                TableWriter(status_path, fmt, done.schema("status")) as status:
            for chunk in rows:
                results.write(chunk.filter(pc.equal(chunk.column("status"), "scored")).select(done.columns("results")))
                status.write(chunk.select(list(STATUS_COLUMNS)))
        return done


class _PathOrder:
    """A store's committed rows in path order, each path once, :data:`CHUNK_ROWS` rows at a time.

    Parts are committed in decode order, so the consolidated tables need a sort of the whole
    archive; it is an external one. Entering copies each part (one in memory at a time) into an
    uncompressed Arrow file beside the parts and puts its paths, with where each row lies, into a
    private SQLite index (:class:`radflash.util.scratch.ScratchDB`) whose primary key is the path:
    ``INSERT OR IGNORE`` keeps the first row of a path, as :func:`split_tables` does, and SQLite
    keeps them sorted on disk. Iterating walks the index a page at a time and gathers each page's
    rows from the memory-mapped copy (zero-copy until the gather). Both files are gone when the
    iteration ends (the copy's name is unlinked once mapped; a kill before that leaves a
    ``parts/.*.tmp`` that the next :meth:`PartStore.open` deletes). Disk: about the run's tables
    uncompressed, for the time of the consolidation.
    """

    def __init__(self, store: PartStore) -> None:
        self.store = store
        self._copy = store.parts_dir / f".consolidate-{uuid.uuid4().hex[:12]}.arrow.tmp"
        self._index: ScratchDB | None = None
        self._mapped: pa.MemoryMappedFile | None = None

    def __enter__(self) -> _PathOrder:
        schema = self.store.spec.schema()
        self._index = ScratchDB(self.store.out_dir, "-score-order.sqlite",
                                "CREATE TABLE rows (path TEXT PRIMARY KEY, batch INTEGER, row INTEGER) WITHOUT ROWID;",
                                what="the index that sorts the run's rows")
        rows, batches = 0, 0
        with pa.OSFile(str(self._copy), "wb") as sink, pa.ipc.new_file(sink, schema) as copy:
            for part in self.store.part_files():
                for batch in self.store._read_part(part).to_batches():
                    if not batch.num_rows:
                        continue
                    copy.write_batch(batch)
                    paths = batch.column("path").to_pylist()
                    self._index.run_many("INSERT OR IGNORE INTO rows VALUES (?, ?, ?)",
                                         ((p, batches, i) for i, p in enumerate(paths)))
                    rows, batches = rows + len(paths), batches + 1
        kept = self._index.run("SELECT COUNT(*) FROM rows")[0][0]
        if kept != rows:  # cannot happen with correct resume logic; keep the output usable if it ever does
            log.warning("duplicate paths across parts; keeping the first row of each")
        self._mapped = pa.memory_map(str(self._copy))
        with contextlib.suppress(OSError):  # the mapping keeps the data (POSIX); elsewhere removed on exit
            self._copy.unlink()
        return self

    def __iter__(self) -> Iterator[pa.Table]:
        assert self._index is not None and self._mapped is not None
        copy = pa.ipc.open_file(self._mapped)
        page = self._index.run("SELECT path, batch, row FROM rows ORDER BY path LIMIT ?", (CHUNK_ROWS,))
        while page:
            groups: dict[int, list[tuple[int, int]]] = {}  # batch → (position in the page, row)
            for position, (_, batch, row) in enumerate(page):
                groups.setdefault(batch, []).append((position, row))
            pieces = [copy.get_batch(b).take(pa.array([row for _, row in g], pa.int64())) for b, g in groups.items()]
            where = [position for g in groups.values() for position, _ in g]
            yield pa.Table.from_batches(pieces).take(pa.array(sorted(range(len(where)), key=where.__getitem__)))
            page = self._index.run("SELECT path, batch, row FROM rows WHERE path > ? ORDER BY path LIMIT ?",
                                   (page[-1][0], CHUNK_ROWS))

    def __exit__(self, *exc: object) -> None:
        if self._mapped is not None:
            self._mapped.close()
        if self._index is not None:
            self._index.close()
        self._copy.unlink(missing_ok=True)


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


def check_format(fmt: str) -> None:
    """A one-line :class:`InputError` for a format other than :data:`FORMATS`, before anything is written."""
    if fmt not in FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


class TableWriter:
    """A Parquet or CSV table written a chunk at a time (a row group, or rows under one header) into
    ``.<name>.tmp``, which replaces ``path`` only once complete and fsynced: readers see the old file
    or the new one, never a half-written one. The bytes are those of one :func:`write_table` call."""

    def __init__(self, path: str | Path, fmt: Format, schema: pa.Schema) -> None:
        check_format(fmt)
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115  # closed by __exit__ (the writer outlives this call)
        try:
            self._writer = pq.ParquetWriter(self._fh, schema) if fmt == "parquet" else pacsv.CSVWriter(self._fh, schema)
        except BaseException:
            self._abort()
            raise

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._abort()
            return
        self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)

    def _abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_table(table: pa.Table, path: str | Path, fmt: Format) -> Path:
    """Atomically write ``table`` as Parquet or CSV (header always present, even with 0 rows)."""
    with TableWriter(path, fmt, table.schema) as writer:
        writer.write(table)
    return Path(path)


_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)  # a reason may span lines


def _csv_types(schema: pa.Schema, columns: Sequence[str] | None = None) -> pacsv.ConvertOptions:
    """Read a CSV that :func:`write_table` wrote back to ``schema``'s values: its writer quotes every
    string and leaves a null empty, so only an unquoted empty field is null (``"NA"`` stays text)."""
    return pacsv.ConvertOptions(column_types={f.name: f.type for f in schema}, include_columns=columns,
                                strings_can_be_null=True, quoted_strings_can_be_null=False)


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read a results/status file written by :func:`write_table` (format from the suffix); a CSV
    file is typed by inference, or exactly as written when its ``schema`` is given."""
    path = Path(path)
    if path.suffix != ".csv":
        return pq.read_table(path)
    if schema is None:
        return pacsv.read_csv(path)
    return pacsv.read_csv(path, parse_options=_CSV_PARSE, convert_options=_csv_types(schema)).cast(schema)


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
