"""A rendered overlay (RGB pixels) → a DICOM Secondary Capture in the source's study, a new series.

Many PACS viewers show neither SEG nor SR overlays; every viewer shows an image. The Secondary
Capture carries the source image with the masks burnt in as colour and a legend, marked as derived
(Image Type DERIVED\\SECONDARY), with burnt-in annotation, a Source Image Sequence pointing at the
analysed image, and "NOT FOR DIAGNOSIS" in its series description, derivation and comments: it is
a picture of the result, not a diagnostic image. Rendering stays with the caller (``segment``'s
:func:`radflash.segment.writers.render_preview`, or a server's), so any verb can reuse this.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from radflash.dicomout import ObjectError
from radflash.dicomout.equipment import Equipment
from radflash.dicomout.header import with_type2
from radflash.dicomout.text import lo
from radflash.dicomout.uids import SC_SERIES_NUMBER, instance_number_for

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"


def build_overlay_sc(header: Any, rgb: np.ndarray, *, equipment: Equipment, series_uid: str, sop_uid: str,
                     instance_number: int | None = None, series_number: int = SC_SERIES_NUMBER,
                     description: str = "radflash overlay") -> Any:
    """The Secondary Capture of ``rgb`` (H×W×3 uint8, the source's size) for the image ``header``;
    ``instance_number`` None derives it from that image (:func:`radflash.dicomout.uids.instance_number_for`)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ObjectError(f"overlay: expected an H×W×3 uint8 image, got {rgb.dtype} {rgb.shape}")
    if "Rows" in header and (int(header.Rows), int(header.Columns)) != rgb.shape[:2]:
        raise ObjectError(f"overlay: source is {header.Rows}×{header.Columns}, "
                          f"overlay is {rgb.shape[0]}×{rgb.shape[1]}")
    src = with_type2(header)
    if instance_number is None:
        instance_number = instance_number_for(str(src.get("SOPInstanceUID", "") or sop_uid))
    orientation = src.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2 and all(orientation)
    try:
        with warnings.catch_warnings():
            # highdicom warns on a one-component person name and quotes it: a source's names never
            # reach the log (they are copied unchanged, as the source has them)
            warnings.filterwarnings("ignore", message=".*person name", category=UserWarning)
            sc = hd.sc.SCImage(
                pixel_array=np.ascontiguousarray(rgb), photometric_interpretation="RGB", bits_allocated=8,
                coordinate_system="PATIENT", study_instance_uid=src.StudyInstanceUID, series_instance_uid=series_uid,
                series_number=series_number, sop_instance_uid=sop_uid, instance_number=instance_number,
                manufacturer=equipment.manufacturer, patient_id=src.PatientID, patient_name=src.PatientName,
                patient_birth_date=src.PatientBirthDate, patient_sex=src.PatientSex or None,
                accession_number=src.AccessionNumber, study_id=src.StudyID, study_date=src.StudyDate or None,
                study_time=src.StudyTime or None, referring_physician_name=src.ReferringPhysicianName,
                # highdicom insists on an orientation for patient images; an unknown one is written empty below
                patient_orientation=tuple(orientation) if known else ("L", "F"),
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ObjectError(f"overlay: cannot build the Secondary Capture ({type(exc).__name__}: {exc})"
                          .splitlines()[0]) from None
    if not known:
        sc.PatientOrientation = ""  # Type 2: present, unknown
    for keyword in ("StudyDate", "StudyTime"):  # Type 2 in General Study: keep them even when empty
        if keyword not in sc:
            setattr(sc, keyword, "")
    if "SpecificCharacterSet" in src:  # names copied from the source keep their character set
        sc.SpecificCharacterSet = src.SpecificCharacterSet
    # General Series' Laterality is Type 2C (required for paired body parts): with the source's body
    # part (CHEST: unpaired) it is left out, without one it is the source's or empty (unknown)
    if src.get("BodyPartExamined"):
        sc.BodyPartExamined = src.BodyPartExamined
    if src.get("Laterality") or not src.get("BodyPartExamined"):
        sc.Laterality = src.get("Laterality", "") or ""
    sc.ConversionType = "WSD"  # made on a workstation, not digitised film or video
    sc.ImageType = ["DERIVED", "SECONDARY", "OVERLAY"]
    sc.BurnedInAnnotation = "YES"  # the legend (prompts, probabilities) is text in the pixels
    sc.SeriesDescription = lo(f"{description} - {NOT_FOR_DIAGNOSIS}")
    sc.DerivationDescription = lo(f"masks of {equipment.model_name} burnt into the source image; "
                                  f"{NOT_FOR_DIAGNOSIS}", 1024)
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}: radflash result overlay, not the original image"
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    purpose = Dataset()
    concept = codes.cid7202.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = concept.value, concept.scheme_designator, \
        concept.meaning
    ref.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [ref]
    return equipment.stamp(sc)
