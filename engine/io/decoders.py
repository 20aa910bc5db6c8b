"""Which pixel decoder reads which transfer syntax: the fastest measured one that can, by name.

pydicom offers several plugins per compressed syntax (GDCM, pylibjpeg's libjpeg/openjpeg/rle,
pyjpegls, Pillow, its own RLE) and, left alone, tries them in its own fixed order. We pick per
syntax instead, because the plugins differ by up to an order of magnitude on a 3000×2500 film
(``benchmarks/bench_decoders.py``, results in ``benchmarks/results/decoders_cpu.md``) and some
cannot read every image of a syntax they claim (GDCM and Pillow refuse 12-bit JPEG Extended,
GDCM refuses 6/7-bit JPEG-LS). The plugin that decoded a file is recorded (``ImageMeta.decoder``,
the ``decoder`` column of ``status.parquet``) so a wrong decode can be traced to its library.

Licences: everything the core install decodes with is permissive (GDCM BSD, OpenJPEG BSD,
CharLS BSD via pyjpegls, pylibjpeg-rle MIT, Pillow HPND). The one syntax left is 12-bit JPEG
Extended (1.2.840.10008.1.2.4.51 with more than 8 bits stored), which only libjpeg (GPL-3.0,
pylibjpeg-libjpeg) decodes: it stays opt-in, and every file it would decode is skipped with the
install line in its reason.

Imports nothing heavy at module level: the decode workers load it, and they must stay torch-free.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("radflash.decoders")

# Syntax UIDs (pydicom.uid names), spelled out so this table needs no pydicom import to read.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# The install line for the GPL libjpeg plugin (the only decoder of 12-bit JPEG Extended).
LIBJPEG_INSTALL = "pip install 'radflash[libjpeg]'"
MISSING_DECODER = "encapsulated without decoder"  # reason prefix; the report folds reasons on it

# Per syntax, pydicom plugin names fastest first, as measured on a 3000×2500 12-bit film
# (benchmarks/results/decoders_cpu.md, AMD EPYC, 1 thread): the first one installed and able to
# read the image is used, the others are fallbacks when it raises. 8-bit JPEG: Pillow ~3× faster
# than GDCM or libjpeg (27 vs 77/88 ms); JPEG-LS: pyjpegls (CharLS) ~1.7× GDCM (175 vs 295 ms);
# JPEG 2000: OpenJPEG ≈ Pillow, ~1.2× GDCM; RLE: pylibjpeg-rle ~10× pydicom's numpy decoder.
# JPEG lossless: GDCM and libjpeg within the noise (248 vs 272 ms SV1), GDCM first because it is
# the permissive one every install has. (2 shared cores, load ~5: ratios, not absolute times.)
PREFERENCE: dict[str, tuple[str, ...]] = {
    JPEG_BASELINE: ("pillow", "pylibjpeg", "gdcm"),
    JPEG_EXTENDED: ("pillow", "pylibjpeg", "gdcm"),  # 12-bit: Pillow and GDCM refuse (can_read)
    JPEG_LOSSLESS: ("gdcm", "pylibjpeg"),
    JPEG_LOSSLESS_SV1: ("gdcm", "pylibjpeg"),
    JPEG_LS_LOSSLESS: ("pyjpegls", "gdcm", "pylibjpeg"),
    JPEG_LS_NEAR_LOSSLESS: ("pyjpegls", "gdcm", "pylibjpeg"),
    JPEG_2000_LOSSLESS: ("pylibjpeg", "gdcm", "pillow"),
    JPEG_2000: ("pylibjpeg", "gdcm", "pillow"),
    HTJ2K_LOSSLESS: ("pylibjpeg",),
    HTJ2K_LOSSLESS_RPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
    RLE_LOSSLESS: ("pylibjpeg", "pydicom"),
}

# The package behind a plugin name for a syntax (pydicom's "pylibjpeg" is three libraries).
_PYLIBJPEG_PART = {JPEG_2000_LOSSLESS: "openjpeg", JPEG_2000: "openjpeg", HTJ2K_LOSSLESS: "openjpeg",
                   HTJ2K_LOSSLESS_RPCL: "openjpeg", HTJ2K: "openjpeg", RLE_LOSSLESS: "rle"}
_INSTALL = {"gdcm": "pip install python-gdcm", "pyjpegls": "pip install pyjpegls",
            "openjpeg": "pip install pylibjpeg pylibjpeg-openjpeg", "rle": "pip install pylibjpeg pylibjpeg-rle",
            "libjpeg": LIBJPEG_INSTALL}

# The syntaxes a CR/DX archive holds, in the order `radflash doctor` lists them.
ARCHIVE_SYNTAXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    (RLE_LOSSLESS, "RLE Lossless"),
    (JPEG_BASELINE, "JPEG Baseline (8-bit)"),
    (JPEG_EXTENDED, "JPEG Extended (8-bit)"),
    (JPEG_EXTENDED, "JPEG Extended (12-bit)"),
    (JPEG_LOSSLESS, "JPEG Lossless (Process 14)"),
    (JPEG_LOSSLESS_SV1, "JPEG Lossless SV1 (Process 14, Selection Value 1)"),
    (JPEG_LS_LOSSLESS, "JPEG-LS Lossless"),
    (JPEG_LS_NEAR_LOSSLESS, "JPEG-LS Near-Lossless"),
    (JPEG_2000_LOSSLESS, "JPEG 2000 Lossless"),
    (JPEG_2000, "JPEG 2000"),
    (HTJ2K_LOSSLESS, "HTJ2K Lossless"),
    (HTJ2K_LOSSLESS_RPCL, "HTJ2K Lossless RPCL"),
    (HTJ2K, "HTJ2K"),
)


def package_of(plugin: str, transfer_syntax: str) -> str:
    """The library a pydicom plugin name stands for on this syntax ("pylibjpeg" → "pylibjpeg-openjpeg")."""
    if plugin == "pylibjpeg":
        return f"pylibjpeg-{_PYLIBJPEG_PART.get(str(transfer_syntax), 'libjpeg')}"
    return plugin


def can_read(plugin: str, transfer_syntax: str, bits_stored: int | None, pixel_representation: int | None = 0,
             lossy: bool = False) -> bool:
    """Whether ``plugin`` decodes this image, beyond claiming the syntax.

    The limits are those the plugins themselves raise on (pydicom 3.0's gdcm and pillow plugins):
    a file sent there would fail instead of going to a plugin that reads it.
    """
    uid, bits = str(transfer_syntax), bits_stored or 8
    if plugin in ("gdcm", "pillow") and uid == JPEG_EXTENDED and bits > 8:
        return False  # 12-bit JPEG Extended: libjpeg only
    if plugin == "pillow" and uid in (JPEG_BASELINE, JPEG_EXTENDED) and bits > 8:
        return False
    jpeg_ls = uid in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS)
    signed_lossy_small = uid == JPEG_LS_NEAR_LOSSLESS and pixel_representation == 1 and bits < 8
    return not (plugin == "gdcm" and jpeg_ls and (bits in (6, 7) or signed_lossy_small))


def installed_plugins(transfer_syntax: str) -> tuple[str, ...]:
    """pydicom plugins installed for this syntax (() when none, or when pydicom has no decoder)."""
    from pydicom.pixels import get_decoder

    try:
        return tuple(get_decoder(str(transfer_syntax)).available_plugins)
    except NotImplementedError:
        return ()


def usable_plugins(transfer_syntax: str, bits_stored: int | None = None,
                   pixel_representation: int | None = 0) -> tuple[str, ...]:
    """Installed plugins able to read this image, fastest first (the preference, then any other)."""
    uid = str(transfer_syntax)
    installed = installed_plugins(uid)
    order = [p for p in PREFERENCE.get(uid, ()) if p in installed] + [p for p in installed
                                                                        if p not in PREFERENCE.get(uid, ())]
    return tuple(p for p in order if can_read(p, uid, bits_stored, pixel_representation))


def missing_hint(transfer_syntax: str, bits_stored: int | None = None) -> str:
    """The install line that adds a decoder for this syntax (and bit depth)."""
    uid, bits = str(transfer_syntax), bits_stored or 8
    if uid == JPEG_EXTENDED and bits > 8:
        return f"12-bit JPEG Extended needs the GPL libjpeg: {LIBJPEG_INSTALL}"
    if uid in _PYLIBJPEG_PART:
        return _INSTALL[_PYLIBJPEG_PART[uid]]
    if uid in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS):
        return f"{_INSTALL['pyjpegls']} (or python-gdcm)"
    return _INSTALL["gdcm"]  # JPEG baseline/extended 8-bit and JPEG lossless


def decoder_reason(transfer_syntax: str | None, bits_stored: int | None = None,
                   pixel_representation: int | None = 0) -> str | None:
    """Why no installed decoder can read this syntax and bit depth (``None`` when one can).

    The reason names the syntax and the install line that fixes it, so a status table tells the
    user what to install without a look at the docs.
    """
    if not transfer_syntax:
        return None  # no file meta: pydicom reads the data set as native (uncompressed) data
    from pydicom.uid import UID

    uid = UID(str(transfer_syntax))
    if not uid.is_transfer_syntax:
        return f"unknown transfer syntax ({uid})"
    if uid.is_deflated or not uid.is_compressed:
        return None
    if not installed_plugins(uid) and uid not in PREFERENCE:
        return f"{MISSING_DECODER} ({uid})"  # a syntax no pydicom plugin reads at all
    if usable_plugins(uid, bits_stored, pixel_representation):
        return None
    return f"{MISSING_DECODER} ({uid}; {missing_hint(uid, bits_stored)})"


@dataclass(frozen=True)
class Decoded:
    """Stored pixel values and the library that produced them."""

    array: Any  # numpy array
    decoder: str  # "native", "native (deflate)", "gdcm", "pylibjpeg-openjpeg", ...
    reduction: int = 0  # resolution levels skipped (fast decode): the array is ~2^-r of Rows × Columns


def decode(ds: Any, *, min_size: int | None = None) -> Decoded:
    """Decode ``ds``'s pixel data with the fastest usable plugin; the next ones on its error.

    A compressed file reaches this only after :func:`decoder_reason` said some plugin can read it;
    if every plugin raises, the first error (the preferred decoder's) is re-raised.

    ``min_size`` (``--fast-decode``): the model input's side. A JPEG 2000 or 8-bit JPEG film is
    then decoded at the coarsest resolution whose shorter side still covers it
    (:func:`decode_reduced`), with the stored-value range unchanged, so the Modality/VOI LUTs
    apply as they do to the full decode; any other syntax, or a file the reduced path cannot
    vouch for, is decoded in full as usual.
    """
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    from pydicom.uid import UID

    if min_size is not None and uid in REDUCIBLE:
        reduced = decode_reduced(ds, min_size)
        if reduced is not None:
            return reduced
    tsyntax = UID(uid) if uid else None
    if tsyntax is None or not tsyntax.is_transfer_syntax or not tsyntax.is_compressed or tsyntax.is_deflated:
        return Decoded(ds.pixel_array, "native (deflate)" if tsyntax is not None and tsyntax.is_deflated
                       else "native")
    bits = _int(ds.get("BitsStored"))
    plugins = usable_plugins(uid, bits, _int(ds.get("PixelRepresentation")))
    first_error: Exception | None = None
    for plugin in plugins:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return Decoded(ds.pixel_array, package_of(plugin, uid))
        except Exception as exc:  # any plugin error: the next plugin may still read the file
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise NotImplementedError(f"{MISSING_DECODER} ({uid}; {missing_hint(uid, bits)})")


# ---- reduced-resolution decode (--fast-decode) ---------------------------------------------------
# Syntaxes whose codestream can be decoded at a fraction of its resolution for a fraction of the
# cost: JPEG 2000 by stopping the inverse wavelet transform r levels early (OpenJPEG's decoded-
# resolution factor, reached through Pillow: pylibjpeg-openjpeg 2.6 does not expose it), 8-bit JPEG
# by libjpeg's DCT scaling (1/2, 1/4, 1/8). Both keep the stored-value range: the LL band of the
# reversible 5/3 and irreversible 9/7 wavelets has unit DC gain, and a scaled IDCT averages.
REDUCIBLE = frozenset({JPEG_2000_LOSSLESS, JPEG_2000, JPEG_BASELINE, JPEG_EXTENDED})
MAX_DCT_REDUCTION = 3  # libjpeg scales by 1/2, 1/4 or 1/8 at most


def reduction_levels(rows: int, cols: int, min_size: int, max_levels: int | None = None) -> int:
    """The largest r with min(rows, cols) / 2^r ≥ ``min_size`` (0 when even r = 1 falls short),
    capped at ``max_levels`` (the codestream's wavelet levels, or libjpeg's 3 DCT scalings).

    The shorter side decides so that the model's resize still goes *down* in both directions
    (a letterbox scales the longer side to S, which the shorter-side rule covers too).
    """
    if min_size < 1 or rows < 1 or cols < 1:
        return 0
    r, short = 0, min(rows, cols)
    while short / 2 ** (r + 1) >= min_size and (max_levels is None or r + 1 <= max_levels):
        r += 1
    return r


@dataclass(frozen=True)
class J2KHeader:
    """What the reduced decode needs from a JPEG 2000 main header (SIZ and COD/COC markers)."""

    width: int
    height: int
    x0: int
    y0: int
    components: int
    precision: int
    signed: bool
    levels: int  # decomposition levels (the fewest over COD and any COC)


def j2k_header(frame: bytes) -> J2KHeader | None:
    """Parse SIZ and COD/COC of a JPEG 2000 codestream (or of the codestream in a JP2 file);
    ``None`` when the main header is not what ISO 15444-1 A.5/A.6 describes."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream's first two markers
    if start < 0 or start > 4096:
        return None
    pos, size, levels = start + 2, None, []
    try:
        while pos + 4 <= len(frame):
            marker, length = struct.unpack(">HH", frame[pos:pos + 4])
            body = frame[pos + 4:pos + 2 + length]
            if marker == 0xFF51:  # SIZ: Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
                _, xs, ys, xo, yo, *_tiles, csiz = struct.unpack(">HIIIIIIIIH", body[:36])
                ssiz = body[36]
                size = (xs, ys, xo, yo, csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
            elif marker == 0xFF52:  # COD: Scod, SGcod (4 bytes), then the decomposition levels
                levels.append(body[5])
            elif marker == 0xFF53 and size is not None:  # COC: component index (1 or 2 bytes), Scoc
                levels.append(body[(1 if size[4] < 257 else 2) + 1])
            elif marker == 0xFF90:  # SOT: the main header is over
                break
            pos += 2 + length
    except (struct.error, IndexError):
        return None
    if size is None or not levels:
        return None
    xs, ys, xo, yo, csiz, precision, signed = size
    return J2KHeader(xs - xo, ys - yo, xo, yo, csiz, precision, signed, min(levels))


def decode_reduced(ds: Any, min_size: int) -> Decoded | None:
    """``ds``'s stored values at the coarsest resolution that still covers ``min_size``, or
    ``None`` when the full decode must be used instead (another syntax, a film already too small
    to reduce, several frames or samples, or a codestream whose header disagrees with the DICOM one).

    The values are the stored values' own range (no rescale, no bit shift left over), so the
    Modality and VOI LUTs apply unchanged: Pillow returns JPEG 2000 samples shifted up to 8 or 16
    bits (a 15-bit CR comes back ×2; that was the "wrong values" seen with Pillow's ``reduce``),
    which is undone here and checked against the full decode in ``tests/engine/io/test_fast_decode.py``.
    """
    meta = getattr(ds, "file_meta", None)
    uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    rows, cols, bits = _int(ds.get("Rows")), _int(ds.get("Columns")), _int(ds.get("BitsStored"))
    if uid not in REDUCIBLE or not rows or not cols or not bits:
        return None
    if (_int(ds.get("NumberOfFrames")) or 1) != 1 or (_int(ds.get("SamplesPerPixel")) or 1) != 1:
        return None
    if "PixelData" not in ds or reduction_levels(rows, cols, min_size) == 0:
        return None
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:  # malformed encapsulation: the full decode reports it properly
        log.debug("reduced decode: no frame (%s); decoding in full", exc)
        return None
    signed = bool(_int(ds.get("PixelRepresentation")))
    try:
        if uid in (JPEG_2000_LOSSLESS, JPEG_2000):
            return _j2k_reduced(frame, rows, cols, bits, signed, min_size)
        return _jpeg_reduced(frame, rows, cols, bits, min_size)
    except Exception as exc:  # a codestream Pillow cannot reduce: the full decode still may
        log.debug("reduced decode failed (%s: %s); decoding in full", type(exc).__name__, exc)
        return None


def _expected(rows: int, cols: int, r: int) -> tuple[int, int]:
    return -(-rows // 2**r), -(-cols // 2**r)


def _j2k_reduced(frame: bytes, rows: int, cols: int, bits: int, signed: bool, min_size: int) -> Decoded | None:
    import io

    import numpy as np
    from PIL import Image

    head = j2k_header(frame)
    # Only what a CR/DX stores and what the shift below undoes exactly: one unsigned component of
    # ≤ 16 bits, the precision the header claims, no image offset (Pillow sizes an offset image
    # differently from OpenJPEG and fails on it, as on RG1_J2KR at r = 2 before this check).
    if head is None or head.components != 1 or head.signed or signed or head.precision != bits or bits > 16:
        return None
    if (head.width, head.height) != (cols, rows) or head.x0 or head.y0:
        return None
    r = reduction_levels(rows, cols, min_size, head.levels)
    if r == 0:
        return None
    with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as im:
        im.reduce = r  # OpenJPEG's cp_reduce: the inverse DWT stops r levels early
        im.load()
        mode, arr = im.mode, np.asarray(im)
    shift = {"L": 8, "I;16": 16}.get(mode, 0) - bits
    if shift < 0 or arr.shape != _expected(rows, cols, r):
        return None
    out = (arr >> shift if shift else arr).astype(np.uint16 if bits > 8 else np.uint8, copy=False)
    return Decoded(out, "pillow (openjpeg, reduced)", r)


def _jpeg_reduced(frame: bytes, rows: int, cols: int, bits: int, min_size: int) -> Decoded | None:
    import io

    import numpy as np
    from PIL import Image

    if bits > 8:  # 12-bit JPEG: libjpeg only, no DCT scaling through Pillow
        return None
    r = reduction_levels(rows, cols, min_size, MAX_DCT_REDUCTION)
    if r == 0:
        return None
    want = _expected(rows, cols, r)
    with Image.open(io.BytesIO(frame), formats=["JPEG"]) as im:
        if im.mode != "L" or im.size != (cols, rows):
            return None
        im.draft("L", (want[1], want[0]))  # libjpeg's scale_denom: the smallest scale ≥ the request
        im.load()
        arr = np.asarray(im)
    if arr.shape != want:
        return None
    return Decoded(arr, "pillow (DCT-scaled)", r)


def missing_decoder_line(reasons: Iterable[str | None]) -> str | None:
    """The end-of-run line for files skipped for a missing decoder: their count and the fixes.

    ``None`` when no reason is a missing decoder, so a run that lacks nothing prints nothing.
    """
    count, hints = 0, []
    for reason in reasons:
        if not reason or not reason.startswith(MISSING_DECODER):
            continue
        count += 1
        hint = re.search(r"\(([^;]*); (.*)\)\s*$", reason)
        text = hint.group(2) if hint else "no pydicom plugin decodes this syntax"
        if text not in hints:
            hints.append(text)
    if not count:
        return None
    files = "file was" if count == 1 else "files were"
    return f"{count} {files} skipped for a missing decoder: {'; '.join(hints)}"


def syntax_table() -> list[dict[str, Any]]:
    """One row per syntax of :data:`ARCHIVE_SYNTAXES`: the plugins able to read it here, the one
    used, and the install line when none is (for ``radflash doctor``)."""
    rows = []
    for uid, name in ARCHIVE_SYNTAXES:
        bits = 12 if "12-bit" in name else 8 if "8-bit" in name else 16
        from pydicom.uid import UID

        native = not UID(uid).is_compressed or UID(uid).is_deflated
        plugins = () if native else usable_plugins(uid, bits)
        rows.append({
            "uid": uid, "name": name, "decodes": native or bool(plugins),
            "decoder": ("native (deflate)" if UID(uid).is_deflated else "native") if native
            else (package_of(plugins[0], uid) if plugins else None),
            "plugins": [package_of(p, uid) for p in plugins],
            "missing": None if native or plugins else missing_hint(uid, bits),
        })
    return rows


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None
