"""The node's memory: every accepted instance, durably, from intake to forwarded result.

Bytes → ``STATE/spool/`` (written, fsync'd, renamed, folder fsync'd) → a row in
``STATE/journal.sqlite`` (WAL, ``synchronous=FULL``: a committed row survives a power cut). Only
then is the sender told "stored", so what was acknowledged is never lost: on start the node
re-queues every instance without a forwarded result (:meth:`Journal.unfinished`,
:meth:`Journal.pending_forwards`).

States of an instance::

    queued ──► scored ──► forwarded          (every --forward target holds its results)
       │          └─────► dead               (a target still refused after every retry: --retry-dead)
       ├────► skipped                        (not a chest frontal radiograph: nothing to send)
       └────► failed                         (the decoder refused it)

"received" is not a separate row state: a row is written only once the bytes are safe, and it is
queued in the same transaction. A ``forwards`` row per (instance, target) tracks each delivery.
Results are kept as JSON with everything an SR needs (model, prompts, numbers), so forwarding and
``--retry-dead`` need neither the model nor the findings file; with ``--segment`` the result also
names the SEG (and overlay SC) files under ``STATE/results/``, written and fsync'd before the row
says "scored", and removed with the spool once every target holds them. Instances refused at intake are
rows of ``rejections`` (reason, caller; never patient data). No table holds patient names or IDs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radflash.errors import RadflashError

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop TEXT PRIMARY KEY, study TEXT NOT NULL, series TEXT NOT NULL, sop_class TEXT,
    file TEXT NOT NULL, size INTEGER NOT NULL, priority INTEGER NOT NULL, source TEXT NOT NULL,
    caller TEXT, received REAL NOT NULL, state TEXT NOT NULL, reason TEXT, result TEXT,
    scored REAL, done REAL, receipts INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE TABLE IF NOT EXISTS forwards (
    sop TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT, updated REAL NOT NULL, PRIMARY KEY (sop, target));
CREATE INDEX IF NOT EXISTS forwards_state ON forwards(state);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, source TEXT NOT NULL, caller TEXT,
    sop TEXT, reason TEXT NOT NULL);
"""
UNFINISHED = ("queued",)
DONE = ("forwarded", "skipped", "failed")


class JournalError(RadflashError):
    """The state folder cannot be used (locked by another node, unreadable, not a journal)."""


