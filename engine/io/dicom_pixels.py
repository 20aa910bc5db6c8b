"""DICOM stored values → display intensities in [0, 1] ("air is dark").

The grayscale pipeline of PS3.3 C.11 / PS3.4 N.2: stored values → Modality LUT (rescale or LUT
sequence) → VOI (VOI LUT sequence or window) → Presentation (MONOCHROME1 inverts). A model trained
on exported radiographs saw what a workstation displays, so we reproduce that display instead of
min-max stretching raw detector values (a CR plate's raw range is mostly empty).

Why our own window/LUT code instead of ``pydicom.pixels.apply_voi_lut``: pydicom writes cast values
back into the dataset, maps the window onto the *stored* bit range (we want [0, 1] directly), and
warns on float input to a VOI LUT, which is what every rescaled image is. The formulas are those of
PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), computed in float64 with output range [0, 1].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("radflash.dicom_pixels")

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class UnusableImage(ValueError):
    """The pixels decode, but to nothing a model may score: non-finite or constant values.

    A NaN/inf Rescale Slope, an intercept of 1e308 (every value rounds to the same float) or a
    blank frame would otherwise become an all-zero image and get confident-looking scores.
    """


def check_usable(values: np.ndarray, stage: str = "") -> None:
    """Raise :class:`UnusableImage` when ``values`` hold a non-finite value or a single value."""
    where = f" {stage}" if stage else ""
    if values.size == 0:
        raise UnusableImage(f"empty image{where}")
    lo, hi = float(np.min(values)), float(np.max(values))  # NaN propagates through min/max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UnusableImage(f"non-finite pixel values{where}")
    if hi <= lo:
        raise UnusableImage(f"constant image{where} (every pixel is {lo:g})")


@dataclass(frozen=True)
class Window:
    """One VOI window (C.11.2.1.2); ``function`` is the VOI LUT Function, LINEAR when absent."""

    center: float
    width: float
    function: str = "LINEAR"


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing with output range [0, 1], in float64.

    LINEAR (C.11.2.1.2.1) keeps the standard's historic −0.5/−1 offsets, so a width-1 window is a
    hard threshold at ``center − 0.5``; LINEAR_EXACT (C.11.2.1.3.2) has none; SIGMOID is
    C.11.2.1.3.1, written with tanh so that far-out values cannot overflow ``exp``.
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").strip().upper()
    c, w = float(center), float(width)
    if not (np.isfinite(c) and np.isfinite(w)):
        raise ValueError(f"window center/width must be finite, got {center}/{width}")
    if function == "LINEAR":
        if w < 1:
            raise ValueError(f"LINEAR window width must be ≥ 1, got {width}")
        c, w = c - 0.5, w - 1.0
        lo, hi = c - w / 2, c + w / 2
        out = np.where(x > hi, 1.0, 0.0)
        between = (x > lo) & (x <= hi)  # empty when w == 0: no division by zero
        if between.any():
            out[between] = (x[between] - c) / w + 0.5
        return out
    if function == "LINEAR_EXACT":
        if w <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width}")
        lo, hi = c - w / 2, c + w / 2
        out = np.where(x > hi, 1.0, 0.0)
        between = (x > lo) & (x <= hi)
        out[between] = (x[between] - c) / w + 0.5
        return out
    if function == "SIGMOID":
        if w <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width}")
        # 1 / (1 + exp(−4(x−c)/w)) == (1 + tanh(2(x−c)/w)) / 2
        return 0.5 * (1.0 + np.tanh(2.0 * (x - c) / w))
    raise ValueError(f"unsupported VOI LUT Function {function!r} (expected one of {', '.join(VOI_FUNCTIONS)})")


def min_max(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1]; a constant image becomes all zeros rather than NaN."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros(x.shape, dtype=np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float64)
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def lut_data(item: Any, *, little_endian: bool = True) -> tuple[np.ndarray, int, int]:
    """(entries, first mapped value, bits per entry) of a Modality/VOI LUT sequence item.

    LUT Data arrives either as US values or as raw OW bytes in the file's byte order, and the
    descriptor's "0 entries" means 2¹⁶ (C.11.1.1.1); a LUT shorter than its descriptor says is
    used as far as it goes rather than rejected, since viewers do the same.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"LUT Descriptor needs 3 values, got {descriptor}")
    n_entries, first, bits = descriptor
    n_entries = n_entries or 2**16
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        if bits <= 8 and len(raw) == n_entries:
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<u2" if little_endian else ">u2")
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if data.size == 0:
        raise ValueError("LUT Data is empty")
    return data[:n_entries].astype(np.float64), first, bits


