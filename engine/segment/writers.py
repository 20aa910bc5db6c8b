"""Writers for ``radflash segment`` outputs: PNG masks, NPZ maps, DICOM SEG, NIfTI, previews.

Every writer takes arrays at the SOURCE image's size (the maps were upsampled there already) and
writes atomically: the file is written under a temporary name in the same folder and renamed
into place, so a crash, a full disk or Ctrl-C never leaves a truncated file that looks complete,
and a file from an earlier image is never lost. Optional dependencies (highdicom: extra ``seg``,
nibabel: extra ``nifti``) are imported only when their format is asked for, with an install hint.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# SegmentInfo / SegSeries live with the SEG builder (radflash.dicomout.seg); imported from here by
# segment's output writer and tests since before #27.
from radflash.dicomout.codes import PRIVATE_SCHEME  # noqa: F401
from radflash.dicomout.seg import SegmentInfo, SegSeries
from radflash.errors import InputError, RadflashError

if TYPE_CHECKING:
    from radflash.io.imageio import ImageMeta

# tab10: distinct on grey X-rays and friendly to the common colour-vision deficiencies.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
)


class WriteError(RadflashError):
    """An output could not be produced for one image (recorded per image; the run goes on)."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` onto ``path`` (same folder, so the rename is atomic).

    The temporary name keeps the final suffix (``.nii.gz``), because some libraries choose the
    encoding from the file name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---- PNG / NPZ -----------------------------------------------------------------------------
def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """A binary mask as an 8-bit PNG, 0 / 255 (viewable as is; ``> 0`` reads it back)."""
    from PIL import Image

    img = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False))


class NpzWriter:
    """Adds float16 maps to a ``.npz`` one at a time; the file appears only on :meth:`commit`.

    Maps arrive prompt-chunk by prompt-chunk, so a caller never holds all of them: with hundreds
    of open-vocabulary prompts at 2000² a full float16 stack would be gigabytes. ``np.load``
    reads the result (each key is one ``<key>.npy`` member, as ``np.savez`` writes them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{self.path.name}")
        # level 1: smooth maps compress ~3× already; higher levels cost seconds per large image
        self._zf: zipfile.ZipFile | None = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED,
                                                           compresslevel=1)

    def add(self, key: str, arr: np.ndarray) -> None:
        assert self._zf is not None, "NpzWriter already closed"
        with self._zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(arr, dtype=np.float16), allow_pickle=False)

    def add_strings(self, key: str, values: Sequence[str]) -> None:
        """Small string arrays (prompt texts), stored as unicode so ``allow_pickle=False`` loads them."""
        assert self._zf is not None, "NpzWriter already closed"
        with self._zf.open(f"{key}.npy", "w") as fh:
            np.lib.format.write_array(fh, np.asarray(list(values), dtype=str), allow_pickle=False)

    def commit(self) -> Path:
        if self._zf is not None:
            self._zf.close()
            self._zf = None
            os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop an uncommitted file (no-op after :meth:`commit`)."""
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_maps_npz(path: str | Path, maps: Iterable[tuple[str, np.ndarray]], *,
                   metadata: dict[str, Sequence[str]] | None = None) -> Path:
    """Probability maps (key, H×W) as float16 in one compressed ``.npz``; ``metadata`` = string arrays."""
    with NpzWriter(path) as npz:
        for key, arr in maps:
            npz.add(key, arr)
        for key, values in (metadata or {}).items():
            npz.add_strings(key, values)
    return Path(path)


