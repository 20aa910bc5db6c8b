"""Rebuild the embedded demo archive that ``radflash score`` scores when given no inputs.

Run ``python -m radflash.training.demo_assets`` (seeded, byte-stable across runs of the same
library versions). The archive is synthetic phantoms plus the clutter real PACS exports hold
(other modalities, laterals, multi-frame, colour, corrupt files), so the default run shows every
status. Its expected-status manifest is kept beside the folder, not inside it, so it is not
itself scored as a junk file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import radflash
from radflash.synthetic.dicom_archive import write_archive

DEMO_ARCHIVE = Path(radflash.__file__).resolve().parent / "assets" / "demo_archive"
SEED, FILMS = 2026, 16


def build_demo_archive(dest: Path = DEMO_ARCHIVE, *, n: int = FILMS, seed: int = SEED) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    write_archive(dest, n, seed)
    (dest / "manifest.json").replace(dest.with_name(dest.name + ".manifest.json"))
    return dest


if __name__ == "__main__":
    print(build_demo_archive())
