"""Sources: what a run reads, as typed items, whatever it comes from.

A verb (``score``, ``segment``) never walks folders itself: it iterates a :class:`Source`, which
yields one :class:`SourceItem` per thing to account for. :class:`FileSource` is today's file
discovery (:mod:`radflash.io.discovery`) and sharding; a network source (DICOMweb WADO, a queue of
instances) yields the same items with ``data`` instead of ``path``, and the decode stage, the
batching, the scorer and the sinks do not change (MONAI Deploy's data-loader operator; Ray Data's
read step).

Keys are the row identity in status/results tables, so they are storable text: for a file it is
:func:`path_text` of its absolute path (the form every earlier run wrote, which resume matches);
another source uses its own stable key (a SOPInstanceUID, a URL without credentials).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from radflash.io.discovery import Discovery, discover_entries, shard

_ESCAPE_RE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_text(path: str | os.PathLike) -> str:
    """A path as storable text (UTF-8 safe): bytes that are not UTF-8 become ``\\xNN`` and a
    backslash becomes ``\\\\``, so the text is unambiguous; any other path is unchanged.

    Python hands undecodable name bytes over as lone surrogates (``surrogateescape``), which
    Parquet, CSV and JSON cannot hold; this form can, and :func:`path_from_text` inverts it.
    """
    raw = os.fsencode(path)
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
    """Anything that yields :class:`SourceItem` s and can say what it reads."""

    def __iter__(self) -> Iterator[SourceItem]:
        """Every item, each once, in a stable order (a resumed or sharded run relies on it)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What this source reads, for the run manifest: JSON-able, and never credentials."""
        ...


class FileSource:
    """Files and folders on disk: :func:`radflash.io.discovery.discover_entries`, then one shard.

    Yields the shard's files (sorted; path as discovered, key = :func:`path_text` of the absolute
    path) followed by its unread entries, each with its ``skip`` reason. Discovery runs once, on
    first use, and is kept, so counting across shards does not walk the archive again.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike] | str | os.PathLike, *, num_parts: int = 1,
                 part_id: int = 0) -> None:
        self.inputs = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
        self.num_parts = num_parts
        self.part_id = part_id
        self._found: Discovery | None = None

    def discovery(self) -> Discovery:
        """The walk over all inputs (every shard): raises InputError for a missing input."""
        if self._found is None:
            self._found = discover_entries(self.inputs)
        return self._found

    @property
    def entries_all_shards(self) -> int:
        """Files plus unread entries across every shard (the manifest's ``discovered_all_shards``)."""
        found = self.discovery()
        return len(found.files) + len(found.skipped)

    def __iter__(self) -> Iterator[SourceItem]:
        found = self.discovery()
        files, left_out = found.files, found.skipped
        if self.num_parts > 1:  # unread entries are sharded by the same path hash as files
            files = shard(files, self.num_parts, self.part_id)
            mine = {p.as_posix() for p in shard([p for p, _ in left_out], self.num_parts, self.part_id)}
            left_out = [(p, r) for p, r in left_out if p.as_posix() in mine]
        for path in files:
            yield SourceItem(path_text(os.path.abspath(path)), path)
        for path, reason in left_out:
            yield SourceItem(path_text(os.path.abspath(path)), path, skip=reason)

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "inputs": [path_text(p) for p in self.inputs],
                "num_parts": self.num_parts, "part_id": self.part_id}
