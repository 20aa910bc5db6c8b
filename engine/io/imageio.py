"""Radiograph loader: one file → float32 H×W in [0, 1] with air dark, plus its header metadata.

Two entry points over the same code: :func:`load_image` raises (:class:`SkippedImage` when the
selection rules or the loader's limits exclude the file, :class:`ImageLoadError` when it cannot be
read), and :func:`try_load` never raises and returns a :class:`LoadOutcome` for the status table.

The file type is sniffed from the content, not the suffix: archives are full of DICOM files named
``IM0001`` or with no preamble at all. Selection is decided on a header-only read, so skipped files
never pay for a pixel decode (JPEG 2000 decoding costs ~100× a header parse).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from radflash.errors import ImageLoadError, InputError, RadflashError
from radflash.io.decoders import decode
from radflash.io.dicom_pixels import UnusableImage, check_usable, to_display
from radflash.io.selection import SelectionRules, check, pixel_budget_reason, structural_reason

log = logging.getLogger("radflash.imageio")

Status = Literal["loaded", "skipped", "failed"]

_RASTER_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"GIF8", "gif"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xffO\xffQ", "jpeg2000"),
)
# The first tag of a DICOM stream without preamble: group 0002 (file meta) or 0008, either byte order.
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
_PIXEL_TAG_INTS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float, pixel data
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")  # explicit VRs with a 4-byte length
DEFER_SIZE = 1 << 20  # values above 1 MB are read only when used: a huge private tag costs nothing
HEADER_INFLATE_LIMIT = 16 << 20  # a deflated header is parsed from at most this much inflated data
# A gray image saved as RGB by a lossy codec differs between channels by a few levels, not more.
GRAY_RGB_TOLERANCE = 2
_MAX_REASON = 240


class SkippedImage(RadflashError):
    """The file is readable but excluded (selection rules or loader limits); ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str, meta: ImageMeta | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.meta = meta


@dataclass(frozen=True)
class ImageMeta:
    """Header facts the writers and the selection rules need; DICOM-only fields are None otherwise.

    ``path`` is enough for a DICOM SEG writer to re-read the full source header
    (:meth:`source_dataset`), so the dataset itself is not kept alive per image.
    """

    path: str | None
    kind: str  # dicom | png | jpeg | tiff | bmp | gif | jpeg2000
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    view_hint: str | None = None  # "lateral"/"frontal" from the View Code Sequence when present
    photometric: str | None = None
    rows: int | None = None
    cols: int | None = None
    frames: int | None = None
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    pixel_representation: int | None = None
    transfer_syntax: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # mm (Pixel Spacing, else Imager Pixel Spacing)
    has_pixel_data: bool | None = None  # None: unknown until the full read (deflated files)
    voi: str | None = None  # the VOI transform applied: "window LINEAR c=.. w=..", "voi-lut", "minmax"
    decoder: str | None = None  # the library that decoded the pixels ("gdcm", "native"...): traces a bad decode
    reduction: int = 0  # --fast-decode: resolution levels skipped (pixels are ~2^-r of rows × cols)
    patient_id: str | None = field(default=None, repr=False)  # PHI: kept out of reprs and logs
    patient_name: str | None = field(default=None, repr=False)

    def source_dataset(self, *, stop_before_pixels: bool = True) -> Any:
        """Re-read the source DICOM header (for writers that derive objects from it, e.g. SEG)."""
        if self.kind != "dicom" or not self.path:
            raise InputError(f"{self.path}: not a DICOM file")
        import pydicom

        return pydicom.dcmread(self.path, force=True, stop_before_pixels=stop_before_pixels)


@dataclass(frozen=True)
class DecodedImage:
    """Display-ready pixels (float32 H×W in [0, 1], air dark, MONOCHROME1 already inverted)."""

    pixels: np.ndarray
    meta: ImageMeta

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        # np.asarray(load_image(p)) is the pixel array, so array-consuming code needs no unwrapping.
        return self.pixels if dtype is None else self.pixels.astype(dtype, copy=False)


@dataclass(frozen=True)
class LoadOutcome:
    """What happened to one file: ``image`` is set when loaded; ``meta`` whenever a header was read."""

    path: str
    status: Status
    reason: str | None = None
    image: DecodedImage | None = None
    meta: ImageMeta | None = None


