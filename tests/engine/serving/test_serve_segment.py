"""``radflash serve --segment … --overlay sc`` against real Orthancs: one DICOM SEG (one segment per
prompt) and one overlay Secondary Capture per chest instance, beside its SR, at every target, over
STOW-RS and C-STORE; dead letters and ``--retry-dead`` carry them too; ``dciodvfy`` finds no error in
what the node sent; a resend (a second node scoring the same instances) replaces, never duplicates.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.engine.serving.conftest import CHEST, OTHER, orthanc_or_skip, stored_by, storescu, uids

PROMPTS = ("There is pneumothorax", "left lung")


def _instances(server, modality: str) -> list:
    """Every instance of ``modality`` the server holds, as pydicom data sets."""
    import pydicom

    query = json.dumps({"Level": "Instance", "Query": {"Modality": modality}}).encode()
    ids = server.request("POST", "/tools/find", query, "application/json")
    return [pydicom.dcmread(io.BytesIO(server.request("GET", f"/instances/{i}/file"))) for i in ids]  # type: ignore


def _count(server, modality: str) -> int:
    query = json.dumps({"Level": "Instance", "Query": {"Modality": modality}}).encode()
    return len(server.request("POST", "/tools/find", query, "application/json"))  # type: ignore[arg-type]


def _expected_uids(files: list[Path]) -> tuple[set[str], set[str]]:
    """The SEG and SC SOP Instance UIDs ``segment`` derives for these sources, model and prompts."""
    import radflash
    from radflash.dicomout.uids import prompt_set_key, sc_uids, seg_uids
    from radflash.segment.prompts import resolve_prompts

    model = radflash.load(device="cpu")
    specs = resolve_prompts(list(PROMPTS), calibration=model.calibration, default_prompts=model.default_prompts)
    key = prompt_set_key([(s.name, s.prompt, s.threshold) for s in specs])
    segs, scs = set(), set()
    for f in files:
        sop, study = uids(f)
        segs.add(seg_uids(sop, study, model.sha256, key)[1])
        scs.add(sc_uids(sop, study, model.sha256, key)[1])
    return segs, scs


@pytest.mark.slow  # ~30-40 s: two Orthancs, two nodes, dciodvfy
def test_segment_and_overlay_reach_every_target_once_and_validate(tmp_path: Path, nodes) -> None:
    from tests.engine.dicomout.validators import dciodvfy

    pacs = orthanc_or_skip(tmp_path / "pacs")  # receives over STOW-RS
    archive = orthanc_or_skip(tmp_path / "archive")  # receives over C-STORE; down at first
    chest = CHEST[:6]
    try:
        archive.stop(kill=True)
        flags = ("--segment", PROMPTS[0], "--segment", PROMPTS[1], "--overlay", "sc", "--forward", pacs.dicomweb,
                 "--forward", archive.dimse(aet=archive.aet), "--forward-retries", "0", "--max-batch", "4")
        node = nodes("node", *flags).start()
        sent = storescu(node.dicom_port, chest + OTHER[:2])
        assert stored_by(sent) == len(chest) + 2, sent.stdout + sent.stderr
        node.wait_for(lambda: node.counts()["dead"] == len(chest), 90, "dead letters for the archive")
        for modality in ("SR", "SEG", "OT"):
            assert _count(pacs, modality) == len(chest), modality  # one each per chest film, none for the others

        # the archive comes back: --retry-dead sends SR, SEG and SC (from STATE/results, no model)
        archive.start()
        out = node.status("--retry-dead")
        assert out.startswith(f"resent {len(chest)} dead letter(s); 0 still failing"), out
        assert not any((node.state / "results").iterdir())  # delivered everywhere: the files are gone

        want_seg, want_sc = _expected_uids(chest)
        sources = {uids(f)[0] for f in chest}
        checked: list[Path] = []
        for server in (pacs, archive):
            segs, scs = _instances(server, "SEG"), _instances(server, "OT")
            assert {str(s.SOPInstanceUID) for s in segs} == want_seg  # derived as `segment` derives them
            assert {str(s.SOPInstanceUID) for s in scs} == want_sc
            for seg in segs:
                assert [str(d.SegmentLabel) for d in seg.SegmentSequence] == list(PROMPTS)
                refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                        for i in s.ReferencedInstanceSequence}
                assert len(refs) == 1 and refs <= sources
            for sc in scs:
                assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources
                assert "NOT FOR DIAGNOSIS" in sc.SeriesDescription
            for name, ds in (("seg", segs[0]), ("sc", scs[0])):
                path = tmp_path / f"{name}-{len(checked)}.dcm"
                ds.save_as(path)
                checked.append(path)
        for path in checked:  # a SEG and an SC as each transport delivered them
            verdict = dciodvfy(path)
            assert verdict.errors == [], (path.name, verdict.errors)
        assert node.terminate() == 0

        # a resend (here: a second node that has never seen them scores the same films again) makes
        # the same UIDs, so both targets still hold exactly one SR, SEG and SC per film
        again = nodes("again", *flags).start()
        assert stored_by(storescu(again.dicom_port, chest)) == len(chest)
        again.wait_for(lambda: again.counts()["forwarded"] == len(chest), 90, "the resend")
        assert again.counts()["dead"] == 0
        for server in (pacs, archive):
            for modality in ("SR", "SEG", "OT"):
                assert _count(server, modality) == len(chest), modality
        assert again.terminate() == 0
    finally:
        pacs.stop(kill=True)
        archive.stop(kill=True)


@pytest.mark.slow  # ~25 s: an Orthanc, a node started twice
def test_one_study_over_batches_and_a_restart_gets_distinct_instance_numbers(tmp_path: Path, nodes) -> None:
    """Three films of one study, each in its own batch (``--max-batch 1``), the last after a restart:
    each batch has its own writer, yet the SR, SEG and SC series each number them apart, with the
    numbers derived from the source films (the same on any rerun)."""
    import pydicom
    from pydicom.uid import generate_uid

    from radflash.archive.verb import DEMO_ARCHIVE
    from radflash.dicomout.uids import instance_number_for

    study = generate_uid(entropy_srcs=["serve-instance-number-study"])
    films = []
    for i in range(3):  # one CR film three times in one study (Series and Instance Number 1 in each)
        ds = pydicom.dcmread(DEMO_ARCHIVE / "patient02" / "study0" / "img002.dcm")
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["serve-film", str(i)])
        films.append(tmp_path / f"film{i}.dcm")
        ds.save_as(films[-1])
    pacs = orthanc_or_skip(tmp_path / "pacs")
    try:
        flags = ("--segment", PROMPTS[0], "--segment", PROMPTS[1], "--overlay", "sc", "--forward", pacs.dicomweb,
                 "--max-batch", "1")
        node = nodes("node", *flags).start()
        assert stored_by(storescu(node.dicom_port, films[:2])) == 2
        node.wait_for(lambda: node.counts()["forwarded"] == 2, 90, "the first two films' results")
        assert node.terminate() == 0
        node = nodes("node", *flags).start()  # the same state: the node restarted
        assert stored_by(storescu(node.dicom_port, films[2:])) == 1
        node.wait_for(lambda: node.counts()["forwarded"] == 3, 90, "the third film's results")
        want = sorted(instance_number_for(uids(f)[0]) for f in films)
        assert len(set(want)) == 3
        for modality in ("SR", "SEG", "OT"):
            objects = _instances(pacs, modality)
            assert len({str(o.SeriesInstanceUID) for o in objects}) == 1, modality  # one series in the study
            assert sorted(int(o.InstanceNumber) for o in objects) == want, modality
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)


def test_overlay_without_segment_and_a_blank_prompt_are_usage_errors(tmp_path: Path) -> None:
    from radflash.errors import InputError
    from radflash.serving.options import ServeOptions

    with pytest.raises(InputError, match="--overlay sc draws the --segment masks"):
        ServeOptions.from_flat(tmp_path, overlay="sc")
    with pytest.raises(InputError, match="non-empty prompt"):
        ServeOptions.from_flat(tmp_path, segment=[" "])
    options = ServeOptions.from_flat(tmp_path, segment="left lung", overlay="sc", forward="dimse://A@127.0.0.1:1")
    assert options.segment == ("left lung",) and options.forward.targets == ("dimse://A@127.0.0.1:1",)
