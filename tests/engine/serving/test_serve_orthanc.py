"""``radflash serve`` against a real Orthanc: pushed studies come back as one SR per image, with
``radflash score``'s probabilities; a node killed with ``kill -9`` at any point loses nothing and
duplicates nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.engine.serving.conftest import (
    CHEST,
    NODE_AET,
    OTHER,
    expected_scores,
    orthanc_or_skip,
    sr_count,
    sr_uid_of,
    srs_in,
    stored_by,
    storescu,
    storescu_command,
    uids,
)


@pytest.mark.slow  # ~20-30 s: real Orthancs and several node starts
def test_orthanc_push_and_storescu_give_one_sr_per_image_with_score_probabilities(tmp_path: Path, nodes) -> None:
    pacs = orthanc_or_skip(tmp_path / "pacs")  # pushes studies; receives SRs over STOW-RS
    archive = orthanc_or_skip(tmp_path / "archive")  # receives SRs over C-STORE only
    try:
        node = nodes("node", "--forward", pacs.dicomweb, "--forward", archive.dimse("", aet=archive.aet),
                     "--max-batch", "4").start()
        pacs.add_modality("radflash", NODE_AET, node.dicom_port)
        by_orthanc, by_storescu = CHEST[:10] + OTHER, CHEST[10:]
        ids = [pacs.request("POST", "/instances", p.read_bytes())["ID"] for p in by_orthanc]  # type: ignore[index]
        job = pacs.request("POST", "/modalities/radflash/store",
                           json.dumps({"Resources": ids, "Synchronous": True}).encode(), "application/json")
        assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(by_orthanc)  # type: ignore[index]
        sent = storescu(node.dicom_port, by_storescu)
        assert sent.returncode == 0 and stored_by(sent) == len(by_storescu), sent.stdout + sent.stderr
        node.wait_for(lambda: sr_count(archive) >= len(CHEST) and sr_count(pacs) >= len(CHEST), 90, "SRs")
        # the journal and the metrics follow the last delivery: waited for, not slept on
        node.wait_for(lambda: node.metric("radflash_serve_end_to_end_seconds_count") >= len(CHEST)
                      and node.metric("radflash_serve_results_total") >= len(CHEST + OTHER), 30, "the journal")

        want = expected_scores(CHEST)
        assert len(want) == len(CHEST)
        for server in (pacs, archive):
            got = srs_in(server)
            assert len(got) == len(CHEST)  # one SR per chest film; none for CT/MR/knee/lateral (skipped)
            for path in CHEST:
                sop, study = uids(path)
                sr = got[sr_uid_of(sop, study)]  # the SR's UID derives from the source and the model
                assert sr.keys() == want[sop].keys()
                for name, p in want[sop].items():
                    assert sr[name] == pytest.approx(p, abs=1e-5), (path.name, name)
        counts = node.counts()
        assert counts["forwarded"] == len(CHEST) and counts["skipped"] == len(OTHER)
        assert counts["queued"] == counts["scored"] == counts["dead"] == 0
        assert node.metric("radflash_serve_requests_total", intake="dimse", status="stored") == len(CHEST + OTHER)
        assert node.metric("radflash_serve_end_to_end_seconds_count") == len(CHEST)
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)
        archive.stop(kill=True)


def _copies(files: list[Path], folder: Path, n: int) -> list[Path]:
    """``n`` chest films with fresh UIDs (so many instances cost no more Orthanc state than needed)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(files[i % len(files)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["kill9", str(i)])
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["kill9-study", str(i // 4)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["kill9-series", str(i // 2)])
        ds.save_as(folder / f"{i:03d}.dcm")
        out.append(folder / f"{i:03d}.dcm")
    return out


@pytest.mark.slow  # ~20-30 s: real Orthancs and several node starts
def test_kill9_in_intake_in_a_batch_and_in_forward_loses_nothing_and_duplicates_nothing(tmp_path: Path, nodes) -> None:
    pacs = orthanc_or_skip(tmp_path / "pacs")
    files = _copies(CHEST, tmp_path / "films", 24)
    flags = ("--forward", pacs.dicomweb, "--max-batch", "4", "--max-queue-delay-ms", "200",
             "--group", "series", "--quiet-period", "0.3", "--forward-backoff", "0.2", "--forward-retries", "50")
    state = tmp_path / "node"
    node = nodes("node", *flags).start()
    ports = {"dicom_port": node.dicom_port, "http_port": node.http_port}
    try:
        # 1. in intake: killed while storescu is still sending (some acknowledged, some not)
        sender = subprocess.Popen(storescu_command(node.dicom_port, files), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            node.wait_for(lambda: node.metric("radflash_serve_requests_total", status="stored") >= 6, 60, "intake")
            node.kill9()
        finally:
            # What the sender does once the node is dead does not matter (it resends everything in 2.),
            # but left alone it can sit out its 30 s ACSE/DIMSE timeout on the dead association, and it
            # must not reach the restarted node: it is stopped here instead of waited for.
            sender.kill()
            sender.wait(timeout=30)

        # 2. in a batch and in forward (one restart checks both): restarted with the PACS down (the
        # acknowledged ones are re-queued), so scored results wait for delivery while later batches
        # compute; killed once both are under way
        pacs.stop(kill=True)
        node = nodes("node", *flags, **ports).start()
        assert node.state == state
        sent = storescu(node.dicom_port, files)  # the sender retries everything; duplicates are acknowledged
        assert stored_by(sent) == len(files), sent.stdout + sent.stderr
        node.wait_for(lambda: node.metric("radflash_serve_forward_retries_total") >= 2
                      and (node.metric("radflash_serve_in_batch") > 0
                           or node.metric("radflash_serve_results_total") >= 8), 60, "a batch and forward retries")
        node.kill9()

        # 3. restart with the PACS back: everything arrives, exactly once
        pacs.start()
        node = nodes("node", *flags, **ports).start()
        node.wait_for(lambda: sr_count(pacs) >= len(files), 120, "every SR")
        node.wait_for(lambda: node.counts()["forwarded"] == len(files), 30, "journal forwarded")
        got = srs_in(pacs)
        assert set(got) == {sr_uid_of(*uids(f)) for f in files}  # none missing, none extra
        counts = node.counts()
        assert counts["forwarded"] == len(files) and counts["queued"] == counts["scored"] == counts["dead"] == 0
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)
