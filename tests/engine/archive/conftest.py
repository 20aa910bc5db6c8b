"""Fixtures shared by the archive tests (local pipeline, Ray executor)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weights checkpoint on disk, one per test module."""
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(random_checkpoint("tiny", seed=0, model_id="test-tiny"), path)
    return path
