"""The pixels the model sees are the pixels a DICOM viewer shows: radflash against DCMTK.

Reference: DCMTK's ``dcmj2pnm`` (``dcml2pnm`` for JPEG-LS) renders each file through its Modality
LUT, VOI LUT or window and MONOCHROME1 inversion into a 16-bit PNG, scaled here to [0, 1]. DCMTK is
given radflash's VOI choice (first VOI LUT, else first window, else min-max); where radflash fell
back from a window to min-max because the window maps every pixel to one value, DCMTK's render of
that window must indeed be constant (so the fallback is checked too, not assumed).

Tolerance: mean |Δ| ≤ 0.01 and 99th percentile ≤ 0.03 of the display range. DCMTK quantises its
VOI output to the PNG's 16 bits and computes windows in its own fixed-point steps; a real
disagreement (wrong LUT entry, missed inversion, wrong sign extension) moves whole bands of pixels
by ≫ 0.03.

1. Every single-frame grayscale image of pydicom's test files and pydicom-data that DCMTK renders.
   A file radflash refuses is skipped with its reason (listed by ``-ra``); a refusal for a missing
   decoder fails the test unless it is 12-bit JPEG Extended (GPL libjpeg, opt-in).
2. Generated images for each VOI path (VOI LUT sequence; LINEAR, LINEAR_EXACT and SIGMOID windows;
   signed pixels with rescale; MONOCHROME1 with and without a window; 8/12/15/16 bits stored),
   each in every lossless syntax the install decodes, encoded by DCMTK (OpenJPEG for JPEG 2000).
   The decoded stored values must equal the original exactly, and the display must match DCMTK's
   render of the uncompressed original.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files

from radflash.io import decoders
from radflash.io.imageio import SkippedImage, load_image, try_load
from radflash.io.selection import SelectionRules
from tests.engine import dicom_factory as F
from tests.engine.io.dcmtk import JPEG_2000, encode, render, require_dcmtk

MEAN_TOL, P99_TOL = 0.01, 0.03
RULES = SelectionRules.any_image()


def _grayscale_single_frame(path: str) -> bool:
    """Cheap header test (no pixels): one frame, one sample, MONOCHROME1/2, pixel data present."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
            photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    except Exception:  # unreadable header: not an image this test can compare
        return False
    return "Rows" in ds and frames == 1 and samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")


_BY_NAME = {Path(p).name: p for p in get_testdata_files()}
CORPUS = sorted((p for p in get_testdata_files() if _grayscale_single_frame(p)), key=lambda p: Path(p).name)


def _voi_choice(ds: Any) -> str:
    """DCMTK's option for the VOI radflash applies first: VOI LUT, else window, else min-max."""
    if ds.get("VOILUTSequence"):
        return "voi-lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "minmax"


def _used(voi: str) -> str:
    """radflash's ``meta.voi`` ("window LINEAR c=.. w=..", "voi-lut", "minmax") → the VOI kind."""
    return "window" if voi.startswith("window") else voi


