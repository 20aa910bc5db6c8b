"""Loader tests: real public DICOM files (pydicom, pydicom-data) plus synthetic edge cases.

Expected display values are computed here in float64 straight from the PS3.3 C.11 formulas,
independently of radflash.io.dicom_pixels, and compared with the loader's float32 output.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from radflash.errors import ImageLoadError, RadflashError
from radflash.io.dicom_pixels import apply_lut, lut_data, min_max, window
from radflash.io.imageio import (
    DecodedImage,
    ImageMeta,
    LoadOutcome,
    SkippedImage,
    load_image,
    read_meta,
    sniff,
    try_load,
)
from radflash.io.selection import SelectionRules
from tests.engine import dicom_factory as F
from tests.tolerances import tolerance

ANY = SelectionRules.any_image()
F32 = tolerance(np.float32).bound(1.0)  # float32 rounding of values in [0, 1], plus the cast of the input
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def local_file(name: str) -> str:
    """A pydicom / pydicom-data test file that is on disk (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None or not os.path.exists(path):
        pytest.skip(f"{name} not installed locally")
    return str(path)


def raw_pixels(name: str) -> np.ndarray:
    return pydicom.dcmread(local_file(name)).pixel_array


# ---- float64 references: PS3.3 C.11.2.1.2 with output range [0, 1] ------------------------------
def linear_ref(x: float, c: float, w: float) -> float:
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 1.0
    return (x - (c - 0.5)) / (w - 1) + 0.5


def linear_exact_ref(x: float, c: float, w: float) -> float:
    if x <= c - w / 2:
        return 0.0
    if x > c + w / 2:
        return 1.0
    return (x - c) / w + 0.5


def sigmoid_ref(x: float, c: float, w: float) -> float:
    z = -4 * (x - c) / w
    return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))


REFS = {"LINEAR": linear_ref, "LINEAR_EXACT": linear_exact_ref, "SIGMOID": sigmoid_ref}


def window_ref(values: np.ndarray, c: float, w: float, function: str = "LINEAR") -> np.ndarray:
    ref = REFS[function]
    return np.array([ref(float(v), c, w) for v in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))


def minmax_ref(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return (v - v.min()) / (v.max() - v.min())


# ---- the window / LUT functions themselves -------------------------------------------------------
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40, 400), (0.5, 1), (2047.5, 4096), (-600, 1500), (13, 2.5)])
def test_window_matches_standard_formulas(function: str, center: float, width: float) -> None:
    if function == "LINEAR" and width < 1:
        pytest.skip("LINEAR needs width ≥ 1")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(center - 2 * width, center + 2 * width, 997),
                        [center, center - 0.5, center - width / 2, center + width / 2, center - 0.5 + (width - 1) / 2]])
    got = window(x, center, width, function)
    np.testing.assert_allclose(got, window_ref(x, center, width, function), rtol=0, atol=1e-12)
    assert got.dtype == np.float64 and got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_agrees_with_pydicom(function: str) -> None:
    """pydicom maps the window onto the stored range [0, 2^16 − 1]; rescaled, it must equal ours."""
    from pydicom.pixels import apply_windowing

    x = np.arange(0, 65536, 7, dtype=np.uint16).reshape(1, -1)
    ds = F.make_dataset(x, WindowCenter=30000, WindowWidth=12001, VOILUTFunction=function)
    theirs = apply_windowing(x, ds) / 65535.0
    np.testing.assert_allclose(window(x, 30000, 12001, function), theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("function", "width"), [("LINEAR", 0.5), ("LINEAR_EXACT", 0), ("SIGMOID", -1), ("GAMMA", 10)])
def test_window_rejects_invalid(function: str, width: float) -> None:
    with pytest.raises(ValueError):
        window(np.zeros(3), 0, width, function)


def test_linear_width_one_is_a_threshold() -> None:
    np.testing.assert_array_equal(window(np.array([9.0, 9.5, 9.6, 10.0]), 10, 1), [0, 0, 1, 1])


def test_min_max_guards_constant_and_nan() -> None:
    np.testing.assert_array_equal(min_max(np.full((3, 4), 7.0)), np.zeros((3, 4)))
    np.testing.assert_allclose(min_max(np.array([1.0, np.nan, 3.0])), [0.0, 0.0, 1.0])


