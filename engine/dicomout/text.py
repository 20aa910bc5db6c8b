"""Fitting free text (prompts, model ids) into DICOM string elements."""

from __future__ import annotations


def ascii_text(text: str) -> str:
    """``text`` in ASCII (the objects' default character set): anything else becomes ``?``."""
    return str(text).encode("ascii", "replace").decode("ascii")


def lo(text: str, limit: int = 64) -> str:
    """Fit text into a DICOM LO element: ASCII, no backslash (the value separator), single spaces,
    at most ``limit`` characters. The exact prompt text is kept in the per-image JSON."""
    text = " ".join(ascii_text(text).replace("\\", "/").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
