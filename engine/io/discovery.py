"""Input files → the stream of entries a run accounts for, in a stable order, and its shards.

Every regular file under the inputs is listed, whatever its name or suffix: archives hold DICOM
files called ``IM0001`` or ``1.2.840...``, and a file the loader rejects must still appear in the
status table (as skipped/failed) so that nothing goes silently missing. Entries that are not
read are still accounted for: hidden files and dot-folders (``.DS_Store``, ``.git``), radflash
output folders, symlinked folders (not followed, so links cannot loop), symlink loops, broken
links, non-regular files (FIFOs, sockets, devices: opening a FIFO blocks forever) and folders that
cannot be listed each get one *skipped* entry with the reason. Nothing is ever opened here.

Discovery is streamed (:func:`walk`): folders are listed one at a time with ``os.scandir`` and
each listing is sorted before it is descended, so an archive of 10⁶ files is never held as a
list, yet every run and every shard node sees the same sequence. That sequence is the sorted
order of the path strings (a folder sorts as ``name/``, so its subtree comes exactly where its
paths sort); the only thing held is the listing of each folder on the current path. Regular
files cost no system call beyond the listing (``scandir`` reports their type); links and special
files are ``stat``-ed to say what they are.

Sharding is a hash of each path (:func:`shard_key`), so it filters the stream item by item.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from radflash.errors import InputError

log = logging.getLogger("radflash.discovery")

# A folder holding both is a radflash output folder (see radflash.archive.sinks: MANIFEST, PARTS_DIR).
_OUTPUT_MARKERS = ("manifest.json", "parts")


def is_output_dir(folder: str | os.PathLike) -> bool:
    """True for a radflash run folder: re-scanning it would score our own tables."""
    return (os.path.isfile(os.path.join(folder, _OUTPUT_MARKERS[0]))
            and os.path.isdir(os.path.join(folder, _OUTPUT_MARKERS[1])))


class Entry(NamedTuple):
    """One discovered name: ``path`` spelled from its input (POSIX text); ``reason`` is ``None``
    for a file to read, else why it is accounted for without being read."""

    path: str
    reason: str | None = None


@dataclass
class Discovery:
    """What a walk found, as lists: the files to read and the entries accounted for unread."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason), sorted by path


def discover(inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True,
             exclude: Iterable[str | Path] = ()) -> list[Path]:
    """All regular files under ``inputs`` (files and folders), in :func:`walk` order, each once.

    A list, for small inputs and tests; a run streams :func:`walk` instead.

    Raises:
        InputError: an input does not exist or is neither a file nor a folder.
    """
    return discover_entries(inputs, recursive=recursive, exclude=exclude).files


def discover_entries(inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True,
                     exclude: Iterable[str | Path] = ()) -> Discovery:
    """:func:`discover` plus every entry left unread with its reason, both as lists."""
    found = Discovery()
    for entry in walk(inputs, recursive=recursive, exclude=exclude):
        if entry.reason is None:
            found.files.append(Path(entry.path))
        else:
            found.skipped.append((Path(entry.path), entry.reason))
    return found