def test_lut_clamps_below_first_and_past_end() -> None:
    entries = np.array([10.0, 20.0, 30.0])
    np.testing.assert_array_equal(apply_lut(np.array([-5, 4, 5, 6, 7, 100]), entries, 5), [10, 10, 10, 20, 30, 30])


# ---- real files: the pydicom-data CR chest radiograph RG1 ----------------------------------------
@pytest.fixture(scope="module")
def rg1() -> dict[str, LoadOutcome]:
    """RG1 (CR, MONOCHROME1, chest PA, 15-bit): UNCR is the source of J2KR (lossless) and
    UNCI is J2KI (lossy) decoded and stored uncompressed."""
    return {n: try_load(local_file(f"RG1_{n}.dcm")) for n in ("UNCR", "J2KR", "J2KI", "UNCI")}


def test_rg1_is_a_chest_pa_radiograph(rg1: dict[str, LoadOutcome]) -> None:
    ds = pydicom.dcmread(local_file("RG1_J2KR.dcm"), stop_before_pixels=True)
    for name, outcome in rg1.items():
        assert outcome.status == "loaded", (name, outcome.reason)
        meta = outcome.image.meta
        assert (meta.kind, meta.modality, meta.photometric, meta.body_part, meta.view_position) == (
            "dicom", "CR", "MONOCHROME1", "CHEST", "PA")
        assert (meta.rows, meta.cols, meta.bits_stored) == (ds.Rows, ds.Columns, 15)
        assert outcome.image.pixels.shape == (ds.Rows, ds.Columns) and outcome.image.pixels.dtype == np.float32
    meta = rg1["J2KR"].image.meta
    assert meta.sop_instance_uid == ds.SOPInstanceUID and meta.study_instance_uid == ds.StudyInstanceUID
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.90" and meta.voi.startswith("window LINEAR")
    assert meta.pixel_spacing is None or all(s > 0 for s in meta.pixel_spacing)


def test_rg1_lossless_jpeg2000_equals_uncompressed(rg1: dict[str, LoadOutcome]) -> None:
    np.testing.assert_array_equal(raw_pixels("RG1_J2KR.dcm"), raw_pixels("RG1_UNCR.dcm"))
    np.testing.assert_array_equal(rg1["J2KR"].image.pixels, rg1["UNCR"].image.pixels)
    np.testing.assert_array_equal(rg1["J2KI"].image.pixels, rg1["UNCI"].image.pixels)  # same decoded lossy data


def test_rg1_lossy_jpeg2000_is_close(rg1: dict[str, LoadOutcome]) -> None:
    diff = np.abs(rg1["J2KI"].image.pixels - rg1["UNCR"].image.pixels)
    assert diff.mean() < 5e-3 and diff.max() < 0.05


def test_rg1_monochrome1_window_and_inversion_against_formula(rg1: dict[str, LoadOutcome]) -> None:
    raw = raw_pixels("RG1_UNCR.dcm")
    ds = pydicom.dcmread(local_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    # vectorised C.11.2.1.2.1 (checked against the scalar reference on a sample just below)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    x = raw.astype(np.float64)
    linear = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    sample = x.ravel()[::9973]
    np.testing.assert_allclose(linear.ravel()[::9973], window_ref(sample, c, w), atol=1e-12)
    got = rg1["UNCR"].image.pixels
    np.testing.assert_allclose(got, 1.0 - linear, rtol=0, atol=F32)
    # MONOCHROME1: the largest stored value is displayed darkest, the smallest brightest.
    assert got.flat[np.argmax(raw)] == got.min() and got.flat[np.argmin(raw)] == got.max()


# ---- real files: pydicom's small images with Modality LUT / rescale / VOI -------------------------
@pytest.mark.parametrize("name", ["693_UNCI.dcm", "MR2_UNCI.dcm", "MR_small.dcm"])
def test_rescale_then_window_against_formula(name: str) -> None:
    ds = pydicom.dcmread(local_file(name))
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = float(np.ravel(ds.WindowCenter)[0]), float(np.ravel(ds.WindowWidth)[0])
    got = load_image(local_file(name), rules=ANY).pixels
    np.testing.assert_allclose(got, window_ref(values, c, w), rtol=0, atol=F32)


def test_rescale_without_window_is_min_max() -> None:
    ds = pydicom.dcmread(local_file("CT_small.dcm"))
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = load_image(local_file("CT_small.dcm"), rules=ANY)
    np.testing.assert_allclose(image.pixels, minmax_ref(values), rtol=0, atol=F32)
    assert image.meta.voi == "minmax"


def test_modality_lut_sequence_file_against_formula() -> None:
    ds = pydicom.dcmread(local_file("mlut_18.dcm"))
    item = ds.ModalityLUTSequence[0]
    n, first, _ = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(pydicom.pixels.apply_modality_lut(np.arange(first, first + n), ds), dtype=np.float64)
    idx = np.clip(ds.pixel_array.astype(np.int64) - first, 0, n - 1)
    np.testing.assert_allclose(load_image(local_file("mlut_18.dcm"), rules=ANY).pixels, minmax_ref(lut[idx]),
                               rtol=0, atol=F32)


def test_voi_lut_sequence_file_against_formula() -> None:
    ds = pydicom.dcmread(local_file("vlut_04.dcm"))
    entries, first, _ = lut_data(ds.VOILUTSequence[0])
    assert entries.size == int(ds.VOILUTSequence[0].LUTDescriptor[0])
    idx = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries.size - 1)
    expected = (entries[idx] - entries.min()) / (entries.max() - entries.min())
    image = load_image(local_file("vlut_04.dcm"), rules=ANY)
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=F32)
    assert image.meta.voi == "voi-lut"


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
                                  "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_padded.dcm"])
