"""Sources: what a run reads, as typed items, whatever it comes from.

A verb (``score``, ``segment``) never walks folders itself: it iterates a :class:`Source`, which
yields one :class:`SourceItem` per thing to account for. :class:`FileSource` streams file
discovery (:mod:`radflash.io.discovery`) and sharding; a network source (DICOMweb WADO, a queue of
instances) yields the same items with ``data`` instead of ``path``, and the decode stage, the
batching, the scorer and the sinks do not change (MONAI Deploy's data-loader operator; Ray Data's
read step).

Keys are the row identity in status/results tables, so they are storable text: for a file it is
:func:`path_text` of its absolute path (the form every earlier run wrote, which resume matches);
another source uses its own stable key (a SOPInstanceUID, a URL without credentials).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from radflash.io.discovery import Entry, check_shard, shard_text_key, walk

_ESCAPE_RE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_text(path: str | os.PathLike) -> str:
    """A path as storable text (UTF-8 safe): bytes that are not UTF-8 become ``\\xNN`` and a
    backslash becomes ``\\\\``, so the text is unambiguous; any other path is unchanged.

    Python hands undecodable name bytes over as lone surrogates (``surrogateescape``), which
    Parquet, CSV and JSON cannot hold; this form can, and :func:`path_from_text` inverts it.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.isascii() and "\\" not in text:
        return text  # nothing to escape (the common case: cheap for an archive of 10⁶ files)
    raw = os.fsencode(text)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def path_from_text(text: str) -> str:
    """The path (as Python spells it: ``os.fsdecode`` of its bytes) that :func:`path_text` wrote."""
    def unescape(m: re.Match) -> str:
        code = m.group(1)
        return "\\" if code == "\\" else os.fsdecode(bytes([int(code[1:], 16)]))

    return _ESCAPE_RE.sub(unescape, text)


@dataclass(frozen=True)
class SourceItem:
    """One thing a run accounts for: a file to read, bytes already fetched, or an entry left unread.

    ``skip`` is set for entries that are listed but never opened (hidden files, symlink loops,
    FIFOs...): they still get a status row, so nothing in an archive goes silently missing.
    Otherwise exactly one of ``path`` and ``data`` is set: a path is what a decode worker opens
    (cheap to send to it); bytes are what a network source has in hand.
    """

    key: str  # the row key in status/results tables: storable text, stable across runs
    path: Path | None = None
    data: bytes | None = None
    skip: str | None = None  # why the entry is accounted for without being read

    def __post_init__(self) -> None:
        if self.skip is None and (self.path is None) == (self.data is None):
            raise ValueError(f"{self.key}: a source item needs exactly one of path and data")

    @classmethod
    def of_path(cls, path: str | os.PathLike) -> SourceItem:
        """An item for a path as given (not made absolute): its key is the path's storable text."""
        return cls(path_text(path), Path(path))


@runtime_checkable
class Source(Protocol):
    """Anything that yields :class:`SourceItem` s and can say what it reads.

    Two members are required. A source may also offer the optional members below; the verbs
    reach them through :func:`listed_items`, :func:`retrieved_items` and :func:`retrieval_failures`,
    which supply each default, so a source with only the two required members works unchanged:

    * ``listing()``: the items, cheaply, without their bytes (a network source lists first, so a
      resumed run never fetches what an earlier run committed); default: ``iter(source)``.
    * ``retrieve(items)``: the listed items still to do, with their bytes fetched lazily, in
      order; an item that cannot be fetched is left out and recorded in ``failures``; default:
      the items unchanged.
    * ``failures``: ``(key, reason)`` of listed items that could not be retrieved, complete once
      the retrieved items have been consumed (an iterable, e.g. a :class:`FailureLog`, which keeps
      them on disk rather than in memory); default: none.
    """

    def __iter__(self) -> Iterator[SourceItem]:
        """Every item, each once, in a stable order (a resumed or sharded run relies on it)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What this source reads, for the run manifest: JSON-able, and never credentials."""
        ...


def listed_items(source: Source) -> Iterator[SourceItem]:
    """``source.listing()`` where the source has it, else its items: the first pass of a run."""
    method = getattr(source, "listing", None)
    return iter(method() if method is not None else source)


def retrieved_items(source: Source, items: Iterable[SourceItem]) -> Iterable[SourceItem]:
    """``source.retrieve(items)`` where the source has it, else ``items``: the bytes of what is to do."""
    method = getattr(source, "retrieve", None)
    return method(items) if method is not None else items


def retrieval_failures(source: Source) -> Iterable[tuple[str, str]]:
    """``(key, reason)`` of listed items the source could not retrieve (none for most sources)."""
    return getattr(source, "failures", ())


