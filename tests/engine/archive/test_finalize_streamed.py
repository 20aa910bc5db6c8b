"""An output folder's ``results``/``status`` are streamed from the parts: the files the whole-table
consolidation wrote (byte for byte in CSV), in memory that does not grow with the number of parts,
and ``ScoreRun.results``/``.status`` read back from them only when asked for."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import radflash.archive.sinks as sinks
from radflash.archive.sinks import STATUS_COLUMNS, FileRecord, Finalized, PartStore, TableSpec, TableWriter
from radflash.archive.verb import score
from tests.engine.crash import Crash, crash_on_batch

NAMES = ("edema", "pleural effusion")
RUN = {"workers": 0, "batch_size": 2, "commit_every": 4, "progress": False}


def reference(parts_dir: Path, spec: TableSpec) -> tuple[pa.Table, pa.Table]:
    """(results, status) as the old consolidation defined them, built without radflash's code: every
    part at once (``pa.concat_tables``), the first row of each path kept, sorted by path."""
    parts = [pq.read_table(p) for p in sorted(parts_dir.glob("part-*.parquet"))]
    whole = pa.concat_tables(parts) if parts else spec.schema().empty_table()
    first: dict[str, dict] = {}
    for row in whole.to_pylist():
        first.setdefault(row["path"], row)
    rows = [first[p] for p in sorted(first)]  # Python's str order is UTF-8 byte order, as Arrow's sort
    status = pa.Table.from_pylist(rows, schema=pa.schema([whole.schema.field(c) for c in STATUS_COLUMNS]))
    per_file = {"status", "reason", "modality", "view_position", "decoder"}  # in status, not in results
    results = pa.Table.from_pylist([r for r in rows if r["status"] == "scored"], schema=pa.schema(
        [f for f in whole.schema if f.name not in per_file]))
    return results, status


def assert_same_files(done: Finalized, parts_dir: Path) -> None:
    """Parquet: the reference tables; CSV: the bytes ``write_csv`` gives for them."""
    for path, ref in zip((done.results_path, done.status_path), reference(parts_dir, done.spec)):
        assert path is not None
        if path.suffix == ".csv":
            expected = io.BytesIO()
            pacsv.write_csv(ref, expected)
            assert path.read_bytes() == expected.getvalue(), path
        else:
            assert pq.read_table(path).equals(ref), path


def assert_no_scratch(out: Path) -> None:
    assert not list((out / "parts").glob(".*")) and not list(out.glob(".tmp-*")) and not list(out.glob(".*.tmp"))


def _records(prefix: str, keys: list[int]) -> list[FileRecord]:
    """Scored, skipped and failed rows, with the text a CSV writer must quote and a reader keep."""
    out = []
    for k in keys:
        path = f"{prefix}/IM-{k:05d}\\xe9 \"q\",.dcm"
        if k % 4 == 1:
            out.append(FileRecord(path, "skipped", "NA" if k % 8 == 1 else "modality CT"))
        elif k % 4 == 2:
            out.append(FileRecord(path, "failed", "truncated\nfile", decoder=""))
        else:
            out.append(FileRecord(path, "scored", sop_instance_uid=f"1.2.{k}", decoder="gdcm" if k % 3 else None,
                                  logits=(k / 7, -k / 3), probs=(np.float32(k % 97 / 97).item(), 0.5),
                                  positive=(k % 2 == 0, None)))
    return out


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_finalize_writes_the_consolidated_files(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "CHUNK_ROWS", 7)  # many chunks and index pages from a few rows
    spec = TableSpec(NAMES, with_positive=True)
    store = PartStore(tmp_path, spec)
    store.open()
    keys = np.random.permutation(90).tolist()
    for start in range(0, 90, 13):  # parts in decode order, not path order
        store.commit(_records("/b", keys[start:start + 13]) + _records("/a", keys[start:start + 2]))
    store.commit(_records("/b", keys[:5]))  # rows a resume should never have committed twice: first kept

    done = store.finalize(fmt)  # type: ignore[arg-type]

    assert_same_files(done, tmp_path / "parts")
    assert_no_scratch(tmp_path)
    results, status = reference(tmp_path / "parts", spec)
    assert done.table("status").equals(status) and done.table("results").equals(results)  # CSV: typed as written
    assert status.num_rows == 90 + 14 and 0 < results.num_rows < status.num_rows


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_finalize_without_parts_writes_empty_tables(tmp_path: Path, fmt: str) -> None:
    store = PartStore(tmp_path, TableSpec(NAMES))
    store.open()
    done = store.finalize(fmt)  # type: ignore[arg-type]
    assert_same_files(done, tmp_path / "parts")
    assert done.table("results").num_rows == done.table("status").num_rows == 0


def test_a_failed_consolidation_leaves_no_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "CHUNK_ROWS", 5)
    store = PartStore(tmp_path, TableSpec(NAMES))
    store.open()
    store.commit(_records("/a", list(range(20))))
    writes = []

    def fail_on_third(self: TableWriter, table: pa.Table) -> None:
        writes.append(table.num_rows)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(TableWriter, "write", fail_on_third)
    with pytest.raises(OSError, match="No space"):
        store.finalize("csv")
    assert not list(tmp_path.glob("*.csv"))
    assert_no_scratch(tmp_path)


# ---- bounded memory ------------------------------------------------------------------------------
def _write_parts(out: Path, spec: TableSpec, parts: int, rows: int) -> None:
    """``parts`` committed parts of ``rows`` rows each, paths shuffled across all of them (the worst
    case for the sort: every chunk gathers from every part), written straight as Parquet."""
    (out / "parts").mkdir(parents=True)
    order = np.random.permutation(parts * rows)
    schema = spec.schema()
    for i in range(parts):
        keys = order[i * rows:(i + 1) * rows]
        status = np.array(["scored", "skipped", "failed"])[keys % 3]
        scored = status == "scored"
        columns: dict[str, object] = {"path": [f"/archive/p{k // 50:06d}/IM-{k:08d}.dcm" for k in keys],
                                      "status": status, "reason": np.where(scored, None, "modality CT")}
        columns |= {f.name: pa.nulls(rows, f.type) for f in schema if f.name not in columns and "." not in f.name}
        for name in spec.names:
            columns[f"{name}.logit"] = pa.array(np.where(scored, keys / 3.0, np.nan), pa.float32(), mask=~scored)
            columns[f"{name}.prob"] = pa.array(np.where(scored, (keys % 97) / 97, np.nan), pa.float32(), mask=~scored)
        pq.write_table(pa.table(columns, schema=schema), out / "parts" / f"part-{i:05d}.parquet")


def _finalize_peaks(out: Path, spec: TableSpec, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """(Python heap peak by tracemalloc, Arrow bytes held at the most) while ``finalize`` runs; Arrow's
    memory is sampled after each part is read and at each chunk written (where a whole-table
    consolidation would hold the archive)."""
    arrow: list[int] = []
    read, write = PartStore._read_part, TableWriter.write

    def sampled_read(self: PartStore, part: Path) -> pa.Table:
        table = read(self, part)
        arrow.append(pa.total_allocated_bytes())
        return table

    def sampled_write(self: TableWriter, table: pa.Table) -> None:
        arrow.append(pa.total_allocated_bytes())
        write(self, table)

    monkeypatch.setattr(PartStore, "_read_part", sampled_read)
    monkeypatch.setattr(TableWriter, "write", sampled_write)
    store = PartStore(out, spec)
    store.open()
    base_arrow = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        done = store.finalize("parquet")
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        monkeypatch.undo()
    assert pq.ParquetFile(done.status_path).metadata.num_rows == len(store.part_files()) * 2_000
    return python, max(arrow) - base_arrow


def test_finalize_memory_does_not_grow_with_the_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TableSpec(tuple(f"finding {i}" for i in range(14)))  # as many as the default CheXpert prompts
    few, many = tmp_path / "few", tmp_path / "many"
    _write_parts(few, spec, 10, 2_000)
    _write_parts(many, spec, 40, 2_000)
    whole = pq.read_table(many / "parts" / "part-00000.parquet").nbytes * 40  # what consolidating in memory held

    python_few, arrow_few = _finalize_peaks(few, spec, monkeypatch)
    python_many, arrow_many = _finalize_peaks(many, spec, monkeypatch)

    assert python_many < 1.25 * python_few + 512 * 1024, (python_few, python_many)
    assert arrow_many < 1.25 * arrow_few + 1024 * 1024, (arrow_few, arrow_many)
    assert arrow_many < whole / 4 and python_many < whole / 4, (arrow_many, python_many, whole)


# ---- through score() ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Films plus write_archive's clutter (other modalities, broken files): skipped and failed rows too."""
    from radflash.synthetic.dicom_archive import MANIFEST, write_archive

    base = tmp_path_factory.mktemp("archive")
    write_archive(base / "export", 8, seed=11)
    (base / "export" / MANIFEST).replace(base / MANIFEST)
    return base / "export"


