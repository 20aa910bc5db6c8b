"""Orthanc fixtures shared by the DICOMweb tests (score and segment over a real PACS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.orthanc import ARCHIVE_FILES, start_or_skip


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc holding the demo archive (chest films in several encodings, CT/MR/knee/lateral...)."""
    server = start_or_skip(tmp_path_factory.mktemp("orthanc"))
    server.stored = server.upload(ARCHIVE_FILES)  # type: ignore[attr-defined]
    yield server
    server.stop(kill=True)  # teardown: nothing left to close cleanly


@pytest.fixture()
def fresh_orthanc(tmp_path: Path):
    """A PACS of its own: storing SRs or SEGs changes what a query lists, so the shared one stays clean."""
    server = start_or_skip(tmp_path / "pacs")
    server.stored = server.upload(ARCHIVE_FILES)  # type: ignore[attr-defined]
    yield server
    server.stop(kill=True)  # teardown: nothing left to close cleanly
