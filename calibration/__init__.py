"""Post-training calibration: INT8 quantisation of the image tower and per-finding score calibration.

``radflash.checkpoints.calibration`` is what scoring calls; it imports neither onnx nor matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from radflash.errors import ImageLoadError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".dcm")


def read_image(path: str | Path) -> np.ndarray:
    """One grayscale image as float32 H×W in [0, 1] (PNG/JPEG/TIFF via Pillow, .npy, DICOM via radflash.io.imageio)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False).astype(np.float32)
            if arr.max(initial=0) > 1:
                arr = arr / 255.0 if arr.max() <= 255 else (arr - arr.min()) / max(float(np.ptp(arr)), 1e-6)
            return arr
        if suffix == ".dcm":
            from radflash.io import imageio  # the engine's DICOM loader (modality LUT, VOI, MONOCHROME1)

            return np.asarray(imageio.load_image(path), dtype=np.float32)
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"))
        return (arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 or arr.max(initial=0) > 255 else 255.0))
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise ImageLoadError(f"{path}: cannot read image ({exc})") from None


def list_images(folder: str | Path, *, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def phantom_samples(n: int, *, seed: int, size: int) -> Sequence:
    """``n`` labelled phantom samples (needs radflash.synthetic.phantoms)."""
    try:
        from radflash.synthetic.phantoms import FINDINGS  # noqa: F401  (fails early when the generator is absent)
        from radflash.training.data import PhantomDataset
    except ImportError as exc:
        raise InputError(f"phantoms are not available in this build ({exc}); pass images instead") from None
    return PhantomDataset(seed=seed, length=n, size=size)