def test_every_encoding_of_one_image_gives_the_same_pixels(name: str) -> None:
    reference = load_image(local_file("MR_small.dcm"), rules=ANY).pixels
    np.testing.assert_array_equal(load_image(local_file(name), rules=ANY).pixels, reference)


# ---- real files that must be skipped or failed, each with its reason -----------------------------
ODD_FILES = [
    # name, rules, status, reason fragment
    ("MR_small.dcm", None, "skipped", "modality MR not in CR/DX"),
    ("CT_small.dcm", None, "skipped", "modality CT not in CR/DX"),
    ("RG3_UNCI.dcm", None, "skipped", "body part EXTREMITY"),
    ("liver_1frame.dcm", None, "skipped", "not a radiograph: SEG"),
    ("liver.dcm", ANY, "skipped", "not a radiograph: SEG"),
    ("test-SR.dcm", None, "skipped", "not a radiograph: SR"),
    ("rtplan.dcm", ANY, "skipped", "not a radiograph: RTPLAN"),
    ("rtdose_1frame.dcm", ANY, "skipped", "not a radiograph: RTDOSE"),
    ("waveform_ecg.dcm", ANY, "skipped", "not a radiograph: ECG"),
    ("ExplVR_BigEndNoMeta.dcm", ANY, "skipped", "not a radiograph: RTPLAN"),
    ("rtplan_truncated.dcm", ANY, "skipped", "not a radiograph"),
    ("badVR.dcm", ANY, "skipped", "not a radiograph: RTDOSE"),
    ("empty_charset_LEI.dcm", ANY, "skipped", "no pixel data"),
    ("no_meta_group_length.dcm", ANY, "skipped", "no pixel data"),
    ("SC_rgb.dcm", ANY, "skipped", "colour image (RGB)"),
    ("SC_rgb_2frame.dcm", ANY, "skipped", "multi-frame (2 frames)"),
    ("SC_ybr_full_uncompressed.dcm", ANY, "skipped", "colour image (YBR_FULL)"),
    ("US1_J2KR.dcm", ANY, "skipped", "colour image (YBR_RCT)"),
    ("OBXXXX1A.dcm", ANY, "skipped", "colour image (PALETTE COLOR)"),
    ("emri_small.dcm", ANY, "skipped", "multi-frame (10 frames)"),
    ("eCT_Supplemental.dcm", ANY, "skipped", "multi-frame (2 frames)"),
    # 12-bit JPEG Extended: libjpeg (GPL, opt-in) only; the reason names its install line
    ("JPGExtended.dcm", ANY, "skipped",
     "encapsulated without decoder (1.2.840.10008.1.2.4.51; 12-bit JPEG Extended needs the GPL libjpeg: "
     "pip install 'radflash[libjpeg]')"),
    ("MR_truncated.dcm", ANY, "failed", "truncated: the file ends 62 bytes short of its 8192-byte pixel data"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", ANY, "failed", "pixel decode failed"),
    ("meta_missing_tsyntax.dcm", ANY, "failed", "Bits Allocated"),
    ("no_meta.dcm", ANY, "failed", "not a DICOM or image file"),
    ("rtplan.dump", ANY, "failed", "not a DICOM or image file"),
    ("zipMR.gz", ANY, "failed", "not a DICOM or image file"),
    ("crayons.icc", ANY, "failed", "not a DICOM or image file"),
]


@pytest.mark.parametrize(("name", "rules", "status", "reason"), ODD_FILES, ids=[f"{r[0]}-{r[2]}" for r in ODD_FILES])
def test_odd_real_files_are_skipped_or_failed_with_a_reason(name: str, rules, status: str, reason: str) -> None:
    path = PYDICOM_FILES / name
    if not path.exists():
        path = Path(local_file(name))
    outcome = try_load(path, rules)
    assert (outcome.status, outcome.image) == (status, None), outcome
    assert reason in outcome.reason and "\n" not in outcome.reason
    expected = SkippedImage if status == "skipped" else ImageLoadError
    with pytest.raises(expected) as info:
        load_image(path, rules=rules)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_skipped_files_are_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self):
        raise AssertionError("pixel data decoded for a skipped file")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    outcome = try_load(local_file("RG3_J2KR.dcm"))  # EXTREMITY: skipped from the header alone
    assert outcome.status == "skipped" and outcome.meta.modality == "CR"