def _compare(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs DCMTK {reference.shape}"
    diff = np.abs(ours.astype(np.float64) - reference)
    mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
    assert mean <= MEAN_TOL and p99 <= P99_TOL, f"{what}: mean |Δ| {mean:.4f}, p99 {p99:.4f} vs DCMTK"


def _conform(path: Path, tmp_path: Path, *, transfer_syntax: str | None = None) -> np.ndarray:
    """radflash's display of ``path`` checked against DCMTK's render of the same file."""
    image = load_image(path, rules=RULES)
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    choice, used = _voi_choice(header), _used(image.meta.voi or "minmax")
    if used != choice:  # radflash fell back to min-max: only when the first VOI shows one value
        assert used == "minmax", f"{path.name}: radflash applied {image.meta.voi}, the file's first VOI is {choice}"
        shown, why = render(path, tmp_path / "first.png", choice, transfer_syntax)
        assert shown is not None, f"{path.name}: DCMTK cannot render: {why}"
        assert float(shown.max() - shown.min()) <= 1 / 255, (
            f"{path.name}: radflash fell back to min-max but DCMTK shows the {choice} with a range of "
            f"{float(shown.max() - shown.min()):.3f}")
    reference, why = render(path, tmp_path / "ref.png", used, transfer_syntax)
    assert reference is not None, f"{path.name}: DCMTK cannot render: {why}"
    _compare(image.pixels, reference, path.name)
    return image.pixels


# ---- 1. real files -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", CORPUS, ids=[f"{Path(p).parent.name}/{Path(p).name}" for p in CORPUS])
def test_real_file_matches_dcmtk(path: str, tmp_path: Path) -> None:
    require_dcmtk()
    p = Path(path)
    header = pydicom.dcmread(p, stop_before_pixels=True, force=True)
    uid = str(header.file_meta.get("TransferSyntaxUID", "")) if getattr(header, "file_meta", None) else ""
    outcome = try_load(p, RULES)
    if outcome.status != "loaded":
        reason = outcome.reason or ""
        if reason.startswith(decoders.MISSING_DECODER):
            bits = int(header.get("BitsStored") or 8)
            assert uid == decoders.JPEG_EXTENDED and bits > 8, f"{p.name}: refused on the default install: {reason}"
            assert decoders.LIBJPEG_INSTALL in reason
        pytest.skip(f"radflash refuses {p.name}: {reason}")
    if uid in JPEG_2000:  # DCMTK has no JPEG 2000 codec: compare with its render of the uncompressed twin
        twin = _uncompressed_twin(p)
        if twin is None:
            pytest.skip(f"{p.name}: DCMTK has no JPEG 2000 decoder and the corpus no uncompressed twin")
        image = load_image(p, rules=RULES)
        reference, why = render(twin, tmp_path / "twin.png", _used(image.meta.voi or "minmax"))
        assert reference is not None, f"{twin.name}: DCMTK cannot render: {why}"
        _compare(image.pixels, reference, f"{p.name} (DCMTK: {twin.name})")
        return
    reference, why = render(p, tmp_path / "probe.png", "minmax", uid)
    if reference is None:
        pytest.skip(f"DCMTK does not render {p.name}: {why}")
    _conform(p, tmp_path, transfer_syntax=uid)


def _uncompressed_twin(path: Path) -> Path | None:
    """The corpus' uncompressed copy of a JPEG 2000 file (RG1_J2KR.dcm → RG1_UNCR.dcm...)."""
    name = path.name
    for old, new in (("_J2KR", "_UNCR"), ("_J2KI", "_UNCI"), ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
                     ("MR_small_jp2klossless.dcm", "MR_small.dcm")):
        if old in name:
            twin = _BY_NAME.get(name.replace(old, new))  # pydicom's files and pydicom-data's share twins
            return Path(twin) if twin else None
    return None


def test_the_corpus_holds_what_the_issue_names() -> None:
    """The comparison above is only worth something if the corpus has the syntaxes it is about."""
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID", ""))
                for p in CORPUS}
    assert {decoders.JPEG_LOSSLESS_SV1, decoders.JPEG_LS_LOSSLESS, decoders.RLE_LOSSLESS,
            "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes
    assert len(CORPUS) >= 50


# ---- 2. generated VOI paths × lossless syntaxes -------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    bits_stored: int
    signed: bool = False
    photometric: str = "MONOCHROME2"
    attrs: tuple[tuple[str, Any], ...] = ()
    voi_lut: bool = False


CASES = (
    Case("voi-lut-12bit", 12, voi_lut=True),
    Case("linear-12bit", 12, attrs=(("WindowCenter", 2100), ("WindowWidth", 2600))),
    Case("linear-exact-12bit", 12, attrs=(("WindowCenter", 1900.5), ("WindowWidth", 3100.25),
                                          ("VOILUTFunction", "LINEAR_EXACT"))),
    Case("sigmoid-12bit", 12, attrs=(("WindowCenter", 2048), ("WindowWidth", 1800), ("VOILUTFunction", "SIGMOID"))),
    Case("signed-rescale-16bit", 16, signed=True, attrs=(("RescaleSlope", 0.5), ("RescaleIntercept", 100),
                                                         ("WindowCenter", 120), ("WindowWidth", 900))),
    Case("mono1-window-12bit", 12, photometric="MONOCHROME1", attrs=(("WindowCenter", 1800), ("WindowWidth", 3000))),
    Case("mono1-minmax-12bit", 12, photometric="MONOCHROME1"),
    Case("minmax-8bit", 8),
    Case("window-15bit", 15, attrs=(("WindowCenter", 16000), ("WindowWidth", 20000))),
    Case("window-16bit", 16, attrs=(("WindowCenter", 30000), ("WindowWidth", 50000))),
)
LOSSLESS = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian (the original)
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    decoders.RLE_LOSSLESS,
    decoders.JPEG_LOSSLESS_SV1,
    decoders.JPEG_LOSSLESS,
    decoders.JPEG_LS_LOSSLESS,
    decoders.JPEG_2000_LOSSLESS,
)
SHAPE = (67, 91)  # odd sizes: no codec tile or row length lines up by accident


