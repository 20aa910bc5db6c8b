"""``radflash serve --tls-cert/--tls-key``: STOW-RS over HTTPS and C-STORE over DICOM TLS are
accepted (clients verify the node against its certificate); plain HTTP and a plain association to
the same ports fail; and a client that connects and never handshakes holds up nobody else."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.engine.serving.conftest import CHEST, NODE_AET, stow_body
from tests.services import unavailable


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 and its key, made by the ``openssl`` CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("the openssl CLI is not installed (apt-get install openssl)")
    cert, key = folder / "node-cert.pem", folder / "node-key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=radflash-test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def _ae(sop_class: str, syntax: str):
    from pynetdicom import AE

    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.connection_timeout = 10
    return ae


def test_https_stow_and_dicom_tls_are_accepted_and_plain_connections_fail(tmp_path: Path, nodes) -> None:
    import pydicom
    import requests

    cert, key = self_signed(tmp_path)
    node = nodes("node", "--tls-cert", str(cert), "--tls-key", str(key), tls_ca=cert).start()
    # one silent TCP client on each port, open throughout: before the handshake moved into each
    # connection's thread it blocked the accept loops, and every request below timed out
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in (node.http_port, node.dicom_port)]
    try:
        # (a) HTTPS: STOW-RS verified against the node's certificate is stored
        body, ctype = stow_body([CHEST[0].read_bytes()])
        reply = requests.post(f"https://127.0.0.1:{node.http_port}/dicom-web/studies", data=body,
                              headers={"Content-Type": ctype}, verify=str(cert), timeout=30)
        assert reply.status_code == 200 and len(reply.json()["00081199"]["Value"]) == 1
        # ... plain HTTP to the TLS port gets no answer, and a client that trusts only the system's
        # CAs refuses the self-signed certificate
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{node.http_port}/health", timeout=15)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{node.http_port}/health", timeout=15)

        # (b) DICOM TLS: a C-STORE over TLS is stored; a plain association to that port is not made
        ds = pydicom.dcmread(CHEST[1])
        ae = _ae(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        tls = ssl.create_default_context(cafile=str(cert))
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title=NODE_AET, tls_args=(tls, "127.0.0.1"))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        finally:
            assoc.release()
        plain = ae.associate("127.0.0.1", node.dicom_port, ae_title=NODE_AET)
        assert not plain.is_established
        node.wait_for(lambda: node.counts()["forwarded"] == 2, 60, "both instances scored")  # no targets
        assert node.metric("radflash_serve_requests_total", status="stored") == 2
        for s in silent:  # closed before the stop, which would otherwise wait out their handshake time
            s.close()
        assert node.terminate() == 0
    finally:
        for s in silent:
            s.close()
