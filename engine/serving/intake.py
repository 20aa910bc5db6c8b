"""What every intake (C-STORE, STOW-RS) does with one instance's bytes, before saying "stored".

:func:`inspect` is the header check a sender hears about at once (its status names the reason):
not DICOM, no SOP/Study/Series UIDs, not an image (no pixel data: an SR, a presentation state...),
a header that claims more pixels than the budget (a decompression bomb), or a file cut short of the
pixel data its header describes. It reads the header only, with the same bounded reader and the
same budget as ``score``'s decoders, so nothing is decoded at intake. Everything else (a CT, a
lateral view) is accepted and recorded as skipped after the decode stage, as ``score`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# (C-STORE status, STOW-RS failure reason) per kind of refusal (PS3.4 B.2.3, PS3.18 Table I.2-2)
REFUSED_NOT_IMAGE = 0x0122  # Refused: SOP Class not supported
ERROR_CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORISED = 0x0124
ACCEPT_POLL_S = 0.05  # s each intake's accept loop waits between checks for stop (a SIGTERM waits this long)
STOW_FAILURE = {REFUSED_NOT_IMAGE: 0x0122, ERROR_CANNOT_UNDERSTAND: 0xC000, OUT_OF_RESOURCES: 0xA700}


@dataclass(frozen=True)
class Inspected:
    """The header facts intake keeps, or why the instance is refused (``code`` ≠ 0)."""

    code: int = 0
    reason: str | None = None
    sop: str | None = None
    study: str | None = None
    series: str | None = None
    sop_class: str | None = None


def inspect(path: Path, *, max_pixels: int | None = None) -> Inspected:
    """Header-only check of a spooled instance (see the module doc)."""
    from radflash.errors import RadflashError
    from radflash.io import imageio
    from radflash.io.selection import DEFAULT_MAX_PIXELS, pixel_budget_reason

    try:
        kind = imageio.sniff(path)
        if kind != "dicom":
            return Inspected(ERROR_CANNOT_UNDERSTAND, "not a DICOM instance")
        # the loader's bounded header reader (deferred large values, truncation check against the file size)
        meta, problem = imageio.read_header(path)
    except RadflashError as exc:
        return Inspected(ERROR_CANNOT_UNDERSTAND, str(exc).split(": ", 1)[-1][:200])
    except Exception as exc:  # a reader bug must refuse the instance, not crash the node
        return Inspected(ERROR_CANNOT_UNDERSTAND, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    ids = dict(sop=meta.sop_instance_uid, study=meta.study_instance_uid, series=meta.series_instance_uid,
               sop_class=meta.sop_class_uid)
    if not (meta.sop_instance_uid and meta.study_instance_uid and meta.series_instance_uid):
        return Inspected(ERROR_CANNOT_UNDERSTAND, "missing SOP, Study or Series Instance UID", **ids)
    if meta.has_pixel_data is False and not problem:
        return Inspected(REFUSED_NOT_IMAGE, f"not an image (SOP class {meta.sop_class_uid or 'unknown'})", **ids)
    budget = pixel_budget_reason(meta, max_pixels or DEFAULT_MAX_PIXELS)
    if budget:
        return Inspected(ERROR_CANNOT_UNDERSTAND, budget, **ids)
    if problem:
        return Inspected(ERROR_CANNOT_UNDERSTAND, problem, **ids)
    return Inspected(0, None, **ids)