# ---- synthetic DICOM: encodings, bit depths, LUTs, windows ----------------------------------------
def ramp(shape=(37, 53), lo=0, hi=4095, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(1)
    arr = rng.integers(lo, hi + 1, shape).astype(dtype)
    arr.flat[0], arr.flat[1] = lo, hi  # the full range is present, so min-max is predictable
    return arr


CHEST = {"BodyPartExamined": "CHEST", "ViewPosition": "PA"}


@pytest.mark.parametrize("ts", [F.ExplicitVRLittleEndian, F.ImplicitVRLittleEndian, F.ExplicitVRBigEndian,
                                F.DeflatedExplicitVRLittleEndian, F.RLELossless], ids=lambda t: t.name)
def test_12_bits_in_16_with_garbage_high_bits(tmp_path: Path, ts: str) -> None:
    arr = ramp()
    junk = (np.random.default_rng(2).integers(0, 16, arr.shape).astype(np.uint16) << 12)
    raw = None if ts == F.RLELossless else arr | junk  # RLE stores exactly what it is given
    path = F.write(F.make_dataset(arr, bits_stored=12, raw=raw, transfer_syntax=ts, **CHEST), tmp_path / "x.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, arr)  # pydicom masks the unused bits
    image = load_image(path)
    np.testing.assert_allclose(image.pixels, minmax_ref(arr), rtol=0, atol=F32)
    assert image.meta.transfer_syntax == ts and image.meta.bits_stored == 12


def test_signed_12_bit_pixels_are_sign_extended(tmp_path: Path) -> None:
    arr = ramp(lo=-2048, hi=2047, dtype=np.int16)
    raw = ((arr.astype(np.int32) & 0x0FFF) | 0xA000).astype(np.uint16).view(np.int16)  # garbage high nibble
    path = F.write(F.make_dataset(arr, bits_stored=12, raw=raw, signed=True, RescaleSlope=2, RescaleIntercept=-100,
                                  WindowCenter=-100, WindowWidth=5000, **CHEST), tmp_path / "signed.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, arr)
    values = arr.astype(np.float64) * 2 - 100
    np.testing.assert_allclose(load_image(path).pixels, window_ref(values, -100, 5000), rtol=0, atol=F32)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_in_files(tmp_path: Path, function: str) -> None:
    arr = ramp()
    ds = F.make_dataset(arr, WindowCenter=[1500, 3000], WindowWidth=[1000, 200], VOILUTFunction=function, **CHEST)
    image = load_image(F.write(ds, tmp_path / "w.dcm"))
    np.testing.assert_allclose(image.pixels, window_ref(arr, 1500, 1000, function), rtol=0, atol=F32)  # first window
    assert image.meta.voi == f"window {function} c=1500 w=1000"


def test_invalid_window_falls_back_to_min_max(tmp_path: Path) -> None:
    arr = ramp()
    image = load_image(F.write(F.make_dataset(arr, WindowCenter=100, WindowWidth=0, **CHEST), tmp_path / "w0.dcm"))
    np.testing.assert_allclose(image.pixels, minmax_ref(arr), rtol=0, atol=F32)
    assert image.meta.voi == "minmax"


def test_modality_lut_sequence_then_window(tmp_path: Path) -> None:
    arr = ramp(hi=1023)
    lut = (np.sqrt(np.arange(1024)) * 100).astype(np.uint16)  # a non-linear detector response
    ds = F.with_modality_lut(F.make_dataset(arr, bits_stored=10, WindowCenter=1600, WindowWidth=1800, **CHEST),
                             lut, first=0)
    got = load_image(F.write(ds, tmp_path / "mlut.dcm")).pixels
    np.testing.assert_allclose(got, window_ref(lut[arr].astype(np.float64), 1600, 1800), rtol=0, atol=F32)


def test_voi_lut_sequence_is_preferred_over_window(tmp_path: Path) -> None:
    arr = ramp(hi=511)
    first = 100
    lut = (4095 * (np.linspace(0, 1, 300) ** 0.5)).astype(np.uint16)  # covers 100..399; rest is clamped
    ds = F.with_voi_lut(F.make_dataset(arr, WindowCenter=256, WindowWidth=512, **CHEST), lut, first=first, bits=12)
    image = load_image(F.write(ds, tmp_path / "vlut.dcm"))
    expected = lut[np.clip(arr.astype(np.int64) - first, 0, lut.size - 1)].astype(np.float64)
    np.testing.assert_allclose(image.pixels, (expected - lut.min()) / (lut.max() - lut.min()), rtol=0, atol=F32)
    assert image.meta.voi == "voi-lut"


def test_monochrome1_synthetic_is_inverted(tmp_path: Path) -> None:
    arr = ramp()
    m1 = load_image(F.write(F.make_dataset(arr, photometric="MONOCHROME1", **CHEST), tmp_path / "m1.dcm")).pixels
    m2 = load_image(F.write(F.make_dataset(arr, photometric="MONOCHROME2", **CHEST), tmp_path / "m2.dcm")).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, rtol=0, atol=F32)


def test_constant_image_fails_instead_of_scoring_zeros(tmp_path: Path) -> None:
    outcome = try_load(F.write(F.make_dataset(np.full((8, 9), 1234, np.uint16), **CHEST), tmp_path / "flat.dcm"))
    assert (outcome.status, outcome.reason) == ("failed", "constant image after the modality LUT (every pixel is 1234)")


@pytest.mark.parametrize("ts", [F.ImplicitVRLittleEndian, F.ExplicitVRLittleEndian, F.ExplicitVRBigEndian],
                         ids=lambda t: t.name)
def test_bare_dataset_without_preamble_or_suffix(tmp_path: Path, ts: str) -> None:
    arr = ramp()
    path = F.write(F.make_dataset(arr, transfer_syntax=ts, **CHEST), tmp_path / "IM0001", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM" and sniff(path) == "dicom"
    image = load_image(path)
    np.testing.assert_allclose(image.pixels, minmax_ref(arr), rtol=0, atol=F32)
    assert image.meta.kind == "dicom" and image.meta.transfer_syntax is None and image.meta.modality == "CR"


def test_meta_fields_and_phi_kept_out_of_repr(tmp_path: Path) -> None:
    ds = F.make_dataset(ramp(), ImagerPixelSpacing=[0.15, 0.2], **CHEST)
    path = F.write(ds, tmp_path / "m.dcm")
    meta = read_meta(path)
    assert (meta.patient_id, meta.patient_name) == ("SYNTH-001", "Synthetic^Patient")
    assert "SYNTH-001" not in repr(meta) and "Synthetic" not in repr(meta)
    assert meta.pixel_spacing == (0.15, 0.2) and meta.has_pixel_data is True
    assert meta.series_instance_uid == ds.SeriesInstanceUID and meta.sop_class_uid == F.CR_STORAGE
    assert meta.source_dataset().SOPInstanceUID == ds.SOPInstanceUID  # what a SEG writer re-reads


# ---- unreadable files -----------------------------------------------------------------------------
def test_unreadable_files_fail_with_one_line(tmp_path: Path) -> None:
    good = F.write(F.make_dataset(ramp(shape=(64, 64)), **CHEST), tmp_path / "good.dcm")
    cases = {
        "truncated.dcm": good.read_bytes()[: good.stat().st_size // 2],
        "empty.dcm": b"",
        "random.bin": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "notes.txt": b"patient list\nnothing to see\n",
        "broken.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        outcome = try_load(tmp_path / name)
        assert outcome.status == "failed" and outcome.reason and "\n" not in outcome.reason, (name, outcome)
    assert try_load(tmp_path / "truncated.dcm").reason.startswith("truncated: the file ends")
    assert try_load(tmp_path / "missing.dcm").reason == "no such file"
    assert try_load(tmp_path).reason == "is a directory"
    with pytest.raises(ImageLoadError, match=r"notes\.txt: not a DICOM or image file$"):
        load_image(tmp_path / "notes.txt")


def test_try_load_never_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from radflash.io import imageio

    def crash(*args, **kwargs):
        raise RuntimeError("decoder exploded\nwith a second line")

    monkeypatch.setattr(imageio, "to_display", crash)
    outcome = try_load(F.write(F.make_dataset(ramp(), **CHEST), tmp_path / "x.dcm"))
    assert outcome.status == "failed" and "decoder exploded" in outcome.reason and "\n" not in outcome.reason
    monkeypatch.setattr(imageio, "load_image", crash)
    outcome = try_load(tmp_path / "x.dcm")
    expected = LoadOutcome(str(tmp_path / "x.dcm"), "failed", "RuntimeError: decoder exploded with a second line")
    assert outcome == expected


def test_skipped_image_carries_reason_and_meta(tmp_path: Path) -> None:
    path = F.write(F.make_dataset(ramp(), BodyPartExamined="CHEST", ViewPosition="LL"), tmp_path / "lat.dcm")
    with pytest.raises(SkippedImage) as info:
        load_image(path)
    assert isinstance(info.value, RadflashError) and info.value.reason == "view LL (lateral)"
    assert info.value.meta.view_position == "LL"
    assert load_image(path, rules=SelectionRules(include_lateral=True)).pixels.shape == (37, 53)


# ---- PNG / JPEG / TIFF ----------------------------------------------------------------------------
def test_png_8_bit(tmp_path: Path) -> None:
    arr = ramp(hi=255, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(image.pixels, arr / 255.0, rtol=0, atol=F32)
    assert (image.meta.kind, image.meta.bits_stored, image.meta.modality) == ("png", 8, None)


def test_png_16_bit_keeps_full_precision(tmp_path: Path) -> None:
    arr = ramp(hi=65535)
    Image.fromarray(arr).save(tmp_path / "b.png")
    image = load_image(tmp_path / "b.png")
    np.testing.assert_allclose(image.pixels, arr / 65535.0, rtol=0, atol=F32)
    assert np.unique(image.pixels).size > 256 and image.meta.bits_stored == 16


def test_tiff_16_bit_and_file_without_suffix(tmp_path: Path) -> None:
    arr = ramp(hi=65535)
    Image.fromarray(arr).save(tmp_path / "c.tif")
    (tmp_path / "c.tif").rename(tmp_path / "scan")
    image = load_image(tmp_path / "scan")
    np.testing.assert_allclose(image.pixels, arr / 65535.0, rtol=0, atol=F32)
    assert image.meta.kind == "tiff"


def test_gray_in_rgb_is_loaded_and_colour_is_skipped(tmp_path: Path) -> None:
    gray = ramp(hi=255, dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray_rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "gray_rgb.png").pixels, gray / 255.0, rtol=0, atol=F32)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray_rgb.jpg", quality=95)
    jpeg = load_image(tmp_path / "gray_rgb.jpg")
    assert jpeg.meta.kind == "jpeg" and np.abs(jpeg.pixels - gray / 255.0).mean() < 0.05
    colour = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    outcome = try_load(tmp_path / "colour.png")
    assert (outcome.status, outcome.reason) == ("skipped", "colour image (RGB)")


def test_multi_frame_tiff_is_skipped(tmp_path: Path) -> None:
    frames = [Image.fromarray(ramp(hi=255, dtype=np.uint8)) for _ in range(3)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    assert try_load(tmp_path / "stack.tif").reason == "multi-frame (3 frames)"


def test_decoded_image_is_array_like(tmp_path: Path) -> None:
    arr = ramp(hi=255, dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert isinstance(image, DecodedImage) and isinstance(image.meta, ImageMeta)
    np.testing.assert_array_equal(np.asarray(image, dtype=np.float32), image.pixels)
