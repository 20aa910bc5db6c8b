"""``segment`` over DICOMweb against a real Orthanc (tests/engine/orthanc.py): same outputs as files,
and ``--store`` sends each DICOM SEG once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radflash.archive.verb import DEMO_ARCHIVE
from radflash.segment.verb import segment

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install 'radflash[dicomweb]')")
pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'radflash[seg]')")

PROMPTS = ["There is pleural effusion", "left lung"]


def _run(inputs, out: Path, **kwargs):
    # batch size 1 on both sides: the two sources batch different neighbours together (see test_dicomweb)
    return segment(inputs, out, prompts=PROMPTS, formats=("png", "npz", "dicom-seg"), workers=1, batch_size=1,
                   progress=False, **kwargs)


def _outputs(out: Path, names: set[str]) -> dict[str, dict[str, object]]:
    """name → {mask PNGs as arrays, npz maps, per-prompt grounding}, for the images in ``names``."""
    from PIL import Image

    found: dict[str, dict[str, object]] = {}
    for name in sorted(names):
        folder = out / name
        entry: dict[str, object] = {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("mask-*.png"))}
        with np.load(folder / "maps.npz") as z:
            entry.update({f"npz:{k}": z[k] for k in z.files})
        record = json.loads((folder / "result.json").read_text())
        entry["prompts"] = record["prompts"]
        entry["files"] = sorted(record["files"])
        found[name] = entry
    return found


def _segs(server) -> list[dict]:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(server.url + "/dicom-web").search_for_instances(search_filters={"Modality": "SEG"})


def _uid(row: dict, tag: str) -> str:
    return row[tag]["Value"][0]


def test_segment_over_dicomweb_equals_segment_over_files(orthanc, tmp_path: Path) -> None:
    web = _run(orthanc.dicomweb + "/studies", tmp_path / "web")
    files = _run(DEMO_ARCHIVE, tmp_path / "files")
    stored = {str(p) for p in orthanc.stored}
    from_pacs = [r for r in files.images if r.source in stored]  # the PACS refused the non-DICOM files
    assert len(web.images) == len(from_pacs) > 0
    names = {r.name for r in web.images}
    assert names == {r.name for r in from_pacs} == {r.sop_instance_uid for r in web.images}  # named by UID
    a, b = _outputs(tmp_path / "web", names), _outputs(tmp_path / "files", names)
    for name in names:
        assert a[name].keys() == b[name].keys()
        for key, value in a[name].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[name][key], err_msg=f"{name}/{key}")
            else:
                assert value == b[name][key], f"{name}/{key}"
    assert all(r.source.startswith(f"{orthanc.url}/dicom-web/studies/") for r in web.images)
    # same selection: what files skipped for its header, the PACS run skipped too
    skipped = {f.status for f in web.failures}
    assert skipped <= {"skipped", "failed"} and sum(f.status == "skipped" for f in web.failures) == \
        sum(f.status == "skipped" for f in files.failures)

    import pydicom

    name = sorted(names)[0]
    seg_web = pydicom.dcmread(tmp_path / "web" / name / "seg.dcm")
    seg_file = pydicom.dcmread(tmp_path / "files" / name / "seg.dcm")
    # deterministic UIDs: source image + model + prompt set, whichever way the image came
    assert seg_web.SOPInstanceUID == seg_file.SOPInstanceUID and seg_web.SeriesInstanceUID == seg_file.SeriesInstanceUID
    assert seg_web.PixelData == seg_file.PixelData
    assert seg_web.StudyInstanceUID == seg_file.StudyInstanceUID and seg_web.PatientID == seg_file.PatientID


def test_store_sends_each_seg_once_and_it_references_its_source(fresh_orthanc, tmp_path: Path) -> None:
    import highdicom as hd
    from click.testing import CliRunner
    from dicomweb_client.api import DICOMwebClient

    from radflash.cli import cli

    query = fresh_orthanc.dicomweb + "/studies"
    args = ["segment", query, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--store", "--quiet",
            "--batch-size", "1", "--workers", "1"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a")])  # --store adds dicom-seg
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    n = len(report["images"])
    assert n > 0 and report["store"]["stored"] == n and report["store"]["already_on_server"] == 0
    assert "dicom-seg" in report["formats"]
    segs = _segs(fresh_orthanc)
    assert len(segs) == n

    c = DICOMwebClient(fresh_orthanc.url + "/dicom-web")
    sources = {r["name"] for r in report["images"]}  # the SOPInstanceUIDs of the segmented images
    referenced = set()
    for row in segs:
        ds = c.retrieve_instance(_uid(row, "0020000D"), _uid(row, "0020000E"), _uid(row, "00080018"))
        seg = hd.seg.Segmentation.from_dataset(ds)
        ((study, _, sop),) = seg.get_source_image_uids()
        assert study == seg.StudyInstanceUID
        referenced.add(sop)
        assert [d.SegmentLabel for d in seg.SegmentSequence] == PROMPTS
        local = hd.seg.segread(tmp_path / "a" / sop / "seg.dcm")
        assert local.SOPInstanceUID == seg.SOPInstanceUID
    assert referenced == sources

    # a re-run into a new folder (which also lists the stored SEGs, and skips them) stores nothing new
    again = segment(query, tmp_path / "b", prompts=PROMPTS, workers=1, batch_size=1, progress=False, store="same")
    assert again.report["store"] == {"url": "dicomweb+" + fresh_orthanc.url + "/dicom-web", "stored": 0,
                                     "already_on_server": n}
    assert sorted(_uid(r, "00080018") for r in _segs(fresh_orthanc)) == sorted(_uid(r, "00080018") for r in segs)


def test_store_needs_a_url_for_files_and_hides_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.errors import InputError

    with pytest.raises(InputError, match="--store"):
        segment(DEMO_ARCHIVE, tmp_path / "o", prompts=PROMPTS, store="same", progress=False)
    with pytest.raises(InputError) as err:
        segment(DEMO_ARCHIVE, tmp_path / "o", prompts=PROMPTS, store="dicomweb+http://bob:hunter2@pacs/dicom-web",
                progress=False)
    assert "hunter2" not in str(err.value)
