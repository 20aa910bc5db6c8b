"""Model families by name: a checkpoint's ``model.architecture`` picks the module that is built.

Why a table of import strings rather than imports: :mod:`radflash.models.config` validates the
family name against this table, and the config is imported by code that must not pull in model
or kernel code (the bench reference path); a family's module is imported only when a model of
that family is built. Adding a family is one line here plus its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from radflash.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

    from radflash.models.config import ModelConfig

# family name (the config's ``architecture``) → "module:Class"
FAMILIES: dict[str, str] = {
    "radzero": "radflash.models.radzero:RadZero",
    "carzero": "radflash.models.carzero:CARZero",
}


def names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(FAMILIES)


def expected() -> str:
    """What a config may say, worded for the one-line error: ``'radzero'`` or ``one of 'a', 'b'``."""
    quoted = [repr(n) for n in FAMILIES]
    return quoted[0] if len(quoted) == 1 else "one of " + ", ".join(quoted)


def check_name(name: str) -> str:
    """Return ``name`` if it is a registered family, else raise ``ValueError`` (pydantic's hook).

    The config schema calls this at validation time, not at import time, so a family registered
    later (or by a test) is accepted without rebuilding the schema.
    """
    if name not in FAMILIES:
        raise ValueError(f"must be {expected()}")
    return name


def family_class(name: str) -> type[nn.Module]:
    """Import and return the module class of family ``name`` (lazily: only this family's code)."""
    try:
        target = FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"model.architecture: must be {expected()} (got {name!r})") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build(config: ModelConfig) -> nn.Module:
    """Build the (randomly initialised) module of the family ``config.architecture`` names.

    The result is checked against :class:`radflash.models.base.ModelFamily`, so a family that
    forgets a member fails here with its name rather than deep inside a verb.
    """
    from torch import nn

    from radflash.models.base import MEMBERS, ModelFamily

    module = family_class(config.architecture)(config)
    if not isinstance(module, nn.Module) or not isinstance(module, ModelFamily):
        missing = [m for m in MEMBERS if not hasattr(module, m)]
        raise TypeError(f"model family {config.architecture!r} ({type(module).__name__}) is not an nn.Module "
                        f"implementing radflash.models.base.ModelFamily (missing: {', '.join(missing) or 'none'})")
    return module
