"""The one place where images become model input.

Every caller (API, score pipeline, segment, bench, training, export calibration) goes through
:func:`preprocess`, so a change of resize or normalisation can never make two paths disagree.
Reference: grayscale → 3 equal channels, bicubic resize with antialiasing (what PIL does when it
shrinks) to S×S ignoring aspect ratio, values in [0, 1], then per-channel mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radflash.errors import InputError

ImageLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[torch.Tensor]:
    """Accept one H×W image, a B×H×W / B×1×H×W batch, or a list of H×W images of any sizes."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = _to_float(images)
        if t.ndim == 2:
            return [t]
        if t.ndim == 3:
            return list(t.unbind(0))
        if t.ndim == 4 and t.shape[1] == 1:
            return list(t[:, 0].unbind(0))
        raise InputError(
            f"images must be H×W, B×H×W or B×1×H×W grayscale, got shape {tuple(images.shape)}"
        )
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InputError(f"images must be arrays/tensors or a list of them, got {type(images).__name__}")
    if len(images) == 0:
        raise InputError("no images given")
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, (np.ndarray, torch.Tensor)):
            raise InputError(f"image #{i} is a {type(img).__name__}, expected a numpy array or tensor")
        t = _to_float(img)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise InputError(f"image #{i} must be a 2-D grayscale H×W array, got shape {tuple(img.shape)}")
        out.append(t)
    return out


def _to_float(img: ImageLike) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if not t.is_floating_point():
        raise InputError(f"images must be float in [0, 1] or uint8, got dtype {t.dtype}")
    if t.numel() and min(t.shape[-2:]) < 2:
        raise InputError(f"image too small: shape {tuple(t.shape)}")
    return t


def preprocess(
    images: ImageLike | Sequence[ImageLike],
    spec: Preprocessing,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images in [0, 1] (any sizes) → normalised (B, 3, S, S) model input on ``device``."""
    size = spec.image_size
    resized = []
    for img in as_image_list(images):
        x = img.to(device=device, dtype=torch.float32)[None, None]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        resized.append(x.clamp_(0.0, 1.0))
    batch = torch.cat(resized).expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return ((batch - mean) / std).to(dtype)
