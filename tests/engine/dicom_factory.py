"""Synthetic DICOM files for loader tests: every pixel-level feature in a few hundred bytes.

Real files cover the common paths; these cover the combinations no small public file has
(signed CR data, 12-in-16 bits with garbage high bits, big-endian, deflate, RLE, LUT sequences,
each VOI LUT Function) with values chosen by the test, so expected outputs can be computed
independently of the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
SOP_CLASS = {"CR": CR_STORAGE, "DX": DX_STORAGE}


def make_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    bits_allocated: int | None = None,
    bits_stored: int | None = None,
    signed: bool | None = None,
    raw: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attrs: Any,
) -> FileDataset:
    """A single-frame grayscale image dataset holding ``pixels`` (or ``raw`` stored words).

    ``raw`` lets a test store words whose unused high bits are garbage (BitsStored < BitsAllocated),
    which a conforming reader must mask or sign-extend; keyword ``attrs`` become DICOM keywords
    (``BodyPartExamined="CHEST"``, ``WindowCenter=...``).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    signed = bool(np.issubdtype(pixels.dtype, np.signedinteger)) if signed is None else signed
    bits_allocated = bits_allocated or (8 if pixels.dtype.itemsize == 1 else 16)
    bits_stored = bits_stored or bits_allocated
    stored = raw if raw is not None else pixels
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")

    meta = FileMetaDataset()
    sop_class = SOP_CLASS.get(modality, UID("1.2.840.10008.5.1.4.1.1.7"))  # else Secondary Capture
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    compress_to = UID(str(transfer_syntax)) if UID(str(transfer_syntax)) == RLELossless else None
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if compress_to else UID(str(transfer_syntax))
    ds = FileDataset("synthetic", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "SYNTH-001"
    ds.PatientName = "Synthetic^Patient"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    little = meta.TransferSyntaxUID != ExplicitVRBigEndian
    words = np.ascontiguousarray(stored).astype(dtype.newbyteorder("<" if little else ">"))
    ds.PixelData = words.tobytes()
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    for key, value in attrs.items():
        setattr(ds, key, value)
    if compress_to is not None:  # pydicom's own RLE encoder: no optional plugin needed
        ds.compress(compress_to, encoding_plugin="pydicom")
    return ds


def lut_item(data: Any, first: int, bits: int = 16, *, explanation: str = "test LUT") -> Dataset:
    """One Modality/VOI LUT sequence item (LUT Data as US values, descriptor as US)."""
    data = [int(v) for v in data]
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data) % 65536, int(first) % 65536, bits])  # LUTDescriptor
    item.add_new(0x00283003, "LO", explanation)  # LUTExplanation
    item.add_new(0x00283006, "US", data)  # LUTData
    return item


def with_modality_lut(ds: Dataset, data: Any, first: int, bits: int = 16) -> Dataset:
    item = lut_item(data, first, bits)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    return ds


def with_voi_lut(ds: Dataset, data: Any, first: int, bits: int = 16) -> Dataset:
    ds.VOILUTSequence = Sequence([lut_item(data, first, bits)])
    return ds


def write(ds: FileDataset, path: str | Path, *, preamble: bool = True) -> Path:
    """Write ``ds``; ``preamble=False`` writes a bare data set (no preamble, no "DICM", no meta),
    in the encoding its transfer syntax names, as old modalities and some PACS exports do."""
    path = Path(path)
    tsyntax = ds.file_meta.TransferSyntaxUID
    if preamble:
        dcmwrite(path, ds, enforce_file_format=True)
        return path
    bare = Dataset()
    bare.update(ds)
    dcmwrite(path, bare, implicit_vr=tsyntax == ImplicitVRLittleEndian, little_endian=tsyntax != ExplicitVRBigEndian)
    return path


__all__ = [
    "CR_STORAGE", "DX_STORAGE", "DeflatedExplicitVRLittleEndian", "ExplicitVRBigEndian", "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian", "RLELossless", "lut_item", "make_dataset", "with_modality_lut", "with_voi_lut", "write",
]


def write_deflated_zeros(path: str | Path, rows: int, cols: int, **attrs: Any) -> Path:
    """A deflated 16-bit image of ``rows × cols`` zeros, streamed: never holds the pixels in memory.

    A decompression bomb: 12000 × 12000 inflates from ~280 KB to 288 MB (and a reader that decodes
    it to float64 needs gigabytes). The data set is encoded with pydicom, the pixel element and its
    zeros are appended to the deflate stream chunk by chunk.
    """
    import struct
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = make_dataset(np.zeros((2, 2), np.uint16), **attrs)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n_bytes = rows * cols * 2
    body.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", n_bytes))
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        fh.write(meta.getvalue())
        fh.write(deflater.compress(body.getvalue()))
        chunk = bytes(1 << 24)
        left = n_bytes
        while left:
            fh.write(deflater.compress(chunk[:min(left, len(chunk))]))
            left -= min(left, len(chunk))
        fh.write(deflater.flush())
    return path
