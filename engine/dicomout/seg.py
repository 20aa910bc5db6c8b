"""Masks → a binary DICOM Segmentation (one segment per prompt) in the source's study.

Each segment's property type is the finding's code from ``codes.json`` when the prompt's name is a
preset finding (so a viewer lists "Pneumothorax (SNOMED CT)", not our text), else radflash's private
code carrying the name; the algorithm identification keeps the prompt and threshold, so the SEG is
interpretable without our JSON. Contributing Equipment names the model (:mod:`.equipment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radflash.dicomout import ObjectError
from radflash.dicomout.codes import finding_code
from radflash.dicomout.equipment import Equipment
from radflash.dicomout.header import fill_type2
from radflash.dicomout.text import ascii_text, lo
from radflash.dicomout.uids import SEG_SERIES_NUMBER, instance_number_for


@dataclass(frozen=True)
class SegmentInfo:
    """What one segment is: a short label, the full prompt and the threshold that made the mask."""

    label: str
    prompt: str
    threshold: float


@dataclass(frozen=True)
class SegSeries:
    """Series the SEG instance belongs to (one per source study, model and prompt set) and its number
    in it (None: derived from the source image, :func:`radflash.dicomout.uids.instance_number_for`)."""

    series_instance_uid: str
    series_number: int = SEG_SERIES_NUMBER
    instance_number: int | None = None
    sop_instance_uid: str | None = None  # None: a fresh UID (segment derives it: radflash.dicomout.uids.seg_uids)


def build_seg(header: Any, masks: np.ndarray, segments: Sequence[SegmentInfo], *, equipment: Equipment,
              series: SegSeries | None = None, where: str = "") -> Any:
    """The Segmentation for ``masks`` (T, H, W) over the source image ``header`` (a pydicom dataset
    without pixels; filled in place with the Type 2 attributes it lacks). ``where`` names the
    source in errors (:class:`radflash.dicomout.ObjectError`)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from radflash.io.imageio import meta_from_dataset

    where = where or str(header.get("SOPInstanceUID", "source"))
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != len(segments):
        raise ObjectError(f"{where}: expected {len(segments)} masks, got array of shape {masks.shape}")
    if "Rows" not in header or "Columns" not in header or "SOPInstanceUID" not in header:
        raise ObjectError(f"{where}: not a DICOM image header (no Rows/Columns/SOP Instance UID)")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ObjectError(f"{where}: DICOM SEG is written for single-frame sources only ({frames} frames)")
    if (int(header.Rows), int(header.Columns)) != masks.shape[1:]:
        raise ObjectError(f"{where}: source is {header.Rows}×{header.Columns}, masks are "
                          f"{masks.shape[1]}×{masks.shape[2]}")

    fill_type2(header)
    descriptions = []
    for i, seg in enumerate(segments, start=1):
        algorithm = hd.AlgorithmIdentificationSequence(
            name="radflash",
            family=codes.cid7162.ArtificialIntelligence,
            version=lo(equipment.model_id),
            source=lo(f"radflash {equipment.version}"),
            parameters={"prompt": ascii_text(seg.prompt)[:10000], "threshold": f"{seg.threshold:g}",
                        **({"model_sha256": equipment.model_sha256} if equipment.model_sha256 else {})},
        )
        # Open vocabulary: a preset finding's name has a standard code; any other prompt (a finding
        # or an anatomical structure in free text) gets a private code carrying its name.
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=lo(seg.label),
            segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
            segmented_property_type=finding_code(seg.label, seg.prompt).code.concept(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
    series = series or SegSeries(hd.UID())
    number = series.instance_number
    if number is None:
        number = instance_number_for(str(header.SOPInstanceUID))
    extra = {}
    if "FrameOfReferenceUID" not in header:
        # Projection radiographs (CR/DX) have no frame of reference; highdicom then writes a
        # Pixel Measures item without SliceThickness, which its own reader rejects. Give it one
        # (nominal 1 mm: a projection image has no slice) with the source's pixel spacing.
        spacing = meta_from_dataset(header).pixel_spacing or (1.0, 1.0)
        extra["pixel_measures"] = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=1.0)
    try:
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=(masks > 0).transpose(1, 2, 0)[None],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series.series_instance_uid,
            series_number=series.series_number,
            sop_instance_uid=series.sop_instance_uid or hd.UID(),
            instance_number=number,
            manufacturer=equipment.manufacturer,
            manufacturer_model_name=equipment.model_name,
            software_versions=equipment.version,
            device_serial_number=equipment.serial_number,
            content_description=lo("radflash open-vocabulary segmentation"),
            content_label="RADFLASH",
            series_description=lo(f"radflash segment ({equipment.model_id})"),
            omit_empty_frames=False,  # one frame per prompt even when empty: readers see every segment
            **extra,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ObjectError(f"{where}: cannot build DICOM SEG ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # General Image's Patient Orientation is Type 2C (required without a frame of reference):
        # the source's, or empty (unknown) when the source has none either.
        seg.PatientOrientation = header.get("PatientOrientation", "") or ""
    return equipment.stamp(seg)
