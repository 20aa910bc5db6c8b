"""Real-size films from a real Orthanc, over DICOMweb and over DIMSE: the same numbers as from
files, and (DICOMweb, with --store) one SR each.

The first user to score a real PACS hung forever: WADO-retrieved bytes (~15 MB a film) went to the
decode workers over the same pipes as their 30 MB results (see radflash.archive.decode_pool).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from radflash.archive.verb import score
from tests.engine.archive.test_real_size import assert_same_scores
from tests.engine.orthanc import start_or_skip

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install 'radflash[dicomweb]')")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, real_size_archive):
    server = start_or_skip(tmp_path_factory.mktemp("pacs"))
    server.upload(list(real_size_archive.files))
    yield server
    server.stop(kill=True)  # teardown: nothing left to close cleanly


def sr_count(server) -> int:
    from dicomweb_client.api import DICOMwebClient

    return len(DICOMwebClient(server.url + "/dicom-web").search_for_instances(search_filters={"Modality": "SR"}))


@pytest.fixture(scope="module")
def files(real_size_archive, tiny_model: Path):
    return score(real_size_archive.folder, None, model=tiny_model, workers=0, batch_size=1, progress=False)


def test_real_size_films_over_dicomweb_score_as_files_and_store_one_sr_each(
        pacs, real_size_archive, files, tiny_model: Path, tmp_path: Path) -> None:
    n = len(real_size_archive.files)
    first = score(pacs.dicomweb, tmp_path / "a", model=tiny_model, workers=2, batch_size=1, progress=False,
                  stow="same", timeout=120)
    assert (first.scored, first.failed) == (n, 0)
    assert_same_scores(first, files)
    assert sr_count(pacs) == n  # one SR per scored image

    # one worker, full batches, a fresh output folder: the same scores, and nothing stored twice
    again = score(pacs.dicomweb + "/studies?ModalitiesInStudy=CR", tmp_path / "b", model=tiny_model, workers=1,
                  batch_size=16, progress=False, stow="same", timeout=120)
    assert (again.scored, again.failed) == (n, 0)
    assert_same_scores(again, files)
    assert sr_count(pacs) == n


def test_real_size_films_over_dimse_score_as_files(pacs, real_size_archive, files, tiny_model: Path) -> None:
    """C-GET in the stored transfer syntaxes, two decode workers: the bytes a file run reads."""
    pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'radflash[dimse]')")
    run = score(pacs.dimse("ModalitiesInStudy=CR"), None, model=tiny_model, workers=2, batch_size=1,
                progress=False, timeout=120)
    assert (run.scored, run.failed) == (len(real_size_archive.files), 0)  # (SRs stored above: skipped, not images)
    assert_same_scores(run, files)
