"""What the bench times: prompt lists of any size, a synthetic DICOM archive, or in-memory images.

Built before any timing starts and shared by the radflash and reference loops, so both sides
decode the same files and score the same prompts. When the archive cannot be written (radflash's DICOM
modules not importable, or ``archive_files=0``) the bench falls back to seeded in-memory images and
records why in the report's ``skipped`` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC_SIZE = 512  # side of in-memory images when no DICOM archive can be built


_LOCATIONS = ("left upper lobe", "right upper lobe", "left lower lobe", "right lower lobe", "left lung", "right lung")


def bench_prompts(n: int, defaults: Sequence[str]) -> list[str]:
    """``n`` distinct prompts: the model's defaults first, then '<default> of the <location>' variants."""
    out = list(dict.fromkeys(defaults))
    for loc in _LOCATIONS:
        out += [f"{p} of the {loc}" for p in defaults]
    k = 0
    while len(out) < n:  # open-vocabulary sizes beyond the templates
        out.append(f"There is finding number {k}")
        k += 1
    return out[:n]


@dataclass
class BenchInputs:
    """The images of every timed iteration: DICOM files when an archive was built, else arrays."""

    files: list[Path]  # DICOM files (empty: synthetic in-memory images)
    synthetic: list[np.ndarray]  # float32 [0, 1] H×W, used when files is empty
    map_size: tuple[int, int]

    def batch(self, i: int, b: int) -> list[Path] | list[np.ndarray]:
        pool = self.files or self.synthetic
        return [pool[(i * b + j) % len(pool)] for j in range(b)]


def build_archive(root: Path, n: int, skipped: list[dict[str, str]]) -> list[Path]:
    """``n`` synthetic chest films in the encodings real archives hold (J2K, MONOCHROME1, 8–16 bit...).

    The archive's clutter (knees, CT, broken files) is written too but left out of the timed
    file list: ``decode`` and ``score`` time images that are actually scored.
    """
    if n <= 0:
        skipped.append({"what": "decode, score", "reason": "archive_files=0: in-memory images used"})
        return []
    try:
        from radflash.io.imageio import load_image  # noqa: F401  (needed to decode what we write)
        from radflash.synthetic.dicom_archive import read_manifest, write_archive
    except ImportError as exc:
        reason = f"no synthetic DICOM archive ({exc}); in-memory images used"
        skipped.append({"what": "decode, score", "reason": reason})
        return []
    write_archive(root, n, 0)
    return [root / e.path for e in read_manifest(root) if e.expected == "loaded"][:n]


def make_inputs(files: list[Path], image_size: int) -> BenchInputs:
    """The archive's files (maps at the first file's size), or four seeded images when there are none."""
    if files:
        from radflash.io.imageio import load_image

        h, w = load_image(files[0]).pixels.shape[-2:]
        return BenchInputs(files, [], (int(h), int(w)))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SYNTHETIC_SIZE, 0:SYNTHETIC_SIZE] / SYNTHETIC_SIZE
    synthetic = [np.clip(0.5 + 0.3 * np.sin(3 * xx + k) * np.cos(2 * yy) + rng.normal(0, 0.02, xx.shape), 0, 1)
                 .astype(np.float32) for k in range(4)]
    return BenchInputs([], synthetic, (SYNTHETIC_SIZE, SYNTHETIC_SIZE))


def image_loader():
    """radflash's DICOM loader, imported only when files are timed (its decoders are optional)."""
    from radflash.io.imageio import load_image

    return load_image
