"""The stage interfaces: the decode stage takes a source item (path or bytes); stores are sinks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radflash.archive.decode_pool import decode_one, decode_stream, default_loader, to_task
from radflash.archive.sinks import FileRecord, MemoryStore, PartStore, Sink, TableSpec, split_tables
from radflash.io.source import SourceItem
from tests.engine import dicom_factory as F


def film(path: Path) -> Path:
    pixels = (np.arange(48 * 40, dtype=np.uint32) % 4096).astype(np.uint16).reshape(48, 40)
    return F.write(F.make_dataset(pixels, BodyPartExamined="CHEST", ViewPosition="PA"), path)


def test_bytes_item_decodes_like_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = film(tmp_path / "x.dcm")
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))
    loader = default_loader()
    by_path = decode_one(to_task(0, path), loader, None)
    by_bytes = decode_one(to_task(1, SourceItem("1.2.3.4", data=path.read_bytes())), loader, None)
    assert by_path.status == by_bytes.status == "loaded"
    assert by_bytes.key == by_bytes.path == "1.2.3.4" and by_path.key == by_path.path == str(path)
    np.testing.assert_array_equal(by_path.pixels, by_bytes.pixels)
    assert by_path.meta.sop_instance_uid == by_bytes.meta.sop_instance_uid
    assert list(spool.iterdir()) == []  # the spooled copy is gone once the decode returns
    junk = decode_one(to_task(2, SourceItem("junk", data=b"not an image")), loader, None)
    assert junk.status == "failed" and junk.key == "junk"


def test_unread_entries_are_not_decoded() -> None:
    with pytest.raises(ValueError, match="not decoded"):
        to_task(0, SourceItem("k", Path("pipe"), skip="not a regular file (FIFO)"))


def test_inline_stream_keeps_keys_in_order(tmp_path: Path) -> None:
    a, b = film(tmp_path / "a.dcm"), film(tmp_path / "b.dcm")
    stream, pool = decode_stream([SourceItem("A", a), SourceItem("B", data=b.read_bytes())], workers=0)
    assert pool is None and [(d.index, d.key, d.status) for d in stream] == [(0, "A", "loaded"), (1, "B", "loaded")]


def test_stores_are_sinks(tmp_path: Path) -> None:
    spec = TableSpec(("edema",))
    records = [FileRecord("/b", "scored", logits=(0.5,), probs=(0.6,)), FileRecord("/a", "skipped", "hidden file")]
    memory, parts = MemoryStore(spec), PartStore(tmp_path / "out", spec)
    parts.open()
    sinks: list[Sink] = [memory, parts]  # structural: a type checker holds both to the protocol
    for sink in sinks:
        sink.commit(records)
    in_memory, on_disk = memory.finalize("parquet"), parts.finalize("csv")
    mem_res, mem_status = in_memory.table("results"), in_memory.table("status")
    results, status = on_disk.table("results"), on_disk.table("status")  # read back from the CSV files
    assert (in_memory.results_path, in_memory.status_path) == (None, None)
    assert on_disk.results_path.suffix == on_disk.status_path.suffix == ".csv"
    assert results.equals(mem_res) and status.equals(mem_status)
    assert (mem_res, mem_status) == split_tables(memory.table(), spec)
