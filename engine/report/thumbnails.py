"""Small JPEG thumbnails for the report's gallery: grey radiograph, heat overlay, mask overlay.

Thumbnails are at most :data:`MAX_SIDE` pixels on their long side and JPEG-encoded (quality
:data:`QUALITY`), so a gallery of 14 findings × 8 images adds well under a megabyte to the
HTML; they are embedded as ``data:`` URIs because the report must work offline from ``file://``.
Encoding is deterministic (same pixels → same bytes), which keeps ``radflash report OUT``
byte-identical to the file the run wrote.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np

from radflash.segment.writers import blend_mask

if TYPE_CHECKING:
    from PIL import Image

MAX_SIDE = 256
QUALITY = 85
HEAT_ALPHA = 0.6  # overlay opacity at map probability 1; fades to 0 where the map is 0

# A perceptually ordered dark-blue → red → yellow ramp (close to "inferno"), as control points.
_HEAT_STOPS = np.array([
    [0.00, 0, 0, 4], [0.25, 87, 16, 110], [0.50, 188, 55, 84], [0.75, 249, 142, 9], [1.00, 252, 255, 164],
], dtype=np.float64)


def thumbnail_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(h, w) scaled so the long side is at most ``max_side`` (never upscaled), at least 1 each."""
    scale = min(1.0, max_side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def gray_thumbnail(pixels: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """H×W image in [0, 1] → a float32 thumbnail in [0, 1] (area-averaged, so no aliasing)."""
    from PIL import Image

    img = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32)), 0.0, 1.0)
    h, w = thumbnail_size(*img.shape[:2], max_side=max_side)
    if (h, w) == img.shape[:2]:
        return img
    small = Image.fromarray(img, mode="F").resize((w, h), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map or mask resized (bilinear) to ``size`` = (h, w), for overlaying on a thumbnail."""
    from PIL import Image

    arr = np.asarray(values, dtype=np.float32)
    if arr.shape == tuple(size):
        return arr
    out = Image.fromarray(arr, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def heat_colors(p: np.ndarray) -> np.ndarray:
    """Map probabilities in [0, 1] to RGB (float, 0–255) along the heat ramp."""
    p = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64)), 0.0, 1.0)
    return np.stack([np.interp(p, _HEAT_STOPS[:, 0], _HEAT_STOPS[:, c]) for c in (1, 2, 3)], axis=-1)


def heat_overlay(gray: np.ndarray, prob: np.ndarray) -> Image.Image:
    """The grey thumbnail with the similarity map blended in, more opaque where the map is high."""
    from PIL import Image

    g = np.repeat((np.clip(gray, 0.0, 1.0) * 255.0)[..., None], 3, axis=2)
    p = np.clip(resize_map(prob, gray.shape), 0.0, 1.0)
    alpha = (HEAT_ALPHA * p)[..., None]
    rgb = g * (1.0 - alpha) + heat_colors(p) * alpha
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def mask_overlay(gray: np.ndarray | None, mask: np.ndarray, color: tuple[int, int, int],
                 size: tuple[int, int] | None = None, alpha: float = 0.45) -> Image.Image:
    """A mask (any size) over the grey thumbnail in ``color`` with a solid outline.

    Without a thumbnail (an old segment output) the mask is drawn on black at ``size``.
    """
    from PIL import Image

    if gray is None:
        gray = np.zeros(size or thumbnail_size(*np.asarray(mask).shape[:2]), np.float32)
    m = resize_map((np.asarray(mask) > 0).astype(np.float32), gray.shape) >= 0.5
    rgb = np.repeat((np.clip(gray, 0.0, 1.0) * 255.0)[..., None], 3, axis=2)
    blend_mask(rgb, m, np.asarray(color, dtype=np.float64), alpha)
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def gray_image(gray: np.ndarray) -> Image.Image:
    from PIL import Image

    return Image.fromarray(np.clip(np.asarray(gray) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def data_uri(img: Image.Image, quality: int = QUALITY) -> str:
    """``data:image/jpeg;base64,…`` of ``img`` (baseline JPEG, no metadata: nothing but pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_data_uri(uri: str) -> np.ndarray:
    """A thumbnail stored as a data URI → float32 grey pixels in [0, 1] (for re-composing overlays)."""
    from PIL import Image

    head, _, payload = uri.partition(",")
    if not head.startswith("data:image/") or not payload:
        raise ValueError("not an image data URI")
    img = Image.open(io.BytesIO(base64.b64decode(payload))).convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0
