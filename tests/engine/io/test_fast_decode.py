"""``--fast-decode``: every reduced decoder against the full decode + resize, levels, and the score wiring.

Bounds are |Δ| on the model's S×S input in [0, 1] (fractions of the display range), measured on
this machine and kept with some margin; the max sits at sharp edges (anatomy borders, collimation),
where a wavelet LL band and the bicubic antialias filter differ most:

* real 1955×1841 15-bit CR (pydicom-data RG1_J2KR), one wavelet level: mean 0.0011, max 0.047;
* generated 3000×2500 12-bit phantom, JPEG 2000, two levels: mean 0.0038, max 0.21 (p99 0.053);
* the same phantom as 8-bit JPEG baseline (quality 90), DCT scaling by 1/4: mean 0.0014, max 0.055.

Pillow's JPEG 2000 decoder returns samples shifted up to 16 bits (the 15-bit CR comes back ×2:
the "wrong values" reported for Pillow's ``reduce``), so the reduced stored values are also
compared with a block mean of the full decode's: a shift left over would double them.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from radflash.archive.decode_pool import resize_for_model
from radflash.io import decoders
from radflash.io.imageio import fast_loader, load_image, try_load
from radflash.preprocess import Preprocessing

S = 518
RADZERO = Preprocessing(S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
LETTERBOX = Preprocessing(S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), letterbox=S)
CR_BOUNDS = (0.0025, 0.06)  # (mean, max) |Δ| for the real CR
FILM_BOUNDS = (0.006, 0.25)  # for the generated 3000×2500 phantom film (JPEG 2000)
JPEG_BOUNDS = (0.003, 0.08)  # the same phantom, JPEG baseline, DCT-scaled


@pytest.fixture(scope="module")
def phantom_films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 3000×2500 phantom radiograph as JPEG 2000 (12-bit, MONOCHROME1) and JPEG baseline (8-bit)."""
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from radflash.synthetic.dicom_archive import write_dicom
    from radflash.synthetic.phantoms import generate_phantom

    folder = tmp_path_factory.mktemp("fast-decode")
    phantom = generate_phantom(7, (3000, 2500))
    j2k = write_dicom(phantom, folder / "film-j2k.dcm", photometric="MONOCHROME1", bits_stored=12, jpeg2000=True)
    native = write_dicom(phantom, folder / "film-8bit.dcm", bits_stored=8)
    ds = pydicom.dcmread(native)
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=90)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    jpeg = folder / "film-jpeg.dcm"
    ds.save_as(jpeg, enforce_file_format=True)
    return {"j2k": j2k, "jpeg": jpeg, "native": native}


def _cr(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom-data's {name} is part of the test install"
    return Path(path)


def _differences(path: Path, geometry: Preprocessing) -> tuple[float, float, int]:
    full, fast = load_image(path), load_image(path, min_size=S)
    a, b = resize_for_model(full.pixels, geometry), resize_for_model(fast.pixels, geometry)
    d = np.abs(a.astype(np.float64) - b)
    return float(d.mean()), float(d.max()), fast.meta.reduction


@pytest.mark.parametrize(("rows", "cols", "min_size", "cap", "levels"), [
    (1955, 1841, 518, None, 1),  # the real CR: 920 ≥ 518 > 460
    (3000, 2500, 518, None, 2),  # 625 ≥ 518 > 312
    (2500, 3000, 518, None, 2),  # landscape: the shorter side decides
    (1036, 1500, 518, None, 1),  # exactly 2 × 518
    (1035, 1500, 518, None, 0),  # one pixel short
    (518, 518, 518, None, 0),
    (3000, 2500, 224, None, 3),
    (4300, 3500, 64, None, 5),
    (4300, 3500, 64, 3, 3),  # capped: libjpeg's 1/8, or the codestream's own levels
    (3000, 2500, 0, None, 0),
])
def test_reduction_levels(rows: int, cols: int, min_size: int, cap: int | None, levels: int) -> None:
    assert decoders.reduction_levels(rows, cols, min_size, cap) == levels


def test_j2k_header_of_the_real_cr() -> None:
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(_cr("RG1_J2KR.dcm"))
    head = decoders.j2k_header(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert head is not None
    assert (head.width, head.height, head.precision, head.signed, head.components) == (1841, 1955, 15, False, 1)
    assert head.levels >= 1
    assert decoders.j2k_header(b"not a codestream") is None


def test_reduced_stored_values_keep_their_range() -> None:
    """The reduced 15-bit CR against a 2×2 block mean of its full decode: no bit shift left over."""
    import pydicom

    ds = pydicom.dcmread(_cr("RG1_J2KR.dcm"))
    reduced = decoders.decode_reduced(ds, S)
    assert reduced is not None and reduced.reduction == 1
    full = decoders.decode(pydicom.dcmread(_cr("RG1_J2KR.dcm"))).array.astype(np.float64)
    h, w = full.shape[0] // 2, full.shape[1] // 2
    block = full[:2 * h, :2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
    got = reduced.array[:h, :w].astype(np.float64)
    assert reduced.array.shape == (978, 921)
    assert abs(got.mean() / block.mean() - 1) < 0.01
    assert np.median(np.abs(got - block)) < 0.01 * (full.max() - full.min())


@pytest.mark.parametrize("geometry", [RADZERO, LETTERBOX], ids=["resize", "letterbox"])
def test_real_cr_fast_matches_full(geometry: Preprocessing) -> None:
    mean, worst, levels = _differences(_cr("RG1_J2KR.dcm"), geometry)
    assert levels == 1
    assert mean <= CR_BOUNDS[0] and worst <= CR_BOUNDS[1], (mean, worst)


@pytest.mark.parametrize("geometry", [RADZERO, LETTERBOX], ids=["resize", "letterbox"])
def test_generated_film_fast_matches_full(phantom_films: dict[str, Path], geometry: Preprocessing) -> None:
    mean, worst, levels = _differences(phantom_films["j2k"], geometry)
    assert levels == 2
    assert mean <= FILM_BOUNDS[0] and worst <= FILM_BOUNDS[1], (mean, worst)


def test_jpeg_baseline_dct_scaling_matches_full(phantom_films: dict[str, Path]) -> None:
    image = load_image(phantom_films["jpeg"], min_size=S)
    assert image.meta.decoder == "pillow (DCT-scaled)" and image.pixels.shape == (750, 625)
    mean, worst, levels = _differences(phantom_films["jpeg"], RADZERO)
    assert levels == 2
    assert mean <= JPEG_BOUNDS[0] and worst <= JPEG_BOUNDS[1], (mean, worst)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "rle"])
def test_syntaxes_without_reduction_decode_in_full(name: str, tmp_path: Path) -> None:
    """Explicit little endian and RLE cannot skip resolution: decoded fully, no error, same pixels."""
    path = _cr(name) if name.endswith(".dcm") else _rle_copy(tmp_path)
    full, fast = load_image(path), load_image(path, min_size=S)
    assert fast.meta.reduction == 0 and fast.meta.decoder == full.meta.decoder
    np.testing.assert_array_equal(fast.pixels, full.pixels)


def _rle_copy(folder: Path) -> Path:
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_cr("RG1_UNCR.dcm"))
    ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.save_as(folder / "rg1-rle.dcm", enforce_file_format=True)
    return folder / "rg1-rle.dcm"


