"""``radflash serve`` and ``radflash.serve(...)``: a long-running node that receives studies
(C-STORE, STOW-RS), scores them in dynamic batches and sends the results back (SR, and with
``segment`` a SEG and optionally an overlay Secondary Capture, by STOW-RS or C-STORE). See
:mod:`radflash.serving.node`. The package is ``serving`` so that ``radflash.serve`` can be the function.

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
    from radflash.serving.node import Node
    from radflash.serving.options import ServeOptions

log = logging.getLogger("radflash.serving")


def serve(options: ServeOptions | None = None, /, *, block: bool = True, stop: threading.Event | None = None,
          **flags: Any) -> Node:
    """Run a serving node: ``radflash.serve(ServeOptions(...))`` or, spelled as the CLI's flags,
    ``radflash.serve(state="/var/lib/radflash", forward=["dicomweb+http://pacs/dicom-web"],
    max_batch=8, segment=["There is pneumothorax"], overlay="sc")`` (the keywords of
    :meth:`radflash.serving.options.ServeOptions.from_flat`; one spelling or the other, not both).

    With ``block`` (the default) it serves until SIGTERM/SIGINT (or ``stop`` is set), then drains
    within ``options.grace`` and stops, as ``radflash serve`` does. ``block=False`` returns the
    started node at once; the caller then owns ``node.drain()`` and ``node.stop()``. Returns the node.
    """
    from radflash.errors import InputError
    from radflash.serving.node import Node
    from radflash.serving.options import ServeOptions

    if options is None:
        if "state" not in flags:
            raise InputError("serve: give ServeOptions or at least state=FOLDER")
        options = ServeOptions.from_flat(**flags)
    elif flags:
        raise InputError(f"serve: ServeOptions given, so keyword options {sorted(flags)} would be ignored")
    elif not isinstance(options, ServeOptions):
        raise InputError(f"serve: expected ServeOptions, got {type(options).__name__}")
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
