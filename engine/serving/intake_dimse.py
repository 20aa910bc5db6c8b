"""The C-STORE SCP (and Verification): instances pushed by a PACS or a modality → the node's intake.

The handler only admits, persists and enqueues (:meth:`radflash.serving.node.Node.receive`); it never
waits for the model. Who may associate: with no ``--allow-ae``, any AE title from a loopback
address; with entries, only those AE titles (an unknown one gets an A-ASSOCIATE-RJ "calling AE
title not recognised"), and an ``AET@HOST`` entry only from that host (TCP connections from hosts
no entry names are closed before the association; a known AE title from the wrong host is refused
per request with 0x0124). At most ``max_associations`` at a time (more are rejected, transient).
Once the node drains, the server is shut down: new associations are refused.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from radflash.serving.intake import ACCEPT_POLL_S, NOT_AUTHORISED, OUT_OF_RESOURCES
from radflash.serving.options import DIMSE_PRIORITY, IntakeOptions, is_loopback

if TYPE_CHECKING:
    from radflash.serving.node import Node

log = logging.getLogger("radflash.serving")
VERIFICATION = "1.2.840.10008.1.1"


class DimseIntake:
    def __init__(self, node: Node, options: IntakeOptions) -> None:
        self.node = node
        self.options = options
        self.server: Any = None

    def host_admitted(self, host: str) -> bool:
        entries = self.options.allow_ae
        if not entries:
            return is_loopback(host)
        return any(e.host is None or e.host == host for e in entries)

    def caller_admitted(self, aet: str, host: str) -> bool:
        entries = self.options.allow_ae
        if not entries:
            return is_loopback(host)
        return any(e.admits(aet, host) for e in entries)

    def start(self) -> None:
        from pynetdicom import AE, build_context, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        from radflash.io.dimse import CANDIDATE_SYNTAXES, quiet_pynetdicom

        quiet_pynetdicom()
        o = self.options
        ae = AE(ae_title=o.ae_title)
        # every syntax the decoders may read: accepted as sent; one the installed decoders cannot read
        # is recorded as failed with the loader's install line, as in score
        ae.supported_contexts = [build_context(cx.abstract_syntax, list(CANDIDATE_SYNTAXES))
                                 for cx in AllStoragePresentationContexts] + [build_context(VERIFICATION)]
        ae.maximum_associations = o.max_associations
        ae.require_called_aet = True
        if o.allow_ae:
            ae.require_calling_aet = sorted({e.aet for e in o.allow_ae})
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.maximum_pdu_size = 0
        ssl_context = None
        if o.tls_cert is not None:
            from radflash.serving.tls import server_context

            assert o.tls_key is not None
            ssl_context = server_context(o.tls_cert, o.tls_key)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        # not start_server(ssl_context=...): pynetdicom would handshake in its accept loop, where one
        # silent client holds every later association (radflash.serving.tls); here each connection's
        # own thread does it, bounded in time
        # make_server, not start_server: our own accept thread, which notices a stop within
        # ACCEPT_POLL_S (start_server's thread polls every 0.5 s, and every SIGTERM waited that long)
        from pynetdicom.transport import ThreadedAssociationServer

        self.server = ae.make_server((o.bind, o.dicom_port), evt_handlers=handlers,
                                     server_class=ThreadedAssociationServer)
        ae._servers.append(self.server)  # as start_server does: the server's shutdown() removes itself there
        # socketserver's hook: a host no entry admits is closed before any DICOM is read
        self.server.verify_request = lambda request, address: self.host_admitted(address[0])
        if ssl_context is not None:
            self.server.finish_request = self._tls_finish(self.server.finish_request, ssl_context)
        # accepting starts only now, with the hooks in place (start_server accepted before they were set)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": ACCEPT_POLL_S},
                         name="radflash-serve-dimse", daemon=True).start()
        log.info("C-STORE SCP %s listening on %s:%d%s", o.ae_title, o.bind, o.dicom_port,
                 " (TLS)" if ssl_context else "")

    @staticmethod
    def _tls_finish(finish: Any, ctx: Any) -> Any:
        """``finish_request`` that first completes the TLS handshake (or drops the connection)."""
        from radflash.serving.tls import handshake

        def finish_request(request: Any, client_address: Any) -> None:
            conn = handshake(ctx, request, client_address, "DICOM TLS")
            if conn is not None:
                finish(conn, client_address)  # the association runs on in its own thread

        return finish_request

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _caller(self, event: Any) -> tuple[str, str]:
        req = event.assoc.requestor
        return str(req.ae_title).strip(), str(req.address)

    def _on_echo(self, event: Any) -> int:
        aet, host = self._caller(event)
        return 0x0000 if self.caller_admitted(aet, host) else NOT_AUTHORISED

    def _on_store(self, event: Any) -> Any:
        from pydicom import Dataset

        aet, host = self._caller(event)
        caller = f"{aet}@{host}"

        def status(code: int, comment: str | None = None) -> Any:
            ds = Dataset()
            ds.Status = code
            if comment:
                ds.ErrorComment = comment[:64]  # LO
            return ds

        if not self.caller_admitted(aet, host):
            self.node.refused("dimse", caller, "caller not on the allow-list", counted_as="unauthorised")
            return status(NOT_AUTHORISED, "caller not allowed")
        priority = DIMSE_PRIORITY.get(int(getattr(event.request, "Priority", 0) or 0), 1)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a data set pynetdicom cannot encode: refuse it, keep serving
            self.node.refused("dimse", caller, f"cannot read data set ({type(exc).__name__})")
            return status(0xC000, "cannot read data set")
        receipt = self.node.receive(data, source="dimse", caller=caller, priority=priority)
        if receipt.code == OUT_OF_RESOURCES:
            return status(OUT_OF_RESOURCES, receipt.reason)
        if receipt.code:
            return status(receipt.code, receipt.reason)
        return 0x0000

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
