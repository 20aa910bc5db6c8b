"""Writers: PNG/NPZ round trips, atomic writes, DICOM SEG read back with highdicom, NIfTI, previews."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radflash.segment.writers import (
    NpzWriter,
    Overlay,
    SegmentInfo,
    SegSeries,
    WriteError,
    atomic_write,
    render_preview,
    write_dicom_seg,
    write_maps_npz,
    write_mask_png,
    write_nifti,
    write_preview,
)


def make_dicom(path: Path, *, rows: int = 61, cols: int = 47, sop_uid: str | None = None,
               photometric: str = "MONOCHROME2", frame_of_reference: bool = False) -> Path:
    """A small single-frame CR written with pydicom (odd size on purpose)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cr = "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = cr
    ds.SOPInstanceUID = sop_uid or meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", "PHANTOM", "Phantom^Test"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = (
        "20240101", "120000", "A1", "1", 1, 1)
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.Manufacturer = "test"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.139, 0.139]
    if frame_of_reference:
        ds.FrameOfReferenceUID = generate_uid()
    yy, xx = np.mgrid[:rows, :cols]
    ds.PixelData = ((xx * 37 + yy * 11) % 4096).astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _masks(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((t, h, w), np.uint8)
    for k in range(t):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[k, y0:y0 + h // 3, x0:x0 + w // 4] = 1
    return m


def test_mask_png_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    mask = _masks(1, 53, 41)[0]
    path = write_mask_png(tmp_path / "m.png", mask)
    img = Image.open(path)
    assert img.size == (41, 53) and img.mode == "L"
    assert np.array_equal(np.asarray(img) > 0, mask > 0)
    assert set(np.unique(np.asarray(img))) <= {0, 255}


def test_npz_is_float16_and_only_appears_on_commit(tmp_path: Path) -> None:
    maps = np.random.default_rng(1).random((3, 29, 31)).astype(np.float32)
    path = write_maps_npz(tmp_path / "maps.npz", [(f"p{i}", maps[i]) for i in range(3)],
                          metadata={"_prompts": ["a", "b", "c"]})
    with np.load(path, allow_pickle=False) as npz:
        assert npz["p1"].dtype == np.float16 and npz["p1"].shape == (29, 31)
        assert np.array_equal(npz["p2"], maps[2].astype(np.float16))
        assert list(npz["_prompts"]) == ["a", "b", "c"]
    w = NpzWriter(tmp_path / "never.npz")
    w.add("x", maps[0])
    w.discard()
    assert not (tmp_path / "never.npz").exists() and not list(tmp_path.glob(".tmp-*"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("frame_of_reference", [False, True])
def test_dicom_seg_round_trip_with_highdicom(tmp_path: Path, frame_of_reference: bool) -> None:
    import highdicom as hd  # a runtime dependency: never skipped
    import pydicom

    src = make_dicom(tmp_path / "src.dcm", frame_of_reference=frame_of_reference)
    source = pydicom.dcmread(src)
    masks = _masks(3, 61, 47)
    masks[2] = 0  # an empty segment is still written
    segments = [SegmentInfo("There is pneumothorax", "There is pneumothorax", 0.5),
                SegmentInfo("left lung", "left lung", 0.4),
                SegmentInfo("effusion", "There is a small left pleural effusion " * 4, 0.7)]
    path = write_dicom_seg(tmp_path / "seg.dcm", src, masks, segments, model_id="radflash-demo-tiny",
                           model_sha256="ab" * 32, series=SegSeries(hd.UID(), instance_number=3))
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 3
    assert seg.get_source_image_uids()[0][2] == source.SOPInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.InstanceNumber == 3
    pix = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3],
                                            combine_segments=False)
    assert pix.shape == (1, 61, 47, 3)
    assert np.array_equal(pix[0].transpose(2, 0, 1), masks)
    desc = seg.SegmentSequence[0]
    alg = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "radflash" and alg.AlgorithmVersion == "radflash-demo-tiny"
    assert "There is pneumothorax" in alg.AlgorithmParameters
    assert seg.SegmentSequence[1].SegmentLabel == "left lung"
    assert len(seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeMeaning) <= 64


def test_dicom_seg_rejects_mismatched_size(tmp_path: Path) -> None:
    src = make_dicom(tmp_path / "src.dcm")
    with pytest.raises(WriteError, match="masks are"):
        write_dicom_seg(tmp_path / "seg.dcm", src, _masks(1, 60, 47), [SegmentInfo("a", "a", 0.5)], model_id="m")
    assert not (tmp_path / "seg.dcm").exists()


def test_nifti_has_one_slice_per_prompt(tmp_path: Path) -> None:
    import nibabel as nib  # in the test extra: never skipped
    masks = _masks(2, 37, 23)
    path = write_nifti(tmp_path / "m.nii.gz", masks, spacing=(0.2, 0.1))
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.shape == (23, 37, 2)
    assert np.array_equal(data.transpose(2, 1, 0), masks)
    assert img.header.get_zooms()[:2] == pytest.approx((0.1, 0.2))


def test_preview_has_source_size_and_shows_masks(tmp_path: Path) -> None:
    from PIL import Image

    h, w = 211, 173
    image = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
    masks = _masks(2, h, w)
    overlays = [Overlay("There is pneumothorax", masks[0], (10, 20), (0, 0, 5, 5), 0.91),
                Overlay("left lung", masks[1], (100, 150), None, 0.4)]
    path = write_preview(tmp_path / "preview.png", image, overlays)
    img = np.asarray(Image.open(path))
    assert img.shape == (h, w, 3)
    plain = np.asarray(render_preview(image, []))
    inside_mask = masks[0].astype(bool) & ~masks[1].astype(bool)
    inside_mask[:60] = False  # away from the legend
    assert inside_mask.any()
    assert (np.abs(img[inside_mask].astype(int) - plain[inside_mask].astype(int)).sum(-1) > 20).all()
    with pytest.raises(WriteError):
        render_preview(image, [Overlay("x", np.zeros((5, 5)), (0, 0))])


def test_dicom_seg_from_a_source_missing_type2_patient_and_study_attributes(tmp_path: Path) -> None:
    """Exports often drop Type 2 attributes (birth date, sex, accession...); the SEG is still written."""
    import highdicom as hd  # a runtime dependency: never skipped
    import pydicom

    src = make_dicom(tmp_path / "src.dcm")
    ds = pydicom.dcmread(src)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
                    "ReferringPhysicianName", "StudyID"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(src)
    masks = _masks(1, 61, 47)
    path = write_dicom_seg(tmp_path / "seg.dcm", src, masks, [SegmentInfo("p", "There is edema", 0.5)],
                           model_id="m")
    seg = hd.seg.segread(path)
    assert seg.PatientBirthDate == "" and seg.get_source_image_uids()[0][2] == ds.SOPInstanceUID
    pix = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1], combine_segments=False)
    assert np.array_equal(pix[0, :, :, 0], masks[0])
