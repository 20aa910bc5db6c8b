"""Phantom generator: determinism, geometry, visible findings, speed; DICOM writer and demo archive."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radflash.errors import InputError
from radflash.synthetic.dicom_archive import jpeg2000_available, read_manifest, write_archive, write_dicom
from radflash.training.phantoms import ANATOMY, FINDINGS, allowed_combos, generate_batch, generate_phantom
from tests.tolerances import tolerance


@pytest.mark.parametrize("size", [224, (301, 277), (64, 96)])
def test_deterministic_and_well_formed(size) -> None:
    a = generate_phantom(7, size, p_normal=0.0)
    b = generate_phantom(7, size, p_normal=0.0)
    h, w = (size, size) if isinstance(size, int) else size
    assert a.image.shape == (h, w) and a.image.dtype == np.float32
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0
    assert np.array_equal(a.image, b.image) and a.report == b.report
    assert not np.array_equal(a.image, generate_phantom(8, size).image)
    assert a.findings
    for f in a.findings:
        assert f.name in FINDINGS and f.location in FINDINGS[f.name].locations
        assert f.mask.shape == (h, w) and f.mask.dtype == bool and f.mask.any()
        r0, c0, r1, c1 = f.box
        assert f.mask[r0:r1, c0:c1].sum() == f.mask.sum()  # box is tight and end-exclusive
        assert f.mask[r0, c0:c1].any() and f.mask[r1 - 1, c0:c1].any()
    assert set(a.anatomy) == set(ANATOMY)
    assert all(m.shape == (h, w) and m.any() for m in a.anatomy.values())
    assert not (a.anatomy["left lung"] & a.anatomy["right lung"]).any()
    # patient's right lung is on the image's left
    assert np.nonzero(a.anatomy["right lung"])[1].mean() < np.nonzero(a.anatomy["left lung"])[1].mean()
    for side in ("right", "left"):  # the zones split each lung, upper above lower
        up, low = a.anatomy[f"{side} upper lung"], a.anatomy[f"{side} lower lung"]
        assert np.array_equal(up | low, a.anatomy[f"{side} lung"]) and not (up & low).any()
        assert np.nonzero(up)[0].mean() + 10 < np.nonzero(low)[0].mean()  # rows; the grid may be rotated


def test_zone_findings_lie_in_their_zone() -> None:
    """A nodule placed in a zone sits in that zone's anatomy mask (the map targets rely on it)."""
    for seed in range(6):
        zone = ("right upper lung", "left lower lung", "left upper lung")[seed % 3]
        ph = generate_phantom(seed, 128, findings=[("lung nodule", zone)])
        mask = ph.findings[0].mask
        assert (mask & ph.anatomy[zone]).sum() >= 0.8 * mask.sum(), (seed, zone)


def test_report_does_not_depend_on_size() -> None:
    assert generate_phantom(3, 64).report == generate_phantom(3, 224).report


def test_explicit_findings_and_errors() -> None:
    ph = generate_phantom(1, 128, findings=[("pleural effusion", "left lung"), "cardiomegaly"])
    assert [(f.name, f.location) for f in ph.findings] == [("pleural effusion", "left lung"), ("cardiomegaly", None)]
    assert generate_phantom(1, 128, findings=[]).findings == []
    with pytest.raises(InputError):
        generate_phantom(1, 128, findings=[("pleural effusion", "left upper lung")])
    with pytest.raises(InputError):
        generate_phantom(1, 128, findings=[("edema", None)])
    with pytest.raises(InputError):
        generate_phantom(1, 16)


def test_exclude_and_p_normal() -> None:
    held = {("lung nodule", "left lower lung"), ("consolidation", "right upper lung")}
    seen = set()
    normal = 0
    for seed in range(300):
        ph = generate_phantom(seed, 32, exclude=held)
        normal += not ph.findings
        seen |= {(f.name, f.location) for f in ph.findings}
        assert len(ph.findings) <= 3
    assert not seen & held
    assert seen == set(allowed_combos()) - held  # everything else does occur
    assert 0.2 < normal / 300 < 0.4
    assert all(not generate_phantom(s, 32, p_normal=1.0).findings for s in range(5))


