"""Fixtures of the report tests: a tiny model, a synthetic archive, runs written by the real CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.engine.report.browser import find_chromium, start_chromium
from tests.services import unavailable

FILMS = 24  # chest films; write_archive adds 9 clutter files (skipped or failed)
MAPS_K = 3


@pytest.fixture(scope="package")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital-export-like folder: chest films in several encodings plus clutter."""
    from radflash.synthetic.dicom_archive import MANIFEST, write_archive

    base = tmp_path_factory.mktemp("archive")
    root = base / "export"
    write_archive(root, FILMS, seed=3)
    (root / MANIFEST).replace(base / MANIFEST)  # not itself an input
    return root


def run_cli(*args: str) -> Any:
    from radflash.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="package")
def scored(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``radflash score ARCHIVE -o OUT --report-maps 3``: results, status, manifest, gallery, report."""
    out = tmp_path_factory.mktemp("scored") / "out"
    result = run_cli("score", str(archive), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
                     "--batch-size", "5", "--report-maps", str(MAPS_K), "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="package")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the package's browser tests; skipped with the reason when absent."""
    found = find_chromium()
    if isinstance(found, str):
        unavailable(f"browser tests need Chromium: {found}")
    drv = start_chromium(*found)
    try:
        yield drv
    finally:
        drv.quit()
