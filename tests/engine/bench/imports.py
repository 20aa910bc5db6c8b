"""The radflash imports of a module, read from its source: the bench references' independence tests."""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType


def radflash_imports(module: ModuleType) -> tuple[ast.Module, dict[str, bool]]:
    """The module's syntax tree and every radflash name it imports → imported at run time (False:
    only under ``if TYPE_CHECKING``). ``from a.b import c`` records both ``a.b`` and ``a.b.c``."""
    tree = ast.parse(Path(module.__file__).read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) ==
                 "TYPE_CHECKING" for n in ast.walk(node)}
    used: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "radflash":
                used[name] = used.get(name, False) or id(node) not in type_only
    return tree, used
