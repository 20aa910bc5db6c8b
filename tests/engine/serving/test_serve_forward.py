"""Results back to the hospital when it is not there: retries, dead letters, ``--retry-dead``; and
SIGTERM, which finishes and forwards what is in flight, then exits 0."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.engine.serving.conftest import CHEST, orthanc_or_skip, sr_count, sr_uid_of, srs_in, stored_by, storescu, uids


@pytest.mark.slow  # ~20-30 s: real Orthancs and several node starts
def test_a_target_down_then_up_is_retried_then_dead_lettered_then_resent(tmp_path: Path, nodes) -> None:
    pacs = orthanc_or_skip(tmp_path / "pacs")
    try:
        node = nodes("node", "--forward", pacs.dicomweb, "--forward-retries", "3", "--forward-backoff", "0.5").start()
        # down, then back within the retries (0.5 + 1 + 2 s): delivered by a retry
        pacs.stop(kill=True)
        assert stored_by(storescu(node.dicom_port, CHEST[:2])) == 2
        node.wait_for(lambda: node.metric("radflash_serve_forward_retries_total") >= 2, 30, "retries")
        pacs.start()
        node.wait_for(lambda: sr_count(pacs) == 2, 30, "delivery after the target came back")
        assert node.metric("radflash_serve_dead_letters_total") == 0

        # down for longer than the retries: dead letters, listed by --status
        pacs.stop(kill=True)
        assert stored_by(storescu(node.dicom_port, CHEST[2:5])) == 3
        node.wait_for(lambda: node.metric("radflash_serve_dead_letters_total") == 3, 60, "dead letters")
        listing = node.status()
        assert listing.count("dead\t") == 3 and pacs.dicomweb in listing
        assert node.counts()["dead"] == 3

        # up again: --retry-dead resends them (while the node keeps running), exactly once each
        pacs.start()
        out = node.status("--retry-dead")
        assert out.startswith("resent 3 dead letter(s); 0 still failing"), out
        assert set(srs_in(pacs)) == {sr_uid_of(*uids(f)) for f in CHEST[:5]}
        counts = node.counts()
        assert counts["forwarded"] == 5 and counts["dead"] == 0
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)


def test_sigterm_stops_intake_forwards_what_is_in_flight_and_exits_0(tmp_path: Path, nodes) -> None:
    pacs = orthanc_or_skip(tmp_path / "pacs")
    try:
        # a long quiet period: without the drain these groups would wait 60 s
        node = nodes("node", "--forward", pacs.dicomweb, "--group", "study", "--quiet-period", "60",
                     "--grace", "30").start()
        assert stored_by(storescu(node.dicom_port, CHEST[:6])) == 6
        assert sr_count(pacs) == 0
        assert node.terminate(timeout=60) == 0
        assert sr_count(pacs) == 6  # finished and forwarded before the exit
        with socket.socket() as s:  # intake is closed
            assert s.connect_ex(("127.0.0.1", node.dicom_port)) != 0
        # a restart finds nothing to do
        node = nodes("node", "--forward", pacs.dicomweb).start()
        assert node.counts()["forwarded"] == 6 and node.metric("radflash_serve_results_total") == 0
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)


def test_status_and_retry_dead_need_no_torch() -> None:
    """``--status`` and ``--retry-dead`` run without a model, so the modules they use must not import
    torch (it cost 1–4 s per call when the score calibration pulled it in at import time)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import radflash.cli.serve, radflash.serving.forward, radflash.serving.journal\n"
            "import radflash.archive.pipeline, radflash.archive.sinks, radflash.archive.stow\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
