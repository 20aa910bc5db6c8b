"""``radflash serve``: a long-running node that receives studies (C-STORE, STOW-RS), scores them in
dynamic batches and sends the results back (SR by STOW-RS or C-STORE). See :mod:`radflash.serve.node`.

Modules: :mod:`.options` (typed option groups), :mod:`.journal` (SQLite WAL + fsync'd spool),
:mod:`.intake` (header checks), :mod:`.intake_dimse` (C-STORE SCP), :mod:`.http` (STOW-RS,
``/v1/score``, health, metrics), :mod:`.scheduler` (groups, priorities), :mod:`.forward` (targets,
retries, dead letters), :mod:`.metrics` (Prometheus), :mod:`.node` (assembly, start/drain/stop).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radflash.serve.node import Node
    from radflash.serve.options import ServeOptions

log = logging.getLogger("radflash.serve")


def serve(options: ServeOptions, *, block: bool = True, stop: threading.Event | None = None) -> Node:
    """Start a node; with ``block`` serve until SIGTERM/SIGINT (or ``stop`` is set), then drain within
    ``options.grace`` and stop. Returns the node (started and serving when ``block`` is False)."""
    from radflash.serve.node import Node

    node = Node(options).start()
    if not block:
        return node
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
        log.warning("stopping: intake closed, draining for at most %g s", options.grace)
        node.drain()
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return node
