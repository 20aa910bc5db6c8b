"""Real-size films (tests/engine/realsize.py: 3000×2500 16-bit, ~15 MB each, four lossless
syntaxes) sent to a node with DCMTK's storescu: each is kept, scored and reported back to a real
Orthanc with the probabilities ``radflash score`` gives the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.serving.conftest import (
    expected_scores,
    orthanc_or_skip,
    sr_count,
    sr_uid_of,
    srs_in,
    stored_by,
    storescu,
    uids,
)

pytestmark = pytest.mark.slow


def test_real_size_films_are_scored_and_reported_back(tmp_path: Path, nodes, real_size_archive) -> None:
    films = [p for p in real_size_archive.generated if p.stem in ("film-explicit", "film-j2k")]  # 15 MB raw, JPEG 2000
    pacs = orthanc_or_skip(tmp_path / "pacs")
    try:
        node = nodes("node", "--forward", pacs.dicomweb, "--max-batch", "4").start()
        sent = storescu(node.dicom_port, films)
        assert sent.returncode == 0 and stored_by(sent) == len(films), sent.stdout + sent.stderr
        node.wait_for(lambda: sr_count(pacs) >= len(films), 120, "SRs of the real-size films")
        want, got = expected_scores(films), srs_in(pacs)
        assert len(got) == len(films)
        for path in films:
            sop, study = uids(path)
            for name, p in want[sop].items():
                assert got[sr_uid_of(sop, study)][name] == pytest.approx(p, abs=1e-5), (path.name, name)
        assert node.terminate() == 0
    finally:
        pacs.stop(kill=True)
