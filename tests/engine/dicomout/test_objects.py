"""The DICOM objects radflash writes (SR, SEG, Secondary Capture), checked by the real validators.

Every object is made from the demo archive and from the real CR radiograph (pydicom-data's
RG1_UNCI) the way the verbs make them (``score`` → ``build_sr``; ``segment --format dicom-seg
--overlay sc``), then: dciodvfy reports no error and no warning beyond the listed ones; dsrdump
parses every SR and shows the TID 1500 root, the findings' codes and the Parquet rows'
probabilities; Contributing Equipment names the model with a Device UID that is stable across
runs and distinct across checkpoints; a real Orthanc accepts every object over STOW-RS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest

from radflash.archive.pipeline import PromptSet
from radflash.archive.sinks import FileRecord
from radflash.archive.stow import build_sr
from radflash.archive.verb import DEMO_ARCHIVE, score
from radflash.dicomout.codes import TABLE, finding_code
from radflash.dicomout.equipment import AIR_PURPOSE, Equipment
from tests.engine.dicomout.validators import dciodvfy, dsrdump, unexpected

pytest.importorskip("highdicom")

# Presets with a standard code (thresholded: present/absent), a preset without one, a custom prompt.
FINDINGS = {
    "pneumothorax": {"prompt": "There is pneumothorax", "threshold": 0.5},
    "lung mass": {"prompt": "There is lung mass", "threshold": 0.3},
    "pleural effusion": {"prompt": "There is pleural effusion", "threshold": 0.5},
    "atelectasis": {"prompt": "There is atelectasis", "threshold": None},
    "left lung": {"prompt": "left lung", "threshold": None},
}
DEMO_FILES = [DEMO_ARCHIVE / "patient02" / "study0" / "img002.dcm",  # CR, MONOCHROME1
              DEMO_ARCHIVE / "patient01" / "study1" / "img001.dcm"]  # DX, JPEG 2000


@pytest.fixture(scope="module")
def rg1() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data's RG1_UNCI.dcm is not installed")
    return Path(path)


@pytest.fixture(scope="module")
def model() -> Any:
    import radflash

    return radflash.load()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, rg1: Path, model: Any) -> list[tuple[Path, dict]]:
    """One SR per image scored from the demo archive and the real CR, as ``score --store`` builds
    it, written to disk, each with its Parquet row."""
    from radflash import __version__

    run = score([DEMO_ARCHIVE, rg1], None, findings=FINDINGS, model=model, workers=0, progress=False)
    assert run.scored >= 10
    names = tuple(FINDINGS)
    prompts = PromptSet(names, tuple(f["prompt"] for f in FINDINGS.values()),
                        tuple(f["threshold"] for f in FINDINGS.values()))
    out = tmp_path_factory.mktemp("srs")
    written = []
    for i, row in enumerate(run.results.to_pylist()):
        record = FileRecord(row["path"], "scored", sop_instance_uid=row["sop_instance_uid"],
                            study_instance_uid=row["study_instance_uid"],
                            logits=tuple(row[f"{n}.logit"] for n in names),
                            probs=tuple(row[f"{n}.prob"] for n in names),
                            positive=tuple(row.get(f"{n}.positive") for n in names))
        header = pydicom.dcmread(row["path"], stop_before_pixels=True)
        sr = build_sr(header, record, prompts, model_id=model.model_id, model_sha256=model.sha256,
                      version=__version__, family=model.family)
        path = out / f"sr{i:02d}.dcm"
        sr.save_as(path)
        written.append((path, row))
    assert any(row["path"] == str(rg1) for _, row in written)
    return written


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory, rg1: Path, model: Any) -> Path:
    """``segment --format dicom-seg,dicom-sr --overlay sc`` over the real CR and two demo films."""
    from radflash.segment.verb import segment

    out = tmp_path_factory.mktemp("seg") / "out"
    run = segment([rg1, *DEMO_FILES], out, prompts={"pneumothorax": "There is pneumothorax", "left lung": "left lung"},
                  model=model, formats=("dicom-seg", "dicom-sr"), overlay="sc", workers=0, progress=False)
    assert len(run.images) == 3 and not run.failures
    assert all({"dicom-seg", "dicom-sr", "overlay-sc"} <= set(r.files) for r in run.images)
    return out


def _objects(out: Path, name: str) -> list[Path]:
    found = sorted(out.rglob(name))
    assert found, f"no {name} under {out}"
    return found


def _probabilities(tree: str) -> list[float]:
    return [float(v) for v in re.findall(r'NUM:\(,,"Probability"\)="([^"]+)"', tree)]


# ---- SR --------------------------------------------------------------------------------------
def test_every_sr_validates_without_errors(reports: list[tuple[Path, dict]]) -> None:
    for path, row in reports:
        verdict = dciodvfy(path)
        assert verdict.errors == [], (row["path"], verdict.errors)
        assert unexpected(verdict.warnings) == [], (row["path"], verdict.warnings)


def test_dsrdump_shows_a_tid1500_report_with_codes_and_the_parquet_probabilities(
        reports: list[tuple[Path, dict]]) -> None:
    for path, row in reports:
        tree = dsrdump(path)
        root = next(line for line in tree.splitlines() if line.startswith("<CONTAINER"))
        assert '"Imaging Measurement Report"' in root and "TID 1500" in root
        assert tree.count('CONTAINER:(,,"Measurement Group")') == len(FINDINGS)  # one TID 1501 group each
        assert '(36118008,SCT,"Pneumothorax")' in tree and '(60046008,SCT,"Pleural effusion")' in tree
        assert '(4147007,SCT,"Mass")' in tree and '"Finding Site")=(39607008,SCT,"Lung")' in tree
        assert re.search(r'\(RF[0-9a-f]{10},99RADFLASH,"left lung"\)', tree)  # the custom prompt
        assert '"Observer Type")=(121007,DCM,"Device")' in tree
        # probabilities: exactly the Parquet rows (DS keeps 16 characters: float32's digits survive)
        assert _probabilities(tree) == pytest.approx([row[f"{n}.prob"] for n in FINDINGS], rel=1e-6, abs=1e-9)
        for name, spec in FINDINGS.items():
            positive = row.get(f"{name}.positive")
            assert (spec["threshold"] is None) == (positive is None)
        decisions = re.findall(r'CODE:\(,,"(?:Pneumothorax|Mass|Pleural effusion)"\)=\(\d+,SCT,"(Present|Absent)"\)',
                               tree)
        assert decisions == ["Present" if row[f"{n}.positive"] else "Absent"
                             for n in ("pneumothorax", "lung mass", "pleural effusion")]


def test_sr_carries_contributing_equipment_and_references_its_source(reports: list[tuple[Path, dict]],
                                                                    model: Any) -> None:
    from radflash.dicomout.sr import read_findings

    path, row = reports[0]
    sr = pydicom.dcmread(path)
    (item,) = [i for i in sr.ContributingEquipmentSequence if i.Manufacturer == "radflash"]  # highdicom adds
    assert item.ManufacturerModelName == f"{model.family} {model.model_id}"  # the source's and its own
    assert item.DeviceUID == Equipment(model.model_id, model.sha256, model.family).uid
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == AIR_PURPOSE
    assert item.SoftwareVersions and sr.StudyInstanceUID == row["study_instance_uid"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in evidence] == [row["sop_instance_uid"]]
    tree = dsrdump(path)
    assert f'"Device Observer UID")="{item.DeviceUID}"' in tree and '"Image Library"' in tree
    found = read_findings(sr)
    assert list(found) == list(FINDINGS)
    assert found["pneumothorax"]["code"] == ("36118008", "SCT", "Pneumothorax")


def test_device_uid_is_stable_across_runs_and_distinct_across_checkpoints(tmp_path: Path, model: Any) -> None:
    """Same weights → the same UID in another interpreter; other weights under the same id → another."""
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    code = ("import radflash; from radflash.dicomout.equipment import Equipment; m = radflash.load(); "
            "print(Equipment(m.model_id, m.sha256, m.family).uid)")
    other_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert other_run.returncode == 0, other_run.stderr
    here = Equipment(model.model_id, model.sha256, model.family).uid
    assert other_run.stdout.strip().splitlines()[-1] == here
    import radflash

    uids = set()
    for seed in (1, 2):
        path = save_checkpoint(random_checkpoint("tiny", seed=seed, model_id="same-id"), tmp_path / f"ck{seed}")
        m = radflash.load(path)
        uids.add(Equipment(m.model_id, m.sha256, m.family).uid)
    assert len(uids) == 2 and here not in uids
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in uids)


def test_code_table_holds_only_codes_from_dicoms_own_dictionaries() -> None:
    """codes.json invents nothing: every standard code is in DICOM PS3.16 as pydicom bundles it."""
    from pydicom.sr._concepts_dict import concepts

    table = json.loads(TABLE.read_text())
    meanings: dict[tuple[str, str], set[str]] = {}
    for scheme, by_keyword in concepts.items():
        for entries in by_keyword.values():
            for code, (meaning, _) in entries.items():
                meanings.setdefault((code, scheme), set()).add(meaning.lower())
    coded = [e["code"] for e in table["findings"].values() if e["code"]] + [table["lung"]]
    for value, scheme, meaning in coded:
        # the code exists with this meaning, and with no unrelated one (a dictionary clash means "unsure")
        found = meanings.get((value, scheme), set())
        assert meaning.lower() in found and all(meaning.lower() in m for m in found), (value, scheme, found)
    from radflash.findings import CHEXPERT_14

    assert set(CHEXPERT_14) <= set(table["findings"])  # every preset is listed (coded or knowingly not)
    assert finding_code("There is pneumothorax").code.value == "36118008"  # a --prompt given as text
    assert finding_code("my own prompt").code.scheme == "99RADFLASH"


# ---- SEG and Secondary Capture --------------------------------------------------------------
def test_every_seg_and_sc_validates_without_errors(segmented: Path) -> None:
    for path in _objects(segmented, "seg.dcm") + _objects(segmented, "overlay-sc.dcm") + _objects(segmented, "sr.dcm"):
        verdict = dciodvfy(path)
        assert verdict.errors == [], (path, verdict.errors)
        assert unexpected(verdict.warnings) == [], (path, verdict.warnings)


def test_seg_and_sc_carry_contributing_equipment_and_join_the_source_study(segmented: Path, model: Any) -> None:
    device = Equipment(model.model_id, model.sha256, model.family).uid
    for seg_path in _objects(segmented, "seg.dcm"):
        seg = pydicom.dcmread(seg_path)
        sc = pydicom.dcmread(seg_path.with_name("overlay-sc.dcm"))
        source_uid = json.loads(seg_path.with_name("result.json").read_text())["sop_instance_uid"]
        for ds in (seg, sc):
            (item,) = [i for i in ds.ContributingEquipmentSequence if i.Manufacturer == "radflash"]
            assert item.DeviceUID == device
            assert item.PurposeOfReferenceCodeSequence[0].CodeValue == AIR_PURPOSE[0]
        assert seg.StudyInstanceUID == sc.StudyInstanceUID and seg.SeriesInstanceUID != sc.SeriesInstanceUID
        prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("36118008", "SCT")  # pneumothorax, coded
        assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99RADFLASH"
        # the overlay: derived, burnt-in, not for diagnosis, pointing at the analysed image
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSIS" in sc.SeriesDescription and "NOT FOR DIAGNOSIS" in sc.ImageComments
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source_uid
        assert sc.PhotometricInterpretation == "RGB" and (sc.Rows, sc.Columns) == (seg.Rows, seg.Columns)
        assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_report_referencing_the_seg_validates(segmented: Path, tmp_path: Path, model: Any) -> None:
    """A segment run's findings as TID 1410 groups that point at the SEG's segments."""
    from radflash.dicomout.sr import FindingResult, build_report
    from radflash.dicomout.uids import segment_sr_uids

    seg_path = _objects(segmented, "seg.dcm")[0]
    seg = pydicom.dcmread(seg_path)
    result = json.loads(seg_path.with_name("result.json").read_text())
    header = pydicom.dcmread(result["source"], stop_before_pixels=True)
    findings = [FindingResult(p["name"], p["prompt"], p["max_prob"], positive=p["positive"],
                              threshold=p["threshold"], segment_number=i)
                for i, p in enumerate(result["prompts"], start=1)]
    series, sop = segment_sr_uids(header.SOPInstanceUID, header.StudyInstanceUID, model.sha256, "k")
    sr = build_report(header, findings, equipment=Equipment(model.model_id, model.sha256, model.family),
                      series_uid=series, sop_uid=sop, segmentation=seg, aggregate="max")
    path = tmp_path / "sr-seg.dcm"
    sr.save_as(path)
    verdict = dciodvfy(path)
    assert verdict.errors == [] and unexpected(verdict.warnings) == [], verdict
    tree = dsrdump(path)
    for i in range(1, len(findings) + 1):  # one TID 1410 group per segment, pointing at its frame
        assert f'"Referenced Segmentation Frame")=(SG image,,{i})' in tree
    refs = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert refs == {seg.SOPInstanceUID, header.SOPInstanceUID}
    assert _probabilities(tree) == pytest.approx([p["max_prob"] for p in result["prompts"]], rel=1e-6)


def test_segment_sr_references_its_seg_with_the_json_probabilities(segmented: Path) -> None:
    """``--format dicom-sr``: the written report, its groups pointing at the SEG's segments."""
    for sr_path in _objects(segmented, "sr.dcm"):
        result = json.loads(sr_path.with_name("result.json").read_text())
        seg = pydicom.dcmread(sr_path.with_name("seg.dcm"))
        tree = dsrdump(sr_path)
        assert "TID 1500" in tree and '(36118008,SCT,"Pneumothorax")' in tree
        assert _probabilities(tree) == pytest.approx([p["max_prob"] for p in result["prompts"]], rel=1e-6)
        assert tree.count('"Referenced Segmentation Frame")=(SG image,,') == len(result["prompts"])
        sr = pydicom.dcmread(sr_path)
        refs = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for series in e.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
        assert refs == {seg.SOPInstanceUID, result["sop_instance_uid"]}


