"""Input files → the ordered list of files a run accounts for, and its deterministic shards.

Every regular file under the inputs is listed, whatever its name or suffix: archives hold DICOM
files called ``IM0001`` or ``1.2.840...``, and a file the loader rejects must still appear in the
status table (as skipped/failed) so that nothing goes silently missing. Entries that are not
read are still accounted for (:func:`discover_entries`): hidden files and dot-folders
(``.DS_Store``, ``.git``), radflash output folders, symlinked folders (not followed, so links
cannot loop), symlink loops, broken links and non-regular files (FIFOs, sockets, devices: opening
a FIFO blocks forever) each get one *skipped* row with the reason. Nothing is ever opened here:
``lstat``/``stat`` only.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from radflash.errors import InputError

log = logging.getLogger("radflash.discovery")

# A folder holding both is a radflash output folder (see radflash.archive.sinks: MANIFEST, PARTS_DIR).
_OUTPUT_MARKERS = ("manifest.json", "parts")


def is_output_dir(folder: Path) -> bool:
    """True for a radflash run folder: re-scanning it would score our own tables."""
    return (folder / _OUTPUT_MARKERS[0]).is_file() and (folder / _OUTPUT_MARKERS[1]).is_dir()


@dataclass
class Discovery:
    """What a walk found: the files to read, and the entries accounted for without reading them."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason), sorted by path


def discover(inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True,
             exclude: Iterable[str | Path] = ()) -> list[Path]:
    """All regular files under ``inputs`` (files and folders), sorted, each once.

    Only the files: :func:`discover_entries` also lists what was left out and why.

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
    return discover_entries(inputs, recursive=recursive, exclude=exclude).files


def discover_entries(inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True,
                     exclude: Iterable[str | Path] = ()) -> Discovery:
    """:func:`discover`, plus one ``(path, reason)`` per entry under the inputs that is not read
    (hidden, symlinked folder, symlink loop, broken link, FIFO...), so a status table can account
    for every name in the archive."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    excluded = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
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
            files, left_out = _walk(path, recursive=recursive, excluded=excluded)
            found.extend(files)
            skipped.extend(left_out)
        else:
            raise InputError(f"input is neither a file nor a folder: {path}")
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in sorted(found, key=lambda p: p.as_posix()):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    listed: dict[str, tuple[Path, str]] = {}
    for path, reason in skipped:
        listed.setdefault(path.as_posix(), (path, reason))
    return Discovery(unique, [listed[k] for k in sorted(listed)])


def _walk(root: Path, *, recursive: bool, excluded: set[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    out: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        if base != root and base.resolve() in excluded:
            log.info("skipping excluded folder %s", base)
            dirs[:] = []
            continue
        if base != root and is_output_dir(base):
            skipped.append((base, "radflash output folder (not searched)"))
            dirs[:] = []
            continue
        keep = []
        for d in sorted(dirs):
            path = base / d
            if d.startswith("."):
                skipped.append((path, "hidden folder (not searched)"))
            elif path.is_symlink():  # os.walk lists links to folders here; following them could loop
                reason = _link_problem(path)
                skipped.append((path, reason or "symlinked folder (not followed)"))
            elif recursive:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            path = base / name
            if name.startswith("."):
                skipped.append((path, "hidden file"))
                continue
            reason = _not_a_file(path)
            if reason:
                skipped.append((path, reason))
            else:
                out.append(path)
    return out, skipped


def _link_problem(path: Path) -> str | None:
    """Why a symlink cannot be followed (loop, dangling), or None when its target exists."""
    try:
        os.stat(path)
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else "broken symlink"
    return None


def _not_a_file(path: Path) -> str | None:
    """None for a regular file (or a link to one); else the reason it is not read. Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return "symlink loop" if exc.errno == errno.ELOOP else "broken symlink"
        return f"cannot stat ({exc.strerror or type(exc).__name__})"
    if stat.S_ISREG(mode):
        return None
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else
            "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "folder" if stat.S_ISDIR(mode) else "special")
    return f"not a regular file ({kind})"


def shard_key(path: str | Path) -> int:
    """Stable 64-bit hash of a path's POSIX string (Python's ``hash`` is salted per process).

    ``surrogateescape``: a name that is not valid UTF-8 (a Latin-1 archive) hashes its own bytes
    instead of raising; every other name hashes exactly as before, so no file changes shard.
    """
    digest = hashlib.blake2b(Path(path).as_posix().encode("utf-8", "surrogateescape"), digest_size=8).digest()
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