@dataclass(frozen=True)
class Instance:
    """One journal row, as the scheduler and the forwarder need it (no patient data)."""

    sop: str
    study: str
    series: str
    file: str
    priority: int
    received: float  # epoch seconds
    state: str = "queued"
    result: dict[str, Any] | None = None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The SQLite journal and the spool under one state folder; thread-safe (one connection, a lock)."""

    def __init__(self, state: str | os.PathLike, *, lock: bool = True) -> None:
        self.root = Path(state)
        self.spool = self.root / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self._lockfile = None
        if lock:
            self._lockfile = self._take_lock()
        self._db = sqlite3.connect(self.root / "journal.sqlite", isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()
        for leftover in self.spool.glob(".tmp-*"):  # bytes of an instance never acknowledged
            with suppress(OSError):
                leftover.unlink()

    def _take_lock(self) -> Any:
        import fcntl

        fh = open(self.root / "node.lock", "a+")  # noqa: SIM115  (held, locked, for the node's life)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise JournalError(f"{self.root}: a node is already serving this state folder ({holder})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        return fh

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- intake ---------------------------------------------------------------------------------
    def spool_bytes(self, data: bytes) -> Path:
        """``data`` in a private temporary spool file, fsync'd (not yet an accepted instance)."""
        tmp = self.spool / f".tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def path_of(self, sop: str) -> Path:
        return self.spool / (self.key(sop) + ".dcm")

    @staticmethod
    def key(sop: str) -> str:
        """An instance's name on disk: a digest of its UID (file names never carry patient data)."""
        return hashlib.sha256(sop.encode()).hexdigest()[:40]

    @property
    def results_root(self) -> Path:
        return self.root / "results"

    def results_dir(self, sop: str) -> Path:
        """Where the instance's SEG/overlay files wait for delivery (``--segment``); removed with its spool."""
        return self.results_root / self.key(sop)

    def accept(self, tmp: Path, *, sop: str, study: str, series: str, sop_class: str | None, priority: int,
               source: str, caller: str | None) -> str:
        """Make a checked spool file an accepted, queued instance; returns ``"new"``, ``"requeued"``
        (known, but its last attempt failed or it is still waiting) or ``"duplicate"`` (already done:
        the bytes are dropped). Durable when it returns."""
        final = self.path_of(sop)
        with self._tx() as db:
            row = db.execute("SELECT state FROM instances WHERE sop=?", (sop,)).fetchone()
            if row is not None and row[0] in ("forwarded", "skipped", "scored", "dead"):
                db.execute("UPDATE instances SET receipts = receipts + 1 WHERE sop=?", (sop,))
                with suppress(OSError):
                    tmp.unlink()
                return "duplicate"
            os.replace(tmp, final)
            _fsync_dir(self.spool)
            now = time.time()
            if row is None:
                db.execute("INSERT INTO instances (sop, study, series, sop_class, file, size, priority, source,"
                           " caller, received, state) VALUES (?,?,?,?,?,?,?,?,?,?, 'queued')",
                           (sop, study, series, sop_class, final.name, final.stat().st_size, priority, source,
                            caller, now))
                return "new"
            db.execute("UPDATE instances SET state='queued', reason=NULL, result=NULL, priority=?, received=?,"
                       " receipts = receipts + 1 WHERE sop=?", (priority, now, sop))
            return "requeued" if row[0] == "failed" else "waiting"

    def reject(self, *, source: str, caller: str | None, sop: str | None, reason: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO rejections (at, source, caller, sop, reason) VALUES (?,?,?,?,?)",
                       (time.time(), source, caller, sop, reason[:500]))

    # ---- after inference ------------------------------------------------------------------------
    def scored(self, sop: str, result: dict[str, Any], targets: tuple[str, ...]) -> None:
        """Keep the result and open one delivery per target (none: the instance is done)."""
        now = time.time()
        with self._tx() as db:
            state = "scored" if targets else "forwarded"
            db.execute("UPDATE instances SET state=?, result=?, scored=?, done=? WHERE sop=?",
                       (state, json.dumps(result), now, None if targets else now, sop))
            for t in targets:
                db.execute("INSERT OR REPLACE INTO forwards (sop, target, state, attempts, error, updated)"
                           " VALUES (?,?,'pending',0,NULL,?)", (sop, t, now))
        if not targets:
            self._drop_spool(sop)

    def finished(self, sop: str, state: str, reason: str | None) -> None:
        """``skipped`` or ``failed``: nothing to send; the spooled bytes go."""
        with self._tx() as db:
            db.execute("UPDATE instances SET state=?, reason=?, done=? WHERE sop=?",
                       (state, (reason or "")[:500], time.time(), sop))
        self._drop_spool(sop)

    def forward_done(self, sop: str, target: str) -> bool:
        """One delivery made; True when it was the instance's last (then the instance is forwarded)."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE forwards SET state='done', error=NULL, attempts=attempts+1, updated=? "
                       "WHERE sop=? AND target=?", (now, sop, target))
            left = db.execute("SELECT COUNT(*) FROM forwards WHERE sop=? AND state!='done'", (sop,)).fetchone()[0]
            if left == 0:
                db.execute("UPDATE instances SET state='forwarded', done=? WHERE sop=?", (now, sop))
        if left == 0:
            self._drop_spool(sop)
        return left == 0

    def forward_failed(self, sop: str, target: str, error: str, *, dead: bool) -> int:
        """A failed delivery; ``dead``: no more retries (the instance becomes dead). Returns attempts."""
        with self._tx() as db:
            db.execute("UPDATE forwards SET state=?, error=?, attempts=attempts+1, updated=? WHERE sop=? AND target=?",
                       ("dead" if dead else "pending", error[:500], time.time(), sop, target))
            if dead:
                db.execute("UPDATE instances SET state='dead' WHERE sop=?", (sop,))
            return db.execute("SELECT attempts FROM forwards WHERE sop=? AND target=?", (sop, target)).fetchone()[0]

    def retry_dead(self) -> int:
        """Dead deliveries back to pending (``--retry-dead``); returns how many."""
        with self._tx() as db:
            n = db.execute("UPDATE forwards SET state='pending', attempts=0 WHERE state='dead'").rowcount
            db.execute("UPDATE instances SET state='scored' WHERE state='dead'")
        return n

    def _drop_spool(self, sop: str) -> None:
        with suppress(OSError):
            self.path_of(sop).unlink()
        folder = self.results_dir(sop)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)

    # ---- start-up and status --------------------------------------------------------------------
    def _instance(self, row: tuple) -> Instance:
        sop, study, series, file, priority, received, state, result = row
        return Instance(sop, study, series, str(self.spool / file), priority, received, state,
                        json.loads(result) if result else None)

    _COLUMNS = "sop, study, series, file, priority, received, state, result"

    def unfinished(self) -> list[Instance]:
        """Accepted instances still waiting for the model (queued, in a group or in a batch at a crash)."""
        rows = self._rows(f"SELECT {self._COLUMNS} FROM instances WHERE state='queued' ORDER BY received")
        return [self._instance(r) for r in rows]

    def instance(self, sop: str) -> Instance | None:
        rows = self._rows(f"SELECT {self._COLUMNS} FROM instances WHERE sop=?", (sop,))
        return self._instance(rows[0]) if rows else None

    def pending_forwards(self, targets: tuple[str, ...]) -> list[tuple[str, str, int]]:
        """(sop, target, attempts) of deliveries to make: pending rows, plus rows for a target added
        since an instance was scored."""
        with self._tx() as db:
            now = time.time()
            for t in targets:
                db.execute("INSERT OR IGNORE INTO forwards (sop, target, state, attempts, error, updated) "
                           "SELECT sop, ?, 'pending', 0, NULL, ? FROM instances WHERE state='scored'", (t, now))
            return db.execute("SELECT f.sop, f.target, f.attempts FROM forwards f JOIN instances i ON i.sop=f.sop "
                              "WHERE f.state='pending' ORDER BY i.received").fetchall()

    def dead(self) -> list[tuple[str, str, int, str]]:
        return self._rows("SELECT sop, target, attempts, error FROM forwards WHERE state='dead' ORDER BY updated")

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("queued", "scored", "forwarded", "dead", "skipped", "failed")}
        for state, n in self._rows("SELECT state, COUNT(*) FROM instances GROUP BY state"):
            out[state] = n
        out["rejected"] = self._rows("SELECT COUNT(*) FROM rejections")[0][0]
        out["pending_forwards"] = self._rows("SELECT COUNT(*) FROM forwards WHERE state='pending'")[0][0]
        return out

    def rejections(self, limit: int = 20) -> list[tuple[float, str, str | None, str | None, str]]:
        return self._rows("SELECT at, source, caller, sop, reason FROM rejections ORDER BY id DESC LIMIT ?", (limit,))

    def waiting(self) -> int:
        """Instances accepted and not yet scored (what ``--max-queue`` caps)."""
        return self._rows("SELECT COUNT(*) FROM instances WHERE state='queued'")[0][0]
