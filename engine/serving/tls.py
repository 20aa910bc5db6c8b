"""TLS for the node's two ports (``--tls-cert/--tls-key``): HTTPS and DICOM TLS (PS3.15 B.1).

Both servers would, left alone, do the TLS handshake in their accepting thread (the stdlib's
wrapped listening socket; pynetdicom's ``get_request``), where the accepted socket has no timeout:
one client that opens a TCP connection and sends nothing (or speaks plain DICOM/HTTP slowly) would
hold the handshake, and so every later connection, for as long as it likes. Here the handshake runs
in the connection's own thread (``finish_request``), bounded by :data:`HANDSHAKE_TIMEOUT_S`; a
failed one (a plain-text client, a silent one, a bad certificate) closes that connection only and
is logged with the peer's address, never with what it sent.
"""

from __future__ import annotations

import logging
import socket
import ssl
from contextlib import suppress
from pathlib import Path

log = logging.getLogger("radflash.serving")
HANDSHAKE_TIMEOUT_S = 10.0


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the node's certificate (TLS 1.2+; clients are not asked for one)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def handshake(ctx: ssl.SSLContext, sock: socket.socket, peer: object, what: str) -> ssl.SSLSocket | None:
    """``sock`` (just accepted) wrapped and handshaken within :data:`HANDSHAKE_TIMEOUT_S`; None (and
    the connection closed) when the peer does not complete a TLS handshake."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        host = peer[0] if isinstance(peer, tuple) else peer
        log.info("%s: TLS handshake with %s failed (%s)", what, host, type(exc).__name__)
        with suppress(OSError):
            sock.close()
        return None
    tls.settimeout(None)  # as an accepted socket is: the servers set their own timeouts from here
    return tls
