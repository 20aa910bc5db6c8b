"""``--store``: write each scored image's findings back to a PACS as a DICOM Structured Report.

:class:`StowSink` wraps the run's table sink. For every committed batch it first builds one
SR per scored image (:func:`build_sr`: a TID 1500 report as IHE AIR asks, built by
:mod:`radflash.dicomout`: the model as observer device and Contributing Equipment; the source image
by reference; per finding its code, probability and, where a threshold applies, present/absent) and
stores them with STOW-RS, then commits the batch to the inner sink.
That order is what makes re-runs safe: an SR's SOPInstanceUID is derived from the source
SOPInstanceUID and the model hash (:func:`sr_uids`), so a batch whose STOW went through but whose
part was never committed (a crash, a server gone mid-run) stores the *same* objects again on
``--resume``, and instances the server already holds are not sent at all.

``segment --store`` uses the same pieces for its DICOM SEGs: :class:`Stower` (ask the server,
then STOW-RS only what it lacks), :func:`seg_uids` (UIDs from the source SOPInstanceUID, the model
hash and :func:`prompt_set_key`) and :func:`instance_header` (a DICOMweb source image's header).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from radflash.archive.pipeline import PromptSet
from radflash.archive.sinks import FileRecord, Finalized, Format, Sink

# The DICOM objects are built by the writer package (#27); their UIDs and Type 2 rules are
# re-exported here because score, segment and the DIMSE store import them from this module.
from radflash.dicomout.codes import PRIVATE_SCHEME as SCHEME  # noqa: F401
from radflash.dicomout.header import with_type2
from radflash.dicomout.uids import SR_SERIES_NUMBER, prompt_set_key, seg_uids, sr_uids  # noqa: F401
from radflash.io.dicomweb import STUDY, Auth, DicomWebError, Policy, call_with_retries, client

log = logging.getLogger("radflash.stow")

SERIES_NUMBER = SR_SERIES_NUMBER  # kept for callers of radflash.archive.stow; the writers own it


def build_sr(source: Any, record: FileRecord, prompts: PromptSet, *, model_id: str, model_sha256: str,
             version: str, family: str = "") -> Any:
    """One TID 1500 report (:func:`radflash.dicomout.sr.build_report`) for ``record`` (a scored
    image), in ``source`` 's patient and study: per finding its coded concept, the probability and,
    where a threshold decided, present/absent; Contributing Equipment names the model.

    A thin adapter from the score pipeline's record to the writer package, which every verb shares
    (``family`` names the model family in the model name, e.g. ``"radzero"``).
    """
    from radflash.dicomout.equipment import Equipment
    from radflash.dicomout.sr import FindingResult, build_report

    assert record.logits is not None and record.probs is not None
    findings = [FindingResult(name, prompt, float(record.probs[i]),
                              positive=record.positive[i] if record.positive is not None else None,
                              threshold=prompts.thresholds[i] if i < len(prompts.thresholds) else None)
                for i, (name, prompt) in enumerate(zip(prompts.names, prompts.prompts))]
    series, sop = sr_uids(source.SOPInstanceUID, source.StudyInstanceUID, model_sha256)
    equipment = Equipment(model_id, model_sha256, family, version)
    return build_report(source, findings, equipment=equipment, series_uid=series, sop_uid=sop)


_with_type2 = with_type2  # the old private name (the DIMSE store in progress may still import it)


class Stower:
    """STOW-RS to one DICOMweb server, sending only instances it does not hold yet.

    Shared by ``score --store`` (SRs, :class:`StowSink`) and ``segment --store`` (SEGs): an
    instance's UIDs are deterministic, so asking the server first (QIDO-RS on the SOPInstanceUID)
    is what makes a re-run store nothing twice.
    """

    def __init__(self, url: str, *, auth: Auth | None = None, policy: Policy | None = None) -> None:
        from radflash.io.dicomweb import parse_target

        self.target = parse_target(url)
        self.policy = policy or Policy()
        self.client = client(self.target.base, auth=auth, policy=self.policy)
        self.stored = 0
        self.already = 0

    def exists(self, study: str, sop: str) -> bool:
        rows = call_with_retries(f"{self.target.base}/studies/{study}/instances",
                                 lambda: self.client.search_for_instances(
                                     study_instance_uid=study, search_filters={"SOPInstanceUID": sop}), self.policy)
        return any(r.get(STUDY) for r in rows)

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS ``datasets`` (already checked with :meth:`exists`) in one request."""
        if not datasets:
            return
        what = f"{self.target.base}/studies (STOW-RS)"
        reply = call_with_retries(what, lambda: self.client.store_instances(datasets), self.policy)
        # A 202 Accepted stores only part of a request and lists the rest in FailedSOPSequence:
        # that is a failure here too, or the caller would commit rows whose objects never arrived.
        failed = [str(getattr(item, "ReferencedSOPInstanceUID", "?"))
                  for item in getattr(reply, "FailedSOPSequence", None) or ()]
        if failed:
            raise DicomWebError(f"{what}: the server refused {len(failed)} of {len(datasets)} object(s)")
        self.stored += len(datasets)


