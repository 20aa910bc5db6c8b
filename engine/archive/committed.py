"""The files an earlier run committed, as a resumed ``score`` run looks them up: on disk, not in a set.

A resume leaves out every item whose row is already in a committed part. Holding those keys in a
Python set (~150 B per committed row, measured: 1.5 GB for 10 M films, filled from every part read
at once) cost memory in proportion to the archive for the whole run. :class:`CommittedKeys` keeps them in
a private SQLite scratch file in the output folder instead (:class:`radflash.util.scratch.ScratchDB`:
unlinked as soon as it is open, so nothing is left even after ``kill -9``), filled by one pass over
the parts that reads a part's ``path`` and ``status`` columns at a time (:func:`read_committed`).
Memory is then bounded by one part and SQLite's page cache, whatever the archive size; a lookup is
one primary-key query (microseconds, beside the milliseconds a file takes to decode).

The output folder's lock (:class:`radflash.archive.sinks.OutputLock`) is held around the whole
run, so the parts cannot change under the index, and each run opens its own file, so a second
run (or a rerun after a crash) never sees another's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from radflash.archive.sinks import PartStore, status_counts
from radflash.util.scratch import ScratchDB

INDEX_SUFFIX = "-score-committed.sqlite"


class CommittedKeys:
    """A set of committed keys (``key in keys``) in a scratch file made with the first key added.

    False while empty, so a run with nothing committed never creates the file and its intake
    skips the lookup (and the ``realpath`` that makes a file's key) altogether.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._db: ScratchDB | None = None

    def update(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if self._db is None:
            self._db = ScratchDB(self.folder, INDEX_SUFFIX, "CREATE TABLE keys (key BLOB PRIMARY KEY) WITHOUT ROWID;",
                                 what="the index of the earlier run's committed files")
        self._db.run_many("INSERT OR IGNORE INTO keys VALUES (?)", ((_blob(k),) for k in keys))

    def __contains__(self, key: object) -> bool:
        return self._db is not None and bool(self._db.run("SELECT 1 FROM keys WHERE key = ?", (_blob(str(key)),)))

    def __bool__(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        """Free the scratch file once the source has been walked (also done on garbage collection)."""
        if self._db is not None:
            self._db.close()


def _blob(key: str) -> bytes:
    """A key as SQLite can hold it: a resolved path may carry lone surrogates (a file name's
    undecodable bytes), which SQLite's text refuses; ``surrogatepass`` keeps every key distinct."""
    return key.encode("utf-8", "surrogatepass")


def read_committed(store: PartStore, also: Callable[[str], str]) -> tuple[CommittedKeys, dict[str, int]]:
    """One pass over ``store``'s committed parts, a part at a time: every row's key, and ``also(key)``
    (a file's resolved path), into the index; and the committed rows per status."""
    done = CommittedKeys(store.out_dir)
    counts = status_counts(())
    for part in store.committed(("path", "status")):
        keys = part.column("path").to_pylist()
        done.update(keys + [also(k) for k in keys])
        for status, n in status_counts(part.column("status").to_pylist()).items():
            counts[status] = counts.get(status, 0) + n
    return done, counts
