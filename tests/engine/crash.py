"""Crash a CLI run mid-flight (``kill -9``), the way a power cut or the OOM killer would."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from radflash.archive.sinks import read_manifest


def kill9_after_second_part(cmd: list[str], out: Path, *, within: float = 120.0) -> None:
    """Run ``cmd`` (a ``radflash score … -o out`` command) and ``kill -9`` it as soon as its second
    part is committed; the run must still have been going (its manifest not complete)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + within
    while not (out / "parts" / "part-00001.parquet").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"no part committed within {within:g} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not read_manifest(out)["complete"], "the run finished before it could be killed"


class Crash(RuntimeError):
    """What :func:`crash_on_batch`'s observer raises to stop an in-process run mid-way."""


def crash_on_batch(n: int = 3):
    """A ``score(observer=...)`` that raises :class:`Crash` at the ``n``-th batch, after some parts
    are committed: an in-process stand-in for a crash where ``kill -9`` would cost a subprocess."""
    batches: list[int] = []

    def observer(*args: object) -> None:
        batches.append(1)
        if len(batches) == n:
            raise Crash("killed mid-run")

    return observer