@pytest.fixture(scope="module")
def in_memory(archive: Path, tiny_model: Path):
    """The same run without an output folder (MemoryStore): nothing streamed, the tables held."""
    return score(archive, None, model=tiny_model, **RUN)


def _close(a: pa.Table, b: pa.Table) -> None:
    """Same rows in the same order; scores equal up to float rounding (batches may differ)."""
    assert a.schema == b.schema and a.column("path").equals(b.column("path"))
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if pa.types.is_floating(a.schema.field(name).type):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-5), name
        else:
            assert x == y, name


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_score_run_writes_the_consolidated_files_and_reads_them_lazily(
        archive: Path, tiny_model: Path, in_memory, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []  # the whole tables read from their files
    read = sinks.read_table

    def counted(path: Path, schema: pa.Schema | None = None) -> pa.Table:
        loads.append(Path(path).stem)
        return read(path, schema)

    monkeypatch.setattr(sinks, "read_table", counted)
    run = score(archive, tmp_path / "out", model=tiny_model, fmt=fmt, **RUN)

    assert loads == []  # the run itself (and so the CLI) never read a whole table
    assert_same_files(run.tables, tmp_path / "out" / "parts")
    assert_no_scratch(tmp_path / "out")
    assert run.failed and run.skipped and run.scored  # the archive's clutter: every status
    assert (run.scored, run.skipped, run.failed) == (in_memory.scored, in_memory.skipped, in_memory.failed)
    assert run.manifest["counts"] == in_memory.manifest["counts"]
    results, status = run.results, run.status
    assert run.results is results and run.status is status and loads == ["results", "status"]  # read once, kept
    assert results.equals(read(run.results_path, run.tables.schema("results")))
    assert status.equals(in_memory.status)  # same type and content as a run that held its tables
    _close(results, in_memory.results)


def test_resumed_run_writes_the_consolidated_files(archive: Path, tiny_model: Path, in_memory,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Crash):
        score(archive, out, model=tiny_model, observer=crash_on_batch(3), **RUN)
    run = score(archive, out, model=tiny_model, resume=True, fmt="csv", **RUN)

    assert 0 < run.resumed < run.discovered
    assert_same_files(run.tables, out / "parts")
    assert_no_scratch(out)
    assert run.status.equals(in_memory.status)
    _close(run.results, in_memory.results)