class StowSink:
    """A :class:`radflash.archive.sinks.Sink` that STOWs an SR per scored record, then commits inward.

    ``header_of(record)`` gives the source image's header (patient/study attributes and UIDs, no
    pixels): the SR must join that patient's study and reference the image.
    """

    def __init__(self, inner: Sink, url: str, *, prompts: PromptSet, model_id: str, model_sha256: str,
                 version: str, header_of: Callable[[FileRecord], Any], auth: Auth | None = None,
                 policy: Policy | None = None, family: str = "") -> None:
        from radflash.util.optional import require

        require("highdicom", extra="dicomweb", purpose="--store (DICOM Structured Reports)")
        self.inner = inner
        self.stower = Stower(url, auth=auth, policy=policy)
        self.target, self.policy, self.client = self.stower.target, self.stower.policy, self.stower.client
        self.prompts, self.model_id, self.model_sha256, self.version = prompts, model_id, model_sha256, version
        self.family = family  # the model family, named with the model in the SR's equipment (#27)
        self.header_of = header_of

    @property
    def stored(self) -> int:
        return self.stower.stored

    @property
    def already(self) -> int:
        return self.stower.already

    def commit(self, records: Sequence[FileRecord]) -> object:
        reports = []
        for r in records:
            if r.status != "scored" or not r.sop_instance_uid or not r.study_instance_uid:
                continue
            _, sop = sr_uids(r.sop_instance_uid, r.study_instance_uid, self.model_sha256)
            if self.stower.exists(r.study_instance_uid, sop):
                self.stower.already += 1
                continue
            reports.append(build_sr(self.header_of(r), r, self.prompts, model_id=self.model_id,
                                    model_sha256=self.model_sha256, version=self.version, family=self.family))
        self.stower.store(reports)
        return self.inner.commit(records)

    def finalize(self, fmt: Format) -> Finalized:
        log.info("stored %d structured reports (%d already on the server)", self.stored, self.already)
        return self.inner.finalize(fmt)


def instance_header(source: Any, what: str, study: str, series: str, sop: str) -> Any:
    """One instance's header (no pixels) from a :class:`radflash.io.dicomweb.DicomWebSource`'s
    server, with WADO-RS metadata; ``what`` names it in errors (a URL without credentials)."""
    import pydicom

    meta = call_with_retries(what, lambda: source.client.retrieve_instance_metadata(study, series, sop), source.policy)
    # bulk data (pixels) is only linked in metadata, and neither an SR nor a SEG needs it
    return pydicom.Dataset.from_json({k: v for k, v in meta.items() if "BulkDataURI" not in v})


def header_reader(source: Any) -> Callable[[FileRecord], Any]:
    """How to get a scored record's source header: WADO-RS metadata for a DICOMweb source, the file
    (without pixels) otherwise."""
    import pydicom

    from radflash.io.dicomweb import DicomWebSource
    from radflash.io.source import path_from_text

    own = getattr(source, "header_of", None)  # a source that keeps its instances' headers (DIMSE)
    if callable(own):
        return own
    if isinstance(source, DicomWebSource):
        def from_pacs(r: FileRecord) -> Any:
            return instance_header(source, r.path, r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid)
        return from_pacs

    def from_file(r: FileRecord) -> Any:
        return pydicom.dcmread(path_from_text(r.path), stop_before_pixels=True)
    return from_file
