"""Real-size films (tests/engine/realsize.py) through every local executor, and the decode pool's
protocol with real-size payloads in both directions (the deadlock that small fixtures hid)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from radflash.archive.decode_pool import DecodePool, DecodeTask, decode_inline
from radflash.archive.verb import score

pytestmark = pytest.mark.slow


def probs_by_uid(run) -> dict[str, np.ndarray]:
    cols = [c for c in run.results.column_names if c.endswith(".prob")]
    return {r["sop_instance_uid"]: np.array([r[c] for c in cols]) for r in run.results.to_pylist()}


def assert_same_scores(run, reference, atol: float = 1e-5) -> None:
    """Lossless syntaxes decode to the same pixels; batch composition moves a CPU matmul's last bits."""
    got, want = probs_by_uid(run), probs_by_uid(reference)
    assert got.keys() == want.keys()
    for uid, p in want.items():
        np.testing.assert_allclose(got[uid], p, rtol=0, atol=atol, err_msg=uid)


@pytest.fixture(scope="module")
def reference(real_size_archive, tiny_model: Path):
    """In-process decode, one image per batch: what every other executor must reproduce. The four
    generated 3000×2500 films (the real CR and its twins go through the PACS, Ray and segment tests)."""
    return score(list(real_size_archive.generated), None, model=tiny_model, workers=0, batch_size=1, progress=False)


def test_every_real_size_film_scores(reference, real_size_archive) -> None:
    assert (reference.scored, reference.skipped, reference.failed) == (len(real_size_archive.generated), 0, 0)


@pytest.mark.parametrize("workers, batch_size", [(0, 16), (1, 1), (1, 16), (2, 1), (2, 16)])
def test_local_executors_agree_on_real_size_films(workers: int, batch_size: int, reference, real_size_archive,
                                                  tiny_model: Path, tmp_path: Path) -> None:
    run = score(list(real_size_archive.generated), tmp_path / "out", model=tiny_model, workers=workers,
                batch_size=batch_size, progress=False, commit_every=3)
    assert run.failed == 0 and run.scored == len(real_size_archive.generated)
    assert_same_scores(run, reference)


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_pool_carries_real_size_payloads_both_ways(workers: int, real_size_archive) -> None:
    """Items as bytes (~15 MB each, as a DICOMweb retrieval brings them) in, 30 MB float32 films
    out, ``depth`` 2: the old protocol deadlocked here on the second item. Fails in seconds, never
    hangs the suite: the pool runs on a thread that is given a deadline, then its workers are killed."""
    tasks = [DecodeTask(i, f"item-{i}", None, p.read_bytes()) for i, p in enumerate(real_size_archive.generated)]
    pool = DecodePool(workers, depth=2, timeout=60.0)
    out: list = []
    runner = threading.Thread(target=lambda: out.extend(pool.run(tasks)), daemon=True)
    runner.start()
    runner.join(timeout=45)
    if runner.is_alive():
        pool.kill()
        pytest.fail(f"decode pool with {workers} worker(s) made no progress on real-size items: deadlock")
    inline = {d.index: d for d in decode_inline(tasks)}
    assert sorted(d.index for d in out) == sorted(inline)
    for d in out:
        assert d.status == "loaded", d.reason
        assert d.path == f"item-{d.index}"  # named by the item's key, not by the spooled copy
        np.testing.assert_array_equal(d.pixels, inline[d.index].pixels)
