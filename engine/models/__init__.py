"""Model families (one module per family and its parts) and their configs.

Lazy, like the root package: ``import radflash.models.config`` must not import the kernels (the
bench reference path imports the config only).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"RadZero": "radflash.models.radzero"}
__all__ = ["RadZero"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radflash.models' has no attribute {name!r}")
