"""Result tables, atomic part files, consolidation, formats and the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from radflash.archive.sinks import (
    PHI_COLUMNS,
    STATUS_COLUMNS,
    FileRecord,
    MemoryStore,
    PartStore,
    TableSpec,
    read_manifest,
    read_table,
    split_tables,
    write_manifest,
    write_table,
)
from radflash.errors import InputError

NAMES = ("edema", "pleural effusion")


def _records(prefix: str, n: int) -> list[FileRecord]:
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(FileRecord(f"{prefix}{i:03d}", "skipped", "modality CT"))
        else:
            out.append(FileRecord(f"{prefix}{i:03d}", "scored", sop_instance_uid=f"1.2.{i}",
                                  patient_id="PID", patient_name="Doe^Jane",
                                  logits=(float(i), -float(i)), probs=(0.25, 0.75)))
    return out


def test_schema_columns_and_phi() -> None:
    plain = TableSpec(NAMES)
    cols = plain.result_columns()
    assert cols[:4] == ["path", "sop_instance_uid", "study_instance_uid", "series_instance_uid"]
    assert "edema.logit" in cols and "pleural effusion.prob" in cols
    assert not set(PHI_COLUMNS) & set(plain.schema().names)
    phi = TableSpec(NAMES, include_phi=True, with_positive=True)
    assert set(PHI_COLUMNS) <= set(phi.result_columns())
    assert "edema.positive" in phi.result_columns()


def test_to_table_drops_phi_unless_asked() -> None:
    recs = _records("a", 4)
    assert "patient_name" not in TableSpec(NAMES).to_table(recs).schema.names
    t = TableSpec(NAMES, include_phi=True).to_table(recs)
    assert t.column("patient_name").to_pylist()[0] == "Doe^Jane"
    assert t.column("edema.logit").to_pylist() == [0.0, 1.0, None, 3.0]


def test_part_store_commit_resume_and_consolidate(tmp_path: Path) -> None:
    spec = TableSpec(NAMES)
    store = PartStore(tmp_path, spec)
    store.open()
    assert list(store.committed(("path",))) == []
    store.commit(_records("b", 5))
    store.commit([])  # nothing to commit → no empty part
    store.commit(_records("a", 4))
    assert [p.name for p in store.part_files()] == ["part-00000.parquet", "part-00001.parquet"]
    # a crash mid-write leaves a tmp file: resume deletes it and continues numbering
    (store.parts_dir / ".part-00002.parquet.tmp").write_bytes(b"half a parquet")
    again = PartStore(tmp_path, spec)
    again.open()
    assert sum(t.num_rows for t in again.committed(("path",))) == 9
    assert [t.column_names for t in again.committed(("path", "status"))] == [["path", "status"]] * 2
    assert not list(again.parts_dir.glob(".*.tmp"))
    again.commit(_records("c", 2))
    assert again.part_files()[-1].name == "part-00002.parquet"
    done = again.finalize("parquet")
    results, status = done.table("results"), done.table("status")
    assert status.num_rows == 11 and status.column_names == list(STATUS_COLUMNS)
    assert status.column("path").to_pylist() == sorted(status.column("path").to_pylist())
    assert set(results.column("path").to_pylist()) == {
        r.path for r in _records("a", 4) + _records("b", 5) + _records("c", 2) if r.status == "scored"}
    assert read_table(done.results_path).equals(results)
    assert read_table(done.status_path).num_rows == 11


def test_part_store_rejects_other_columns_on_resume(tmp_path: Path) -> None:
    PartStore(tmp_path, TableSpec(NAMES)).open()
    PartStore(tmp_path, TableSpec(NAMES)).commit(_records("a", 2))
    with pytest.raises(InputError, match="columns differ"):
        PartStore(tmp_path, TableSpec(("edema",))).open()


def test_check_output_refuses_to_overwrite(tmp_path: Path) -> None:
    PartStore.check_output(tmp_path / "new", resume=False)  # missing → fine
    PartStore.check_output(tmp_path, resume=False)  # empty → fine
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not empty"):
        PartStore.check_output(tmp_path, resume=False)
    with pytest.raises(InputError, match=r"no manifest\.json"):
        PartStore.check_output(tmp_path, resume=True)
    with pytest.raises(InputError, match="must be a folder"):
        PartStore.check_output(tmp_path / "x.txt", resume=False)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_write_table_roundtrip(tmp_path: Path, fmt: str) -> None:
    spec = TableSpec(NAMES)
    results, _status = split_tables(spec.to_table(_records("a", 6)), spec)
    path = write_table(results, tmp_path / f"results.{fmt}", fmt)  # type: ignore[arg-type]
    back = read_table(path)
    assert back.num_rows == results.num_rows == 4
    assert back.column_names == results.column_names
    assert back.column("edema.logit").to_pylist() == pytest.approx(results.column("edema.logit").to_pylist())
    empty = write_table(spec.schema().empty_table(), tmp_path / f"empty.{fmt}", fmt)  # type: ignore[arg-type]
    assert read_table(empty).num_rows == 0
    with pytest.raises(InputError):
        write_table(results, tmp_path / "x.xlsx", "xlsx")  # type: ignore[arg-type]


def test_split_tables_dedupes_and_sorts() -> None:
    spec = TableSpec(NAMES)
    mem = MemoryStore(spec)
    assert mem.table().num_rows == 0
    mem.commit(_records("z", 2))
    mem.commit(_records("a", 2) + _records("z", 1))
    results, status = split_tables(mem.table(), spec)
    assert status.column("path").to_pylist() == ["a000", "a001", "z000", "z001"]
    assert results.num_rows == 4


def test_manifest_roundtrip(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, {"a": 1, "p": Path("/x")})
    assert read_manifest(tmp_path) == {"a": 1, "p": "/x"}
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(InputError, match="unreadable manifest"):
        read_manifest(tmp_path)
