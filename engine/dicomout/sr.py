"""Findings → a TID 1500 Measurement Report (IHE AIR), as a Comprehensive SR in the source's study.

The tree a viewer or reporting system expects from an AI node::

    Imaging Measurement Report (TID 1500)
      observer context: device = radflash <family> <model> (TID 1004, the Contributing Equipment's UID)
      procedure reported
      Image Library: the source image (TID 1601)
      Imaging Measurements
        per finding, a measurement group: TID 1501 (image-level), or TID 1410 when a SEG segment
        shows it (the group then references that segment):
          tracking identifier + UID, finding (coded: codes.json), finding site where coded
          algorithm identification (TID 4019: model, version, prompt, threshold)
          Probability (DCM 122157) = the model's probability, UCUM "{probability}" (= "1")  [TID 300]
          <finding> = Present | Absent (SNOMED CT) where a threshold decided   [qualitative evaluation]

Built with highdicom's TID 1500 classes (never a hand-made tree), except the image library for
projection images without Patient Orientation / Imager Pixel Spacing, which highdicom's descriptor
builder cannot describe (most CR/DX exports): there the entry lists modality, rows and columns.
Contributing Equipment (:mod:`radflash.dicomout.equipment`) is added to the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radflash.dicomout.codes import finding_code
from radflash.dicomout.equipment import Equipment
from radflash.dicomout.header import with_type2
from radflash.dicomout.text import ascii_text, lo
from radflash.dicomout.uids import SR_SERIES_NUMBER, instance_number_for, tracking_uid

PROBABILITY_UNIT = ("{probability}", "UCUM", "probability")  # UCUM "1" with an annotation: a ratio in [0, 1]
PROJECTION_MODALITIES = ("CR", "DX", "MG", "RG", "PX", "IO", "XA", "RF")


@dataclass(frozen=True)
class FindingResult:
    """One finding of one image: what the report states about it.

    ``positive`` is the present/absent decision where a threshold applies (a threshold in the
    findings file, a calibrated checkpoint, a segment mask threshold), else None: then the report
    gives the probability only. ``segment_number`` names the SEG segment that shows the finding.
    """

    name: str
    prompt: str
    probability: float
    positive: bool | None = None
    threshold: float | None = None
    segment_number: int | None = None


def build_report(source: Any, findings: Sequence[FindingResult], *, equipment: Equipment, series_uid: str,
                 sop_uid: str, series_number: int = SR_SERIES_NUMBER, instance_number: int | None = None,
                 segmentation: Any = None, aggregate: str | None = None,
                 series_description: str = "radflash findings") -> Any:
    """A Comprehensive SR holding a TID 1500 report of ``findings`` for the image ``source`` (its
    header: patient, study and UIDs; no pixels needed).

    ``segmentation``: the DICOM SEG written for the same image (a dataset); findings with a
    ``segment_number`` then become TID 1410 groups that reference its segment, and the SEG joins
    the report's evidence. ``aggregate`` names how the probability was derived from a map
    (``"max"``: the peak of segment's probability map), else it is the image-level score.
    ``instance_number`` None derives it from the source image (:func:`radflash.dicomout.uids.instance_number_for`):
    the reports of one study's images then differ in it, whichever run or batch wrote them.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not findings:
        raise ValueError("a measurement report needs at least one finding")
    unit = hd.sr.CodedConcept(*PROBABILITY_UNIT)
    source_ref = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
    groups = []
    for f in findings:
        coded = finding_code(f.name, f.prompt)
        concept = coded.code.concept()
        parameters = [f"model sha256 {equipment.model_sha256 or 'none'}", f"prompt {ascii_text(f.prompt)}"]
        if f.threshold is not None:
            parameters.append(f"threshold {f.threshold:g}")
        algorithm = equipment.algorithm(parameters)
        measurement = hd.sr.Measurement(
            name=codes.DCM.Probability, value=float(f.probability), unit=unit,
            derivation=codes.cid7464.Maximum if aggregate == "max" else None)
        evaluations = None
        if f.positive is not None:
            evaluations = [hd.sr.QualitativeEvaluation(concept, codes.SCT.Present if f.positive else codes.SCT.Absent)]
        common: dict[str, Any] = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(sop_uid, f.name), identifier=lo(f.name)),
            finding_type=concept, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(coded.site.concept())] if coded.site is not None else None,
            measurements=[measurement], qualitative_evaluations=evaluations)
        if segmentation is not None and f.segment_number is not None:
            segment = hd.sr.ReferencedSegmentationFrame.from_segmentation(segmentation, segment_number=f.segment_number)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(source_images=[source_ref], **common))

    header = with_type2(source)
    complete = _describable(header)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=equipment.observer_context()),
        procedure_reported=_procedure(header), imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport, referenced_images=[header] if complete else None)
    if not complete:
        _insert_image_library(report, header)
    evidence = [header] + ([segmentation] if segmentation is not None else [])
    number = instance_number_for(str(header.SOPInstanceUID)) if instance_number is None else instance_number
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=number, manufacturer=equipment.manufacturer,
        is_complete=True, series_description=lo(series_description))
    if segmentation is not None:
        single = {str(header.SOPInstanceUID)} if int(header.get("NumberOfFrames", 1) or 1) == 1 else set()
        _fix_frame_references(sr.ContentSequence, single)
    return equipment.stamp(sr)


