"""The decode process a Ray decode task keeps between calls (``process_pool``/``decode_files``)."""

from __future__ import annotations

from pathlib import Path

from radflash.archive import decode_pool
from radflash.archive.decode_pool import DecodeTask, decode_files, process_pool
from radflash.archive.verb import DEMO_ARCHIVE
from tests.engine.archive.ray_hooks import ATTEMPTS, misbehaving_loader

FILM = DEMO_ARCHIVE / "patient00" / "study0" / "img000.dcm"


def test_kept_worker_serves_later_calls_and_a_crash_costs_one_file(tmp_path: Path) -> None:
    crash = tmp_path / "in" / "exit_1.dcm"
    crash.parent.mkdir()
    crash.write_bytes(b"never decoded")
    kwargs = {"loader": misbehaving_loader, "rules": None, "timeout": 30.0, "isolate": True}
    try:
        first = decode_files([DecodeTask(0, "a", str(FILM))], **kwargs)
        pool = process_pool(misbehaving_loader, None, 30.0)
        (kept,) = pool._idle
        again = decode_files([DecodeTask(0, "b", str(FILM))], **kwargs)
        assert [d.status for d in first + again] == ["loaded", "loaded"] and pool._idle == [kept]  # reused

        tasks = [DecodeTask(7, "c", str(FILM)), DecodeTask(3, "d", str(crash)), DecodeTask(5, "e", str(FILM))]
        out = decode_files(tasks, **kwargs)
        assert [(d.index, d.status, d.reason) for d in out] == [  # task order, one per task
            (7, "loaded", None), (3, "failed", "decoder process crashed (exit code 3)"), (5, "loaded", None)]
        assert (tmp_path / ATTEMPTS).read_text().count("exit_1.dcm") == 1  # the crashed file is not retried
        assert pool.restarts == 1 and pool._idle and pool._idle[0] is not kept

        assert process_pool(misbehaving_loader, None, 5.0) is not pool and pool._idle == []  # other settings
    finally:
        if decode_pool._PROCESS_POOL is not None:
            decode_pool._PROCESS_POOL[1].close()
            decode_pool._PROCESS_POOL = None


def test_without_isolation_files_decode_in_this_process(tmp_path: Path) -> None:
    tasks = [DecodeTask(0, "a", str(FILM)), DecodeTask(1, "b", str(tmp_path / "missing.dcm"))]
    out = decode_files(tasks, loader=None, rules=None, timeout=None, isolate=False)
    assert [(d.status, d.reason) for d in out] == [("loaded", None), ("failed", "no such file")]
    assert decode_pool._PROCESS_POOL is None  # no process started