def test_default_loader_is_the_full_decode() -> None:
    outcome = try_load(_cr("RG1_J2KR.dcm"))
    assert outcome.image is not None and outcome.image.meta.reduction == 0
    assert outcome.image.pixels.shape == (1955, 1841)
    assert outcome.image.meta.decoder == "pylibjpeg-openjpeg"


def test_fast_loader_pickles_for_spawn_workers() -> None:
    loader = pickle.loads(pickle.dumps(fast_loader(S)))
    outcome = loader(_cr("RG1_J2KR.dcm"), None)
    assert outcome.status == "loaded" and outcome.image.meta.reduction == 1
    with pytest.raises(Exception, match="positive integer"):
        fast_loader(0)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 1200×1100 phantoms (JPEG 2000, explicit LE, RLE): the demo model's 168² input is
    reached from the JPEG 2000 one at two levels; the others cannot reduce."""
    from radflash.synthetic.dicom_archive import write_dicom
    from radflash.synthetic.phantoms import generate_phantom

    folder = tmp_path_factory.mktemp("fast-score")
    for i, (stem, syntax) in enumerate({"j2k": "1.2.840.10008.1.2.4.90", "explicit": None,
                                        "rle": "1.2.840.10008.1.2.5"}.items()):
        write_dicom(generate_phantom(20 + i, (1200, 1100)), folder / f"{stem}.dcm", transfer_syntax=syntax)
    return folder


def test_score_fast_decode_records_mode_and_agreement(small_archive: Path, tmp_path: Path) -> None:
    from radflash.archive.verb import score

    fast = score(small_archive, tmp_path / "fast", workers=1, fast_decode=True, progress=False)
    manifest = json.loads((tmp_path / "fast" / "manifest.json").read_text())
    decode = manifest["decode"]
    assert decode["mode"] == "fast" and decode["min_size"] == manifest["model"]["image_size"]  # demo: 168
    assert decode["agreement"]["probes"] == 3 and decode["agreement"]["reduced_probes"] == 1
    assert decode["agreement"]["max_abs_dprob"] <= 0.02 and decode["agreement"]["within"]
    decoders_used = dict(zip((Path(p).name for p in fast.status.column("path").to_pylist()),
                             fast.status.column("decoder").to_pylist()))
    assert decoders_used == {"j2k.dcm": "pillow (openjpeg, reduced)", "explicit.dcm": "native",
                             "rle.dcm": "pylibjpeg-rle"}
    assert fast.scored == 3


def test_score_default_is_full_decode_and_unchanged(small_archive: Path) -> None:
    """Off by default: the default run decodes in full, and its probabilities are those of the
    reference path (full load_image → resize → model.score; 1e-6 allows for batch composition)."""
    from radflash.api import as_model
    from radflash.archive.verb import score

    run = score(small_archive, None, workers=0, progress=False)
    assert run.manifest["decode"] == {"mode": "full", "agreement": None}
    assert "reduced" not in " ".join(run.status.column("decoder").to_pylist())
    model = as_model(None)
    names = list(run.manifest["findings"])
    prompts = [run.manifest["findings"][n]["prompt"] for n in names]
    for row in run.results.to_pylist():
        pixels = resize_for_model(load_image(row["path"]).pixels, model.preprocessing.geometry)
        ref = model.score(images=pixels, prompts=prompts).probs.cpu().numpy()[0]
        np.testing.assert_allclose(np.float32([row[f"{n}.prob"] for n in names]), ref, rtol=0, atol=1e-6)


def test_a_resume_refuses_another_decode_mode(tmp_path) -> None:
    from radflash.archive.verb import DEMO_ARCHIVE, score
    from radflash.errors import InputError

    film = DEMO_ARCHIVE / "patient00" / "study0" / "img000.dcm"
    score([film], tmp_path / "out", workers=0, progress=False)
    with pytest.raises(InputError, match=r"decode full ≠ fast \(--fast-decode\)"):
        score([film], tmp_path / "out", workers=0, progress=False, resume=True, fast_decode=True)
