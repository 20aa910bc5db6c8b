"""Input files → the ordered list of files a run accounts for, and its deterministic shards.

Every regular file under the inputs is listed, whatever its name or suffix: archives hold DICOM
files called ``IM0001`` or ``1.2.840...``, and a file the loader rejects must still appear in the
status table (as skipped/failed) so that nothing goes silently missing. Only hidden entries
(dotfiles and dot-folders: ``.DS_Store``, ``.git``, our own ``.tmp`` parts) and radflash output
folders are left out, since scoring our own results or VCS internals is never intended.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from radflash.errors import InputError

log = logging.getLogger("radflash.discovery")

# A folder holding both is a radflash output folder (see radflash.writers: MANIFEST, PARTS_DIR).
_OUTPUT_MARKERS = ("manifest.json", "parts")


def is_output_dir(folder: Path) -> bool:
    """True for a radflash run folder: re-scanning it would score our own tables."""
    return (folder / _OUTPUT_MARKERS[0]).is_file() and (folder / _OUTPUT_MARKERS[1]).is_dir()


def discover(inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True,
             exclude: Iterable[str | Path] = ()) -> list[Path]:
    """All regular files under ``inputs`` (files and folders), sorted, each once.

    Args:
        inputs: files and/or folders. A file named explicitly is kept even when hidden.
        recursive: descend into sub-folders (symlinked folders are not followed, so links cannot loop).
        exclude: folders to leave out (e.g. the run's own output folder), in addition to hidden
            entries and detected radflash output folders.

    Order is the sorted POSIX path string, so every run and every shard node sees the same
    sequence; duplicates (the same file reached twice, through overlapping inputs or symlinks)
    are dropped by resolved path, keeping the first spelling in that order.

    Raises:
        InputError: an input does not exist or is neither a file nor a folder.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    excluded = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            if path.resolve() in excluded:
                log.info("skipping excluded folder %s", path)
                continue
            found.extend(_walk(path, recursive=recursive, excluded=excluded))
        else:
            raise InputError(f"input is neither a file nor a folder: {path}")
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in sorted(found, key=lambda p: p.as_posix()):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _walk(root: Path, *, recursive: bool, excluded: set[Path]) -> list[Path]:
    out: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        if base != root and (is_output_dir(base) or base.resolve() in excluded):
            log.info("skipping %s folder %s", "excluded" if base.resolve() in excluded else "radflash output", base)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = base / name
            if path.is_file():  # also drops broken symlinks, sockets and FIFOs
                out.append(path)
    return out


def shard_key(path: str | Path) -> int:
    """Stable 64-bit hash of a path's POSIX string (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(Path(path).as_posix().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard(paths: Sequence[str | Path], num_parts: int, part_id: int) -> list[Path]:
    """The files of shard ``part_id`` (0-based) out of ``num_parts``, in input order.

    Assignment hashes each path string, so it depends on nothing but the path: nodes agree
    without coordination and adding files to the archive never moves existing files to another
    shard. Every node must therefore be given the same input spelling (relative or absolute).
    Parts are disjoint and their union is ``paths``; sizes balance statistically, not exactly.
    """
    for name, value in (("num_parts", num_parts), ("part_id", part_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
    if num_parts < 1:
        raise InputError(f"num_parts must be ≥ 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(f"part_id must be in [0, {num_parts}), got {part_id}")
    return [Path(p) for p in paths if shard_key(p) % num_parts == part_id]
