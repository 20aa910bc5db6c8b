"""What a segment run accumulates per image, kept on disk so memory stays bounded by the batch.

A run over a million images used to hold every :class:`ImageResult` (for the report and the
returned :class:`SegmentRun`), every failure, every output name it had handed out (collision
check): memory grew with the archive.
:class:`RunLedger` keeps all of that in one private SQLite scratch file instead, in the output
folder (so it lives on the disk the outputs fill, never on a RAM-backed ``/tmp``):

* it is unlinked as soon as it is open (POSIX), so nothing is left behind even after ``kill -9``
  and two runs into one folder never share it (each has its own): :class:`radflash.util.scratch.ScratchDB`,
  shared with ``score``'s resume;
* it is scratch, not a result: the durable per-image record stays ``OUT/<name>/result.json``
  (written atomically as each image is committed) and ``report.json`` is written from the ledger
  at the end, byte for byte as before. Hence no journal and no fsync here;
* SQLite keeps a bounded page cache (a few MB) whatever the table sizes, and its primary-key
  indexes answer "is this name taken?" without a Python set.

Without an output folder the ledger is ``:memory:``: such a run returns every image's arrays in
memory anyway.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, MutableSet, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from radflash.util.scratch import ScratchDB

T = TypeVar("T")

LEDGER_SUFFIX = "-segment-ledger.sqlite"
_CHUNK = 256  # rows read back per query: a bounded window, and no cursor held across appends

_SCHEMA = """
CREATE TABLE rows (list TEXT, seq INTEGER, body TEXT, PRIMARY KEY (list, seq)) WITHOUT ROWID;
CREATE TABLE members (kind TEXT, key TEXT, PRIMARY KEY (kind, key)) WITHOUT ROWID;
"""


class RunLedger:
    """One run's ordered record lists and claimed names in a private SQLite file.

    ``folder`` is the output folder (the file is created there and unlinked at once), or None for
    an in-memory database. Safe to use from the decode thread and the main loop at once.
    """

    def __init__(self, folder: Path | None) -> None:
        self._db = ScratchDB(folder, LEDGER_SUFFIX, _SCHEMA, what="the run's scratch ledger")

    def close(self) -> None:
        """Free the scratch file now (also done when the ledger is garbage-collected)."""
        self._db.close()

    def sequence(self, name: str, encode: Callable[[T], Any], decode: Callable[[Any], T], *,
                 on_append: Callable[[T], None] | None = None) -> SpilledList[T]:
        """An append-only list of ``T`` stored as JSON (``encode`` → JSON-able, ``decode`` back)."""
        return SpilledList(self, name, encode, decode, on_append)

    def members(self, kind: str) -> LedgerSet:
        """A set of strings (e.g. the output names handed out so far)."""
        return LedgerSet(self, kind)

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.run(sql, args)


class SpilledList(Sequence[T], Generic[T]):
    """An append-only sequence whose items live in the ledger; only its length is kept in memory.

    Iteration reads the items back in order, ``_CHUNK`` at a time; ``x[i]`` is one indexed query.
    Compares equal to any sequence with equal items (a list included).
    """

    def __init__(self, ledger: RunLedger, name: str, encode: Callable[[T], Any], decode: Callable[[Any], T],
                 on_append: Callable[[T], None] | None) -> None:
        self._ledger, self._name = ledger, name
        self._encode, self._decode, self._on_append = encode, decode, on_append
        self._n = 0
        self._append_lock = threading.Lock()

    def append(self, item: T) -> None:
        body = json.dumps(self._encode(item), ensure_ascii=False)
        with self._append_lock:
            self._ledger._run("INSERT INTO rows VALUES (?, ?, ?)", (self._name, self._n, body))
            self._n += 1
            if self._on_append is not None:
                self._on_append(item)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[T]:
        seq = 0
        while True:
            rows = self._ledger._run("SELECT body FROM rows WHERE list = ? AND seq >= ? ORDER BY seq LIMIT ?",
                                     (self._name, seq, _CHUNK))
            for (body,) in rows:
                yield self._decode(json.loads(body))
            if len(rows) < _CHUNK:
                return
            seq += len(rows)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        i = index + self._n if index < 0 else index
        if not 0 <= i < self._n:
            raise IndexError(f"{self._name}: index {index} out of range ({self._n} items)")
        (body,), = self._ledger._run("SELECT body FROM rows WHERE list = ? AND seq = ?", (self._name, i))
        return self._decode(json.loads(body))

    def __setitem__(self, index: int, item: T) -> None:
        """Rewrite one stored item (an image's record gains a note after it was appended)."""
        i = index + self._n if index < 0 else index
        if not 0 <= i < self._n:
            raise IndexError(f"{self._name}: index {index} out of range ({self._n} items)")
        body = json.dumps(self._encode(item), ensure_ascii=False)
        self._ledger._run("UPDATE rows SET body = ? WHERE list = ? AND seq = ?", (body, self._name, i))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable, like a list

    def __repr__(self) -> str:
        return f"<{self._name}: {self._n} item(s) in the run's ledger>"


class LedgerSet(MutableSet[str]):
    """A set of strings in the ledger (membership is an indexed lookup)."""

    def __init__(self, ledger: RunLedger, kind: str) -> None:
        self._ledger, self._kind = ledger, kind

    def __contains__(self, key: object) -> bool:
        return bool(self._ledger._run("SELECT 1 FROM members WHERE kind = ? AND key = ?", (self._kind, str(key))))

    def add(self, key: str) -> None:
        self._ledger._run("INSERT OR IGNORE INTO members VALUES (?, ?)", (self._kind, key))

    def discard(self, key: str) -> None:
        self._ledger._run("DELETE FROM members WHERE kind = ? AND key = ?", (self._kind, key))

    def __len__(self) -> int:
        return self._ledger._run("SELECT count(*) FROM members WHERE kind = ?", (self._kind,))[0][0]

    def __iter__(self) -> Iterator[str]:
        return (key for (key,) in self._ledger._run("SELECT key FROM members WHERE kind = ? ORDER BY key",
                                                     (self._kind,)))

