"""``--store``: write each scored image's findings back to a PACS as a DICOM Structured Report.

:class:`StowSink` wraps the run's table sink. For every committed batch it first builds one
Comprehensive SR per scored image (:func:`build_sr`: algorithm name, version and model hash; the
source image by reference; per finding the prompt, logit, probability and, where a threshold
applies, present/absent) and stores them with STOW-RS, then commits the batch to the inner sink.
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
from radflash.io.dicomweb import STUDY, Auth, DicomWebError, Policy, call_with_retries, client

log = logging.getLogger("radflash.stow")

SCHEME = "99RADFLASH"  # private coding scheme (DICOM PS3.16: "99" prefix) for radflash's own concepts
SERIES_NUMBER = 9900


def sr_uids(source_sop: str, source_study: str, model_sha256: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the SR for one source image and model: the same inputs give the
    same UIDs on every run, so storing again replaces nothing and duplicates nothing."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["radflash-sr-series", source_study, model_sha256])
    sop = generate_uid(entropy_srcs=["radflash-sr", source_sop, model_sha256])
    return series, sop


def prompt_set_key(prompts: Sequence[tuple[str, str, float]]) -> str:
    """A digest of a segment run's prompts (name, text, threshold): what, with the model, decides a
    SEG's masks, so a SEG's UIDs change whenever its content could."""
    import hashlib
    import json

    text = json.dumps([[n, p, float(t)] for n, p, t in prompts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seg_uids(source_sop: str, source_study: str, model_sha256: str, prompts_key: str) -> tuple[str, str]:
    """(series UID, SOP UID) of the DICOM SEG for one source image, model and prompt set
    (:func:`prompt_set_key`): like :func:`sr_uids`, the same inputs give the same UIDs every run."""
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=["radflash-seg-series", source_study, model_sha256, prompts_key])
    sop = generate_uid(entropy_srcs=["radflash-seg", source_sop, model_sha256, prompts_key])
    return series, sop


def build_sr(source: Any, record: FileRecord, prompts: PromptSet, *, model_id: str, model_sha256: str,
             version: str) -> Any:
    """One Comprehensive SR for ``record`` (a scored image), in ``source`` 's patient and study."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def concept(value: str, meaning: str, scheme: str = SCHEME) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value, scheme, meaning)

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    unit = concept("1", "no units", "UCUM")
    items: list[Any] = [
        hd.sr.TextContentItem(concept("111001", "Algorithm Name", "DCM"), model_id, contains),
        hd.sr.TextContentItem(concept("111003", "Algorithm Version", "DCM"), f"radflash {version}", contains),
        hd.sr.TextContentItem(concept("111002", "Algorithm Parameters", "DCM"), f"model sha256 {model_sha256}",
                              contains),
        hd.sr.ImageContentItem(concept("121112", "Source of Measurement", "DCM"), source.SOPClassUID,
                               source.SOPInstanceUID, relationship_type=contains),
    ]
    present, absent = concept("52101004", "Present", "SCT"), concept("2667000", "Absent", "SCT")
    assert record.logits is not None and record.probs is not None
    for i, (name, prompt) in enumerate(zip(prompts.names, prompts.prompts)):
        finding = hd.sr.ContainerContentItem(concept("121071", "Finding", "DCM"), relationship_type=contains)
        children: list[Any] = [
            hd.sr.TextContentItem(concept("prompt", "Prompt"), f"{name}: {prompt}", contains),
            hd.sr.NumContentItem(concept("logit", "Logit"), float(record.logits[i]), unit, relationship_type=contains),
            hd.sr.NumContentItem(concept("probability", "Probability"), float(record.probs[i]), unit,
                                 relationship_type=contains),
        ]
        positive = record.positive[i] if record.positive is not None else None
        if positive is not None:
            children.append(hd.sr.CodeContentItem(concept("705057003", "Presence", "SCT"),
                                                  present if positive else absent, contains))
        finding.ContentSequence = hd.sr.ContentSequence(children)
        items.append(finding)
    root = hd.sr.ContainerContentItem(codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = hd.sr.ContentSequence(items)
    series, sop = sr_uids(source.SOPInstanceUID, source.StudyInstanceUID, model_sha256)
    source = _with_type2(source)
    return hd.sr.ComprehensiveSR(evidence=[source], content=root, series_instance_uid=series,
                                 series_number=SERIES_NUMBER, sop_instance_uid=sop, instance_number=1,
                                 manufacturer="radflash", is_complete=True, series_description="radflash findings")


# Type 2 patient/study attributes the SR copies from its source; an image may lack them (many
# exports drop empty elements), and highdicom reads them unconditionally.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(source: Any) -> Any:
    missing = [k for k in _TYPE2 if k not in source]
    if not missing:
        return source
    copy = source.copy()
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


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
                 policy: Policy | None = None) -> None:
        from radflash.util.optional import require

        require("highdicom", extra="dicomweb", purpose="--store (DICOM Structured Reports)")
        self.inner = inner
        self.stower = Stower(url, auth=auth, policy=policy)
        self.target, self.policy, self.client = self.stower.target, self.stower.policy, self.stower.client
        self.prompts, self.model_id, self.model_sha256, self.version = prompts, model_id, model_sha256, version
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
                                    model_sha256=self.model_sha256, version=self.version))
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

    if isinstance(source, DicomWebSource):
        def from_pacs(r: FileRecord) -> Any:
            return instance_header(source, r.path, r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid)
        return from_pacs

    def from_file(r: FileRecord) -> Any:
        return pydicom.dcmread(path_from_text(r.path), stop_before_pixels=True)
    return from_file
