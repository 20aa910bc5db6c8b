"""Which files of an archive are chest radiographs worth scoring, decided from the header alone.

Hospital archives are mostly not frontal chest X-rays (CT/MR series, laterals, extremities,
reports, segmentations...). Every rule here reads only header fields, so a skipped file costs a
header parse and never a pixel decode; :func:`check` returns a short human reason that ends up in
the status table.

Decisions (and why):

* Modalities CR and DX by default (DX covers DR "for presentation"); ``modalities=None`` accepts any.
* Body part: an empty, missing or ``UNKNOWN`` Body Part Examined is accepted, because many
  archives never fill it in; otherwise the value must contain one of the chest terms
  (``CHEST``, ``THORAX``, ``LUNG``, ``TORAX``, ``TORSO``...; so ``CHEST PA`` and ``PORT CHEST`` match).
* View: PA and AP are frontal; an empty View Position is accepted as frontal unless the View
  Code Sequence says lateral (portable ICU films often leave it blank, and they are frontal).
  Laterals (LL, RL, LATERAL, LAT...) only with ``include_lateral=True``; other views (decubitus,
  obliques) are skipped as "not frontal".
* Only 2-D single-frame grayscale images with a pixel decoder can be loaded; the rest is skipped
  with the reason, never failed, since nothing is wrong with those files.
* Non-DICOM images (PNG/JPEG/TIFF) have no header to judge: only the structural rules apply.
* A pixel budget (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS` = 50 megapixels: three times
  the largest real CR/DX, ~4300×3500 = 15 MP) refuses a file from its header, before anything is
  decoded: Rows × Columns × frames × samples above it is *failed* (a header claiming 60000×60000,
  or a 281 KB deflated file that inflates to 12000×12000, is a decompression bomb, not a radiograph).
  Decoding costs ~25 bytes of memory per pixel (float64 display transforms), so the budget is what
  bounds a decode worker's memory (~1.5 GB at the default).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from radflash.errors import InputError

DEFAULT_MODALITIES = ("CR", "DX")
DEFAULT_MAX_PIXELS = 50_000_000  # per file: rows × columns × frames × samples (see the module docstring)
CHEST_TERMS = ("CHEST", "THORAX", "THORAC", "LUNG", "TORAX", "TORSO")
FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL")
UNKNOWN_VALUES = ("", "UNKNOWN", "UNK", "NONE", "OTHER", "-")
# Modalities whose objects are not images of a patient at all (reports, structures, plans...).
NON_IMAGE_MODALITIES = frozenset({
    "SEG", "SR", "KO", "PR", "REG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "RWV", "FID", "ECG",
    "HD", "AU", "DOC", "PLAN", "RESP", "EPS", "HC", "BI", "SMR", "M3D",
})


def _upper_tuple(values: Any, name: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out = tuple(str(v).strip().upper() for v in values if str(v).strip())
    if not out:
        raise InputError(f"SelectionRules.{name} is empty; use None to accept any value")
    return out


@dataclass(frozen=True)
class SelectionRules:
    """Header rules a file must pass to be scored; ``None`` for a tuple field means "any value"."""

    modalities: tuple[str, ...] | None = DEFAULT_MODALITIES
    body_parts: tuple[str, ...] | None = CHEST_TERMS
    accept_unknown_body_part: bool = True
    views: tuple[str, ...] | None = FRONTAL_VIEWS
    accept_unknown_view: bool = True
    include_lateral: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # the pixel budget: larger files fail before decoding

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type.startswith("tuple"):
                object.__setattr__(self, f.name, _upper_tuple(getattr(self, f.name), f.name))
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise InputError(f"SelectionRules.max_pixels must be a positive integer, got {self.max_pixels!r}")

    @classmethod
    def any_image(cls) -> SelectionRules:
        """Rules that accept every loadable image (only the structural limits remain)."""
        return cls(modalities=None, body_parts=None, views=None, include_lateral=True)


def check(ds_or_meta: Any, rules: SelectionRules | None = None) -> str | None:
    """The reason to skip this file, or ``None`` when it should be scored.

    ``ds_or_meta`` is a :class:`radflash.io.imageio.ImageMeta` or a pydicom ``Dataset``; a dataset
    read with ``stop_before_pixels`` has lost its pixel element, so pass the meta from
    :func:`radflash.io.imageio.read_meta` instead (it remembers whether pixel data followed).
    """
    from radflash.io.imageio import ImageMeta, meta_from_dataset

    meta = ds_or_meta if isinstance(ds_or_meta, ImageMeta) else meta_from_dataset(ds_or_meta)
    rules = SelectionRules() if rules is None else rules
    if meta.kind == "dicom":
        reason = _header_reason(meta, rules)
        if reason:
            return reason
    return structural_reason(meta)


def _header_reason(meta: Any, rules: SelectionRules) -> str | None:
    modality = (meta.modality or "").strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"not a radiograph: {modality}"
    if meta.has_pixel_data is False:
        return "no pixel data"
    if rules.modalities is not None and modality not in rules.modalities:
        allowed = "/".join(rules.modalities)
        return f"modality {modality} not in {allowed}" if modality else f"no modality (not in {allowed})"
    body = " ".join((meta.body_part or "").strip().upper().replace("_", " ").split())
    if rules.body_parts is not None and not (body in UNKNOWN_VALUES and rules.accept_unknown_body_part):
        terms = [t.replace("_", " ") for t in rules.body_parts]
        if not any(t in body for t in terms):
            return f"body part {body}" if body else "body part unknown"
    view = (meta.view_position or "").strip().upper()
    if view in UNKNOWN_VALUES:
        if meta.view_hint == "lateral" and not rules.include_lateral:
            return "view lateral (view code)"
        if rules.views is not None and not rules.accept_unknown_view and meta.view_hint != "lateral":
            return "view unknown"
    elif view in LATERAL_VIEWS or view.split()[0] in LATERAL_VIEWS:
        if not rules.include_lateral:
            return f"view {view} (lateral)"
    elif rules.views is not None and view.split()[0] not in rules.views:
        return f"view {view} (not frontal)"
    return None


def pixel_budget_reason(meta: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the header's image is too large to decode (``None`` when it fits the budget).

    Read from the header alone (rows, columns, frames, samples), so a decompression bomb is
    refused before a single byte of it is inflated or decoded.
    """
    dims = [meta.rows, meta.cols, meta.frames or 1, meta.samples_per_pixel or 1]
    if any(d is not None and d < 0 for d in dims):
        return "invalid image size in header"
    if meta.rows is None or meta.cols is None:
        return None
    pixels = 1
    for d in dims:
        pixels *= int(d)
    if pixels > max_pixels:
        size = f"{meta.rows}×{meta.cols}" + (f"×{meta.frames} frames" if (meta.frames or 1) > 1 else "")
        return (f"image too large: header claims {size} = {pixels / 1e6:.1f} megapixels, above the pixel "
                f"budget of {max_pixels / 1e6:g} MP (raise it with --max-pixels)")
    return None


def structural_reason(meta: Any) -> str | None:
    """Limits of the loader itself: one 2-D grayscale frame that some installed decoder can read."""
    if meta.has_pixel_data is False:
        return "no pixel data"
    if meta.frames is not None and meta.frames > 1:
        return f"multi-frame ({meta.frames} frames)"
    photometric = (meta.photometric or "").strip().upper()
    if (meta.samples_per_pixel or 1) != 1 or (photometric and photometric not in ("MONOCHROME1", "MONOCHROME2")):
        return f"colour image ({photometric or f'{meta.samples_per_pixel} samples'})"
    if meta.kind == "dicom":
        if meta.bits_allocated == 1:
            return "binary image (1 bit allocated)"
        return decoder_reason(meta.transfer_syntax, meta.bits_stored, meta.pixel_representation)
    return None


def decoder_reason(transfer_syntax: str | None, bits_stored: int | None = None,
                   pixel_representation: int | None = 0) -> str | None:
    """Why no installed pixel decoder can read this transfer syntax (``None`` when one can); the
    reason names the install line. The plugin table lives in :mod:`radflash.io.decoders`."""
    from radflash.io.decoders import decoder_reason as reason

    return reason(transfer_syntax, bits_stored, pixel_representation)