# ---- public API --------------------------------------------------------------------------------
def load_image(path: str | Path, *, rules: SelectionRules | None = None, min_size: int | None = None) -> DecodedImage:
    """Load one radiograph for scoring.

    ``min_size`` (``--fast-decode``): decode a JPEG 2000 / 8-bit JPEG film only at the coarsest
    resolution whose shorter side still covers this many pixels (:func:`radflash.io.decoders.decode_reduced`);
    ``None`` (the default) decodes every pixel, as the reference preprocessing does.

    Raises:
        SkippedImage: excluded by ``rules`` (``None`` = the default chest X-ray rules) or by the
            loader's limits (multi-frame, colour, no decoder...); ``.reason`` is one short line.
        ImageLoadError: unreadable (missing, truncated, not an image, decoder error); the message
            is one line, "path: reason".
    """
    p = Path(path)
    rules = SelectionRules() if rules is None else rules
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise _failure(p, "no such file") from None
    except OSError as exc:  # a symlink loop, permissions
        raise _failure(p, f"cannot read ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    if stat.S_ISDIR(mode):
        raise _failure(p, "is a directory")
    if not stat.S_ISREG(mode):  # a FIFO would block the reader forever; devices never end
        raise _failure(p, "not a regular file")
    try:
        kind = sniff(p)
    except OSError as exc:  # permissions, a file vanishing mid-run, I/O errors on network shares
        raise _failure(p, f"cannot read ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    if kind == "dicom":
        image = _load_dicom(p, rules, min_size)
    elif kind is None:
        raise _failure(p, "not a DICOM or image file")
    else:
        image = _load_raster(p, kind, rules.max_pixels)
    try:
        check_usable(image.pixels)
    except UnusableImage as exc:
        raise _failure(p, str(exc)) from None
    return image


def try_load(path: str | Path, rules: SelectionRules | None = None, *, min_size: int | None = None) -> LoadOutcome:
    """:func:`load_image` that never raises: batch jobs record every file as loaded/skipped/failed."""
    try:
        image = load_image(path, rules=rules, min_size=min_size)
    except SkippedImage as exc:
        return LoadOutcome(str(path), "skipped", exc.reason, meta=exc.meta)
    except ImageLoadError as exc:
        return LoadOutcome(str(path), "failed", getattr(exc, "reason", None) or _one_line(str(exc)))
    except Exception as exc:  # a bug or a decoder's exotic error must not stop an archive run
        return LoadOutcome(str(path), "failed", _one_line(f"{type(exc).__name__}: {exc}"))
    return LoadOutcome(str(path), "loaded", None, image, image.meta)


def fast_loader(min_size: int) -> Callable[[str | Path, SelectionRules | None], LoadOutcome]:
    """The decode workers' loader for ``--fast-decode``: :func:`try_load` with ``min_size`` bound.

    A :func:`functools.partial` of a module-level function, so it pickles into spawn workers and
    keeps the ``(path, rules) → LoadOutcome`` shape every executor already calls.
    """
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise InputError(f"fast decode needs the model input size (a positive integer), got {min_size!r}")
    return functools.partial(try_load, min_size=min_size)


def sniff(path: str | Path) -> str | None:
    """File kind from its first bytes: "dicom", a raster kind ("png", "jpeg"...), or None.

    "DICM" at offset 128 wins over everything else: some DICOM files carry a TIFF header in their
    preamble (dual-personality files) and must not be opened as TIFF.
    """
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _RASTER_MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 8 and head[:2] in _BARE_DICOM_GROUPS:
        return "dicom"  # no preamble: confirmed (or refused) by the header parse
    return None


def read_meta(path: str | Path) -> ImageMeta:
    """Header-only metadata of a DICOM file (cheap: pixel data is never read).

    Raises ImageLoadError when the file is not a parseable DICOM data set.
    """
    p = Path(path)
    with _quiet_pydicom(p):
        return _header_meta(p)


def meta_from_dataset(ds: Any, has_pixel_data: bool | None = None, *, path: str | Path | None = None) -> ImageMeta:
    """ImageMeta from a pydicom dataset; malformed values become None instead of raising.

    ``has_pixel_data=None`` looks for the pixel element in ``ds`` itself.
    """
    if has_pixel_data is None:
        has_pixel_data = "PixelData" in ds
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    filename = getattr(ds, "filename", None)
    if path is None and isinstance(filename, (str, Path)):
        path = filename
    return ImageMeta(
        path=None if path is None else str(path),
        kind="dicom",
        sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(file_meta, "MediaStorageSOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or _text(file_meta, "MediaStorageSOPClassUID"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        view_hint=_view_hint(ds),
        photometric=_text(ds, "PhotometricInterpretation"),
        rows=_int(ds, "Rows"),
        cols=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        transfer_syntax=str(tsyntax) if tsyntax else None,
        pixel_spacing=_spacing(ds),
        has_pixel_data=has_pixel_data,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
    )


# ---- DICOM -------------------------------------------------------------------------------------
@contextmanager
def _quiet_pydicom(path: Path) -> Iterator[None]:
    """pydicom warns for every odd value of every odd file; in an archive run that is noise, so
    the warnings go to the debug log with the file name instead of stderr. (The warnings filter
    is process-global: decode threads share it, which only ever moves warnings to the log.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("%s: %s", path, w.message)


@dataclass
class _Header:
    """A header-only read: the dataset, whether pixel data follows, and what is wrong with the file."""

    ds: Any
    has_pixel_data: bool | None  # None: unknown (a deflated header longer than the inflate cap)
    problem: str | None = None  # "truncated: ..." when the file cannot hold what its header describes
    deflated: bool = False


def _read_header(p: Path) -> _Header:
    """Header-only read that never holds more than a few MB, whatever the file claims.

    Large values are deferred (never read), a deflated data set is inflated only up to
    :data:`HEADER_INFLATE_LIMIT` (pydicom would inflate all of it, even for a header read), and the
    pixel data element is checked against the file size without reading it, so a file cut inside
    or before its pixel data is reported as truncated instead of decoded or skipped.
    """
    import pydicom

    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            file_meta = _peek_file_meta(f)
            tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
            if tsyntax is not None and getattr(tsyntax, "is_deflated", False):
                return _deflated_header(f, file_meta)
            f.seek(0)
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=True, defer_size=DEFER_SIZE)
            pos = f.tell()
            following = f.read(4)
            has_pixels = following in _PIXEL_DATA_TAGS
            problem = None
            if has_pixels:
                problem = _pixel_extent_problem(f, pos, size, _little_endian_of(ds), _native_bytes(ds))
            elif _ends_short(ds, pos):
                problem = "truncated: the file ends inside a data element, before any pixel data"
            elif _describes_image(ds):
                problem = "truncated: the header describes an image but the file ends before its pixel data"
    except Exception as exc:
        raise _failure(p, f"not readable as DICOM ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    if len(ds) == 0:
        raise _failure(p, "not a DICOM or image file (no data elements)")
    return _Header(ds, has_pixels, problem)


def _peek_file_meta(f: Any) -> Any:
    """The file meta group (preamble and group 0002 only; nothing of the data set is read)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    read_preamble(f, True)
    return _read_file_meta_info(f)


def _inflate(f: Any, limit: int) -> tuple[bytes, bool]:
    """Inflate the raw deflate stream at ``f``'s position, stopping after ``limit`` bytes of output
    (a deflate bomb reaches ~1000:1); returns (data, whether the stream ended properly)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    while len(out) <= limit:
        chunk = inflater.unconsumed_tail or f.read(1 << 20)
        if not chunk:
            break
        out += inflater.decompress(chunk, limit + 1 - len(out))
        if inflater.eof:
            break
    return bytes(out), inflater.eof


def _parse_inflated(data: bytes, file_meta: Any, *, header_only: bool) -> tuple[Any, int]:
    """(dataset, offset where parsing stopped) of an inflated explicit-VR little-endian data set."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    buf = DicomBytesIO(data)
    stop = (lambda tag, vr, length: int(tag) in _PIXEL_TAG_INTS) if header_only else None
    ds = read_dataset(buf, False, True, stop_when=stop)
    ds.file_meta = file_meta
    ds.set_original_encoding(False, True)
    return ds, buf.tell()


def _deflated_header(f: Any, file_meta: Any) -> _Header:
    data, complete = _inflate(f, HEADER_INFLATE_LIMIT)
    ds, pos = _parse_inflated(data, file_meta, header_only=True)
    has_pixels: bool | None = data[pos:pos + 4] == _PIXEL_DATA_TAGS[0]
    problem = None
    if not has_pixels and len(data) > HEADER_INFLATE_LIMIT:
        has_pixels = None  # a header longer than the cap: decided by the full (bounded) read
    elif not has_pixels and (not complete or _ends_short(ds, pos) or _describes_image(ds)):
        problem = "truncated: the deflated data set ends before any pixel data"
    return _Header(ds, has_pixels, problem, deflated=True)


def _read_deflated(p: Path, meta: ImageMeta) -> Any:
    """Full read of a deflated file, inflating no more than its header's image needs."""
    expected = _native_bytes_of(meta) or 0
    limit = expected + 2 * HEADER_INFLATE_LIMIT
    with open(p, "rb") as f:
        file_meta = _peek_file_meta(f)
        data, complete = _inflate(f, limit)
    if len(data) > limit:
        raise _failure(p, f"deflated data inflates beyond the {limit} bytes its header describes "
                          f"(decompression bomb?)")
    if not complete:
        raise _failure(p, "truncated: the deflated data stream ends early")
    ds, _ = _parse_inflated(data, file_meta, header_only=False)
    ds.filename = str(p)
    return ds


def _pixel_extent_problem(f: Any, pos: int, size: int, little: bool, native: int | None) -> str | None:
    """Whether the pixel data element at ``pos`` fits in the file (read: its 12-byte header and,
    when encapsulated, the 8-byte header of each fragment; never the pixel bytes themselves)."""
    f.seek(pos)
    head = f.read(12)
    order = "<" if little else ">"
    explicit = head[4:6] in _LONG_VRS
    if len(head) < (12 if explicit else 8):
        return "truncated: the file ends inside the pixel data element header"
    length = struct.unpack(order + "I", head[8:12] if explicit else head[4:8])[0]
    start = pos + (12 if explicit else 8)
    if length == 0xFFFFFFFF:
        return _fragments_problem(f, start, size)
    if start + length > size:
        return f"truncated: the file ends {start + length - size} bytes short of its {length}-byte pixel data"
    if native is not None and length < native:
        return f"truncated: the pixel data holds {length} bytes, its header describes {native}"
    return None


def _fragments_problem(f: Any, pos: int, size: int) -> str | None:
    """Walk encapsulated items (always little endian) up to the sequence delimiter."""
    while True:
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            return "truncated: the file ends inside the encapsulated pixel data"
        length = struct.unpack("<I", item[4:])[0]
        if item[:4] == b"\xfe\xff\xdd\xe0":  # (FFFE,E0DD) sequence delimiter
            return None
        if item[:4] != b"\xfe\xff\x00\xe0" or length == 0xFFFFFFFF:  # (FFFE,E000) item
            return "malformed encapsulated pixel data (no item or delimiter where one must be)"
        pos += 8 + length
        if pos > size:
            return f"truncated: the file ends {pos - size} bytes short of its encapsulated pixel data"


def _ends_short(ds: Any, pos: int) -> bool:
    """True when pydicom's reader stopped inside an element (it drops or shortens a cut element
    silently): the last element read does not end exactly where reading stopped."""
    tags = list(ds.keys())
    if not tags:
        return False
    el = ds.get_item(tags[-1])
    tell, length = getattr(el, "value_tell", None), getattr(el, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return False  # unknown (converted element or undefined length): not claimed to be truncated
    return tell + length != pos


def _describes_image(ds: Any) -> bool:
    """Rows and Columns present: an image header, so missing pixel data means a cut file."""
    return bool(_int(ds, "Rows")) and bool(_int(ds, "Columns"))


def _little_endian_of(ds: Any) -> bool:
    encoding = getattr(ds, "original_encoding", (None, None))
    return encoding[1] is not False


def _native_bytes(ds: Any) -> int | None:
    meta = meta_from_dataset(ds, True)
    return _native_bytes_of(meta)


def _native_bytes_of(meta: ImageMeta) -> int | None:
    """Bytes of uncompressed pixel data the header describes (``None`` if encapsulated/unknown)."""
    if meta.transfer_syntax:
        from pydicom.uid import UID

        uid = UID(meta.transfer_syntax)
        if uid.is_transfer_syntax and uid.is_compressed and not uid.is_deflated:
            return None
    dims = (meta.rows, meta.cols, meta.bits_allocated)
    if any(d is None or d <= 0 for d in dims):
        return None
    bits = meta.rows * meta.cols * max(1, meta.frames or 1) * max(1, meta.samples_per_pixel or 1) * meta.bits_allocated
    return (bits + 7) // 8


def _header_meta(p: Path) -> ImageMeta:
    return _meta_of(p, _read_header(p))


def read_header(path: str | Path) -> tuple[ImageMeta, str | None]:
    """The bounded header read every decode starts with, and nothing more: the file's metadata and
    the integrity problem found without decoding (e.g. pixel data cut short), or None. For callers
    that must accept or refuse a file before any decode (``radflash serve`` acknowledges an
    instance only once it is known to be whole). Raises :class:`ImageLoadError` for an unreadable header."""
    p = Path(path)
    header = _read_header(p)
    return _meta_of(p, header), header.problem


def _meta_of(p: Path, header: _Header) -> ImageMeta:
    return meta_from_dataset(header.ds, header.has_pixel_data, path=p)


def _load_dicom(p: Path, rules: SelectionRules, min_size: int | None = None) -> DecodedImage:
    with _quiet_pydicom(p):  # value conversions are lazy: odd values warn on first access too
        return _decode_dicom(p, rules, min_size)


def _decode_dicom(p: Path, rules: SelectionRules, min_size: int | None = None) -> DecodedImage:
    """Header checks (selection, pixel budget, integrity) first; only then is anything decoded."""
    import pydicom

    header = _read_header(p)
    meta = _meta_of(p, header)
    reason = check(meta, rules)
    if reason and not (header.problem and reason == "no pixel data"):  # cut before its pixels: failed
        raise SkippedImage(p, reason, meta)
    budget = pixel_budget_reason(meta, rules.max_pixels)
    if budget:
        raise _failure(p, budget)
    if header.problem:
        raise _failure(p, header.problem)
    try:
        ds = _read_deflated(p, meta) if header.deflated else pydicom.dcmread(p, force=True, defer_size=DEFER_SIZE)
    except ImageLoadError:
        raise
    except Exception as exc:
        raise _failure(p, f"not readable as DICOM ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    if "PixelData" not in ds:
        if header.deflated and meta.rows:
            raise _failure(p, "truncated: the data set ends before its pixel data")
        raise SkippedImage(p, "no pixel data", dataclasses.replace(meta, has_pixel_data=False))
    if header.deflated:
        meta = meta_from_dataset(ds, True, path=p)
        # the header was longer than the inflate cap: judged only now, in the same order as above
        reason = check(meta, rules)
        if reason:
            raise SkippedImage(p, reason, meta)
        budget = pixel_budget_reason(meta, rules.max_pixels)
        if budget:
            raise _failure(p, budget)
        native = _native_bytes_of(meta)
        if native is not None and len(ds.PixelData) < native:
            raise _failure(p, f"truncated: the pixel data holds {len(ds.PixelData)} bytes, "
                              f"its header describes {native}")
    _ensure_transfer_syntax(ds)
    try:
        decoded = decode(ds, min_size=min_size)  # the fastest installed plugin for this syntax and bit depth
        arr = decoded.array
    except Exception as exc:
        raise _failure(p, f"pixel decode failed ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    if arr.ndim != 2:
        raise SkippedImage(p, f"not a 2-D grayscale frame (decoded shape {arr.shape})", meta)
    try:
        pixels, voi = to_display(arr, ds)
    except UnusableImage as exc:
        raise _failure(p, _one_line(str(exc))) from exc
    except Exception as exc:
        raise _failure(p, f"grayscale transform failed ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    return DecodedImage(pixels, dataclasses.replace(meta, has_pixel_data=True, voi=voi, decoder=decoded.decoder,
                                                    reduction=decoded.reduction))


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without file meta (no preamble, ACR-NEMA style) are native: name the syntax the
    reader detected, which pydicom's pixel handlers need."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    elif implicit is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


# ---- PNG / JPEG / TIFF -------------------------------------------------------------------------
def _load_raster(p: Path, kind: str, max_pixels: int) -> DecodedImage:
    """Pillow image → [0, 1]. Integer images are display-ready already, so they are scaled by
    their type's full range (8-bit /255, 16-bit /65535) rather than stretched; only float images
    (no defined range) are min-max scaled. ``Image.open`` reads only the header, so the pixel
    budget is checked on the declared size before anything is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # our budget (checked below) rules; Pillow's must not be stricter
    try:
        with Image.open(p) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            meta = ImageMeta(path=str(p), kind=kind, rows=im.height, cols=im.width, frames=frames)
            budget = pixel_budget_reason(meta, max_pixels)
            if budget:
                raise _failure(p, budget)
            reason = structural_reason(meta)
            if reason:
                raise SkippedImage(p, reason, meta)
            if kind == "jpeg":
                im = ImageOps.exif_transpose(im)
            im.load()
            pixels, bits, photometric = _raster_pixels(im)
    except (SkippedImage, ImageLoadError):
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check, in Image.open, at 2× its limit
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)) / 1e6:.1f} megapixels" if claimed else "too many pixels"
        raise _failure(p, f"image too large: header claims {size}, above the pixel budget of "
                          f"{max_pixels / 1e6:g} MP (raise it with --max-pixels)") from exc
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise _failure(p, f"image decode failed ({_one_line(f'{type(exc).__name__}: {exc}')})") from exc
    meta = dataclasses.replace(meta, rows=pixels.shape[0], cols=pixels.shape[1], bits_stored=bits,
                               photometric=photometric, samples_per_pixel=1 if pixels.ndim == 2 else 3,
                               decoder="pillow")
    if pixels.ndim != 2:
        raise SkippedImage(p, f"colour image ({photometric})", meta)
    return DecodedImage(np.ascontiguousarray(np.clip(pixels, 0, 1), dtype=np.float32), meta)


def _raster_pixels(im: Any) -> tuple[np.ndarray, int, str]:
    """(float64 pixels, bits per sample, photometric); colour images come back H×W×3."""
    from radflash.io.dicom_pixels import min_max

    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float64) / 65535.0, 16, "MONOCHROME2"
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:  # how Pillow opens many 16-bit PNG/TIFF
            return arr / 65535.0, 16, "MONOCHROME2"
        return min_max(arr), 32, "MONOCHROME2"
    if mode == "F":
        return min_max(np.asarray(im)), 32, "MONOCHROME2"
    if mode in ("1", "L"):
        return np.asarray(im.convert("L")).astype(np.float64) / 255.0, 8, "MONOCHROME2"
    if mode == "LA":
        return np.asarray(im.getchannel("L")).astype(np.float64) / 255.0, 8, "MONOCHROME2"
    rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0), np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0)
    if max(spread) <= GRAY_RGB_TOLERANCE:  # gray stored as RGB/palette: keep it
        return rgb.mean(axis=-1) / 255.0, 8, "MONOCHROME2"
    return rgb / 255.0, 8, "RGB" if mode in ("RGB", "RGBA", "RGBX", "P", "PA") else mode


# ---- helpers -----------------------------------------------------------------------------------
def _failure(path: Path, reason: str) -> ImageLoadError:
    exc = ImageLoadError(f"{path}: {reason}")
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 1] + "…"


def _text(ds: Any, name: str) -> str | None:
    if ds is None:
        return None
    try:
        value = ds.get(name)
    except Exception:  # a malformed element raises on access; the field is just unknown then
        return None
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _int(ds: Any, name: str) -> int | None:
    try:
        value = ds.get(name)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _spacing(ds: Any) -> tuple[float, float] | None:
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(name)
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0:
                    return row, col
        except Exception:
            continue
    return None


def _view_hint(ds: Any) -> str | None:
    try:
        seq = ds.get("ViewCodeSequence")
        meaning = str(seq[0].get("CodeMeaning", "")).lower() if seq else ""
    except Exception:
        return None
    if "lateral" in meaning and "latero-medial" not in meaning and "medio-lateral" not in meaning:
        return "lateral"
    if "postero-anterior" in meaning or "antero-posterior" in meaning:
        return "frontal"
    return None