def walk(inputs: Sequence[str | os.PathLike] | str | os.PathLike, *, recursive: bool = True,
         exclude: Iterable[str | os.PathLike] = ()) -> Iterator[Entry]:
    """Every entry under ``inputs``, streamed: files to read, and unread entries with their reason.

    Args:
        inputs: files and/or folders. A file named explicitly is kept even when hidden.
        recursive: descend into sub-folders (symlinked folders are never followed).
        exclude: folders to leave out without a row (e.g. the run's own output folder), in
            addition to hidden entries and detected radflash output folders.

    Order: inputs by their spelling (a folder as ``name/``), each walked depth-first with every
    folder's entries sorted, which is the sorted order of the paths. Each file is listed once:
    an input that another input's walk reaches anyway is dropped (its files are listed where
    that walk meets them), and a symlink to a file is dropped when the walk reaches its target,
    or an earlier link did. The inputs are checked here, before the first entry is asked for.

    Raises:
        InputError: an input does not exist or is neither a file nor a folder.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    excluded = {os.path.realpath(e) for e in exclude}
    roots = _roots([Path(p) for p in inputs], excluded)
    scope = _Scope(roots, recursive, excluded)
    scope.roots = [r for r in roots if not scope.reaches(r.real, folder=r.is_dir, besides=r)]
    return _stream(scope)


class _Root(NamedTuple):
    text: str  # the input as spelled (normalised by pathlib: no trailing slash)
    real: str  # its realpath
    is_dir: bool


def _roots(inputs: list[Path], excluded: set[str]) -> list[_Root]:
    """The inputs to walk: checked, sorted, and each file or folder once (the first spelling)."""
    roots: list[_Root] = []
    for path in inputs:
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.is_dir():
            real = os.path.realpath(path)
            if real in excluded:
                log.info("skipping excluded folder %s", path)
                continue
            roots.append(_Root(str(path), real, True))
        elif path.is_file():
            roots.append(_Root(str(path), os.path.realpath(path), False))
        else:
            raise InputError(f"input is neither a file nor a folder: {path}")
    roots.sort(key=lambda r: r.text + "/" if r.is_dir else r.text)
    unique: dict[str, _Root] = {}
    for root in roots:
        unique.setdefault(root.real, root)
    return list(unique.values())


@dataclass
class _Scope:
    """What the walk reaches, so duplicates are recognised without remembering every file listed."""

    roots: list[_Root]
    recursive: bool
    excluded: set[str]
    linked: set[str] = field(default_factory=set)  # realpaths of files listed through a symlink

    def reaches(self, real: str, *, folder: bool = False, besides: _Root | None = None) -> bool:
        """True when walking the roots (other than ``besides``) lists the file ``real`` (a
        symlink-free path) at that very path, or descends into the folder ``real``."""
        for root in self.roots:
            if root is besides:
                continue
            if real == root.real:
                return True
            if root.is_dir and real.startswith(root.real.rstrip("/") + "/") \
                    and self._descends(root.real, real[len(root.real.rstrip("/")) + 1:].split("/"), folder):
                return True
        return False

    def _descends(self, top: str, parts: list[str], folder: bool) -> bool:
        """Whether the walk from ``top`` passes every folder of ``parts`` (and lists its last name)."""
        if parts[-1].startswith("."):
            return False
        folders = parts if folder else parts[:-1]
        if folders and not self.recursive:
            return False
        path = top
        for name in folders:
            path = os.path.join(path, name)
            if name.startswith(".") or path in self.excluded or is_output_dir(path):
                return False
        return True

    def duplicate_link(self, path: str) -> bool:
        """True for a symlink to a regular file that is listed anyway (its target, or an earlier link)."""
        real = os.path.realpath(path)
        if self.reaches(real) or real in self.linked:
            return True
        self.linked.add(real)
        return False


def _stream(scope: _Scope) -> Iterator[Entry]:
    for root in scope.roots:
        if root.is_dir:
            yield from _walk_folder(root, scope)
        else:
            yield Entry(root.text)


# One listed name, as held while its folder is on the walk's path: the bare name for a regular file
# (the common case, and the least memory: a flat folder of 10⁶ files holds 10⁶ short strings), else
# (sort key, name, reason or None, whether to descend into it).
_Row = str | tuple[str, str, str | None, bool]


def _walk_folder(root: _Root, scope: _Scope) -> Iterator[Entry]:
    """Depth-first over one input folder; a stack of sorted listings, one per folder on the path."""
    rows, problem = _sorted_listing(root.text, root.real, scope)
    if problem is not None:
        yield Entry(root.text, problem)
        return
    stack: list[tuple[str, str, Iterator[_Row]]] = [(_prefix(root.text), root.real, iter(rows))]
    while stack:
        prefix, real, rows_left = stack[-1]
        row: _Row | None = next(rows_left, None)
        if row is None:
            stack.pop()
        elif isinstance(row, str):
            yield Entry(prefix + row)
        elif not row[3]:
            yield Entry(prefix + row[1], row[2])
        else:
            path, child_real = prefix + row[1], os.path.join(real, row[1])
            rows, problem = _sorted_listing(path, child_real, scope)
            if problem is not None:
                yield Entry(path, problem)
            else:
                stack.append((path + "/", child_real, iter(rows)))


def _prefix(folder: str) -> str:
    """What a name is appended to, in pathlib's spelling (``Path(".") / "x"`` is ``x``)."""
    return "" if folder == "." else folder if folder.endswith("/") else folder + "/"