class FailureLog:
    """``(key, reason)`` of listed items a network source could not retrieve, spilled to a private
    temporary file as each becomes known: a list of them grew with the archive (a PACS that lost
    10⁶ instances), this costs one line of a file each and a counter in memory.

    Append-only; iterating reads the pairs back in order, a bounded chunk at a time, so the verbs
    commit them as *failed* rows exactly as they did from a list. The file is anonymous (unlinked
    at creation where the OS allows), so nothing is left whatever ends the run; it lives in the
    temporary folder (``TMPDIR``) and is opened only at the first failure. Thread-safe: the
    retrieval appends on the thread that iterates it, a verb may read on another.
    """

    _CHUNK = 1 << 16  # bytes of lines read back per step

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._count = 0
        self._lock = threading.Lock()

    def append(self, failure: tuple[str, str]) -> None:
        key, reason = failure
        line = json.dumps([key, reason]).encode() + b"\n"  # one ASCII line: newlines and surrogates escaped
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="radflash-failures-")  # noqa: SIM115 (held for the log's life)
            self._file.seek(0, os.SEEK_END)
            self._file.write(line)
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[str, str]]:
        offset = 0
        while True:
            with self._lock:  # no file position is held across appends: each step seeks to its own
                if self._file is None:
                    return
                self._file.seek(offset)
                lines = self._file.readlines(self._CHUNK)
                offset = self._file.tell()
            if not lines:
                return
            for line in lines:
                key, reason = json.loads(line)
                yield key, reason


def prefetched(items: Iterable[SourceItem], fetch: Callable[[SourceItem], bytes], *,
               wanted: Callable[[SourceItem], bool], ahead: int,
               failures: list[tuple[str, str]] | FailureLog,
               fatal: type[BaseException] | tuple[type[BaseException], ...], name: str) -> Iterator[SourceItem]:
    """``items`` in order, each ``wanted`` one with its bytes fetched up to ``ahead`` items early on
    a thread pool (network sources: retrieval overlaps decoding, and at most ``ahead`` instances
    are held in memory). An item whose fetch fails on its own is recorded in ``failures`` as
    ``(key, "retrieve failed: …")`` and left out, so the run carries on; a ``fatal`` error (the
    server is gone) ends the iteration. Every wait is bounded by the fetch's own timeouts.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from radflash.errors import RadflashError

    pending: deque[tuple[SourceItem, Future | None]] = deque()
    todo = iter(items)
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix=name) as pool:
        try:
            while True:
                while len(pending) < ahead and (item := next(todo, None)) is not None:
                    pending.append((item, pool.submit(fetch, item) if wanted(item) else None))
                if not pending:
                    return
                item, future = pending.popleft()
                if future is None:
                    yield item
                    continue
                try:
                    data = future.result()
                except fatal:
                    raise
                except RadflashError as exc:  # "<where>: <reason>": the row already names the instance
                    failures.append((item.key, f"retrieve failed: {str(exc).split(': ', 1)[-1]}"))
                    continue
                except Exception as exc:  # bytes that cannot be parsed: that instance fails, the run goes on
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    failures.append((item.key, f"retrieve failed: {type(exc).__name__}: {first}"))
                    continue
                yield SourceItem(item.key, data=data)
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()


def _absolute(path: str, cwd: str) -> str:
    """``os.path.abspath(path)`` with ``cwd`` as the working folder, without its ``normpath`` when a
    walked path cannot need it (pathlib's spelling has no ``.`` parts and no doubled slashes; only
    ``..`` parts, a leading ``//`` and hidden names, which share the ``/.`` test, take the slow road)."""
    absolute = path if path.startswith("/") else os.path.join(cwd, path)
    return os.path.normpath(absolute) if "/." in absolute or absolute.startswith("//") else absolute


class FileSource:
    """Files and folders on disk, streamed: :func:`radflash.io.discovery.walk`, then one shard.

    Yields the shard's entries in walk order (the sorted order of their paths): files with the
    path as discovered and key = :func:`path_text` of the absolute path, unread entries the same
    with their ``skip`` reason. Nothing is listed ahead: the walk advances as items are asked for,
    so an archive of any size costs the memory of one folder listing per level. Iterating checks
    the inputs at once (:class:`InputError` for a missing one), before the first item is asked for.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike] | str | os.PathLike, *, num_parts: int = 1,
                 part_id: int = 0) -> None:
        check_shard(num_parts, part_id)
        self.inputs = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
        self.num_parts = num_parts
        self.part_id = part_id
        self.walked: int | None = None  # entries across every shard, once a walk has run to its end

    @property
    def entries_all_shards(self) -> int:
        """Files plus unread entries across every shard (the manifest's ``discovered_all_shards``):
        counted by the last complete iteration, or by a walk that only counts."""
        if self.walked is None:
            self.walked = sum(1 for _ in walk(self.inputs))
        return self.walked

    def __iter__(self) -> Iterator[SourceItem]:
        return self._items(walk(self.inputs))

    def _items(self, entries: Iterator[Entry]) -> Iterator[SourceItem]:
        cwd = os.getcwd()
        seen = 0
        parts, mine = self.num_parts, self.part_id
        for path, reason in entries:  # the loop runs once per archive entry: kept lean
            seen += 1
            if parts > 1 and shard_text_key(path) % parts != mine:
                continue
            yield SourceItem(path_text(_absolute(path, cwd)), Path(path), skip=reason)
        self.walked = seen

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "inputs": [path_text(p) for p in self.inputs],
                "num_parts": self.num_parts, "part_id": self.part_id}


def peek(items: Iterable[SourceItem], n: int) -> tuple[int, Iterator[SourceItem]]:
    """How many of the next ``n`` items exist, and the same items, none lost.

    Streamed sources have no length: a verb sizes its decode pool (or finds there is no input) by
    pulling a few items ahead, and pulling the first one early makes a failing listing (a server
    away) fail before the model loads.
    """
    it = iter(items)
    head = list(islice(it, n))
    return len(head), chain(head, it)
