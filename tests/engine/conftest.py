"""Fixtures shared by the engine's test packages."""

from __future__ import annotations

from pathlib import Path

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
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weights checkpoint on disk (read-only: shared by every test that scores)."""
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(random_checkpoint("tiny", seed=0, model_id="test-tiny"), path)
    return path


@pytest.fixture(scope="session")
def real_size_archive(tmp_path_factory: pytest.TempPathFactory):
    """Films at the size hospitals store them, for every source and executor (tests/engine/realsize.py)."""
    from tests.engine.realsize import write_real_size_archive

    return write_real_size_archive(tmp_path_factory.mktemp("real-size"))
