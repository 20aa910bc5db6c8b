"""What every radflash object copies from its source image's header."""

from __future__ import annotations

from typing import Any

# Type 2 patient/study attributes an SR, SEG or SC copies from its source (present, may be empty).
# Exports and older modalities often drop empty elements, and highdicom reads them unconditionally;
# an empty value is the standard's "unknown". One list for every object (it was two before #27).
TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber")


def fill_type2(ds: Any) -> None:
    """Add every missing :data:`TYPE2_FROM_SOURCE` attribute to ``ds`` (in place) as empty."""
    for keyword in TYPE2_FROM_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, "")


def with_type2(source: Any) -> Any:
    """``source``, or a copy of it with the missing Type 2 attributes added empty (the caller's
    header is never changed: a DICOMweb source may hand the same dataset to several writers)."""
    if all(k in source for k in TYPE2_FROM_SOURCE):
        return source
    copy = source.copy()
    fill_type2(copy)
    return copy