# ---- DICOM SEG -----------------------------------------------------------------------------
# The SEG itself is built by the writer package every verb shares (radflash.dicomout.seg); this
# function reads the source header, names the model and writes the file atomically.
def write_dicom_seg(
    path: str | Path,
    source: str | Path | ImageMeta,
    masks: np.ndarray,
    segments: Sequence[SegmentInfo],
    *,
    model_id: str,
    model_sha256: str = "",
    series: SegSeries | None = None,
    header: Any = None,
    family: str = "",
) -> Path:
    """A binary DICOM Segmentation (one segment per prompt) referencing the source instance.

    ``source`` is the source file or its :class:`radflash.io.imageio.ImageMeta`; its header is re-read
    (without pixels, as leniently as the loader read it); rows and columns must match the masks. The
    algorithm identification names radflash and the model id, each segment carries its prompt and
    threshold as algorithm parameters and a preset finding's standard code, and Contributing
    Equipment names the model (``family`` and ``model_id``) with a Device UID from ``model_sha256``
    (:mod:`radflash.dicomout.seg`). ``header`` (a pydicom Dataset without pixels) is used instead of
    re-reading the source: an instance from a DICOMweb server has no file to re-read.
    """
    import pydicom

    from radflash.dicomout import ObjectError
    from radflash.dicomout.equipment import Equipment
    from radflash.dicomout.seg import build_seg
    from radflash.util.optional import require

    require("highdicom", extra="seg", purpose="DICOM SEG output")
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != len(segments):
        raise WriteError(f"{path}: expected {len(segments)} masks, got array of shape {masks.shape}")
    from radflash.io.imageio import ImageMeta

    meta = source if isinstance(source, ImageMeta) else ImageMeta(path=str(source), kind="dicom")
    source = meta.path
    try:
        ds = header if header is not None else meta.source_dataset()
    except (OSError, InputError, pydicom.errors.InvalidDicomError) as exc:
        raise WriteError(f"{source}: cannot re-read the DICOM header for SEG ({exc})") from None
    try:
        seg = build_seg(ds, masks, segments, equipment=Equipment(model_id, model_sha256, family),
                        series=series, where=str(source))
    except ObjectError as exc:
        raise WriteError(str(exc)) from None
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))


# ---- NIfTI ---------------------------------------------------------------------------------
def write_nifti(path: str | Path, masks: np.ndarray, *, spacing: tuple[float, float] | None = None,
                description: str = "radflash segment") -> Path:
    """Masks (T, H, W) as one uint8 NIfTI volume of shape (W, H, T): one slice per prompt.

    NIfTI indexes (x, y, z), hence the transpose; the prompt order is the order in the image's
    JSON. ``spacing`` = (row, column) spacing in mm when the source DICOM states one.
    """
    from radflash.util.optional import require

    nib = require("nibabel", extra="nifti", purpose="NIfTI output")
    data = np.ascontiguousarray((np.asarray(masks) > 0).astype(np.uint8).transpose(2, 1, 0))
    sy, sx = spacing or (1.0, 1.0)
    img = nib.Nifti1Image(data, np.diag([sx, sy, 1.0, 1.0]))
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    if spacing:
        img.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


# ---- preview -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overlay:
    """One prompt's layer in a preview: mask, grounding point (x, y), optional box, legend text."""

    label: str
    mask: np.ndarray
    point: tuple[int, int]
    bbox: tuple[int, int, int, int] | None = None
    max_prob: float | None = None


