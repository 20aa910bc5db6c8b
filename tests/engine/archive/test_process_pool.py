"""The decode process a Ray decode task keeps between calls (``process_pool``/``decode_files``), and
the niceness decode processes run at beside an encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from radflash.archive import decode_pool
from radflash.archive.decode_pool import DECODE_NICE, DecodePool, DecodeTask, decode_files, process_pool
from radflash.archive.verb import DEMO_ARCHIVE
from tests.engine.archive.ray_hooks import ATTEMPTS, misbehaving_loader

FILM = DEMO_ARCHIVE / "patient00" / "study0" / "img000.dcm"


def test_kept_worker_serves_later_calls_and_a_crash_costs_one_file(tmp_path: Path) -> None:
    crash = tmp_path / "in" / "exit_1.dcm"
    crash.parent.mkdir()
    crash.write_bytes(b"never decoded")
    kwargs = {"loader": misbehaving_loader, "rules": None, "timeout": 30.0, "isolate": True}
    try:
        first = decode_files([DecodeTask(0, "a", str(FILM))], **kwargs)
        pool = process_pool(misbehaving_loader, None, 30.0)
        (kept,) = pool._idle
        again = decode_files([DecodeTask(0, "b", str(FILM))], **kwargs)
        assert [d.status for d in first + again] == ["loaded", "loaded"] and pool._idle == [kept]  # reused

        tasks = [DecodeTask(7, "c", str(FILM)), DecodeTask(3, "d", str(crash)), DecodeTask(5, "e", str(FILM))]
        out = decode_files(tasks, **kwargs)
        assert [(d.index, d.status, d.reason) for d in out] == [  # task order, one per task
            (7, "loaded", None), (3, "failed", "decoder process crashed (exit code 3)"), (5, "loaded", None)]
        assert (tmp_path / ATTEMPTS).read_text().count("exit_1.dcm") == 1  # the crashed file is not retried
        assert pool.restarts == 1 and pool._idle and pool._idle[0] is not kept

        assert process_pool(misbehaving_loader, None, 5.0) is not pool and pool._idle == []  # other settings
    finally:
        if decode_pool._PROCESS_POOL is not None:
            decode_pool._PROCESS_POOL[1].close()
            decode_pool._PROCESS_POOL = None


def test_without_isolation_files_decode_in_this_process(tmp_path: Path) -> None:
    tasks = [DecodeTask(0, "a", str(FILM)), DecodeTask(1, "b", str(tmp_path / "missing.dcm"))]
    out = decode_files(tasks, loader=None, rules=None, timeout=None, isolate=False)
    assert [(d.status, d.reason) for d in out] == [("loaded", None), ("failed", "no such file")]
    assert decode_pool._PROCESS_POOL is None  # no process started


def niceness_loader(path: Path, rules):
    """Top-level (spawn-importable): reports the decoding process's niceness instead of decoding."""
    from radflash.io.imageio import LoadOutcome

    return LoadOutcome(str(path), "skipped", f"nice {os.nice(0)}")


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process niceness on this OS")
@pytest.mark.parametrize("nice", [0, 3, DECODE_NICE])
def test_workers_decode_at_the_niceness_asked_for(nice: int) -> None:
    """Niceness is relative to the parent's and capped at 19 by the OS."""
    pool = DecodePool(2, loader=niceness_loader, nice=nice)
    out = list(pool.run([DecodeTask(i, str(i), str(FILM)) for i in range(4)]))
    assert {d.reason for d in out} == {f"nice {min(19, os.nice(0) + nice)}"} and len(out) == 4


def test_score_decodes_beside_the_encoder_at_decode_nice(tiny_model: Path) -> None:
    """The pipeline hands DECODE_NICE to its workers; a run's manifest says how the cores are shared."""
    import torch

    import radflash
    from radflash.archive.pipeline import PipelineConfig, run_pipeline
    from radflash.archive.sinks import MemoryStore, TableSpec
    from radflash.archive.verb import resolve_findings, score
    from radflash.findings import default_prompts

    prompts = resolve_findings(default_prompts())
    store = MemoryStore(TableSpec(prompts.names))
    config = PipelineConfig(batch_size=2, workers=1, loader=niceness_loader)
    run_pipeline([FILM, FILM.with_name("img001.dcm")], radflash.load(tiny_model, device="cpu"), prompts, store, config)
    reasons = set(store.table().column("reason").to_pylist())
    assert reasons == {f"nice {min(19, os.nice(0) + DECODE_NICE)}"}

    run = score([FILM], model=tiny_model, workers=1, progress=False)
    assert run.manifest["cores"] == {"cores": len(os.sched_getaffinity(0)), "encoder_threads": torch.get_num_threads(),
                                     "decode_workers": 1, "decode_nice": DECODE_NICE}


GIB = 1 << 30


@pytest.mark.parametrize(("cores", "memory", "expected"), [
    (2, 24 * GIB, 2),  # this machine: one per core
    (64, 256 * GIB, 64),  # a large server: no fixed cap of 4
    (64, 8 * GIB, 4),  # half the available memory holds 4 workers of 1 GiB
    (16, GIB // 2, 1),  # at least one
    (8, None, 8),  # memory unknown: the cores decide
])
def test_default_workers_one_per_core_as_memory_allows(cores: int, memory: int | None, expected: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.archive.options import DecodeOptions
    from radflash.util import sysinfo

    monkeypatch.setattr(sysinfo, "usable_cores", lambda: cores)
    monkeypatch.setattr(sysinfo, "available_memory", lambda: memory)
    assert decode_pool.WORKER_MEMORY == GIB
    assert decode_pool.default_workers() == expected
    assert DecodeOptions().processes() == expected and DecodeOptions(workers=3).processes() == 3


def test_available_memory_reads_this_machine() -> None:
    from radflash.util.sysinfo import available_memory

    free = available_memory()  # Linux: /proc/meminfo's MemAvailable, between 0 and the physical memory
    assert free is not None and 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
