"""``score --ray``: the same rows as a local run, the install hint, driver kill -9 + resume, actor kill.

One local Ray (``ray.init(num_cpus=2)``, ~6 s to start here) is shared by the module; the tests
that kill things are marked ``slow``. The archive is the embedded demo archive, which mixes scored,
skipped and failed files (16/6/3).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from radflash.archive.sinks import read_manifest, read_table
from radflash.archive.verb import DEMO_ARCHIVE, score
from radflash.cli import cli
from radflash.errors import InputError, MissingDependency
from tests.engine.crash import kill9_after_second_part

ray = pytest.importorskip("ray")

from radflash.archive.ray_executor import RayOptions, plan  # noqa: E402  (needs ray only at run time)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local 2-CPU Ray, joinable by address from a subprocess (the kill -9 test's driver).

    Ray ≥ 2.5x turns on token authentication for a new cluster; a second process on this machine
    would need the token, so this throwaway test cluster runs without it.
    """
    # Workers import the decoder hooks (ray_hooks) through the PYTHONPATH that tests/conftest.py sets.
    previous = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The local pipeline's run of the demo archive: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "out"
    return score(DEMO_ARCHIVE, out, model=tiny_model, workers=1, batch_size=4, commit_every=8, progress=False)


def assert_same_tables(a: pa.Table, b: pa.Table) -> None:
    """Same rows in the same (path) order; floats within 1e-5 (batch composition changes GEMMs)."""
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows
    for x, y in zip(a.to_pylist(), b.to_pylist()):
        for col, value in x.items():
            if isinstance(value, float):
                assert y[col] == pytest.approx(value, abs=1e-5), (x["path"], col)
            else:
                assert y[col] == value, (x["path"], col)


def assert_matches_reference(run, reference) -> None:
    paths = run.status.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == reference.discovered  # every file exactly once
    assert_same_tables(read_table(run.status_path), read_table(reference.status_path))
    assert_same_tables(read_table(run.results_path), read_table(reference.results_path))


# ---- no cluster needed -----------------------------------------------------------------------------
def test_missing_ray_is_a_one_line_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray.data", None)  # import ray.data → ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'radflash\[ray\]'"):
        score(DEMO_ARCHIVE, tmp_path / "out", ray=RayOptions(), progress=False)
    res = CliRunner().invoke(cli, ["score", str(DEMO_ARCHIVE), "-o", str(tmp_path / "o2"), "--ray", "-q"])
    assert res.exit_code == 1, res.output
    assert "radflash[ray]" in res.output and "Traceback" not in res.output