def _pixels(case: Case, rng: np.random.Generator) -> np.ndarray:
    """A smooth ramp with noise over the whole stored range (every window edge and LUT entry hit)."""
    lo, hi = (-(2 ** (case.bits_stored - 1)), 2 ** (case.bits_stored - 1) - 1) if case.signed \
        else (0, 2**case.bits_stored - 1)
    ramp = np.linspace(0.0, 1.0, SHAPE[0] * SHAPE[1]).reshape(SHAPE)
    values = lo + (hi - lo) * np.clip(ramp + rng.normal(0, 0.05, SHAPE), 0, 1)
    dtype = (np.int16 if case.signed else np.uint16) if case.bits_stored > 8 else np.uint8
    return np.rint(values).astype(dtype)


def _original(case: Case, tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    pixels = _pixels(case, rng)
    ds = F.make_dataset(pixels, bits_stored=case.bits_stored, photometric=case.photometric, signed=case.signed,
                        BodyPartExamined="CHEST", ViewPosition="PA", **dict(case.attrs))
    if case.voi_lut:  # a gamma-like curve over the 12-bit range, 16-bit entries
        entries = np.rint(65535 * np.linspace(0, 1, 4096) ** 0.6).astype(int)
        F.with_voi_lut(ds, entries, 0, 16)
    return F.write(ds, tmp_path / f"{case.name}.dcm"), pixels


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_voi_paths_match_dcmtk_in_every_lossless_syntax(case: Case, tmp_path: Path) -> None:
    require_dcmtk()
    rng = np.random.default_rng(np.random.randint(2**31))
    original, pixels = _original(case, tmp_path, rng)
    reference_display = _conform(original, tmp_path)  # radflash vs DCMTK on the uncompressed file
    refused = {}
    for uid in LOSSLESS[1:]:
        encoded = encode(original, tmp_path / f"{uid}.dcm", uid)
        reason = decoders.decoder_reason(uid, case.bits_stored, int(case.signed))
        if reason is not None:
            refused[uid] = reason
            with pytest.raises(SkippedImage, match="encapsulated without decoder"):
                load_image(encoded, rules=RULES)
            continue
        ds = pydicom.dcmread(encoded)
        stored = decoders.decode(ds)
        np.testing.assert_array_equal(stored.array, pixels, err_msg=f"{case.name} in {uid} ({stored.decoder})")
        image = load_image(encoded, rules=RULES)
        assert image.meta.decoder == stored.decoder
        np.testing.assert_array_equal(image.pixels, reference_display, err_msg=f"{case.name} in {uid}")
    # the default install decodes every lossless syntax a CR/DX archive holds
    assert not refused, refused
