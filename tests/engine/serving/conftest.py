"""A real ``radflash serve`` process, a real Orthanc as the hospital PACS, and ways to talk to both.

The node runs as a subprocess (``python -m radflash serve``) so the tests can ``kill -9`` it and
send it SIGTERM; Orthanc (tests/engine/orthanc.py) pushes studies to it through a DicomModalities
entry and receives its SRs over STOW-RS and C-STORE; DCMTK's ``storescu`` is a second sender.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.engine.orthanc import ARCHIVE_FILES, free_port, skip_reason
from tests.services import unavailable

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'radflash[serve]')")
pytest.importorskip("prometheus_client", reason="prometheus-client is not installed (pip install 'radflash[serve]')")

ROOT = Path(__file__).resolve().parents[3]
NODE_AET = "RADFLASH"
CHEST = [p for p in ARCHIVE_FILES if p.parts[-3].startswith("patient")]  # the 16 chest frontal films
OTHER = [p for p in ARCHIVE_FILES if "other" in p.parts]  # CT, MR, knee, lateral...: accepted, skipped


class NodeProc:
    """One ``radflash serve`` subprocess on free loopback ports."""

    def __init__(self, state: Path, *args: str, dicom_port: int | None = None, http_port: int | None = None,
                 tls_ca: Path | None = None) -> None:
        self.state = state
        self.tls_ca = tls_ca  # the node serves HTTPS (--tls-cert): talk to it trusting this certificate
        self.args = args
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = state.parent / f"{state.name}.log"

    def start(self, timeout: float = 90.0) -> NodeProc:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RADFLASH_NO_DEMO_NOTICE": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "radflash", "-v", "serve", "--state", str(self.state), "--dicom-port",
               str(self.dicom_port), "--http-port", str(self.http_port), "--min-free-mb", "0", "--device", "cpu",
               *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if self.get("/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node not ready in {timeout:g} s: {self.log.read_text()[-3000:]}")

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers or {})
        context = None
        if self.tls_ca is not None:
            import ssl

            context = ssl.create_default_context(cafile=str(self.tls_ca))
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> tuple[int, bytes]:
        code, body, _ = self.request("GET", path, timeout=5)
        return code, body

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.get("/metrics")
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) waiting for {what}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; log: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def status(self, *extra: str) -> str:
        """``radflash serve --state DIR --status`` (or ``extra`` instead of ``--status``): its output."""
        out = subprocess.run([sys.executable, "-m", "radflash", "serve", "--state", str(self.state),
                              *(extra or ("--status",))],
                             capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        return out.stdout

    def counts(self) -> dict:
        return json.loads(self.status().splitlines()[0])


@pytest.fixture
def nodes(tmp_path: Path):
    """Make nodes with ``nodes(name, *flags)``; every one is killed at the end of the test."""
    made: list[NodeProc] = []

    def make(name: str, *args: str, **options) -> NodeProc:
        node = NodeProc(tmp_path / name, *args, **options)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


def orthanc_or_skip(root: Path, **options):
    from tests.engine.orthanc import Orthanc

    reason = skip_reason()
    if reason is not None:
        unavailable(reason)
    return Orthanc(root, **options).start()


def storescu_command(port: int, files: list[Path], *, aet: str = "STORESCU", called: str = NODE_AET,
                     extra: tuple[str, ...] = ()) -> list[str]:
    if shutil.which("storescu") is None:
        unavailable("DCMTK's storescu is not installed (apt-get install dcmtk)")
    # -cx: propose each file's own transfer syntax (JPEG 2000 films go as they are)
    return ["storescu", "-v", "-cx", "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]


def storescu(port: int, files: list[Path], *, aet: str = "STORESCU", called: str = NODE_AET,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(storescu_command(port, files, aet=aet, called=called, extra=extra),
                          capture_output=True, text=True, timeout=120)


def stored_by(out: subprocess.CompletedProcess) -> int:
    """How many of storescu's C-STOREs the node answered with Success."""
    return (out.stdout + out.stderr).count("Received Store Response (Status: 0x0000")


def srs_in(pacs) -> dict[str, dict]:
    """SOP Instance UID → findings (name → probability) of every SR the PACS holds."""
    import io

    import pydicom

    from radflash.dicomout.sr import read_findings

    ids = pacs.request("POST", "/tools/find", json.dumps({"Level": "Instance", "Query": {"Modality": "SR"}}).encode(),
                       "application/json")
    out = {}
    for orthanc_id in ids:  # type: ignore[union-attr]
        ds = pydicom.dcmread(io.BytesIO(pacs.request("GET", f"/instances/{orthanc_id}/file")))  # type: ignore[arg-type]
        out[str(ds.SOPInstanceUID)] = {k: v["probability"] for k, v in read_findings(ds).items()}
    return out


def sr_count(pacs) -> int:
    query = json.dumps({"Level": "Instance", "Query": {"Modality": "SR"}}).encode()
    return len(pacs.request("POST", "/tools/find", query, "application/json"))  # type: ignore[arg-type]


def stow_body(files: list[bytes], boundary: str = "radflash-test-boundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def expected_scores(files: list[Path]) -> dict[str, dict[str, float]]:
    """source SOP Instance UID → finding → probability, from ``radflash score`` on the same files."""
    from radflash.archive.verb import score

    run = score([str(f) for f in files], workers=0, progress=False, device="cpu")
    table = run.results.to_pylist()
    names = [c[:-5] for c in run.results.column_names if c.endswith(".prob")]
    return {row["sop_instance_uid"]: {n: row[f"{n}.prob"] for n in names} for row in table}


def sr_uid_of(source_sop: str, source_study: str) -> str:
    import radflash
    from radflash.dicomout.uids import sr_uids

    global _SHA
    if _SHA is None:
        _SHA = radflash.load(device="cpu").sha256
    return sr_uids(source_sop, source_study, _SHA)[1]


_SHA: str | None = None


def uids(path: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
