"""Output names that can never escape the output folder.

Names come from untrusted places: a DICOM's SOPInstanceUID (any string a modality, a PACS or an
attacker put there: ``"../../etc/x"``, ``"/abs"``, NUL bytes, 10 kB of text) or a file's stem,
and prompts typed by users. Each name is reduced to ONE path component of safe characters, and
every path built from it is checked to lie inside the output folder after resolving symlinks,
so a hostile name is neutralised rather than trusted. Collisions (two files with the same stem,
two UIDs that sanitise alike) get ``-2``, ``-3``... so no output silently overwrites another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import MutableSet
from pathlib import Path

from radflash.errors import InputError

MAX_NAME = 96  # well below the 255-byte limit of common filesystems, leaves room for suffixes
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Names Windows refuses whatever the extension; harmless elsewhere, cheap to avoid everywhere.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_name(raw: object, *, fallback: str = "item", max_len: int = MAX_NAME) -> str:
    """Reduce ``raw`` to one safe file-name component (no separators, no leading dot, bounded).

    Runs of characters outside ``[A-Za-z0-9._-]`` become ``_`` (so separators, NUL, spaces and
    non-ASCII cannot form a path); leading dots/underscores go (no ``..``, no hidden files);
    an empty result becomes ``fallback``. Names longer than ``max_len`` are cut and get a short
    hash of the full text, so two long UIDs sharing a prefix stay distinct.
    """
    text = str(raw)
    name = _UNSAFE.sub("_", text).strip("._-")
    name = re.sub(r"\.{2,}", ".", name)  # "a..b" is harmless as a component, but keep it boring
    if not name:
        name = fallback
    if name.split(".")[0].lower() in _RESERVED:
        name = f"_{name}"
    if len(name) > max_len:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        name = f"{name[:max_len - 11].rstrip('._-')}-{digest}"
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts...``, refusing any result that resolves outside ``root``.

    Defence in depth: callers pass names from :func:`safe_name`, but a symlink planted inside the
    output folder, or a caller that forgot to sanitise, must still not write elsewhere.
    """
    base = Path(root).resolve()
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part or Path(part).is_absolute():
            raise InputError(f"unsafe output name {part!r}")
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise InputError(f"output path {target} would lie outside {base}")
    return target


class NameAllocator:
    """Hands out unique, safe names within one run (case-insensitively: macOS/Windows folders)."""

    def __init__(self, *, fallback: str = "item", max_len: int = MAX_NAME,
                 used: MutableSet[str] | None = None) -> None:
        """``used``: where the claimed names are kept (a set by default; ``segment`` keeps them on
        disk, so a run over millions of images does not hold them all in memory)."""
        self.fallback = fallback
        self.max_len = max_len
        self._used: MutableSet[str] = set() if used is None else used

    def claim(self, raw: object, *, fallback: str | None = None) -> str:
        """A unique safe name for ``raw``; ``fallback`` (sanitised too) when nothing of it is usable."""
        fb = safe_name(fallback, fallback=self.fallback, max_len=self.max_len) if fallback else self.fallback
        base = safe_name(raw, fallback=fb, max_len=self.max_len)
        name, n = base, 1
        while name.lower() in self._used:
            n += 1
            name = f"{base}-{n}"
        self._used.add(name.lower())
        return name

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._used


def image_output_name(sop_instance_uid: str | None, source: str | Path | None, index: int) -> str:
    """The raw (unsanitised) name for one image's outputs: its SOPInstanceUID, else its file stem.

    The UID is preferred because it is what PACS users search for and is unique per image even
    when thousands of files are called ``IM000001``; in-memory arrays get ``image-NNNN``.
    """
    if sop_instance_uid and str(sop_instance_uid).strip():
        return str(sop_instance_uid).strip()
    if source is not None:
        stem = Path(str(source)).name
        for suffix in (".dcm", ".dicom", ".png", ".jpg", ".jpeg"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if stem:
            return stem
    return f"image-{index:04d}"
