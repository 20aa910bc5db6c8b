"""The package layout is the architecture: no stage imports a stage above it in the data flow.

Read statically (every ``import``, lazy ones inside functions too; ``if TYPE_CHECKING:`` imports are
annotations only and exempt), so a violation fails here however rarely its code path runs. The
table is the README's "Architecture" section; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"engine": "radflash", "kernels": "radflash.kernels", "training": "radflash.training",
           "calibration": "radflash.calibration"}

# Lowest first: a module may import its own layer and the layers before it.
LAYERS: list[tuple[str, ...]] = [
    ("radflash.errors",),
    ("radflash.util",),
    ("radflash.devices", "radflash.preprocess", "radflash.tokenizer", "radflash.findings", "radflash.kernels"),
    ("radflash.synthetic", "radflash.io"),
    ("radflash.models",),
    ("radflash.checkpoints",),
    ("radflash.backends",),
    ("radflash.api",),
    # the DICOM objects (SR, SEG, SC) every verb writes: below the verbs that call it (#27)
    ("radflash.dicomout",),
    ("radflash.archive",),
    ("radflash.segment",),
    ("radflash.bench",),
    ("radflash.report",),
    # the serving node (#25): intake, journal, scheduler, forward; reuses archive's stages
    ("radflash.serving",),
    ("radflash.cli",),
]
# The command line is where everything is assembled: it alone reaches training and calibration,
# lazily, inside the commands that need them (`radflash train`, `evaluate`, `calibrate`).
OUTSIDE_ENGINE = ("radflash.training", "radflash.calibration")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def _layer(module: str) -> int | None:
    for index, group in enumerate(LAYERS):
        if any(module == g or module.startswith(f"{g}.") for g in group):
            return index
    return None


def _imports(tree: ast.Module, own: str) -> list[tuple[int, str]]:
    """(line, imported module) for every run-time import of a radflash module."""
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = own.rsplit(".", node.level)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from radflash import io` imports the submodule radflash.io
            found += [(node.lineno, f"{module}.{a.name}" if module == "radflash" else module) for a in node.names]
    return [(line, m) for line, m in found if m == "radflash" or m.startswith("radflash.")]


def _engine_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "engine").rglob("*.py") if "assets" not in p.parts)


def test_every_engine_package_has_a_layer() -> None:
    engine = ROOT / "engine"
    names = {p.relative_to(engine).parts[0].removesuffix(".py") for p in _engine_modules()}
    unplaced = sorted(n for n in names - {"__init__", "__main__"} if _layer(f"radflash.{n}") is None)
    assert not unplaced, f"add these to LAYERS and to the README's Architecture section: {unplaced}"


def test_engine_has_at_most_ten_top_level_modules() -> None:
    modules = [p.name for p in (ROOT / "engine").glob("*.py")]
    assert len(modules) <= 10, modules


@pytest.mark.parametrize("path", _engine_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_imports_a_stage_above_it(path: Path) -> None:
    own = _module_name(path)
    own_layer = _layer(own)
    bad = []
    for line, module in _imports(ast.parse(path.read_text()), own):
        if module.startswith(OUTSIDE_ENGINE):
            if own_layer != _layer("radflash.cli"):
                bad.append(f"{line}: {module} (the engine never imports training or calibration)")
            continue
        layer = _layer(module)
        if own_layer is not None and layer is not None and layer > own_layer:
            bad.append(f"{line}: {module} (layer {layer} above {own} at layer {own_layer})")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize("folder", ["kernels", "training", "calibration"])
def test_subpackages_below_the_engine_keep_their_direction(folder: str) -> None:
    """Kernels import nothing of the engine; training and calibration never import the command line."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        own = _module_name(path)
        for line, module in _imports(ast.parse(path.read_text()), own):
            if folder == "kernels" and not module.startswith(("radflash.kernels", "radflash.errors")):
                bad.append(f"{path.name}:{line}: {module}")
            if module.startswith("radflash.cli"):
                bad.append(f"{path.name}:{line}: {module}")
    assert not bad, bad