def test_cli_overlay_sc(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radflash.cli import cli

    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["segment", str(DEMO_FILES[0]), "-o", str(out), "--prompt", "left lung",
                                      "--format", "png", "--overlay", "sc", "--quiet", "--report", "none"])
    assert result.exit_code == 0, result.output
    (sc,) = out.rglob("overlay-sc.dcm")
    assert pydicom.dcmread(sc).Modality == "OT"
    bad = CliRunner().invoke(cli, ["segment", str(DEMO_FILES[0]), "-o", str(out), "--prompt", "x", "--overlay", "png"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


# ---- a real PACS -----------------------------------------------------------------------------
def test_orthanc_accepts_every_object_over_stow(reports: list[tuple[Path, dict]], segmented: Path,
                                                tmp_path: Path) -> None:
    pytest.importorskip("dicomweb_client")
    from radflash.archive.stow import Stower
    from tests.engine.orthanc import skip_reason, start_or_skip

    if skip_reason() and os.environ.get("CI"):
        pytest.fail(skip_reason())
    server = start_or_skip(tmp_path / "pacs")
    try:
        objects = [pydicom.dcmread(p) for p, _ in reports[:3]]
        objects += [pydicom.dcmread(p) for name in ("seg.dcm", "sr.dcm", "overlay-sc.dcm")
                    for p in _objects(segmented, name)]
        stower = Stower(server.dicomweb)
        stower.store(objects)  # a refused object (FailedSOPSequence) raises
        assert stower.stored == len(objects)
        for ds in objects:
            assert stower.exists(ds.StudyInstanceUID, ds.SOPInstanceUID), ds.SOPClassUID.name
    finally:
        server.stop(kill=True)  # teardown: nothing left to close cleanly
