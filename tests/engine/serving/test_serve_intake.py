"""Intake over C-STORE and STOW-RS: bad input gets its failure status and the node keeps serving;
a full queue answers 0xA700 / 503 and loses nothing; ``POST /v1/score`` equals ``radflash score``."""

from __future__ import annotations

import http.client
import io
import json
import time
from pathlib import Path

import pytest

from tests.engine.orthanc import ARCHIVE_FILES
from tests.engine.serving.conftest import CHEST, expected_scores, stored_by, storescu, stow_body

TOKEN = "serve-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRUNCATED = next(p for p in ARCHIVE_FILES if p.name == "truncated.dcm")
NOT_DICOM = next(p for p in ARCHIVE_FILES if p.name == "notes.dcm")


def _stow(node, files: list[bytes], headers: dict | None = None) -> tuple[int, dict, dict]:
    body, ctype = stow_body(files)
    code, reply, hdrs = node.request("POST", "/dicom-web/studies", body, {"Content-Type": ctype, **(headers or {})})
    return code, (json.loads(reply) if reply[:1] == b"{" else {}), hdrs


def _failures(reply: dict) -> list[tuple[int, str]]:
    return [(i["00081197"]["Value"][0], i.get("00000902", {}).get("Value", [""])[0])
            for i in reply.get("00081198", {}).get("Value", [])]


def _text_sr(folder: Path) -> Path:
    """A Basic Text SR (no pixels): a non-image SOP class."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["serve-text-sr"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["serve-text-sr-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["serve-text-sr-series"])
    ds.Modality = "SR"
    path = folder / "text-sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bad_input_gets_its_failure_status_and_the_node_keeps_serving(tmp_path: Path, nodes) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    node = nodes("node", "--token-file", str(token), "--allow-ae", "GOODSCU", "--max-body-mb", "1").start()

    # a caller not on the allow-list: the association is rejected, nothing stored
    evil = storescu(node.dicom_port, CHEST[:1], aet="EVILSCU")
    assert stored_by(evil) == 0 and "Association Rejected" in evil.stdout + evil.stderr
    # a non-image SOP class: refused with 0x0122 (SOP class not supported), by an allowed caller
    sr = storescu(node.dicom_port, [_text_sr(tmp_path)], aet="GOODSCU")
    assert "0x0122" in sr.stdout + sr.stderr, sr.stdout + sr.stderr
    # no token, a wrong token: 401; /health needs none
    assert _stow(node, [CHEST[0].read_bytes()])[0] == 401
    assert _stow(node, [CHEST[0].read_bytes()], {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    assert node.request("GET", "/metrics")[0] == 401
    # a truncated file and a file that is no DICOM: 409 with the reason per instance
    code, reply, _ = _stow(node, [TRUNCATED.read_bytes(), NOT_DICOM.read_bytes()], AUTH)
    assert code == 409
    failures = _failures(reply)
    assert [f[0] for f in failures] == [0xC000, 0xC000]
    assert failures[0][1].startswith("truncated") and "not a DICOM" in failures[1][1]
    # an oversize body: 413 from the headers alone (the body is never read)
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
    conn.putrequest("POST", "/dicom-web/studies")
    for k, v in {**AUTH, "Content-Type": 'multipart/related; type="application/dicom"; boundary=x',
                 "Content-Length": str(5 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()

    # still serving: a good instance by each intake, a synchronous score
    assert stored_by(storescu(node.dicom_port, CHEST[:1], aet="GOODSCU")) == 1
    code, reply, _ = _stow(node, [CHEST[1].read_bytes()], AUTH)
    assert code == 200 and len(reply["00081199"]["Value"]) == 1
    assert node.get("/health")[0] == 200
    node.wait_for(lambda: node.counts()["forwarded"] == 2, 60, "both scored")  # no targets: done once scored
    status = node.status()
    assert status.count("\nrejected\t") + status.startswith("rejected") >= 6, status
    assert "truncated" in status and "not an image" in status and "bearer token" in status


def test_v1_score_returns_the_probabilities_of_radflash_score(tmp_path: Path, nodes) -> None:
    import numpy as np
    from PIL import Image

    from radflash.io.imageio import load_image

    node = nodes("node", "--dicom-port", "0").start()
    want = expected_scores(CHEST[:1])
    code, body, _ = node.request("POST", "/v1/score", CHEST[0].read_bytes(), {"Content-Type": "application/dicom"})
    assert code == 200, body
    got = json.loads(body)
    sop = next(iter(want))
    for name, p in want[sop].items():
        assert got["findings"][name]["probability"] == pytest.approx(p, abs=1e-5)
    # a PNG of the same film: scored through the same batches (8-bit, so only close)
    png = io.BytesIO()
    Image.fromarray((load_image(CHEST[0]).pixels * 255).round().astype(np.uint8)).save(png, format="PNG")
    code, body, _ = node.request("POST", "/v1/score", png.getvalue(), {"Content-Type": "image/png"})
    assert code == 200
    for name, p in want[sop].items():
        assert json.loads(body)["findings"][name]["probability"] == pytest.approx(p, abs=0.05)
    # and a JPEG of it (lossy at quality 95: close, not equal)
    jpeg = io.BytesIO()
    Image.fromarray((load_image(CHEST[0]).pixels * 255).round().astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    code, body, _ = node.request("POST", "/v1/score", jpeg.getvalue(), {"Content-Type": "image/jpeg"})
    assert code == 200
    for name, p in want[sop].items():
        assert json.loads(body)["findings"][name]["probability"] == pytest.approx(p, abs=0.05)
    code, body, _ = node.request("POST", "/v1/score", NOT_DICOM.read_bytes())
    assert code == 422 and json.loads(body)["status"] == "failed"
    assert node.metric("radflash_serve_batch_size_count") == 4
    assert node.get("/ready")[0] == 200


def test_a_full_queue_answers_out_of_resources_and_a_sender_that_retries_gets_everything_scored(
        tmp_path: Path, nodes) -> None:
    # groups wait 1.5 s for their study to be quiet: what arrives in a burst stays queued
    node = nodes("node", "--max-queue", "2", "--group", "study", "--quiet-period", "1.5").start()
    files = CHEST[:6]
    code, reply, _ = _stow(node, [f.read_bytes() for f in files[:4]])
    assert code == 202  # two kept, two refused: out of resources
    assert [f[0] for f in _failures(reply)] == [0xA700, 0xA700]
    code, _, headers = _stow(node, [files[4].read_bytes()])
    assert code == 503 and int(headers["Retry-After"]) > 0
    busy = storescu(node.dicom_port, files[5:6])
    assert "0xA700" in busy.stdout + busy.stderr and stored_by(busy) == 0
    assert node.get("/ready")[0] == 503
    # a sender that retries until it hears "stored" gets every instance scored; nothing is lost
    left = list(files[2:])
    deadline = time.monotonic() + 90
    while left and time.monotonic() < deadline:
        code, _, _ = _stow(node, [left[0].read_bytes()])
        if code == 200:
            left.pop(0)
        else:
            time.sleep(0.3)
    assert not left
    node.wait_for(lambda: node.counts()["forwarded"] == len(files), 60, "every instance scored")
    assert node.metric("radflash_serve_requests_total", status="busy") >= 4