def render_preview(image: np.ndarray, overlays: Sequence[Overlay], *, alpha: float = 0.4):
    """The overlay as a PIL RGB image at the image's own size (so pixels line up with the source).

    Masks are blended semi-transparently with a solid outline, the grounding point is a ringed
    dot, the box of the largest component is outlined, and a legend lists colour, label and peak
    probability. Sizes of marks and text scale with the image so previews of 224² phantoms and
    3000² radiographs both stay legible.
    """
    from PIL import Image, ImageDraw, ImageFont

    gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    h, w = gray.shape
    rgb = np.repeat((gray * 255.0)[..., None], 3, axis=2)
    for i, ov in enumerate(overlays):
        colour = np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float32)
        m = np.asarray(ov.mask) > 0
        if m.shape != (h, w):
            raise WriteError(f"preview: mask {i} has shape {m.shape}, image is {(h, w)}")
        if m.any():
            blend_mask(rgb, m, colour, alpha)
    out = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    short = min(h, w)
    r = max(3, short // 100)
    line = max(1, short // 400)
    for i, ov in enumerate(overlays):
        colour = PALETTE[i % len(PALETTE)]
        if ov.bbox is not None:
            draw.rectangle(ov.bbox, outline=colour, width=line)
        x, y = ov.point
        draw.ellipse((x - r - line, y - r - line, x + r + line, y + r + line), fill=(0, 0, 0))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255), width=max(1, line))
    font = ImageFont.load_default(size=max(10, short // 45))
    _legend(draw, overlays, font, (h, w))
    return out


def write_preview(path: str | Path, image: np.ndarray, overlays: Sequence[Overlay]) -> Path:
    img = render_preview(image, overlays)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_overlay_sc(path: str | Path, header: Any, image: np.ndarray, overlays: Sequence[Overlay], *,
                     model_id: str, model_sha256: str = "", family: str = "", series_uid: str, sop_uid: str,
                     instance_number: int = 1) -> Path:
    """The preview (:func:`render_preview`: masks, points, legend) as a DICOM Secondary Capture in the
    source's study (``header``: the source's DICOM header), built by :mod:`radflash.dicomout.sc`:
    for PACS viewers that show neither SEG nor SR overlays. Marked derived and not for diagnosis."""
    from radflash.dicomout import ObjectError
    from radflash.dicomout.equipment import Equipment
    from radflash.dicomout.sc import build_overlay_sc
    from radflash.util.optional import require

    require("highdicom", extra="seg", purpose="--overlay sc")
    rgb = np.asarray(render_preview(image, overlays))
    try:
        sc = build_overlay_sc(header, rgb, equipment=Equipment(model_id, model_sha256, family),
                              series_uid=series_uid, sop_uid=sop_uid, instance_number=instance_number)
    except ObjectError as exc:
        raise WriteError(f"{path}: {exc}") from None
    return atomic_write(path, lambda tmp: sc.save_as(str(tmp)))


def blend_mask(rgb: np.ndarray, m: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    """Tint the pixels of boolean mask ``m`` in float RGB ``rgb`` (in place) and draw its outline solid."""
    rgb[m] = rgb[m] * (1.0 - alpha) + colour * alpha
    rgb[outline(m)] = colour


def outline(m: np.ndarray) -> np.ndarray:
    """Pixels of ``m`` with a 4-neighbour outside it (a one-pixel inner contour)."""
    interior = m.copy()
    interior[1:, :] &= m[:-1, :]
    interior[:-1, :] &= m[1:, :]
    interior[:, 1:] &= m[:, :-1]
    interior[:, :-1] &= m[:, 1:]
    return m & ~interior


def _legend(draw, overlays: Sequence[Overlay], font, size: tuple[int, int]) -> None:
    if not overlays:
        return
    h, w = size
    asc, desc = font.getmetrics()
    row = asc + desc + 4
    pad = max(3, row // 4)
    max_rows = max(1, (h - 2 * pad) // row)
    lines = []
    for i, ov in enumerate(overlays):
        text = ov.label if ov.max_prob is None else f"{ov.label}  max {ov.max_prob:.2f}"
        lines.append((PALETTE[i % len(PALETTE)], text[:60]))
    if len(lines) > max_rows:
        lines = [*lines[: max_rows - 1], ((255, 255, 255), f"+{len(overlays) - max_rows + 1} more")]
    width = max(draw.textlength(text, font=font) for _, text in lines) + row + 3 * pad
    draw.rectangle((0, 0, min(w - 1, int(width)), min(h - 1, 2 * pad + row * len(lines))), fill=(0, 0, 0))
    for j, (colour, text) in enumerate(lines):
        top = pad + j * row
        draw.rectangle((pad, top + 2, pad + row - 6, top + row - 4), fill=colour)
        draw.text((pad + row, top), text, fill=(255, 255, 255), font=font)
