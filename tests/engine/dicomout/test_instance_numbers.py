"""InstanceNumber of the result objects: derived from the source image, so one study's reports,
written in separate batches or runs, differ in it, and a rerun gives each the number it had.

``score``'s SR path here (``build_sr``, which ``score --store``, the DIMSE store and ``serve``'s
forward lanes share); ``segment``'s SEG/SC/SR written by separate writers in
``tests/engine/segment/test_instance_numbers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from radflash.archive.pipeline import PromptSet
from radflash.archive.sinks import FileRecord
from radflash.archive.stow import build_sr
from radflash.archive.verb import DEMO_ARCHIVE
from radflash.dicomout.uids import INSTANCE_NUMBER_MAX, instance_number_for, sr_uids
from tests.engine.dicomout.validators import dciodvfy, unexpected

FILM = DEMO_ARCHIVE / "patient02" / "study0" / "img002.dcm"  # CR, MONOCHROME1
PROMPTS = PromptSet(("pneumothorax", "left lung"), ("There is pneumothorax", "left lung"), (0.5, None))


def valid_is(n: int) -> bool:
    """Whether ``n`` is a value of VR IS (PS3.5: at most 12 characters, −2³¹..2³¹−1) highdicom takes (≥ 1)."""
    text = str(pydicom.valuerep.IS(str(n)))
    return 1 <= n <= 2**31 - 1 and len(text) <= 12 and int(text) == n


def one_study(n: int) -> list[pydicom.Dataset]:
    """``n`` headers of one film in one study, each its own SOP Instance (and, like many exports,
    every one Series Number 1 and Instance Number 1)."""
    study = generate_uid()
    headers = []
    for _ in range(n):
        ds = pydicom.dcmread(FILM, stop_before_pixels=True)
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        headers.append(ds)
    return headers


def sr_of(header: pydicom.Dataset) -> pydicom.Dataset:
    record = FileRecord(str(FILM), "scored", sop_instance_uid=header.SOPInstanceUID,
                        study_instance_uid=header.StudyInstanceUID, logits=(0.3, -1.0), probs=(0.57, 0.27),
                        positive=(True, None))
    return build_sr(header, record, PROMPTS, model_id="m", model_sha256="ab" * 32, version="0", family="radzero")


def test_the_number_is_a_fixed_function_of_the_source_uid() -> None:
    # pinned: a change here renumbers every object a PACS already holds (a rerun must match)
    assert instance_number_for("1.2.3") == 1101195035
    assert instance_number_for("1.2.826.0.1.3680043.8.498.1") == instance_number_for("1.2.826.0.1.3680043.8.498.1")
    assert INSTANCE_NUMBER_MAX == 2**31 - 1


def test_numbers_are_valid_is_values_and_distinct_over_many_sources() -> None:
    sources = [str(pydicom.dcmread(p, stop_before_pixels=True, force=True).get("SOPInstanceUID", ""))
               for p in sorted(DEMO_ARCHIVE.rglob("*.dcm"))]
    sources = [s for s in sources if s] + [generate_uid(entropy_srcs=[str(i)]) for i in range(5000)]
    numbers = [instance_number_for(s) for s in sources]
    assert all(valid_is(n) for n in numbers)
    assert len(set(numbers)) == len(set(sources))  # these 5000+ (fixed) UIDs: no two share a number
    assert all(valid_is(instance_number_for(s)) for s in ("", "1", "9" * 64, "1." + "0" * 62))


def test_score_srs_of_one_study_differ_in_instance_number_and_keep_it_on_rerun(tmp_path: Path) -> None:
    headers = one_study(4)
    # each built on its own, as separate score batches, DIMSE commits or serve lanes build them
    first = [sr_of(h) for h in headers]
    series = sr_uids(headers[0].SOPInstanceUID, headers[0].StudyInstanceUID, "ab" * 32)[0]
    assert {str(sr.SeriesInstanceUID) for sr in first} == {series}  # one SR series per study and model
    numbers = [int(sr.InstanceNumber) for sr in first]
    assert len(set(numbers)) == len(headers)
    assert numbers == [instance_number_for(h.SOPInstanceUID) for h in headers]
    # a rerun (another order, another process's worth of state: none) gives the same numbers and UIDs
    again = {str(sr.SOPInstanceUID): int(sr.InstanceNumber) for sr in map(sr_of, reversed(headers))}
    assert again == {str(sr.SOPInstanceUID): int(sr.InstanceNumber) for sr in first}
    path = tmp_path / "sr.dcm"
    first[1].save_as(path)
    read = pydicom.dcmread(path)
    assert read["InstanceNumber"].VR == "IS" and int(read.InstanceNumber) == numbers[1]
    verdict = dciodvfy(path)
    assert verdict.errors == [] and unexpected(verdict.warnings) == [], verdict


def test_an_explicit_number_still_wins() -> None:
    from radflash.dicomout.equipment import Equipment
    from radflash.dicomout.sr import FindingResult, build_report

    header = one_study(1)[0]
    sr = build_report(header, [FindingResult("left lung", "left lung", 0.4)], equipment=Equipment("m", "ab" * 32),
                      series_uid=generate_uid(), sop_uid=generate_uid(), instance_number=7)
    assert int(sr.InstanceNumber) == 7
