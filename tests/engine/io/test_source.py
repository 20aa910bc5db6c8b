"""FileSource: the same files, keys and unread-entry rows that discovery gave the verbs directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from radflash.errors import InputError
from radflash.io.discovery import discover_entries, shard
from radflash.io.source import (
    FileSource,
    Source,
    SourceItem,
    listed_items,
    path_from_text,
    path_text,
    retrieval_failures,
    retrieved_items,
)
from tests.engine.io.test_discovery import touch


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """Files plus every kind of entry discovery accounts for without reading: a FIFO (opening it
    would block forever), a symlink loop, a broken link, hidden entries, a non-UTF-8 name."""
    root = tmp_path / "archive"
    for rel in ["a/IM0001", "a/deeper/1.2.840.5.dcm", "b/IM0002", "c.png", "a/.DS_Store", ".git/HEAD"]:
        touch(root / rel)
    try:
        touch(root / os.fsdecode(b"latin-\xe9t\xe9.dcm"))
    except OSError:  # a filesystem that insists on UTF-8 names
        pytest.skip("filesystem refuses non-UTF-8 names")
    os.mkfifo(root / "a" / "pipe")
    os.symlink(root / "loop", root / "loop")
    os.symlink(root / "gone", root / "b" / "dangling")
    return root


def test_items_are_the_walk_in_sorted_path_order(archive: Path) -> None:
    found = discover_entries([archive])
    items = list(FileSource([archive]))
    assert [i.path.as_posix() for i in items] == sorted(i.path.as_posix() for i in items)  # files and entries mixed
    files = [(i.key, i.path) for i in items if i.skip is None]
    assert files == [(path_text(os.path.abspath(p)), p) for p in found.files]
    assert [(i.key, i.path, i.skip) for i in items if i.skip] == \
        [(path_text(os.path.abspath(p)), p, reason) for p, reason in found.skipped]
    assert all(i.data is None for i in items)
    skips = {i.path.name: i.skip for i in items if i.skip}
    assert skips["pipe"] == "not a regular file (FIFO)"
    assert skips["loop"] == "symlink loop" and skips["dangling"] == "broken symlink"
    assert {".DS_Store", ".git"} <= skips.keys()


def test_source_walks_lazily_and_counts_every_shard_at_the_end(archive: Path) -> None:
    source = FileSource([archive], num_parts=2, part_id=1)
    items = iter(source)
    next(items)
    assert source.walked is None  # nothing listed ahead: the total is only known at the end
    rest = list(items)
    assert source.walked == source.entries_all_shards == len(list(FileSource([archive]))) > len(rest) + 1
    with pytest.raises(InputError, match="input not found"):
        iter(FileSource([archive, archive / "nope"]))  # checked when iteration starts, not at the first item


def test_optional_members_have_defaults(archive: Path) -> None:
    """A source with only the two required members and a file source (no optional members) read the same."""

    class Bare:
        def __iter__(self):
            return iter([SourceItem("k", data=b"x")])

        def describe(self):
            return {"kind": "bare"}

    for source in (Bare(), FileSource(archive)):
        assert isinstance(source, Source)
        items = list(listed_items(source))
        assert items == list(source) and list(retrieved_items(source, items)) == items
        assert list(retrieval_failures(source)) == []


def test_non_utf8_name_keeps_a_storable_reversible_key(archive: Path) -> None:
    (item,) = [i for i in FileSource(archive) if i.path.name.startswith("latin-")]
    assert item.skip is None and item.key.endswith("latin-\\xe9t\\xe9.dcm")
    item.key.encode("utf-8")  # storable: no lone surrogates
    assert path_from_text(item.key) == os.path.abspath(item.path)


def test_relative_inputs_keep_their_spelling_but_get_absolute_keys(archive: Path, monkeypatch) -> None:
    monkeypatch.chdir(archive.parent)
    item = next(iter(FileSource("archive")))
    assert not item.path.is_absolute() and item.key == path_text(archive.resolve() / item.path.relative_to("archive"))


def test_shards_are_discovery_shards(archive: Path) -> None:
    found = discover_entries([archive])
    every = {i.key for i in FileSource(archive)}
    seen: set[str] = set()
    for k in range(3):
        source = FileSource([archive], num_parts=3, part_id=k)
        items = list(source)
        assert [i.path for i in items if i.skip is None] == shard(found.files, 3, k)
        assert [i.path for i in items if i.skip] == shard([p for p, _ in found.skipped], 3, k)
        keys = {i.key for i in items}
        assert not keys & seen
        seen |= keys
        assert source.entries_all_shards == len(found.files) + len(found.skipped)
    assert seen == every


def test_describe_names_the_inputs(archive: Path) -> None:
    source = FileSource(archive, num_parts=2, part_id=1)
    assert isinstance(source, Source)
    assert source.describe() == {"kind": "files", "inputs": [path_text(archive)], "num_parts": 2, "part_id": 1}


def test_item_needs_exactly_one_of_path_and_data() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SourceItem("k")
    with pytest.raises(ValueError, match="exactly one"):
        SourceItem("k", Path("x"), b"x")
    assert SourceItem("k", Path("x"), skip="hidden file").skip == "hidden file"
    assert SourceItem.of_path("rel/x.dcm") == SourceItem("rel/x.dcm", Path("rel/x.dcm"))