def apply_lut(values: np.ndarray, entries: np.ndarray, first: int) -> np.ndarray:
    """Look up ``values`` in a LUT: below ``first`` → first entry, past the end → last (C.11.2.1.1).

    Rescaled inputs are not integers; they are rounded to the nearest entry.
    """
    x = np.asarray(values, dtype=np.float64)
    if first >= 2**15 and np.nanmin(x, initial=0.0) < 0:
        first -= 2**16  # the descriptor's 2nd value is SS for signed input but often read as US
    idx = np.clip(np.rint(x) - first, 0, entries.size - 1).astype(np.int64)
    return entries[idx]


def modality_lut(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values → modality values (float64) through pydicom's Modality LUT / rescale.

    A dataset with only one of Rescale Slope/Intercept is treated as the identity for the missing
    one (slope 1, intercept 0) instead of silently skipping the rescale as pydicom would; a zero
    slope (seen in broken exports) would flatten the image, so it is ignored.
    """
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value is not None and not math.isfinite(value):
            raise UnusableImage(f"{name} is {value} (not a finite number)")
    out = np.asarray(arr, dtype=np.float64)
    if slope is not None and slope != 0 and slope != 1:
        out = out * slope
    if intercept:
        out = out + intercept
    return out


def first_window(ds: Any) -> Window | None:
    """The first of possibly several windows (C.11.2.1.2: the first is the default view)."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper() or "LINEAR"
    return Window(center, width, function)


def to_display(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, str]:
    """Stored pixel array → float32 H×W in [0, 1] with air dark, and which VOI was applied.

    VOI order: a VOI LUT sequence (the vendor's tuned, often non-linear curve) is preferred over
    the window when both are present, as pydicom and most viewers do; a broken VOI (bad width,
    unknown function, malformed LUT) falls back to min-max with a log message rather than failing
    the file, because min-max of a radiograph is still a usable image; so does a window that maps
    every pixel to one value. Values that are non-finite or constant after the modality LUT raise
    :class:`UnusableImage`: there is no image left to display.
    """
    values = modality_lut(arr, ds)
    check_usable(values, "after the modality LUT")
    display: np.ndarray | None = None
    voi = "minmax"
    seq = ds.get("VOILUTSequence")
    if seq:
        try:
            entries, first, _ = lut_data(seq[0], little_endian=_little_endian(ds))
            display = min_max_range(apply_lut(values, entries, first), float(entries.min()), float(entries.max()))
            voi = "voi-lut"
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            log.info("VOI LUT sequence unusable (%s); trying the window", exc)
    if display is None:
        try:
            win = first_window(ds)
        except (ValueError, TypeError) as exc:
            win = None
            log.info("window unreadable (%s); using min-max", exc)
        if win is not None:
            try:
                display = window(values, win.center, win.width, win.function)
                voi = f"window {win.function} c={win.center:g} w={win.width:g}"
            except ValueError as exc:
                log.info("window not applied (%s); using min-max", exc)
    if display is not None and float(display.min()) >= float(display.max()):
        log.info("VOI %s maps every pixel to one value; using min-max", voi)
        display, voi = None, "minmax"
    if display is None:
        display = min_max(values)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        display = 1.0 - display
    return np.ascontiguousarray(np.clip(display, 0.0, 1.0), dtype=np.float32), voi


def min_max_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map a known output range [lo, hi] (not the image's own range) onto [0, 1]."""
    if hi <= lo:
        return np.zeros(np.shape(values), dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)


def _little_endian(ds: Any) -> bool:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is not None and getattr(uid, "is_transfer_syntax", False):
        return bool(uid.is_little_endian)
    encoding = getattr(ds, "original_encoding", (None, None))
    return encoding[1] is not False


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    return float(value)


def _float(value: Any) -> float | None:
    try:
        return _first(value)
    except (TypeError, ValueError):
        return None