def _sorted_listing(folder: str, real: str, scope: _Scope) -> tuple[list[_Row], str | None]:
    """One folder's rows (see ``_Row``) in walk order; or why the folder cannot be listed."""
    prefix = _prefix(folder)
    rows: list[_Row] = []
    try:
        for entry in _list_folder(folder):
            row = _classify(entry, entry.name, prefix, real, scope)
            if row is not None:
                rows.append(row)
    except OSError as exc:
        return [], f"cannot list folder ({exc.strerror or type(exc).__name__})"
    rows.sort(key=lambda row: row if isinstance(row, str) else row[0])
    return rows, None


def _classify(entry: Any, name: str, prefix: str, real: str, scope: _Scope) -> _Row | None:
    """The row (see ``_Row``) of one listed name; ``None`` for what gets no row."""
    if entry.is_file(follow_symlinks=False):  # the common case: no system call beyond the listing
        return (name, name, "hidden file", False) if name.startswith(".") else name
    path = prefix + name
    if _is_dir(entry):  # a folder, or a link to one
        if name.startswith("."):
            return (name, name, "hidden folder (not searched)", False)
        if entry.is_symlink():  # following it could loop
            return (name, name, "symlinked folder (not followed)", False)
        if not scope.recursive:
            return None
        if scope.excluded and os.path.join(real, name) in scope.excluded:
            log.info("skipping excluded folder %s", path)
            return None
        if is_output_dir(path):
            return (name, name, "radflash output folder (not searched)", False)
        return (name + "/", name, None, True)
    if name.startswith("."):
        return (name, name, "hidden file", False)
    reason = _not_a_file(path)
    if reason is None and entry.is_symlink() and scope.duplicate_link(path):
        return None  # listed where it lives (or through an earlier link)
    return (name, name, reason, False)


def _is_dir(entry: Any) -> bool:
    try:
        return bool(entry.is_dir())
    except OSError:
        return False


def _list_folder(folder: str) -> Iterator[Any]:
    """The entries of one folder, one at a time (``os.DirEntry``: a name, and its type from the
    listing itself); a folder that cannot be listed raises ``OSError`` at the first one."""
    with os.scandir(folder) as it:
        yield from it


def _not_a_file(path: str) -> str | None:
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


# ---- sharding ------------------------------------------------------------------------------------
def shard_key(path: str | Path) -> int:
    """Stable 64-bit hash of a path's POSIX string (Python's ``hash`` is salted per process).

    ``surrogateescape``: a name that is not valid UTF-8 (a Latin-1 archive) hashes its own bytes
    instead of raising; every other name hashes exactly as before, so no file changes shard.
    """
    return shard_text_key(Path(path).as_posix())


def shard_text_key(posix: str) -> int:
    """:func:`shard_key` of a path already in pathlib's POSIX spelling (a walked path): no re-parse."""
    digest = hashlib.blake2b(posix.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def check_shard(num_parts: int, part_id: int) -> None:
    """One-line :class:`InputError` unless ``part_id`` is a valid shard of ``num_parts``."""
    for name, value in (("num_parts", num_parts), ("part_id", part_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
    if num_parts < 1:
        raise InputError(f"num_parts must be ≥ 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(f"part_id must be in [0, {num_parts}), got {part_id}")


def shard(paths: Iterable[str | Path], num_parts: int, part_id: int) -> list[Path]:
    """The files of shard ``part_id`` (0-based) out of ``num_parts``, in input order.

    Assignment hashes each path string, so it depends on nothing but the path: nodes agree
    without coordination and adding files to the archive never moves existing files to another
    shard. Every node must therefore be given the same input spelling (relative or absolute).
    Parts are disjoint and their union is ``paths``; sizes balance statistically, not exactly.
    """
    check_shard(num_parts, part_id)
    return [Path(p) for p in paths if shard_key(p) % num_parts == part_id]
