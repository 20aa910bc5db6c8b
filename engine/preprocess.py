"""The one place where images become model input.

Every caller (API, score pipeline, segment, bench, training, export calibration) goes through
:func:`preprocess`, so a change of resize or normalisation can never make two paths disagree.
RadZero: grayscale → 3 equal channels, bicubic resize with antialiasing (what PIL does when it
shrinks) to S×S ignoring aspect ratio, values in [0, 1], then per-channel mean/std.
CARZero (``letterbox``): the longer side resized to L keeping the aspect ratio (area averaging
when shrinking, like cv2's INTER_AREA; bilinear when enlarging), zero-padded centred to L×L,
centre-cropped to S×S. The reference reads 8-bit PNGs; radflash keeps the full precision of
16-bit DICOM pixel data through the resize.
"""

from __future__ import annotations

import math
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
    letterbox: int | None = None  # CARZero: resize the longer side to this, pad square, centre-crop

    @property
    def geometry(self) -> Preprocessing:
        """The same resize without normalisation (what the decode workers apply)."""
        return Preprocessing(self.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), self.letterbox)


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
            if spec.letterbox is not None:
                x = letterbox(x, spec.letterbox, size)
            else:
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        resized.append(x.clamp_(0.0, 1.0))
    batch = torch.cat(resized).expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return ((batch - mean) / std).to(dtype)


def letterbox(x: torch.Tensor, side: int, crop: int) -> torch.Tensor:
    """(1, 1, H, W) → (1, 1, crop, crop): longer side to ``side``, centred zero pad, centre crop.

    Sizes follow CARZero's reference (``int()`` truncation of the shorter side, pad split
    floor/ceil, torchvision's rounded centre crop), so the pixel grid is the one it trained on.
    """
    h, w = x.shape[-2:]
    if h >= w:
        new_h, new_w = side, max(1, int(w * (side / h)))
    else:
        new_h, new_w = max(1, int(h * (side / w))), side
    x = area_resize(x, new_h, new_w)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    x = F.pad(x, (left, side - new_w - left, top, side - new_h - top))
    start = round((side - crop) / 2.0)
    return x[..., start:start + crop, start:start + crop]


def area_resize(x: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """cv2 INTER_AREA: exact box-filter averaging when shrinking, bilinear when enlarging.

    torch's ``mode="area"`` (adaptive average pooling) rounds window edges to whole pixels, which
    for non-integer factors differs from OpenCV; here each output pixel averages the input area it
    covers with fractional edge weights. Each output row or column touches only the ⌈n_in/n_out⌉ + 1
    input cells under it, so the filter is applied as that band (a gather and a weighted sum per
    axis): O(H·W) work, where the equivalent dense (n_out, n_in) matrix products cost O(n_out·H·W),
    ~100 ms for a 3000² film on one core, in the decode feed thread.
    """
    h, w = x.shape[-2:]
    if new_h > h or new_w > w:
        return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return _box_axis(_box_axis(x, new_h, x.dim() - 2), new_w, x.dim() - 1)


def _box_axis(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """Shrink axis ``dim`` of ``x`` to ``n_out``: out[j] averages the cells over [j·s, (j+1)·s), s = n_in/n_out."""
    n_in = x.shape[dim]
    scale = n_in / n_out
    taps = math.ceil(scale) + 1  # cells one output cell can overlap
    j = torch.arange(n_out, dtype=torch.float64)[:, None]
    cells = torch.floor(j * scale).long() + torch.arange(taps)[None, :]  # (n_out, taps)
    lo = torch.maximum(j * scale, cells.double())
    hi = torch.minimum((j + 1) * scale, cells.double() + 1)
    weights = ((hi - lo).clamp(min=0) / scale).to(device=x.device, dtype=x.dtype)  # 0 past the cell's edge
    gathered = x.index_select(dim, cells.clamp(max=n_in - 1).flatten().to(x.device))
    shape = [*x.shape[:dim], n_out, taps, *x.shape[dim + 1:]]
    view = [1] * len(shape)
    view[dim], view[dim + 1] = n_out, taps
    return (gathered.view(shape) * weights.view(view)).sum(dim + 1)
