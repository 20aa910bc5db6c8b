"""Model families (one module per family and its parts) and their configs.

Lazy, like the root package: ``import radflash.models.config`` must not import the kernels (the
bench reference path imports the config only). :mod:`radflash.models.registry` maps a config's
``architecture`` to its family's module, which is imported only when such a model is built;
:class:`~radflash.models.base.ModelFamily` is what the API and the verbs use of any family.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RadZero": "radflash.models.radzero",
    "ModelFamily": "radflash.models.base",
    "build": "radflash.models.registry",
}
__all__ = ["ModelFamily", "RadZero", "build"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radflash.models' has no attribute {name!r}")
