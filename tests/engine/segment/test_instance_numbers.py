"""The SEG, overlay SC and SR of one study's images, written by separate writers, differ in
InstanceNumber; a rerun gives each object the number (and UIDs) it had.

Each ``segment`` call below builds its own :class:`radflash.segment.output.OutputWriter`, as each
``serve`` batch, a restarted node and a ``segment --resume`` do: the bug this guards against was
a per-writer, per-study counter that restarted at 1, so every image of a study spread over several
batches got InstanceNumber 1 in the same series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radflash.archive.verb import DEMO_ARCHIVE
from radflash.dicomout.uids import instance_number_for
from tests.engine.dicomout.validators import dciodvfy, unexpected

pytest.importorskip("highdicom")

PROMPTS = {"pneumothorax": "There is pneumothorax", "left lung": "left lung"}
FILM = DEMO_ARCHIVE / "patient02" / "study0" / "img002.dcm"  # CR, MONOCHROME1, 256×256
OBJECTS = ("seg.dcm", "overlay-sc.dcm", "sr.dcm")


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    from radflash.api import load

    return load(tiny_model, device="cpu")


def one_study(folder: Path, n: int) -> list[Path]:
    """``n`` films of one study, each its own SOP Instance; like many exports (and the demo
    archive), every one has Series Number 1 and Instance Number 1. Fixed UIDs: reproducible."""
    folder.mkdir()
    study = generate_uid(entropy_srcs=["instance-number-test-study"])
    films = []
    for i in range(n):
        ds = pydicom.dcmread(FILM)
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["film", str(i)])
        path = folder / f"film{i}.dcm"
        ds.save_as(path)
        films.append(path)
    return films


def written(out: Path) -> dict[str, dict[str, tuple[str, str, int]]]:
    """Object file name → source SOP Instance UID → (series UID, SOP Instance UID, InstanceNumber)."""
    found: dict[str, dict[str, tuple[str, str, int]]] = {name: {} for name in OBJECTS}
    for name in OBJECTS:
        for path in out.rglob(name):
            source = json.loads(path.with_name("result.json").read_text(encoding="utf-8"))["sop_instance_uid"]
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds["InstanceNumber"].VR == "IS"
            found[name][source] = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), int(ds.InstanceNumber))
    return found


def run(films: list[Path], out: Path, model: Any) -> None:
    from radflash.segment.verb import segment

    result = segment(films, out, prompts=PROMPTS, model=model, formats=("dicom-seg", "dicom-sr"), overlay="sc",
                     workers=0, progress=False, batch_size=len(films))
    assert not result.failures and all({"dicom-seg", "dicom-sr", "overlay-sc"} <= set(r.files) for r in result.images)


def test_one_studys_objects_from_separate_writers_differ_and_keep_their_numbers(model: Any, tmp_path: Path) -> None:
    films = one_study(tmp_path / "in", 3)
    sources = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in films]
    for i, film in enumerate(films):  # one writer per image: separate serve batches, or runs
        run([film], tmp_path / "batches" / str(i), model)
    batches: dict[str, dict[str, tuple[str, str, int]]] = {name: {} for name in OBJECTS}
    for i in range(len(films)):
        for name, objects in written(tmp_path / "batches" / str(i)).items():
            batches[name].update(objects)

    for name in OBJECTS:
        objects = batches[name]
        assert sorted(objects) == sorted(sources), name  # one object of each kind per film
        assert len({series for series, _, _ in objects.values()}) == 1, name  # one series per study
        numbers = {source: number for source, (_, _, number) in objects.items()}
        assert len(set(numbers.values())) == len(films), (name, numbers)  # distinct within the series
        assert numbers == {s: instance_number_for(s) for s in sources}, name  # the same SEG, SC and SR number
        assert all(1 <= n <= 2**31 - 1 for n in numbers.values())

    # a rerun, here all three in one writer and one batch: the same UIDs and numbers, object by object
    run(films, tmp_path / "rerun", model)
    assert written(tmp_path / "rerun") == batches

    for path in sorted((tmp_path / "batches").rglob("*.dcm")):
        verdict = dciodvfy(path)
        assert verdict.errors == [], (path, verdict.errors)
        assert unexpected(verdict.warnings) == [], (path, verdict.warnings)
