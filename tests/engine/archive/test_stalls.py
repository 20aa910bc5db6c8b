"""No verb hangs: a stage that stops delivering ends the run with one line naming it, committed
parts intact, and ``--resume`` finishes the run (radflash.util.watchdog)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from radflash.archive.verb import DEMO_ARCHIVE, score
from radflash.io.source import SourceItem
from radflash.util.watchdog import STALL_EXIT_CODE, Stalled

FILMS = sorted(p for p in DEMO_ARCHIVE.rglob("*.dcm"))
CHEST = sorted(DEMO_ARCHIVE.glob("patient*/*/img*.dcm"))  # frontal chest films: all of them load


class StuckSource:
    """Yields ``n`` demo files, then blocks the way a network read without a timeout does."""

    def __init__(self, n: int, release: threading.Event) -> None:
        self.n, self.release = n, release

    def __iter__(self) -> Iterator[SourceItem]:
        yield from (SourceItem.of_path(p) for p in FILMS[:self.n])
        self.release.wait(120)
        yield from (SourceItem.of_path(p) for p in FILMS[self.n:])

    def describe(self) -> dict[str, Any]:
        return {"inputs": ["stuck"]}


def test_a_source_that_stops_delivering_is_named_and_resume_finishes(tiny_model: Path, tmp_path: Path) -> None:
    release = threading.Event()
    out = tmp_path / "out"
    t0 = time.monotonic()
    try:
        with pytest.raises(Stalled) as err:
            score(StuckSource(6, release), out, model=tiny_model, workers=1, batch_size=2, commit_every=1,
                  progress=False, stall_after=2.0)
    finally:
        release.set()
    assert time.monotonic() - t0 < 60
    message = str(err.value)
    assert "score stalled" in message and "the source stage has been busy" in message and "--resume" in message
    assert sorted(out.glob("parts/part-*.parquet")), "what was committed before the stall stays on disk"
    done = score(StuckSource(6, release), out, model=tiny_model, workers=1, batch_size=2, progress=False,
                 resume=True)
    assert done.resumed > 0  # the stalled run's parts were kept and are not redone
    keys = done.status.column("path").to_pylist()
    assert len(keys) == len(set(keys)) == len(FILMS)  # every file once, none twice


def test_segment_names_the_stage_that_stalled(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    from radflash.segment import verb

    real = verb.segment_one

    def slow(*args: Any, **kwargs: Any):  # the stall is seen after 2 s; the run ends when this returns
        time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(verb, "segment_one", slow)
    t0 = time.monotonic()
    with pytest.raises(Stalled, match=r"segment stalled: .*the maps stage"):
        verb.segment(CHEST[:4], tmp_path / "seg", prompts=["left lung"], model=tiny_model, workers=0,
                     progress=False, stall_after=2.0)
    assert time.monotonic() - t0 < 60


def silent_http_server() -> tuple[socket.socket, int]:
    """A server that accepts connections and never answers (a STOW target hung mid-request)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server, server.getsockname()[1]


def test_cli_ends_a_run_stuck_in_its_sink_with_the_stage_named(tiny_model: Path, tmp_path: Path) -> None:
    """The STOW sink blocks in a socket read that no exception can reach: the command's watchdog
    prints the line and ends the process (exit code 70) instead of hanging; a resume finishes."""
    server, port = silent_http_server()
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "radflash", "score", str(DEMO_ARCHIVE), "-o", str(out), "--model", str(tiny_model),
             "--store", f"dicomweb+http://127.0.0.1:{port}/dicom-web", "--stall-after", "2", "--workers", "1",
             "--quiet", "--report", "none"],
            capture_output=True, text=True, timeout=240)
    finally:
        server.close()
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "score stalled" in lines[0] and "the sink stage has been busy" in lines[0], proc.stderr
    done = score(DEMO_ARCHIVE, out, model=tiny_model, workers=1, progress=False, resume=True)
    assert done.status.num_rows == len([p for p in DEMO_ARCHIVE.rglob("*") if p.is_file()])
