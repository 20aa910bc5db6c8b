"""A resumed ``score`` run looks its committed keys up on disk: same skips and rows, bounded memory."""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radflash.archive.committed import INDEX_SUFFIX, CommittedKeys, read_committed
from radflash.archive.sinks import FileRecord, PartStore, TableSpec, read_manifest
from radflash.archive.verb import score
from tests.engine.crash import Crash, crash_on_batch

FILMS = 8  # write_archive adds its clutter (other modalities, broken files): skipped and failed rows too
RUN = {"workers": 0, "batch_size": 2, "commit_every": 4, "progress": False}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radflash.synthetic.dicom_archive import MANIFEST, write_archive

    base = tmp_path_factory.mktemp("archive")
    write_archive(base / "export", FILMS, seed=7)
    (base / "export" / MANIFEST).replace(base / MANIFEST)  # not scored as a junk file
    return base / "export"


@pytest.fixture(scope="module")
def reference(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run: the rows every resumed run must end with."""
    return score(archive, tmp_path_factory.mktemp("ref") / "out", model=tiny_model, **RUN)


def _keys(parts: list[Path]) -> list[str]:
    return [k for p in parts for k in pq.read_table(p, columns=["path"]).column("path").to_pylist()]


def _open_index_files() -> list[str]:
    """The scratch index files this process holds open (Linux: what /proc/self/fd points at)."""
    fds = Path("/proc/self/fd")
    links: list[str] = []
    for fd in fds.iterdir() if fds.is_dir() else ():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if INDEX_SUFFIX in link]


def _same_rows(a: pa.Table, b: pa.Table) -> None:
    """Same files, same statuses and reasons; scores equal up to batch-composition rounding."""
    rows_a = {r["path"]: r for r in a.to_pylist()}
    rows_b = {r["path"]: r for r in b.to_pylist()}
    assert rows_a.keys() == rows_b.keys()
    for path, row in rows_a.items():
        for col, value in row.items():
            if isinstance(value, float):
                assert rows_b[path][col] == pytest.approx(value, rel=1e-4, abs=1e-5), (path, col)
            else:
                assert rows_b[path][col] == value, (path, col)


def test_crashed_run_resumes_skipping_exactly_its_committed_keys(archive: Path, tiny_model: Path, reference,
                                                                tmp_path: Path) -> None:
    common = {"model": tiny_model, **RUN}
    out = tmp_path / "out"
    with pytest.raises(Crash):
        score(archive, out, observer=crash_on_batch(3), **common)
    assert not read_manifest(out)["complete"]
    before = sorted((out / "parts").glob("part-*.parquet"))
    committed = _keys(before)
    assert 0 < len(committed) < reference.discovered

    held: list[list[str]] = []

    def look(*args: object) -> None:  # the index is open on disk, and already gone from the folder
        held.append(_open_index_files())

    run = score(archive, out, resume=True, observer=look, **common)
    assert run.resumed == len(committed)
    assert run.manifest["counts"]["processed_this_run"] == run.discovered - len(committed)
    new = _keys(sorted(set((out / "parts").glob("part-*.parquet")) - set(before)))
    assert sorted(new) == sorted(set(reference.status.column("path").to_pylist()) - set(committed))  # each once
    _same_rows(run.status, reference.status)
    _same_rows(run.results, reference.results)
    if Path("/proc/self/fd").is_dir():
        assert held and all(links and all(link.endswith(" (deleted)") for link in links) for links in held)
        assert not _open_index_files()  # closed when the run ended
    assert not list(out.glob(f"*{INDEX_SUFFIX}"))


def _fake_parts(store: PartStore, n: int, part: int) -> list[str]:
    """``n`` committed rows (scored, skipped, failed in turn) of files that no longer exist, as
    parts of ``part`` rows written straight through the store."""
    root = f"/gone/archive-{np.random.randint(2**31)}"
    keys = [f"{root}/patient{i // 20:06d}/study{i % 3}/IM-{i:08d}.dcm" for i in range(n)]
    statuses = ("scored", "skipped", "failed")
    for start in range(0, n, part):
        store.commit([FileRecord(k, statuses[i % 3], None if i % 3 == 0 else "gone",
                                 logits=(0.5,) * len(store.spec.names) if i % 3 == 0 else None,
                                 probs=(0.6,) * len(store.spec.names) if i % 3 == 0 else None)
                      for i, k in enumerate(keys[start:start + part], start)])
    return keys


def test_committed_keys_are_read_in_bounded_memory(tmp_path: Path) -> None:
    n, part = 40_000, 2_000
    store = PartStore(tmp_path, TableSpec(("edema",)))
    store.open()
    keys = _fake_parts(store, n, part)

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        as_set = {k for table in store.committed(("path",)) for k in table.column("path").to_pylist()}
        set_bytes = tracemalloc.get_traced_memory()[0] - base  # what a set of the keys read back holds
        del as_set
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        done, counts = read_committed(store, lambda key: f"{key}#resolved")  # realpath: costly under tracemalloc
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()

    assert isinstance(done, CommittedKeys) and counts == {"scored": n // 3 + 1, "skipped": n // 3, "failed": n // 3}
    # one part's keys at a time, never the archive's: a set of all of them costs several times more
    assert peak < set_bytes / 4, (peak, set_bytes)
    assert all(k in done and f"{k}#resolved" in done for k in keys[::997]) and keys[-1] in done
    assert f"{keys[0]}.not-committed" not in done and "" not in done
    assert not list(tmp_path.glob(f"*{INDEX_SUFFIX}"))  # unlinked as soon as it was opened
    done.close()


def test_resume_over_many_committed_rows_scores_only_the_rest(archive: Path, tiny_model: Path, reference,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash.archive.verb as verb

    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    shutil.copy(reference.manifest_path, out)
    for part in sorted(reference.output.glob("parts/part-*.parquet"))[:2]:  # an earlier run's first parts
        shutil.copy(part, out / "parts")
    real_rows = _keys(sorted((out / "parts").glob("part-*.parquet")))
    columns = pq.read_schema(out / "parts" / "part-00000.parquet").names
    spec = TableSpec(tuple(read_manifest(out)["findings"]), with_positive=any(c.endswith(".positive") for c in columns))
    store = PartStore(out, spec)
    store.open()
    gone = _fake_parts(store, 20_000, 5_000)  # and many more rows, of files no longer there

    lookups: list[object] = []
    real = verb.read_committed

    def spy(*args, **kwargs):
        done, counts = real(*args, **kwargs)
        lookups.append(done)
        return done, counts

    monkeypatch.setattr(verb, "read_committed", spy)
    run = score(archive, out, resume=True, model=tiny_model, **RUN)

    assert len(lookups) == 1 and isinstance(lookups[0], CommittedKeys)
    assert run.resumed == len(real_rows) + len(gone)
    assert run.manifest["counts"]["processed_this_run"] == run.discovered - len(real_rows)
    assert run.status.num_rows == len(set(run.status.column("path").to_pylist())) == len(gone) + run.discovered
    real = pa.array([not p.startswith("/gone/") for p in run.status.column("path").to_pylist()])
    _same_rows(run.status.filter(real), reference.status)
    assert not _open_index_files() and not list(out.glob(f"*{INDEX_SUFFIX}"))