def _fix_frame_references(content: Any, single_frame: set[str]) -> None:
    """Make highdicom's segment references valid image references (PS3.3 C.18.3.1, dciodvfy's errors):
    Referenced Segment Number "shall not be present" beside a Referenced Frame Number (our SEG has one
    frame per segment, so the frame names the segment), and a single-frame image (``single_frame``:
    SOP Instance UIDs; the source radiograph, which highdicom references by the SEG's frame number)
    takes no frame number at all."""
    for item in content:
        for ref in item.get("ReferencedSOPSequence", None) or []:
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber
            if "ReferencedFrameNumber" in ref and str(ref.ReferencedSOPInstanceUID) in single_frame:
                del ref.ReferencedFrameNumber
        if "ContentSequence" in item:
            _fix_frame_references(item.ContentSequence, single_frame)


def _procedure(header: Any) -> Any:
    """Procedure reported (CID 100): "XR unspecified body region" for projection radiographs, the
    generic "Imaging procedure" otherwise (the report never guesses the body part)."""
    from pydicom.sr.codedict import codes

    if str(header.get("Modality", "")) in PROJECTION_MODALITIES:
        return codes.cid100.XRUnspecifiedBodyRegion
    return codes.cid100.ImagingProcedure


def _describable(header: Any) -> bool:
    """Whether highdicom's image library entry can describe ``header``: it reads Patient Orientation
    and Imager Pixel Spacing of every projection image unconditionally (both optional in CR)."""
    if str(header.get("Modality", "")) not in PROJECTION_MODALITIES:
        return "Rows" in header and "Columns" in header
    orientation = header.get("PatientOrientation")
    spacing = header.get("ImagerPixelSpacing")
    return (orientation is not None and len(orientation) == 2 and all(orientation)
            and spacing is not None and len(spacing) == 2 and all(float(s) > 0 for s in spacing))


def _insert_image_library(report: Any, header: Any) -> None:
    """The image library (TID 1600) for a source highdicom cannot describe: one entry (TID 1601)
    with the descriptors the header does give (modality, rows, columns), placed where TID 1500
    puts it (before Imaging Measurements)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    pixels = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
    descriptors = [
        hd.sr.CodeContentItem(codes.DCM.Modality, _modality(str(header.get("Modality", ""))), acq),
        hd.sr.NumContentItem(codes.DCM.PixelDataRows, int(header.Rows), pixels, relationship_type=acq),
        hd.sr.NumContentItem(codes.DCM.PixelDataColumns, int(header.Columns), pixels, relationship_type=acq),
    ]
    image = hd.sr.ImageContentItem(hd.sr.CodedConcept("260753009", "SCT", "Source"), header.SOPClassUID,
                                   header.SOPInstanceUID, relationship_type=contains)
    image.ContentSequence = hd.sr.ContentSequence(descriptors)
    group = hd.sr.ContainerContentItem(codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    content = report[0].ContentSequence
    at = next(i for i, item in enumerate(content)
              if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "126010")
    content.insert(at, library)


def _modality(modality: str) -> Any:
    """The DICOM modality code (CID 29) for ``modality``; the modality itself in DCM when CID 29
    does not list it (DCM's modality codes are the Modality values)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == modality:
            return code
    return CodedConcept(modality or "OT", "DCM", modality or "Other")


# ---- reading a report back (tests, and any caller that needs the numbers) ---------------------
def read_findings(sr: Any) -> dict[str, dict[str, Any]]:
    """A radflash TID 1500 report's findings: tracking identifier (the finding's name) →
    {"code": (value, scheme, meaning), "probability": float, "present": bool | None}."""
    out: dict[str, dict[str, Any]] = {}
    root = sr.ContentSequence
    measurements = next(i for i in root if i.ValueType == "CONTAINER"
                        and i.ConceptNameCodeSequence[0].CodeValue == "126010")
    for group in measurements.ContentSequence:
        entry: dict[str, Any] = {"probability": None, "present": None, "code": None}
        name = None
        for item in group.ContentSequence:
            concept = item.ConceptNameCodeSequence[0]
            if item.ValueType == "TEXT" and concept.CodeValue == "112039":  # Tracking Identifier
                name = item.TextValue
            elif item.ValueType == "CODE" and concept.CodeValue == "121071":  # Finding
                c = item.ConceptCodeSequence[0]
                entry["code"] = (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
            elif item.ValueType == "NUM" and concept.CodeValue == "122157":  # Probability
                entry["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE" and entry["code"] is not None and concept.CodeValue == entry["code"][0]:
                entry["present"] = item.ConceptCodeSequence[0].CodeValue == "52101004"
        if name is not None:
            out[name] = entry
    return out
