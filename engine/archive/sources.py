"""Sources and stores by address: the one place where a URL scheme picks its implementation.

``open_source`` turns a run's inputs into a :class:`radflash.io.source.Source` (files and folders,
one ``dicomweb+http(s)://`` or ``dimse://`` query, or a ready source); ``open_store`` wraps the
run's table sink in the store that sends results back (STOW-RS or C-STORE). A new kind of archive
is one new module plus one branch here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radflash.errors import InputError
from radflash.io.source import FileSource, Source

if TYPE_CHECKING:
    from collections.abc import Sequence

    from radflash.archive.pipeline import PromptSet

log = logging.getLogger("radflash.score")

DEMO_ARCHIVE = Path(__file__).resolve().parents[1] / "assets" / "demo_archive"


def open_source(inputs: str | Path | Sequence[str | Path] | Source | None, *, num_parts: int,
               part_id: int, auth: Any = None) -> tuple[Source, bool]:
    """``inputs`` as a :class:`Source`, and whether it is the embedded demo archive.

    Sharding is by file path, so only a file source can be sharded here; any other source is
    already one shard (its owner splits the work), and asking to shard it again is an error.
    """
    if isinstance(inputs, Source):
        if num_parts > 1:
            raise InputError("num_parts/part_id shard files; shard a custom source when building it")
        return inputs, False
    from radflash.io.dicomweb import DicomWebSource, is_dicomweb
    from radflash.io.dimse import DimseSource, is_dimse

    def is_url(i: object) -> bool:
        return is_dicomweb(i) or is_dimse(i)

    urls = [inputs] if is_url(inputs) else [] if inputs is None or isinstance(inputs, (str, Path)) else \
        [i for i in inputs if is_url(i)]
    if urls:  # Path() would fold the URL's '//': URLs are kept as strings from the CLI on
        if len(urls) > 1 or (not isinstance(inputs, str) and len(inputs) > 1):  # type: ignore[arg-type]
            raise InputError("a PACS query is scored on its own: give one dicomweb+http(s):// or dimse:// URL")
        if is_dimse(urls[0]):
            return DimseSource(str(urls[0]), num_parts=num_parts, part_id=part_id), False
        return DicomWebSource(str(urls[0]), auth=auth, num_parts=num_parts, part_id=part_id), False
    demo = inputs is None
    if inputs is None:
        log.info("no inputs given: scoring the embedded demo archive %s", DEMO_ARCHIVE)
        inputs = [DEMO_ARCHIVE]
    elif isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no inputs given")
    return FileSource(paths, num_parts=num_parts, part_id=part_id), demo


def open_store(stow: str, inner: Any, source: Source, prompts: PromptSet, model: Any, auth: Any) -> Any:
    """Wrap ``inner`` so every committed batch is first stored as SRs: by STOW-RS
    (:mod:`radflash.archive.stow`) or C-STORE (:mod:`radflash.archive.dimse_store`); ``"same"``
    writes back to the PACS the source reads."""
    from radflash import __version__
    from radflash.archive.stow import StowSink, header_reader
    from radflash.io.dicomweb import DicomWebSource
    from radflash.io.dimse import DimseSource, is_dimse

    if stow == "same":
        if not isinstance(source, (DicomWebSource, DimseSource)):
            raise InputError("--store without a URL writes back to the PACS scored from; "
                             "give --store dicomweb+http(s)://… or dimse://… for file inputs")
        stow = source.target.display if isinstance(source, DimseSource) else "dicomweb+" + source.target.base
    if is_dimse(stow):  # C-STORE (radflash.archive.dimse_store), as the source's calling AE title
        from radflash.archive.dimse_store import DimseStoreSink

        return DimseStoreSink(inner, stow, prompts=prompts, model_id=model.model_id, model_sha256=model.sha256,
                              version=__version__, header_of=header_reader(source), family=getattr(model, "family", ""))
    return StowSink(inner, stow, prompts=prompts, model_id=model.model_id, model_sha256=model.sha256,
                    version=__version__, header_of=header_reader(source), auth=auth,
                    family=getattr(model, "family", ""))
