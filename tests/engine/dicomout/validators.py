"""The real DICOM validators the writer tests run: dciodvfy (dicom3tools) and dsrdump (DCMTK).

They are Debian packages (``apt-get install dicom3tools dcmtk``). In CI (``CI`` set) a missing one
fails the test, so an object that was never validated cannot pass; on a developer machine without
them the tests skip, naming the package.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.services import unavailable

PACKAGES = {"dciodvfy": "dicom3tools", "dsrdump": "dcmtk"}


def tool(name: str) -> str:
    """The path of validator ``name``; fails under CI and skips elsewhere when it is missing."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {PACKAGES[name]})")
    return path


@dataclass(frozen=True)
class Verdict:
    """dciodvfy's findings on one file: its error and warning lines."""

    errors: list[str]
    warnings: list[str]


def dciodvfy(path: Path) -> Verdict:
    """Validate ``path`` against its IOD. dciodvfy exits 0 even with errors: its lines decide."""
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return Verdict([line for line in lines if line.startswith("Error")],
                   [line for line in lines if line.startswith("Warning")])


def dsrdump(path: Path) -> str:
    """The SR tree as DCMTK prints it, with template identifiers (``+Pt``); a parse failure fails."""
    out = subprocess.run([tool("dsrdump"), "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"dsrdump cannot parse {path}: {out.stderr or out.stdout}"
    return out.stdout


# Warnings every object may keep, each with its reason (listed in the README as well):
EXPECTED_WARNINGS = (
    # AIR puts the Device UID in the Contributing Equipment item; dicom3tools' IOD tables do not list it there
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",  # the same Device UID, as dciodvfy names its consequence
    "Unrecognized defined term <99RADFLASH>",  # private codes for custom prompts / uncoded presets
    "needed to build DICOMDIR",  # the source has no Study ID / Study Time: copied empty (Type 2)
    "Retired Person Name form",  # the real CR's Referring Physician's Name "ward", copied unchanged
)


def unexpected(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(e in w for e in EXPECTED_WARNINGS)]
