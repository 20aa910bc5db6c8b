"""DCMTK as the independent reference: its encoders write the compressed test files, its renderer
(``dcmj2pnm``/``dcml2pnm``) says what a DICOM viewer shows.

DCMTK is a Debian package (``apt-get install dcmtk``). Locally a missing DCMTK skips the tests that
need it, naming the package; under CI (``CI`` set) it fails them, since CI installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from tests.services import unavailable

# transfer syntax → the DCMTK command that converts an explicit-VR little-endian file into it
ENCODERS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.2": ("dcmconv", "+tb"),  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99": ("dcmconv", "+td"),  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5": ("dcmcrle",),  # RLE Lossless
    "1.2.840.10008.1.2.4.57": ("dcmcjpeg", "+el"),  # JPEG Lossless, Process 14
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg", "+e1"),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.51": ("dcmcjpeg", "+ee"),  # JPEG Extended (lossy, 12-bit when the image is)
    "1.2.840.10008.1.2.4.80": ("dcmcjpls", "+el"),  # JPEG-LS Lossless
}
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
TOOLS = ("dcmj2pnm", "dcml2pnm", "dcmconv", "dcmcrle", "dcmcjpeg", "dcmcjpls")


def require_dcmtk() -> None:
    """Skip (locally) or fail (CI) when a DCMTK tool is missing."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"DCMTK not found ({', '.join(missing)}): apt-get install dcmtk")


def encode(src: Path, dst: Path, transfer_syntax: str) -> Path:
    """``src`` (explicit VR little endian) re-encoded by DCMTK, or by pydicom's OpenJPEG for JPEG 2000
    (DCMTK's free toolkit has no JPEG 2000 codec)."""
    if transfer_syntax in JPEG_2000:
        import pydicom

        ds = pydicom.dcmread(src)
        ds.compress(transfer_syntax, encoding_plugin="pylibjpeg")
        ds.save_as(dst, enforce_file_format=True)
        return dst
    cmd = ENCODERS[transfer_syntax]
    done = subprocess.run([*cmd, str(src), str(dst)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {src.name}: {done.stderr.strip()}")
    return dst


def render(path: Path, out: Path, voi: str, transfer_syntax: str | None = None) -> tuple[np.ndarray | None, str]:
    """DCMTK's display of ``path`` as float64 in [0, 1] (16-bit PNG / 65535), or (None, why not).

    ``voi`` is "voi-lut" (first VOI LUT), "window" (first window, with the file's VOI LUT Function)
    or "minmax"; the Modality LUT and MONOCHROME1 inversion are DCMTK's defaults.
    """
    from PIL import Image

    option = {"voi-lut": ["+Wl", "1"], "window": ["+Wi", "1"], "minmax": ["+Wm"]}[voi]
    tool = "dcml2pnm" if transfer_syntax in JPEG_LS else "dcmj2pnm"
    if out.exists():
        out.unlink()
    done = subprocess.run([tool, "+on2", *option, str(path), str(out)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.exists():
        lines = [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))] or done.stderr.splitlines()
        return None, (lines[0] if lines else f"{tool} exit {done.returncode}")[:160]
    with Image.open(out) as im:
        return np.asarray(im).astype(np.float64) / 65535.0, ""
