"""Phantoms as DICOM files, and demo archives that look like a hospital export.

The engine's loader and selection rules must be tested on what archives really contain: chest
CR/DX in several encodings, photometric interpretations and bit depths, mixed with knees,
laterals, CT/MR slices, multi-frame and colour objects, and broken files, in nested folders with
or without ``.dcm`` suffixes. :func:`write_archive` builds such a folder deterministically and
records what each file is in ``manifest.json``, so tests can check the engine's counts.

Expected status per file (the engine's ``loaded | skipped | failed``): chest frontal CR/DX →
``loaded``; other body parts, laterals, CT/MR, multi-frame, RGB → ``skipped`` (nothing is wrong
with them; they are just not frontal chest films); truncated/garbage/text files → ``failed``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from radflash.errors import InputError

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "OT-MF": "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
}
MANIFEST = "manifest.json"


def _uid(seed: int, *parts: object) -> str:
    # a UUID-derived OID (2.25.<128-bit int>) from a hash: the same seed always gives the same UIDs
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def jpeg2000_available() -> bool:
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless

    return bool(get_encoder(JPEG2000Lossless).is_available)


def _base_dataset(*, modality: str, sop_class: str, seed: int, patient_name: str | None, patient_id: str | None,
                  body_part: str, view: str | None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_uid = _uid(seed, "sop", modality)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.SeriesInstanceUID = _uid(seed, "series", modality)
    ds.PatientName = patient_name or f"PHANTOM^{seed:06d}"
    ds.PatientID = patient_id or f"PH{seed:08d}"
    ds.StudyDate = "20240101"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "radflash phantom"
    return ds


def _set_pixels(ds, pixels: np.ndarray, *, bits_stored: int, photometric: str, frames: int | None = None) -> None:
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = int(pixels.shape[-2 if photometric != "RGB" else -3]), int(
        pixels.shape[-1 if photometric != "RGB" else -2])
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16).tobytes()


def write_dicom(
    phantom_or_image,
    path: str | Path,
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    jpeg2000: bool = False,
    transfer_syntax: str | None = None,
    seed: int | None = None,
    body_part: str = "CHEST",
    view: str | None = "PA",
    patient_name: str | None = None,
    patient_id: str | None = None,
) -> Path:
    """Write a phantom (or an H×W float image in [0, 1]) as a single-frame CR/DX DICOM file.

    Pixels are quantised to ``bits_stored`` bits; MONOCHROME1 stores them inverted, with a VOI
    window covering the full range, as modalities do. ``jpeg2000=True`` stores JPEG 2000 lossless
    (needs pylibjpeg-openjpeg); ``transfer_syntax`` names any lossless syntax pydicom can write:
    explicit/implicit little endian, deflated, RLE or JPEG 2000 lossless (a UID). The
    UIDs derive from ``seed`` (default: the phantom's seed).
    """
    image = getattr(phantom_or_image, "image", phantom_or_image)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"write_dicom needs an H×W image, got shape {image.shape}")
    if modality not in ("CR", "DX"):
        raise InputError(f"modality must be CR or DX, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= int(bits_stored) <= 16:
        raise InputError(f"bits_stored must be 8..16, got {bits_stored}")
    if seed is None:
        seed = int(getattr(phantom_or_image, "seed", 0))
    top = (1 << bits_stored) - 1
    values = np.clip(image, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    stored = np.rint(values * top)
    ds = _base_dataset(modality=modality, sop_class=SOP_CLASSES[modality], seed=seed, patient_name=patient_name,
                       patient_id=patient_id, body_part=body_part, view=view)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.WindowCenter = top / 2
    ds.WindowWidth = top + 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    _set_pixels(ds, stored, bits_stored=bits_stored, photometric=photometric)
    _encode(ds, "1.2.840.10008.1.2.4.90" if jpeg2000 else transfer_syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _encode(ds, syntax: str | None) -> None:
    """Store ``ds``'s native pixels in ``syntax`` (``None``: explicit VR little endian, as built)."""
    from pydicom import uid

    if syntax is None or syntax == uid.ExplicitVRLittleEndian:
        return
    if syntax in (uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom re-encodes (deflates) on save
        return
    if syntax == uid.JPEG2000Lossless and not jpeg2000_available():
        raise InputError("JPEG 2000 encoding needs pylibjpeg-openjpeg: pip install pylibjpeg pylibjpeg-openjpeg")
    if syntax not in (uid.JPEG2000Lossless, uid.RLELossless):
        raise InputError(f"write_dicom cannot store transfer syntax {syntax}")
    ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def _write_other(path: Path, *, modality: str, seed: int, pixels: np.ndarray, body_part: str,
                 photometric: str = "MONOCHROME2", frames: int | None = None, bits: int = 12) -> Path:
    sop = SOP_CLASSES["OT-MF" if frames else modality]
    ds = _base_dataset(modality=modality, sop_class=sop, seed=seed, patient_name=None, patient_id=None,
                       body_part=body_part, view=None)
    _set_pixels(ds, pixels, bits_stored=bits, photometric=photometric, frames=frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass(frozen=True)
class ArchiveEntry:
    path: str  # relative to the archive folder
    kind: str  # chest-frontal | non-chest | lateral | ct | mr | multiframe | rgb | truncated | garbage | text
    expected: str  # loaded | skipped | failed
    encoding: str = ""  # e.g. "CR MONOCHROME1 12-bit J2K"
    findings: tuple[str, ...] = ()


def write_archive(out_dir: str | Path, n: int, seed: int, *, mix: bool = True) -> list[Path]:
    """A demo archive of ``n`` chest films (plus, with ``mix``, the clutter real archives hold).

    Writes ``manifest.json`` (one :class:`ArchiveEntry` per file) next to the files; returns the
    file paths in manifest order. Read it back with :func:`read_manifest`.
    """
    from radflash.synthetic.phantoms import generate_phantom

    if n < 0:
        raise InputError(f"n must be ≥ 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xD1C0]))
    j2k = jpeg2000_available()
    entries: list[ArchiveEntry] = []
    for i in range(n):
        ph = generate_phantom(int(rng.integers(2**31)), int(rng.choice([224, 256, 301])))
        modality = ("CR", "DX")[i % 2]
        photometric = "MONOCHROME1" if (mix and i % 3 == 2) else "MONOCHROME2"
        bits = (12, 8, 16, 10)[i % 4] if mix else 12
        use_j2k = mix and j2k and i % 4 == 1
        folder = f"patient{i % 3:02d}/study{i % 2}"
        name = f"img{i:03d}.dcm" if (not mix or i % 5 != 4) else f"IM{i:05d}"  # archives drop suffixes
        rel = f"{folder}/{name}"
        write_dicom(ph, out / rel, modality=modality, photometric=photometric, bits_stored=bits, jpeg2000=use_j2k,
                    seed=int(seed) * 100003 + i)
        enc = f"{modality} {photometric} {bits}-bit{' J2K' if use_j2k else ''}"
        entries.append(ArchiveEntry(rel, "chest-frontal", "loaded", enc, tuple(f.name for f in ph.findings)))
    if mix:
        base = int(seed) * 100003 + 50000
        knee = generate_phantom(base, 128).image
        write_dicom(knee, out / "other/knee.dcm", modality="DX", body_part="KNEE", seed=base + 1)
        entries.append(ArchiveEntry("other/knee.dcm", "non-chest", "skipped", "DX KNEE"))
        lateral = generate_phantom(base + 2, 160).image
        write_dicom(lateral, out / "other/lateral.dcm", modality="CR", view="LL", seed=base + 2)
        entries.append(ArchiveEntry("other/lateral.dcm", "lateral", "skipped", "CR LL"))
        slice_ = (rng.random((64, 64)) * 4000).astype(np.uint16)
        _write_other(out / "other/ct/slice001.dcm", modality="CT", seed=base + 3, pixels=slice_, body_part="CHEST")
        entries.append(ArchiveEntry("other/ct/slice001.dcm", "ct", "skipped", "CT"))
        _write_other(out / "other/mr/MR0001", modality="MR", seed=base + 4, pixels=slice_, body_part="HEAD")
        entries.append(ArchiveEntry("other/mr/MR0001", "mr", "skipped", "MR"))
        frames = (rng.random((3, 64, 64)) * 4000).astype(np.uint16)
        _write_other(out / "other/multiframe.dcm", modality="DX", seed=base + 5, pixels=frames, body_part="CHEST",
                     frames=3)
        entries.append(ArchiveEntry("other/multiframe.dcm", "multiframe", "skipped", "OT 3 frames"))
        rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        _write_other(out / "other/screenshot.dcm", modality="OT", seed=base + 6, pixels=rgb, body_part="CHEST",
                     photometric="RGB", bits=8)
        entries.append(ArchiveEntry("other/screenshot.dcm", "rgb", "skipped", "OT RGB"))
        good = generate_phantom(base + 7, 96).image
        full = write_dicom(good, out / "broken/truncated.dcm", seed=base + 7).read_bytes()
        (out / "broken/truncated.dcm").write_bytes(full[: len(full) // 2])
        entries.append(ArchiveEntry("broken/truncated.dcm", "truncated", "failed"))
        (out / "broken/random.dcm").write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
        entries.append(ArchiveEntry("broken/random.dcm", "garbage", "failed"))
        (out / "broken/notes.dcm").write_text("This is a text file, not a DICOM image.\n")
        entries.append(ArchiveEntry("broken/notes.dcm", "text", "failed"))
    (out / MANIFEST).write_text(json.dumps([asdict(e) for e in entries], indent=1) + "\n")
    return [out / e.path for e in entries]


def read_manifest(out_dir: str | Path) -> list[ArchiveEntry]:
    data = json.loads((Path(out_dir) / MANIFEST).read_text())
    return [ArchiveEntry(**{**d, "findings": tuple(d.get("findings", ()))}) for d in data]