def test_cli_ray_flags(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["score", "--ray", str(DEMO_ARCHIVE), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "put --ray after the inputs" in res.output
    res = CliRunner().invoke(cli, ["score", str(DEMO_ARCHIVE), "-o", str(tmp_path / "o"), "--ray-actors", "2"])
    assert res.exit_code == 2 and "need --ray" in res.output
    res = CliRunner().invoke(cli, ["segment", str(DEMO_ARCHIVE), "-o", str(tmp_path / "s"), "--prompt", "lung",
                                   "--ray-threads", "2"])
    assert res.exit_code == 2 and "need --ray" in res.output


def test_plan_leaves_cpus_for_decode_and_puts_one_actor_per_gpu() -> None:
    cpu = plan(RayOptions(actors=2), "auto", {"CPU": 2.0})
    assert cpu.device == "cpu" and cpu.actors == 2 and cpu.cpus_per_actor == 0.5 and cpu.gpus_per_actor == 0
    gpu = plan(RayOptions(), "auto", {"CPU": 32.0, "GPU": 4.0})
    assert gpu.device == "cuda" and gpu.actors == 4 and gpu.gpus_per_actor == 1.0


def test_windows_bound_what_the_driver_lists_ahead_and_find_lost_files() -> None:
    import random

    from radflash.archive.ray_executor import input_chunks, lost_keys, windows
    from radflash.io.source import SourceItem

    class Sink:
        def commit(self, records: list) -> None:
            self.skipped = getattr(self, "skipped", 0) + len(records)

    n = random.randint(500, 1500)
    items = [SourceItem(f"k{i:05d}", data=b"x") if i % 7 else SourceItem(f"k{i:05d}", skip="hidden file")
             for i in range(n)]
    sink = Sink()
    fed: list[str] = []
    for window in windows(input_chunks(iter(items), is_done=lambda item: False, sink=sink, chunk=64), 200):
        keys = [k for t in window for k in t.column("key").to_pylist()]
        assert 0 < len(keys) <= 200
        fed += keys
        returned = [k for k in keys if random.random() < 0.9]
        lost = lost_keys(window, [pa.array(returned[:len(returned) // 2]), pa.array(returned[len(returned) // 2:])])
        assert lost == [k for k in keys if k not in set(returned)]
    assert fed == [i.key for i in items if i.skip is None] and sink.skipped == n - len(fed)  # each once, in order


def test_an_exception_in_an_actor_stops_the_run(tiny_model: Path) -> None:
    """Not turned into failed rows (which --resume would skip): the driver raises, as a local run does."""
    from radflash.archive.ray_executor import ScoreActor, _raise_actor_error
    from radflash.archive.sinks import TableSpec
    from radflash.archive.verb import resolve_findings

    prompts = resolve_findings(["There is edema"])
    actor = ScoreActor(str(tiny_model), "cpu", None, "eager", prompts, TableSpec(prompts.names), False, 1)
    out = actor(pa.table({"key": ["a", "b"]}))  # no decoded columns: scoring raises
    assert out.column("path").to_pylist() == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"inference failed in a Ray actor: KeyError"):
        _raise_actor_error(out)


# ---- on a local Ray ------------------------------------------------------------------------------
def test_ray_run_matches_local_run(ray_address: str, tiny_model: Path, reference, tmp_path: Path) -> None:
    run = score(DEMO_ARCHIVE, tmp_path / "out", model=tiny_model, batch_size=4, commit_every=8,
                progress=False, ray=RayOptions())
    assert run.counts == reference.counts and min(run.scored, run.skipped, run.failed) > 0
    assert_matches_reference(run, reference)
    executor = read_manifest(tmp_path / "out")["executor"]
    assert executor["kind"] == "ray" and executor["ray_version"] == ray.__version__
    assert executor["actors"] == 1 and executor["resources"]["CPU"] == 2.0


def test_carzero_on_ray_matches_local_run(ray_address: str, tmp_path: Path) -> None:
    """CARZero letterboxes its inputs: the Ray decode tasks must resize like the local feed thread."""
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    model = save_checkpoint(random_checkpoint("carzero-tiny", seed=3, model_id="cz"), tmp_path / "cz")
    local = score(DEMO_ARCHIVE, tmp_path / "local", model=model, workers=1, batch_size=4, progress=False)
    run = score(DEMO_ARCHIVE, tmp_path / "ray", model=model, batch_size=4, progress=False, ray=RayOptions())
    assert run.counts == local.counts and run.scored > 0
    assert_matches_reference(run, local)


def test_report_gallery_on_ray_equals_the_local_one(ray_address: str, tiny_model: Path, tmp_path: Path) -> None:
    """score --ray --report-maps: the actors' galleries, merged on the driver, give the local gallery."""
    from radflash.report.gallery import ScoreGallery

    local, remote = ScoreGallery(2), ScoreGallery(2)
    score(DEMO_ARCHIVE, tmp_path / "local", model=tiny_model, workers=1, batch_size=4, progress=False, observer=local)
    score(DEMO_ARCHIVE, tmp_path / "ray", model=tiny_model, batch_size=4, progress=False, ray=RayOptions(),
          observer=remote)
    assert remote.note is None and remote.observed == local.observed > 0
    assert set(remote.top.lists) == set(local.top.lists)
    for name, tiles in local.top.lists.items():
        got = remote.top.lists[name]
        assert [t.key for t in got] == [t.key for t in tiles], name
        assert [t.score for t in got] == pytest.approx([t.score for t in tiles], abs=1e-5)
        assert all(t.image.startswith("data:image/") and t.point is not None for t in got)


@pytest.mark.slow
def test_driver_kill9_then_resume(ray_address: str, tiny_model: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "radflash", "score", str(DEMO_ARCHIVE), "-o", str(out), "--model", str(tiny_model),
           "--batch-size", "1", "--commit-every", "1", "-q", "--ray", ray_address]
    kill9_after_second_part(cmd, out, within=180)
    committed = read_table_parts(out)
    assert 2 <= committed < reference.discovered

    with pytest.raises(InputError, match="not empty"):
        score(DEMO_ARCHIVE, out, model=tiny_model, progress=False, ray=RayOptions())
    run = score(DEMO_ARCHIVE, out, model=tiny_model, resume=True, batch_size=4, progress=False, ray=RayOptions())
    assert run.resumed == committed
    assert run.manifest["counts"]["processed_this_run"] == run.discovered - run.resumed
    assert_matches_reference(run, reference)


def read_table_parts(out: Path) -> int:
    """Rows committed so far (the parts' union)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("part-*.parquet"))


@pytest.mark.slow
def test_actor_killed_mid_run_loses_nothing(ray_address: str, tiny_model: Path, reference, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    result: list = []
    thread = threading.Thread(target=lambda: result.append(score(
        DEMO_ARCHIVE, out, model=tiny_model, batch_size=1, commit_every=1, progress=False, ray=RayOptions())))
    thread.start()
    deadline = time.monotonic() + 180
    victim = None
    while victim is None:
        assert thread.is_alive(), "the run finished before an actor could be killed"
        assert time.monotonic() < deadline, "no scoring actor seen within 180 s"
        # Killed as soon as it exists: with one file per part, the run cannot finish the 25 parts
        # between this look and the kill, so the actor dies with work still ahead of it (waiting
        # for the first part first would race a fast run to its end).
        victim = next((p for p in psutil.process_iter(["cmdline"])
                       if "ScoreActor" in " ".join(p.info["cmdline"] or ())), None)
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    assert read_table_parts(out) < reference.discovered  # killed mid-run, with rows still to score
    thread.join(timeout=300)
    assert not thread.is_alive() and result, "the run did not finish after its actor was killed"
    assert_matches_reference(result[0], reference)


@pytest.mark.slow
def test_segment_on_ray_writes_the_same_files(ray_address: str, tiny_model: Path, tmp_path: Path) -> None:
    import filecmp
    import json

    from radflash.segment.verb import segment

    prompts = ["left lung", "There is pneumothorax"]
    local = segment(DEMO_ARCHIVE, tmp_path / "local", prompts=prompts, model=tiny_model, workers=1, progress=False)
    on_ray = segment(DEMO_ARCHIVE, tmp_path / "ray", prompts=prompts, model=tiny_model, progress=False,
                     ray=RayOptions())
    assert len(on_ray.images) == len(local.images) > 0 and len(on_ray.failures) == len(local.failures) > 0

    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    assert files(tmp_path / "local") == files(tmp_path / "ray")
    executor = on_ray.report["executor"]  # like score's manifest: that Ray ran, and on what
    assert executor["kind"] == "ray" and executor["ray_version"] == ray.__version__
    assert executor["actors"] == 1 and executor["resources"]["CPU"] == 2.0 and executor["decode_isolated"]
    assert "executor" not in local.report
    for rel in files(tmp_path / "local"):
        a, b = tmp_path / "local" / rel, tmp_path / "ray" / rel
        if rel.name == "report.json":  # equal but for the run's start/finish times and the executor
            ra, rb = (json.loads(p.read_text()) for p in (a, b))
            assert rb.pop("executor") == executor
            for r in (ra, rb):
                for key in ("started", "finished", "elapsed_s"):
                    r.pop(key)
            assert ra == rb
        else:
            assert filecmp.cmp(a, b, shallow=False), rel


# ---- hostile files on Ray: each fails alone, with the local pool's reason ---------------------------
def hostile_folder(root: Path, reference, names: list[str]) -> Path:
    """Copies of scored demo films under ``names`` (ray_hooks.misbehaving_loader acts on the prefix)."""
    import shutil

    folder = root / "in"
    folder.mkdir()
    good = [r["path"] for r in reference.results.to_pylist()]
    for i, name in enumerate(names):
        shutil.copy(good[i % len(good)], folder / name)
    return folder


HANG_TIMEOUT_S = 2.0  # the per-file decode timeout of the hostile runs: the hang_ file waits it out, twice
# (Ray, then the local pool); a demo film decodes in well under a tenth of it


def run_hostile(folder: Path, tiny_model: Path, *, workers: int, on_ray: bool):
    """The folder through the Ray executor or the local pipeline, with the misbehaving decoder:
    {file name: (status, reason)}, asserting every file is there exactly once."""
    import radflash
    from radflash.archive.pipeline import PipelineConfig, run_pipeline
    from radflash.archive.ray_executor import run_ray_pipeline
    from radflash.archive.sinks import MemoryStore, TableSpec
    from radflash.archive.verb import resolve_findings
    from radflash.io.selection import SelectionRules
    from radflash.io.source import FileSource
    from tests.engine.archive.ray_hooks import misbehaving_loader

    prompts = resolve_findings(["There is edema"])
    spec = TableSpec(prompts.names)
    store = MemoryStore(spec)
    config = PipelineConfig(batch_size=4, workers=workers, timeout=HANG_TIMEOUT_S, loader=misbehaving_loader,
                            rules=SelectionRules())
    model = radflash.load(tiny_model, device="cpu")
    if on_ray:
        placement = plan(RayOptions(), "cpu", ray.cluster_resources())
        run_ray_pipeline(FileSource(folder), str(tiny_model), prompts, spec, store, config,
                         geometry=model.preprocessing.geometry, placement=placement)
    else:
        run_pipeline(FileSource(folder), model, prompts, store, config)
    rows = store.table().to_pylist()
    names = [Path(r["path"]).name for r in rows]
    assert sorted(names) == sorted(p.name for p in folder.iterdir())  # every file exactly once
    assert all(r["status"] == "scored" or r["reason"] for r in rows)  # anything else says why
    return {Path(r["path"]).name: (r["status"], r["reason"]) for r in rows}


@pytest.mark.slow
def test_decoder_raise_crash_and_hang_fail_one_file_each(ray_address: str, tiny_model: Path, reference,
                                                        tmp_path: Path) -> None:
    names = [f"ok{i}.dcm" for i in range(6)] + ["raise_a.dcm", "exit_b.dcm", "hang_c.dcm"]
    folder = hostile_folder(tmp_path, reference, names)
    got = run_hostile(folder, tiny_model, workers=1, on_ray=True)
    assert got["raise_a.dcm"] == ("failed", "RuntimeError: decoder bug on raise_a.dcm")
    assert got["exit_b.dcm"] == ("failed", "decoder process crashed (exit code 3)")
    assert got["hang_c.dcm"] == ("failed", f"decoder timed out after {HANG_TIMEOUT_S:g} s")
    assert all(got[n] == ("scored", None) for n in names if n.startswith("ok"))
    assert got == run_hostile(folder, tiny_model, workers=1, on_ray=False)  # the local pool's very rows


@pytest.mark.slow
def test_decode_task_that_dies_costs_at_most_its_block(ray_address: str, tiny_model: Path, reference,
                                                      tmp_path: Path) -> None:
    """``workers=0`` decodes inside the Ray task, so a crashing decoder kills the task's worker:
    the task is retried once, then its block's files are failed; the run goes on."""
    from radflash.archive.ray_executor import DECODE_BATCH, LOST_REASON
    from tests.engine.archive.ray_hooks import ATTEMPTS

    names = [f"ok{i:02d}.dcm" for i in range(11)] + ["exit_x.dcm"]
    folder = hostile_folder(tmp_path, reference, names)
    got = run_hostile(folder, tiny_model, workers=0, on_ray=True)
    lost = {n for n, (status, reason) in got.items() if status != "scored"}
    assert "exit_x.dcm" in lost and len(lost) <= DECODE_BATCH
    assert all(got[n] == ("failed", LOST_REASON) for n in lost)
    assert len((tmp_path / ATTEMPTS).read_text().splitlines()) == 2  # the first try and one retry


@pytest.mark.slow
def test_real_size_films_on_ray_equal_the_local_run(ray_address: str, tiny_model: Path, real_size_archive,
                                                    tmp_path: Path) -> None:
    from tests.engine.archive.test_real_size import assert_same_scores

    local = score(real_size_archive.folder, None, model=tiny_model, workers=0, batch_size=1, progress=False)
    run = score(real_size_archive.folder, tmp_path / "out", model=tiny_model, batch_size=4, progress=False,
                ray=RayOptions())
    assert (run.scored, run.failed) == (len(real_size_archive.files), 0)
    assert_same_scores(run, local)


def test_a_ray_cluster_that_stops_delivering_stops_the_driver(ray_address: str, tiny_model: Path,
                                                              tmp_path: Path) -> None:
    """The driver waits on Ray's output in slices: actors busy far past --stall-after end the run
    with the stage named instead of a driver blocked forever in Ray's iterator."""
    from radflash.util.watchdog import Stalled
    from tests.engine.archive.ray_hooks import SlowObserver

    t0 = time.monotonic()
    with pytest.raises(Stalled, match=r"score --ray stalled: .*the ray stage"):
        score(DEMO_ARCHIVE, tmp_path / "out", model=tiny_model, batch_size=4, progress=False, ray=RayOptions(),
              observer=SlowObserver(6.0), stall_after=3.0)
    assert time.monotonic() - t0 < 60
    # the abandoned iterator's thread closes Ray's pipeline once the slow batch returns: wait for it,
    # so that the cluster is idle again when the fixture shuts it down
    deadline = time.monotonic() + 60
    while any(t.name == "radflash-ray" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.2)
