"""Imports of optional packages (extras), with the install hint at the point of use.

The core install leaves out what most runs never touch (ONNX, matplotlib, highdicom: see the
README's "Dependencies" table). Every place that needs one of them calls :func:`require`, so a
user without the package gets one line naming the package, what needs it and the extra to
install, never an ImportError traceback from deep inside a run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from radflash.errors import MissingDependency


def install_hint(extra: str) -> str:
    """The pip command that installs radflash's extra ``extra``."""
    return f"pip install 'radflash[{extra}]'"


def require(module: str, *, extra: str, purpose: str, note: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``purpose`` and ``extra``.

    ``purpose`` completes "… is required for <purpose>" (e.g. ``"plots"``); ``note`` is appended
    to the hint (e.g. a GPU variant of the package).
    """
    package = module.split(".")[0]  # the extras' import names are their pip names
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not available(package):
            reason = f"{package} is required for {purpose}"
        else:  # installed, but too old or one of its own imports fails: reinstalling is the fix
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reason = f"{package} is installed but cannot be imported ({first}); it is required for {purpose}"
        raise MissingDependency(f"{reason}: {install_hint(extra)}{note}") from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (cheap; for choosing a default)."""
    if module in sys.modules:  # also covers a module blocked with sys.modules[name] = None
        return sys.modules[module] is not None
    top = module.split(".")[0]
    if top in sys.modules and sys.modules[top] is None:
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False
