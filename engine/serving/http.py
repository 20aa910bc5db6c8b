"""The node's HTTP face (stdlib ``ThreadingHTTPServer``; HTTPS with ``--tls-cert/--tls-key``).

* ``POST /dicom-web/studies[/{study}]`` — STOW-RS intake (``multipart/related; type="application/dicom"``):
  each part goes through :meth:`radflash.serving.node.Node.receive`, exactly as a C-STORE does; 200
  when every part is stored, 202 when some were refused (``FailedSOPSequence`` with the reason in
  Error Comment), 409 when none was, 503 + ``Retry-After`` when the node cannot keep them (queue
  full, disk low, draining), 413 for a body over ``max_body_bytes`` (refused before it is read).
* ``POST /v1/score`` — one DICOM, PNG or JPEG body → the findings' probabilities as JSON
  (synchronous; not journaled, nothing forwarded).
* ``GET /health`` (the process answers), ``GET /ready`` (model loaded, intake open, queue below its
  cap), ``GET /metrics`` (Prometheus text).

With a token (``--token-file``) every route but ``/health`` and ``/ready`` needs
``Authorization: Bearer <token>`` (401 otherwise). ``X-Priority: high|medium|low`` sets the
priority of what a request brings. Log lines name routes and statuses, never patient data.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from radflash.serving.intake import ACCEPT_POLL_S, OUT_OF_RESOURCES
from radflash.serving.options import PRIORITIES, IntakeOptions

if TYPE_CHECKING:
    from radflash.serving.node import Node

log = logging.getLogger("radflash.serving")
RETRY_AFTER_S = 5


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a ``multipart/related`` request's parts (RFC 2046), in order."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError("multipart/related without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        _, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without headers")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


def _item(sop_class: str | None, sop: str | None, reason: int | None = None, comment: str | None = None) -> dict:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [sop_class or ""]},
                            "00081155": {"vr": "UI", "Value": [sop or ""]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    if comment:
        item["00000902"] = {"vr": "LO", "Value": [comment[:64]]}
    return item


class HttpIntake:
    def __init__(self, node: Node, options: IntakeOptions) -> None:
        self.node = node
        self.options = options
        self.token = options.token()
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        intake = self

        class Handler(_Handler):
            pass

        Handler.intake = intake
        ctx = None
        if self.options.tls_cert is not None:
            from radflash.serving.tls import server_context

            assert self.options.tls_key is not None
            ctx = server_context(self.options.tls_cert, self.options.tls_key)
        server = _Server((self.options.bind, self.options.http_port), Handler)
        server.daemon_threads = True
        server.tls = ctx
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": ACCEPT_POLL_S},
                                        name="radflash-serve-http", daemon=True)
        self._thread.start()
        log.info("HTTP%s listening on %s:%d", "S" if self.options.tls_cert else "", self.options.bind, self.port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _Server(ThreadingHTTPServer):
    """The stdlib server, with the TLS handshake (when ``tls`` is set) in each connection's own
    thread, bounded in time (:mod:`radflash.serving.tls`), not in the accept loop."""

    tls: Any = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        from radflash.serving.tls import handshake

        conn = handshake(self.tls, request, client_address, "HTTPS")
        if conn is None:
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    intake: HttpIntake
    protocol_version = "HTTP/1.1"
    timeout = 300  # s a connection may sit silent mid-request or idle between requests before it is closed
    server_version = "radflash-serve"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s %s", self.address_string(), format % args)

    # ---- replies ------------------------------------------------------------------------------
    def _reply(self, code: int, body: bytes = b"", content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, payload: Any, content_type: str = "application/json", **headers: str) -> None:
        self._reply(code, json.dumps(payload).encode(), content_type, headers)

    def _error(self, code: int, message: str, **headers: str) -> None:
        self._json(code, {"error": message}, **headers)

    def _busy(self, why: str) -> None:
        self._error(503, why, **{"Retry-After": str(RETRY_AFTER_S)})

    def _authorised(self) -> bool:
        token = self.intake.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), token.encode())
        if not ok:
            self.intake.node.refused("http", self.client_address[0], "missing or wrong bearer token",
                                     counted_as="unauthorised")
            self.close_connection = True
            self._error(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer realm="radflash"'})
        return ok

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "Content-Length required")
            return None
        if int(length) > self.intake.options.max_body_bytes:
            self.close_connection = True  # the body is never read
            self.intake.node.refused("http", self.client_address[0], "request body too large",
                                     counted_as="too_large")
            self._error(413, f"request body of {int(length)} bytes is over the limit of "
                             f"{self.intake.options.max_body_bytes} bytes")
            return None
        return self.rfile.read(int(length))

    def _priority(self) -> int:
        return PRIORITIES.get(self.headers.get("X-Priority", "medium").strip().lower(), 1)

    # ---- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        node = self.intake.node
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/ready":
            ready, why = node.ready()
            self._json(200 if ready else 503, {"ready": ready, "reason": why})
        elif path == "/metrics":
            if self._authorised():
                body, ctype = node.metrics.render()
                self._reply(200, body, ctype)
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        parts = path.split("/")
        if not self._authorised():
            return
        if path == "/v1/score":
            self._score()
        elif len(parts) in (3, 4) and parts[1] == "dicom-web" and parts[2] == "studies":
            self._stow()
        else:
            self._error(404, "not found")

    def _stow(self) -> None:
        node = self.intake.node
        ctype = self.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/related"):
            self._error(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
            return
        busy = node.busy()
        if busy:  # answered before the body is read: nothing is accepted that cannot be kept
            self.close_connection = True
            node.refused("stow", self.client_address[0], busy, counted_as="busy")
            self._busy(busy)
            return
        body = self._body()
        if body is None:
            return
        try:
            parts = multipart_parts(body, ctype)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        stored, failed, busy_parts = [], [], 0
        for data in parts:
            receipt = node.receive(data, source="stow", caller=self.client_address[0], priority=self._priority())
            if receipt.code == 0:
                stored.append(_item(receipt.sop_class, receipt.sop))
            else:
                busy_parts += receipt.code == OUT_OF_RESOURCES
                failed.append(_item(receipt.sop_class, receipt.sop, receipt.code, receipt.reason))
        if failed and busy_parts == len(failed) and not stored:
            self._busy("queue full")
            return
        payload: dict[str, Any] = {}
        if stored:
            payload["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            payload["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else 202 if stored else 409
        self._json(code, payload, "application/dicom+json")

    def _score(self) -> None:
        node = self.intake.node
        busy = node.busy()
        if busy:
            self.close_connection = True
            self._busy(busy)
            return
        body = self._body()
        if body is None:
            return
        if not body:
            self._error(400, "empty body: send one DICOM, PNG or JPEG image")
            return
        code, payload = node.score_now(body, priority=self._priority())
        if code == 503:
            self._busy(payload.get("error", "busy"))
        else:
            self._json(code, payload)