def test_batch_is_deterministic_and_prefix_stable() -> None:
    a = generate_batch(5, 4, 48)
    b = generate_batch(5, 6, 48)
    assert [p.seed for p in a] == [p.seed for p in b[:4]]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert len({p.seed for p in b}) == 6


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` of the mask, outside it (cheap dilation by shifts)."""
    grown = mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        grown = g
    return grown & ~mask


@pytest.mark.parametrize(("finding", "location", "sign"), [
    ("pleural effusion", "right lung", +1), ("pneumothorax", "left upper lung", -1), ("pneumothorax", "right lung", -1),
    ("lung nodule", "left upper lung", +1), ("lung mass", "right lower lung", +1),
    ("consolidation", "left lower lung", +1), ("atelectasis", "right upper lung", +1),
])
def test_findings_are_visible(finding: str, location: str, sign: int) -> None:
    """Inside the mask is clearly brighter (opacities) or darker (pneumothorax) than the surrounding lung."""
    for seed in range(6):
        ph = generate_phantom(seed, 224, findings=[(finding, location)])
        mask = ph.findings[0].mask
        lungs = ph.anatomy["left lung"] | ph.anatomy["right lung"]
        around = _ring(mask, 6) & lungs
        assert around.sum() > 20
        contrast = ph.image[mask].mean() - ph.image[around].mean()
        assert sign * contrast > 0.05, (seed, contrast)


def test_cardiomegaly_enlarges_heart() -> None:
    for seed in range(5):
        normal = generate_phantom(seed, 224, findings=[])
        big = generate_phantom(seed, 224, findings=[("cardiomegaly", None)])
        width = lambda m: np.ptp(np.nonzero(m)[1])
        assert width(big.findings[0].mask) > 1.2 * width(normal.anatomy["heart"])
        assert np.array_equal(big.findings[0].mask, big.anatomy["heart"])


@pytest.mark.parametrize("finding", ["pleural effusion", "pneumothorax"])
def test_segmentation_targets_resolvable_on_16x16(finding: str) -> None:
    """A 16×16 map (14-px patches at 224²) can reach Dice ≥ 0.5: the best patch-level mask does."""
    dices = []
    for seed in range(10):
        m = generate_phantom(seed, 224, findings=[finding]).findings[0].mask
        patches = m.reshape(16, 14, 16, 14).mean(axis=(1, 3)) >= 0.5
        up = np.kron(patches, np.ones((14, 14), bool))
        dices.append(2 * (up & m).sum() / (up.sum() + m.sum()))
    assert np.mean(dices) > 0.7 and min(dices) > 0.5, dices


def test_speed_224() -> None:
    generate_phantom(0, 224)
    n = 40
    start = time.process_time()
    for seed in range(n):
        generate_phantom(seed, 224)
    rate = n / (time.process_time() - start)
    assert rate >= 40, f"{rate:.1f} phantoms/s"  # ~100/s measured on one core; margin for loaded CI


# ---- DICOM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("photometric", "bits", "j2k", "modality"), [
    ("MONOCHROME2", 12, False, "CR"), ("MONOCHROME1", 16, False, "DX"), ("MONOCHROME2", 8, True, "DX"),
    ("MONOCHROME1", 10, True, "CR"),
])
def test_write_dicom_roundtrip(tmp_path: Path, photometric: str, bits: int, j2k: bool, modality: str) -> None:
    if j2k and not jpeg2000_available():
        pytest.skip("no JPEG 2000 encoder")
    ph = generate_phantom(11, (61, 47))
    path = write_dicom(ph, tmp_path / "a.dcm", modality=modality, photometric=photometric, bits_stored=bits,
                       jpeg2000=j2k)
    ds = pydicom.dcmread(path)
    assert ds.Modality == modality and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert ds.BitsStored == bits and ds.PhotometricInterpretation == photometric
    assert ds.file_meta.TransferSyntaxUID.is_compressed == j2k
    values = ds.pixel_array.astype(np.float64) / (2**bits - 1)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    # half a quantisation step, plus the rounding of the stored image (values in [0, 1])
    assert np.abs(values - ph.image).max() <= 0.5 / (2**bits - 1) + tolerance(ph.image.dtype).bound(1.0)
    again = write_dicom(ph, tmp_path / "b.dcm", modality=modality, photometric=photometric, bits_stored=bits,
                        jpeg2000=j2k)
    assert pydicom.dcmread(again).SOPInstanceUID == ds.SOPInstanceUID  # UIDs derive from the seed


def test_write_dicom_rejects_bad_options(tmp_path: Path) -> None:
    img = np.zeros((8, 8), np.float32)
    for kwargs in ({"modality": "MR"}, {"photometric": "RGB"}, {"bits_stored": 7}):
        with pytest.raises(InputError):
            write_dicom(img, tmp_path / "x.dcm", **kwargs)
    with pytest.raises(InputError):
        write_dicom(np.zeros((2, 8, 8)), tmp_path / "x.dcm")


def test_archive_manifest(tmp_path: Path) -> None:
    paths = write_archive(tmp_path, 10, seed=3)
    entries = read_manifest(tmp_path)
    assert [tmp_path / e.path for e in entries] == paths and all(p.is_file() for p in paths)
    counts = {s: sum(e.expected == s for e in entries) for s in ("loaded", "skipped", "failed")}
    assert counts == {"loaded": 10, "skipped": 6, "failed": 3}
    assert any(not p.suffix for p in paths) and any(len(p.relative_to(tmp_path).parts) >= 3 for p in paths)
    for e, p in zip(entries, paths):
        if e.expected == "failed":
            with pytest.raises(Exception):  # noqa: B017 (each broken file fails differently)
                pydicom.dcmread(p).pixel_array  # noqa: B018
        else:
            assert pydicom.dcmread(p).pixel_array.size > 0
    encodings = {e.encoding for e in entries if e.expected == "loaded"}
    assert any("MONOCHROME1" in x for x in encodings) and len({x.split()[2] for x in encodings}) >= 3
    assert write_archive(tmp_path / "again", 10, seed=3) and (tmp_path / "again" / "manifest.json").read_text() == \
        (tmp_path / "manifest.json").read_text()
