"""radflash: fast inference for zero-shot chest X-ray vision-language models.

``import radflash; model = radflash.load()`` gives the embedded demo model; pass a checkpoint
folder for real weights (convert released ones with ``radflash convert radzero``).
Names are resolved lazily so that ``import radflash`` (and the CLI's ``--help``) stay instant:
torch is imported only when a model is actually needed.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

__version__ = (Path(__file__).with_name("VERSION")).read_text().strip()


def _detach_checkout() -> None:
    """Drop a source checkout's root from ``sys.path``.

    Why: the checkout's top-level folders (``kernels/``, ``training/``, ``engine/``, …; names fixed
    by the product card) are import names of other distributions too — transformers imports the
    PyPI package ``kernels``. ``python -m radflash``, ``python -m pytest`` or any script run from
    the root put that root first on ``sys.path``, and the folder would shadow the installed
    package. radflash itself never needs the root there: an editable install maps ``radflash``,
    ``radflash.kernels``, … to their folders through its own finder. An installed wheel has no
    checkout (its parent folder is site-packages, with no ``setup.py`` beside an ``engine/``).
    """
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if package.name != "engine" or not (checkout / "setup.py").is_file():
        return
    root = str(checkout)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


_detach_checkout()

_LAZY = {
    "load": "radflash.api",
    "RadFlashModel": "radflash.api",
    "Scores": "radflash.api",
    "DEMO_MODEL": "radflash.api",
    "RadflashError": "radflash.errors",
    "CheckpointError": "radflash.errors",
    "InputError": "radflash.errors",
    "serve": "radflash.serving",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radflash' has no attribute {name!r}")
