"""A real Orthanc PACS (with its DICOMweb plugin) on a free loopback port, for the DICOMweb tests.

Tests talk to the real server rather than a mock because what matters (QIDO paging, WADO-RS
multipart framing and transfer syntaxes, STOW-RS responses, HTTP auth) is exactly what a mock
would get subtly wrong. The Debian packages ``orthanc`` and ``orthanc-dicomweb`` provide it
(``.ci/run`` installs them); without them the tests skip, naming what is missing.

The DIMSE tests use the same server's DICOM port (loopback): ``aet`` is its called AE title,
``modalities`` its ``DicomModalities`` (where C-MOVE may send: the engine's own Storage SCP),
``check_called_aet`` makes it refuse a wrong called AE title, and ``allow_unknown=False`` makes it
refuse associations from calling AE titles it does not know (a PACS that has not registered us).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from tests.services import unavailable


def _archive_files() -> list[Path]:
    from radflash.archive.verb import DEMO_ARCHIVE

    return sorted(p for p in DEMO_ARCHIVE.rglob("*") if p.is_file())


PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "radflash", "s3cret-token-value"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.path.exists(p)), None)


def dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        for name in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if os.path.isdir(folder) else []:
            return str(name)
    return None


def skip_reason() -> str | None:
    """Why the Orthanc tests cannot run here, or None."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        return "dicomweb-client is not installed (pip install 'radflash[dicomweb]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process over a storage folder that survives :meth:`stop`/:meth:`start`."""

    def __init__(self, root: Path, *, auth: bool = False, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None, check_called_aet: bool = False,
                 allow_unknown: bool = True) -> None:
        self.root = root
        self.auth = auth
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "radflash-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "Plugins": [dicomweb_plugin()],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": auth,
            "RegisteredUsers": {USER: PASSWORD} if auth else {},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "HttpDescribeErrors": True,
            "StableAge": 1,
            "DicomAet": aet,
            "DicomCheckCalledAet": check_called_aet,
            "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
            # all false: only the AE titles in DicomModalities may associate (Orthanc's filter)
            **{f"DicomAlwaysAllow{verb}": allow_unknown for verb in ("Echo", "Store", "Find", "Get", "Move")},
            "DicomScpTimeout": 30,
        }
        self.config_path = root / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root as radflash spells it (``dicomweb+http://…/dicom-web``)."""
        return f"dicomweb+{self.url}/dicom-web"

    def dimse(self, query: str = "", *, aet: str | None = None) -> str:
        """The DICOM port as radflash spells it (``dimse://AET@127.0.0.1:PORT[?query]``)."""
        return f"dimse://{aet or self.aet}@127.0.0.1:{self.dicom_port}" + (f"?{query}" if query else "")

    def _headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        return {"Authorization": "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode()}

    def start(self, timeout: float = 60.0) -> Orthanc:
        with open(self.root / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([orthanc_binary(), str(self.config_path)], stdout=log, stderr=log,
                                         cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: "
                                   f"{(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.request("GET", "/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        raise RuntimeError("Orthanc did not answer /system in time")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server; its storage survives for :meth:`start`.

        SIGTERM by default: a clean stop (2-4 s: Orthanc's HTTP and DICOM servers poll for it) that
        closes open associations, so an in-process DIMSE client is left in no doubt. ``kill``: SIGKILL,
        at once, for tests whose clients are other processes or one-shot HTTP requests (the serve
        tests: a PACS that goes down, and each test's end). Nothing stored is lost either way: Orthanc
        answers a store only after its SQLite index committed it.
        """
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a clean stop that never came
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def request(self, method: str, path: str, data: bytes | None = None,
                content_type: str = "application/dicom") -> object:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
        if data is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def upload(self, files: list[Path]) -> list[Path]:
        """POST each file to /instances; returns those Orthanc accepted (it refuses non-DICOM)."""
        stored = []
        for path in files:
            try:
                self.request("POST", "/instances", path.read_bytes())
                stored.append(path)
            except urllib.error.HTTPError:
                pass
        return stored

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Register a DICOM peer (``DicomModalities`` over REST, no restart): where C-MOVE may send."""
        self.request("PUT", f"/modalities/{name}",
                     json.dumps({"AET": aet, "Host": host, "Port": port}).encode(), "application/json")

    def reset(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.request("GET", "/patients"):  # type: ignore[union-attr]
            self.request("DELETE", f"/patients/{patient}")


def start_or_skip(root: Path, *, auth: bool = False, **dicom: object) -> Orthanc:
    """A started Orthanc (``dicom``: the DICOM-port options of :class:`Orthanc`), or a skip naming
    what is missing."""
    reason = skip_reason()
    if reason is not None:
        unavailable(reason)
    return Orthanc(root, auth=auth, **dicom).start()  # type: ignore[arg-type]


ARCHIVE_FILES = _archive_files()  # the demo archive: chest films in several encodings, CT/MR/knee/lateral...
