"""File discovery and sharding: every file accounted for once, in a stable order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from radflash.errors import InputError
from radflash.io.discovery import discover, shard, shard_key


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    for rel in ["b/IM0002", "a/IM0001", "a/deeper/1.2.840.5.dcm", "README.txt", "c.png", "a/.DS_Store",
                ".hidden/secret.dcm", "run/manifest.json", "run/parts/part-00000.parquet", "run/results.csv"]:
        touch(root / rel)
    return root


def test_lists_every_visible_file_sorted(archive: Path) -> None:
    found = discover([archive])
    assert [p.relative_to(archive).as_posix() for p in found] == [
        "README.txt", "a/IM0001", "a/deeper/1.2.840.5.dcm", "b/IM0002", "c.png"]
    assert found == sorted(found, key=lambda p: p.as_posix())


def test_non_recursive_and_single_input_forms(archive: Path) -> None:
    assert [p.name for p in discover(archive, recursive=False)] == ["README.txt", "c.png"]
    assert discover(str(archive / "a" / "IM0001")) == [archive / "a" / "IM0001"]


def test_explicit_hidden_file_and_excluded_folder(archive: Path) -> None:
    hidden = archive / ".hidden" / "secret.dcm"
    assert discover([hidden]) == [hidden]
    found = discover([archive], exclude=[archive / "b"])
    assert all("b/" not in p.relative_to(archive).as_posix() for p in found) and len(found) == 4


def test_duplicates_are_dropped(archive: Path) -> None:
    os.symlink(archive / "a" / "IM0001", archive / "link_to_IM0001")
    found = discover([archive, archive / "a", archive / "a" / "IM0001"])
    assert len(found) == len({p.resolve() for p in found}) == 5
    assert archive / "a" / "IM0001" in found and archive / "link_to_IM0001" not in found


def test_missing_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"input not found: .*nope"):
        discover([tmp_path, tmp_path / "nope"])


def random_paths(rng: random.Random, n: int) -> list[Path]:
    parts = ["study", "series", "CR", "DX", "img", "1.2.840", "x"]
    return [Path(*(rng.choice(parts) + str(rng.randrange(1000)) for _ in range(rng.randint(1, 4))))
            for _ in range(n)]


@pytest.mark.parametrize("num_parts", [1, 2, 3, 7, 16])
def test_shards_partition_the_paths(num_parts: int) -> None:
    rng = random.Random(num_parts)
    for _ in range(20):
        paths = sorted(set(random_paths(rng, rng.randint(0, 300))))
        parts = [shard(paths, num_parts, k) for k in range(num_parts)]
        assert sorted(p for part in parts for p in part) == paths  # union is everything, nothing twice
        for part in parts:
            members = set(part)
            assert part == [p for p in paths if p in members]  # input order kept
        assert parts == [shard([str(p) for p in paths], num_parts, k) for k in range(num_parts)]


def test_shard_assignment_is_stable_and_balanced() -> None:
    assert shard_key("archive/a/IM0001") == shard_key(Path("archive") / "a" / "IM0001")
    # Pinned: changing the hash would silently reshuffle shards between runs of one archive.
    assert shard_key("archive/a/IM0001") == 0x25F933804FA74D6A
    paths = [Path(f"d/{i}.dcm") for i in range(4000)]
    sizes = [len(shard(paths, 4, k)) for k in range(4)]
    assert min(sizes) > 800  # ≈1000 each; a broken hash would pile files into one part


@pytest.mark.parametrize(("num_parts", "part_id"), [(0, 0), (3, 3), (3, -1), (2.0, 0), (True, 0), (2, "1")])
def test_shard_rejects_bad_arguments(num_parts, part_id) -> None:
    with pytest.raises(InputError):
        shard([Path("a")], num_parts, part_id)
