"""``constraints.txt`` pins a version of every requirement the test install pulls, inside the
ranges ``setup.py`` declares, so ``pip install -c constraints.txt -e ".[test]"`` reproduces the
last green run and a range that no longer admits its pin fails here, not in a user's install."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pins() -> dict[str, Version]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def test_every_test_requirement_is_pinned_inside_its_range() -> None:
    pinned = pins()
    requirements = [Requirement(r) for r in importlib.metadata.requires("radflash") or []]
    wanted = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "test"})]
    assert {"torch", "pydicom", "transformers", "kernels"} <= set(pinned)
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is required by the test install but not pinned in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside setup.py's {req.specifier}")
