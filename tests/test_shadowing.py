"""No folder of the checkout shadows an installed package, however the project is run.

The product card fixes the top-level folder names (``kernels/``, ``training/``, ``engine/``, …), and
some of them are import names of other distributions too: transformers ≥ 5 imports the PyPI
package ``kernels`` as soon as a model module is imported. Whatever puts the checkout root on
``sys.path`` (``python -m pytest`` and ``python -m radflash`` from the root, any script run there)
would make the folder win. ``import radflash`` drops the root (``radflash._detach_checkout``) and
pytest runs in importlib mode; these tests hold both mechanisms to it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]


def top_level_names() -> list[str]:
    """Every name under which a top-level folder of the checkout could be imported."""
    return sorted(p.name for p in CHECKOUT.iterdir() if p.is_dir() and p.name.isidentifier())


def inside_checkout(spec: importlib.machinery.ModuleSpec) -> bool:
    places = [spec.origin] if spec.origin not in (None, "namespace") else []
    places += list(spec.submodule_search_locations or [])
    return any(Path(p).resolve().is_relative_to(CHECKOUT) for p in places if p)


def test_the_checkout_root_is_not_on_sys_path() -> None:
    """The mechanism itself: under the README's own `python -m pytest`, nothing adds the root."""
    assert str(CHECKOUT) not in {os.path.realpath(p or os.curdir) for p in sys.path}


def test_no_top_level_folder_shadows_an_installed_distribution() -> None:
    installed = importlib.metadata.packages_distributions()
    clashing = [name for name in top_level_names() if name in installed]
    assert "kernels" in clashing, "transformers' dependency `kernels` is part of the test install: the case to guard"
    for name in clashing:
        spec = importlib.util.find_spec(name)
        assert spec is not None and not inside_checkout(spec), (
            f"{name!r} resolves to the checkout, not to {installed[name]}")


@pytest.mark.parametrize("module, model", [
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Model"),
    ("transformers.models.bert.modeling_bert", "BertModel"),
    ("transformers.models.vit.modeling_vit", "ViTModel"),
])
def test_transformers_models_import_with_the_pypi_kernels_package(module: str, model: str) -> None:
    kernels = importlib.import_module("kernels")
    assert not inside_checkout(kernels.__spec__), kernels.__file__
    assert hasattr(importlib.import_module(module), model)


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_run_from_the_checkout_root_imports_installed_packages(how: str, tmp_path: Path) -> None:
    """Code run with ``-c`` or ``-m`` in the root, where Python puts the root first on sys.path."""
    code = ("import radflash, importlib.util; import transformers.models.bert.modeling_bert; "
            "print(importlib.util.find_spec('kernels').origin)")
    (tmp_path / "radflash_probe.py").write_text(code)
    argv = [sys.executable, "-c", code] if how == "-c" else [sys.executable, "-m", "radflash_probe"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(argv, cwd=CHECKOUT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert not origin.is_relative_to(CHECKOUT), origin


def test_no_public_name_of_radflash_kernels_hides_its_submodule() -> None:
    """``radflash.kernels.<sub>`` is the submodule for every submodule the package has."""
    package = importlib.import_module("radflash.kernels")
    subs = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert {"attention", "maps", "vlcabs_head"} <= set(subs)
    for name in subs:
        importlib.import_module(f"radflash.kernels.{name}")
        assert isinstance(getattr(package, name), types.ModuleType), f"radflash.kernels.{name} is not the module"
    assert set(package.__all__).isdisjoint(subs)
