"""Fixtures shared by the engine's test packages."""

from __future__ import annotations

import pytest
import torch

from radflash.models import RadZero
from radflash.models.config import ModelConfig


@pytest.fixture
def model_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The default device of every RadZero construction: "meta" costs nothing, anything else allocates."""
    devices: list[str] = []
    build = RadZero.__init__

    def spy(self: RadZero, cfg: ModelConfig) -> None:
        devices.append(torch.get_default_device().type)
        build(self, cfg)

    monkeypatch.setattr(RadZero, "__init__", spy)
    return devices


@pytest.fixture(scope="session")
def real_size_archive(tmp_path_factory: pytest.TempPathFactory):
    """Films at the size hospitals store them, for every source and executor (tests/engine/realsize.py)."""
    from tests.engine.realsize import write_real_size_archive

    return write_real_size_archive(tmp_path_factory.mktemp("real-size"))
