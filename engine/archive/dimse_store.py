"""``--store dimse://AET@HOST:PORT``: results back to an archive that speaks only DIMSE, by C-STORE.

:class:`DimseStore` is the C-STORE counterpart of :class:`radflash.archive.stow.Stower`, with the
same two members the sinks use: :meth:`DimseStore.exists` (C-FIND on the result's SOP Instance
UID) and :meth:`DimseStore.store`. Result UIDs are deterministic (:func:`radflash.archive.stow.sr_uids`,
:func:`~radflash.archive.stow.seg_uids`), so asking first makes a re-run or a ``--resume`` store
nothing twice, exactly as over STOW-RS. :class:`DimseStoreSink` is ``score --store``'s sink: the
STOW sink's commit (SRs built by the same builder, stored before the batch is committed) on a
:class:`DimseStore`.

One association is kept for the run and reopened when the archive has closed it (idle timeouts);
out of resources (0xA7xx), a transient rejection and a lost association are retried with the
source's backoff; a refusal is a one-line :class:`radflash.io.dimse.DimseError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from radflash.archive.pipeline import PromptSet
from radflash.archive.sinks import FileRecord, Finalized, Format, Sink
from radflash.archive.stow import StowSink
from radflash.io.dimse import (
    FIND_MODEL,
    SUCCESS,
    Broken,
    Busy,
    Connector,
    DimseError,
    Link,
    Policy,
    Pool,
    find,
    is_busy,
    parse_target,
    query_identifier,
    status_text,
)

log = logging.getLogger("radflash.dimse")

# What radflash stores: its SRs (TID 1500 in a Comprehensive SR; the others in case a builder
# changes), SEGs and overlay Secondary Captures
RESULT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (segment --overlay sc)
)
# one context per syntax: a SEG written compressed (RLE, JPEG 2000) goes out as written
STORE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
                  "1.2.840.10008.1.2.4.90")
WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)  # stored, with a coercion or elements discarded (PS3.4 B.2.3)


def is_dimse_store(url: object) -> bool:
    """Whether a ``--store`` destination is a DIMSE archive (``dimse://``)."""
    from radflash.io.dimse import is_dimse

    return is_dimse(url)


class DimseStore:
    """C-STORE to one archive, sending only instances it does not hold yet (see the module)."""

    def __init__(self, url: str, *, policy: Policy | None = None) -> None:
        self.target = parse_target(url)
        self.policy = policy or Policy(associations=1)
        self.url = self.target.base
        self.pool = Pool(Connector(self.target, Policy(**{**self.policy.__dict__, "associations": 1})))
        self.stored = 0
        self.already = 0

    @staticmethod
    def _contexts() -> tuple[list[Any], list[Any]]:
        from pynetdicom import build_context

        return [build_context(FIND_MODEL)] + [build_context(c, [ts]) for c in RESULT_CLASSES
                                               for ts in STORE_SYNTAXES], []

    def exists(self, study: str, sop: str, series: str = "") -> bool:
        """Whether the archive holds ``sop`` (a C-FIND at image level in ``study``)."""
        what = f"{self.url}/studies/{study}"
        identifier = query_identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
        rows = self.pool.run(what, "store", self._contexts, lambda link: find(link.assoc, identifier, what))
        return any(str(r.get("SOPInstanceUID", "")) == sop for r in rows)

    def store(self, datasets: Sequence[Any]) -> None:
        """C-STORE ``datasets`` (already checked with :meth:`exists`), one after the other; a
        refusal raises :class:`DimseError` before later ones are sent, so the caller commits nothing."""
        for ds in datasets:
            what = f"{self.url} (C-STORE {ds.Modality} of study {ds.StudyInstanceUID})"
            self.pool.run(what, "store", self._contexts, lambda link, ds=ds, what=what: _store_one(link, ds, what))
            self.stored += 1

    def close(self) -> None:
        self.pool.close()


def _store_one(link: Link, ds: Any, what: str) -> None:
    try:
        status = link.assoc.send_c_store(ds)
    except ValueError as exc:  # no accepted context for its class and syntax
        raise DimseError(f"{what}: the archive accepts no presentation context for it ({exc})") from None
    if "Status" not in status:
        raise Broken(f"{what}: association aborted or timed out during C-STORE")
    code = int(status.Status)
    if is_busy(code):
        raise Busy(f"{what}: {status_text(status)} (out of resources)")
    if code != SUCCESS and code not in WARNINGS:
        raise DimseError(f"{what}: refused ({status_text(status)})")


class DimseStoreSink(StowSink):
    """``score --store dimse://…``: the STOW sink's commit (one SR per scored record, stored before
    the batch is committed inward) with C-STORE as the transport."""

    def __init__(self, inner: Sink, url: str, *, prompts: PromptSet, model_id: str, model_sha256: str,
                 version: str, header_of: Callable[[FileRecord], Any], policy: Policy | None = None,
                 family: str = "") -> None:
        from radflash.util.optional import require

        require("highdicom", extra="dimse", purpose="--store (DICOM Structured Reports)")
        self.inner = inner
        self.stower = DimseStore(url, policy=policy)  # type: ignore[assignment]  # same exists/store members
        self.target, self.policy, self.client = self.stower.target, self.stower.policy, None
        self.prompts, self.model_id, self.model_sha256, self.version = prompts, model_id, model_sha256, version
        self.family = family
        self.header_of = header_of

    def finalize(self, fmt: Format) -> Finalized:
        self.stower.close()  # type: ignore[attr-defined]
        log.info("stored %d structured reports by C-STORE (%d already in the archive)", self.stored, self.already)
        return self.inner.finalize(fmt)
