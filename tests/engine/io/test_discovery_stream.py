"""Streamed discovery: sorted order without a global sort, one folder listed at a time, each file
once, and an archive of 10⁶ entries through discovery + sharding + the Ray input chunks in flat memory."""

from __future__ import annotations

import errno
import os
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

import radflash.io.discovery as discovery
from radflash.archive.ray_executor import input_chunks, windows
from radflash.io.discovery import discover, walk
from radflash.io.source import FileSource
from tests.engine.io.test_discovery import touch

# names whose order stresses the rule "a folder sorts as name/": '-', '.', ' ' and '0' sort before '/'
NAMES = ["a", "a.b", "a-b", "a b", "a0", "ab", "a_", "b", "B", "é", ".h"]


def random_tree(root: Path, rng: random.Random, depth: int = 3) -> None:
    for name in rng.sample(NAMES, rng.randint(2, len(NAMES))):
        if depth and rng.random() < 0.4:
            (root / name).mkdir(parents=True)
            random_tree(root / name, rng, depth - 1)
        else:
            touch(root / name)


def test_walk_order_is_the_sorted_order_of_the_paths(tmp_path: Path) -> None:
    rng = random.Random(random.getrandbits(32))  # the test's seed (autouse fixture)
    for trial in range(10):
        root = tmp_path / f"t{trial}"
        random_tree(root, rng)
        entries = list(walk(root))
        paths = [e.path for e in entries]
        assert paths == sorted(paths) and len(set(paths)) == len(paths)
        expected = set()
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            expected |= {os.path.join(folder, f) for f in files if not f.startswith(".")}
        assert {e.path for e in entries if e.reason is None} == expected
        hidden = {e.path for e in entries if e.reason is not None}
        assert all(os.path.basename(p).startswith(".") for p in hidden)


class FakeEntry:
    """What ``os.scandir`` yields, for a folder that does not exist on disk."""

    __slots__ = ("folder", "name")

    def __init__(self, name: str, folder: bool) -> None:
        self.name, self.folder = name, folder

    def is_file(self, follow_symlinks: bool = True) -> bool:
        return not self.folder

    def is_dir(self, follow_symlinks: bool = True) -> bool:
        return self.folder

    def is_symlink(self) -> bool:
        return False


def fake_archive(monkeypatch: pytest.MonkeyPatch, root: Path, folders: int, files: int) -> list[str]:
    """``root`` (a real, empty folder) seen as ``folders`` × (``files`` files + one ``.DS_Store``),
    generated folder by folder as the walk lists them; returns the folders listed, in order."""
    listed: list[str] = []
    top = str(root)
    # every series folder holds the same names: their entries are made once (a fresh list per listing)
    series = [FakeEntry(f"IM{j:05d}", False) for j in reversed(range(files))] + [FakeEntry(".DS_Store", False)]

    def list_folder(folder: str) -> list[FakeEntry]:
        listed.append(folder)
        if folder == top:  # listed in reverse: the walk must sort
            return [FakeEntry(f"series{i:04d}", True) for i in reversed(range(folders))]
        return list(series)

    monkeypatch.setattr(discovery, "_list_folder", list_folder)
    return listed


def test_walk_lists_one_folder_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = fake_archive(monkeypatch, tmp_path, folders=50, files=20)
    entries = walk(tmp_path)
    first = next(entries)
    assert first == (f"{tmp_path}/series0000/.DS_Store", "hidden file") and len(listed) == 2  # root + 1 folder
    rest = list(entries)
    assert len(listed) == 51 and len(rest) + 1 == 50 * 21
    assert rest[-1] == (f"{tmp_path}/series0049/IM00019", None)


def test_each_file_once_across_overlapping_inputs_and_links(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for rel in ["a/IM1", "a/IM2", "b/IM3", ".hidden/IM4"]:
        touch(root / rel)
    outside = touch(tmp_path / "elsewhere" / "IM5")
    os.symlink(root / "b" / "IM3", root / "a" / "link_to_IM3")  # its target is listed: the link is not
    os.symlink(outside, root / "a" / "link1_to_IM5")  # the first link to an outside file is listed...
    os.symlink(outside, root / "b" / "link2_to_IM5")  # ...once

    def listed(*inputs: Path) -> list[str]:
        return [p.relative_to(tmp_path).as_posix() for p in discover(list(inputs))]

    assert listed(root, root / "a", root / "a" / "IM1", root / ".hidden") == [  # inputs the walk covers: once
        "archive/a/IM1", "archive/a/IM2", "archive/a/link1_to_IM5", "archive/b/IM3",
        "archive/.hidden/IM4"]  # a hidden folder named explicitly is walked
    assert listed(root, root / "b" / "link2_to_IM5") == [  # a link named explicitly is the one listed
        "archive/a/IM1", "archive/a/IM2", "archive/b/IM3", "archive/b/link2_to_IM5"]
    assert listed(outside, root / "b" / "link2_to_IM5") == ["archive/b/link2_to_IM5"]  # one file: first spelling


def test_folder_that_cannot_be_listed_is_accounted_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rel in ["ok/IM1", "locked/IM2"]:
        touch(tmp_path / rel)
    real = discovery._list_folder

    def list_folder(folder: str) -> list:
        if folder.endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        return real(folder)

    monkeypatch.setattr(discovery, "_list_folder", list_folder)
    assert list(walk(tmp_path)) == [(f"{tmp_path}/locked", "cannot list folder (Permission denied)"),
                                    (f"{tmp_path}/ok/IM1", None)]


class CountingSink:
    """Counts the unread entries input_chunks commits as skipped rows (nothing is kept)."""

    def __init__(self) -> None:
        self.skipped = 0

    def commit(self, records: list) -> None:
        self.skipped += len(records)


def streamed(source: FileSource, window: int) -> Iterator[list[pa.Table]]:
    sink = CountingSink()
    yield from windows(input_chunks(source, is_done=lambda item: False, sink=sink), window)
    assert sink.skipped > 0


@pytest.mark.slow
def test_a_million_entries_stream_in_flat_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10⁶ files (+ 10³ hidden ones) through discovery, sharding and the Ray input windows: the
    driver's peak Python memory is a small fraction of what a list of their paths takes, and the
    Arrow it holds is one window, not the archive."""
    folders, files, window, parts = 1000, 1000, 1 << 15, 4
    fake_archive(monkeypatch, tmp_path, folders, files)
    source = FileSource(tmp_path, num_parts=parts, part_id=parts - 1)
    tracemalloc.start()
    try:
        rows = held_max = held_total = 0
        for tables in streamed(source, window):
            held = sum(t.nbytes for t in tables)
            rows += sum(t.num_rows for t in tables)
            held_max, held_total = max(held_max, held), held_total + held
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        sample = folders * files // 20  # the list's cost is linear in its length: a twentieth, times twenty
        paths = [Path(f"{tmp_path}/series{i // files:04d}/IM{i % files:05d}") for i in range(sample)]
        _, list_peak = tracemalloc.get_traced_memory()
        del paths
    finally:
        tracemalloc.stop()
    assert source.walked == folders * (files + 1)  # every entry was walked...
    assert 0.9 < rows * parts / (folders * files) < 1.1  # ...and this shard's files (about a quarter) fed to Ray
    list_bytes = (list_peak - before) * folders * files / sample  # what materialising the files' paths takes
    assert list_bytes > 100e6 and streamed_peak < 50e6 and streamed_peak * 5 < list_bytes, (streamed_peak, list_bytes)
    assert rows > 7 * window and held_max * 5 < held_total  # a window at a time, not the archive
