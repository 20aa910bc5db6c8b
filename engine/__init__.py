"""radflash: fast inference for zero-shot chest X-ray vision-language models.

``import radflash; model = radflash.load()`` gives the embedded demo model; pass a checkpoint
folder for real weights (convert released ones with ``radflash convert radzero``).
Names are resolved lazily so that ``import radflash`` (and the CLI's ``--help``) stay instant:
torch is imported only when a model is actually needed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = (Path(__file__).with_name("VERSION")).read_text().strip()

_LAZY = {
    "load": "radflash.api",
    "RadFlashModel": "radflash.api",
    "Scores": "radflash.api",
    "DEMO_MODEL": "radflash.api",
    "RadflashError": "radflash.errors",
    "CheckpointError": "radflash.errors",
    "InputError": "radflash.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radflash' has no attribute {name!r}")
