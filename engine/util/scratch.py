"""A run's private SQLite scratch file: state that grows with the archive, kept on disk, not in memory.

Used where a verb would otherwise hold a Python container that grows with the archive (``segment``'s
ledger, :mod:`radflash.segment.ledger`; a resumed ``score`` run's committed keys,
:mod:`radflash.archive.committed`):

* the file is made in the output folder (the disk the outputs fill, never a RAM-backed ``/tmp``)
  and unlinked as soon as it is open (POSIX), so nothing is left behind even after ``kill -9`` and
  two runs into one folder never share one (each has its own); where an open file cannot be
  unlinked (Windows) it is removed on close;
* it is scratch, not a result: no journal, no fsync, and one transaction for its whole life, so a
  statement costs microseconds instead of a page flush (pages spill to the file as the cache fills);
* SQLite keeps a bounded page cache (a few MB) whatever the table sizes, and a primary key answers
  "is this key there?" without a Python set.

Without a folder the database is ``:memory:``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from radflash.errors import InputError

_PRAGMAS = "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"


class ScratchDB:
    """One private SQLite file in ``folder`` (unlinked once open) holding ``schema``'s tables.

    Safe to use from several threads at once (one lock around every statement). ``what`` names
    the file in the error raised when it cannot be created.
    """

    def __init__(self, folder: Path | None, suffix: str, schema: str, *, what: str) -> None:
        path = None if folder is None else Path(folder) / f".tmp-{uuid.uuid4().hex[:12]}{suffix}"
        try:
            db = _connect(path)
            db.executescript(_PRAGMAS + schema)
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise InputError(f"{path}: cannot create {what} ({exc})") from None
        if path is not None:
            try:
                path.unlink()  # the open handle keeps the data; no file is left, whatever ends the run
                path = None
            except OSError:
                pass  # an open file cannot be unlinked here (Windows): removed on close
        self._db = db
        self._lock = threading.Lock()
        self._close = weakref.finalize(self, _close, db, path)

    def run(self, sql: str, args: tuple = ()) -> list[tuple]:
        """One statement; its rows."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def run_many(self, sql: str, rows: Iterable[tuple]) -> None:
        """One statement over many parameter rows (a bulk insert)."""
        with self._lock:
            self._db.executemany(sql, rows)

    def close(self) -> None:
        """Free the scratch file now (also done when the object is garbage-collected)."""
        self._close()


def _connect(path: Path | None) -> sqlite3.Connection:
    """The scratch connection. A file is private to this process (and unlinked at once), so it is
    opened without file locks (SQLite's ``unix-none``): locks are what fail on some NFS mounts."""
    if path is None:
        return sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    if os.name == "posix":
        try:
            return sqlite3.connect(f"file:{quote(str(path))}?vfs=unix-none", uri=True, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.OperationalError:  # a SQLite built without that VFS: the default one
            path.unlink(missing_ok=True)
    return sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)


def _close(db: sqlite3.Connection, path: Path | None) -> None:
    db.close()
    if path is not None:
        path.unlink(missing_ok=True)
