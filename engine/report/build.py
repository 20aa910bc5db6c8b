"""Write ``OUT/report.html``: collect the folder, render, replace the old file atomically.

The modes (``--report``): ``none`` writes nothing; ``summary`` has counts, histograms and the image
table but no picture of any patient; ``full`` adds the gallery when the run kept one
(``--report-maps K``). The default is ``full`` where a gallery was kept and ``summary`` otherwise,
for the run and for ``radflash report`` alike, so a rebuild with default options reproduces the
file the run wrote byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

from radflash.errors import InputError
from radflash.report.data import collect
from radflash.report.gallery import GALLERY

REPORT_HTML = "report.html"
MODES = ("none", "summary", "full")


def default_mode(out_dir: str | Path) -> str:
    """``full`` when ``out_dir`` holds a gallery (``--report-maps`` was given), else ``summary``."""
    return "full" if (Path(out_dir) / GALLERY).is_file() else "summary"


def write_report(out_dir: str | Path, *, mode: str | None = None, include_phi: bool = False,
                 path: str | Path | None = None) -> Path | None:
    """Build the report of the score/segment output ``out_dir``; returns its path (None for ``none``).

    ``path`` writes it elsewhere than ``OUT/report.html`` (e.g. to share a summary without the
    folder). Errors are one line naming the folder and the reason.
    """
    from radflash import __version__
    from radflash.report.html import render

    mode = default_mode(out_dir) if mode is None else mode
    if mode not in MODES:
        raise InputError(f"unknown report mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "none":
        return None
    data = collect(out_dir, mode=mode, include_phi=include_phi)  # type: ignore[arg-type]
    text = render(data, mode=mode, version=__version__)
    target = Path(path) if path is not None else Path(out_dir) / REPORT_HTML
    if target.is_dir():
        raise InputError(f"{target}: is a folder; give a file name for the report")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{target}: cannot write the report ({exc.strerror or type(exc).__name__})") from None
    return target
