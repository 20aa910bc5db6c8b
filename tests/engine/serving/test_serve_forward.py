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


def test_two_targets_get_one_sr_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two targets each instance's SR is built once (it costs ~90 ms of one core), each lane
    sends its own dataset read from the same bytes, and both targets get the very same SR: the
    one :func:`radflash.dicomout.uids.sr_uids` names, with the journal's probabilities."""
    import io
    import random

    import pydicom

    from radflash.dicomout.uids import sr_uids
    from radflash.serving import forward
    from radflash.serving.journal import Journal
    from radflash.serving.metrics import Metrics
    from radflash.serving.options import ForwardOptions

    films = random.sample(CHEST, 2)  # random: seeded per test by the suite's conftest
    targets = ("dicomweb+http://127.0.0.1:9/dicom-web", "dimse://PACS@127.0.0.1:9")
    sent: list[tuple[str, bytes, int]] = []

    def capture(self, datasets):  # the transport's wire, without a server: the SR's bytes as sent
        buf = io.BytesIO()
        datasets[0].save_as(buf, enforce_file_format=True)
        sent.append((self.url, buf.getvalue(), id(datasets[0])))

    monkeypatch.setattr(forward.Transport, "send", capture)
    builds = []
    build = forward._build_sr
    monkeypatch.setattr(forward, "_build_sr", lambda inst: builds.append(inst.sop) or build(inst))
    journal = Journal(tmp_path / "state")
    try:
        probs = {}
        for f in films:
            sop, study = uids(f)
            tmp = journal.spool_bytes(f.read_bytes())
            assert journal.accept(tmp, sop=sop, study=study, series="r", sop_class=None, priority=1, source="t",
                                  caller=None) == "new"
            probs[sop] = [round(random.random(), 6), round(random.random(), 6)]
            journal.scored(sop, {"model_id": "m", "model_sha256": "a" * 64, "family": "radzero", "version": "1",
                                 "names": ["effusion", "pneumothorax"], "prompts": ["There is effusion",
                                 "There is pneumothorax"], "thresholds": [None, None], "logits": [0.0, 0.0],
                                 "probs": probs[sop], "positive": None}, targets)
        forwarder = forward.Forwarder(journal, ForwardOptions(targets=targets), Metrics(), lambda inst: None)
        for sop in probs:
            for url in targets:
                forwarder.lanes[url]._deliver(sop, 0)
        assert sorted(builds) == sorted(probs) and forwarder.reports.built == len(probs)  # once per instance
        assert [url for url, _, _ in sent] == [t for _ in probs for t in targets]
        for sop, (a, b) in zip(probs, zip(sent[::2], sent[1::2])):
            assert a[1] == b[1] and a[2] != b[2]  # the same bytes, each lane its own dataset
            sr = pydicom.dcmread(io.BytesIO(a[1]))
            study = uids(next(f for f in films if uids(f)[0] == sop))[1]
            assert str(sr.SOPInstanceUID) == sr_uids(sop, study, "a" * 64)[1]
            values = [float(m.MeasuredValueSequence[0].NumericValue) for m in _content_items(sr)
                      if "MeasuredValueSequence" in m and m.ConceptNameCodeSequence[0].CodeMeaning == "Probability"]
            assert sorted(values) == sorted(probs[sop])
        assert journal.counts()["forwarded"] == len(probs)
    finally:
        journal.close()


def _content_items(ds):
    for item in getattr(ds, "ContentSequence", None) or ():
        yield item
        yield from _content_items(item)
