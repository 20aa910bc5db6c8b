"""End-to-end archive scoring: counts, crash isolation, kill -9 + resume, sharding, formats, PHI, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from radflash.archive.sinks import PHI_COLUMNS, path_from_text, read_manifest, read_table
from radflash.cli import cli
from radflash.errors import InputError
from tests.engine.crash import kill9_after_second_part

FILMS = 40  # chest films; write_archive adds 9 clutter files (other modalities, views, broken files)
STATUS_OF = {"loaded": "scored", "skipped": "skipped", "failed": "failed"}  # archive manifest → status table


# ---- archive + model fixtures --------------------------------------------------------------------
def expected_statuses(root: Path, manifest_dir: Path) -> dict[str, str]:
    """path → expected status column value, from a training.phantom_dicom archive manifest."""
    from radflash.synthetic.dicom_archive import read_manifest as read_archive_manifest

    return {str(root / e.path): STATUS_OF[e.expected] for e in read_archive_manifest(manifest_dir)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A hospital-export-like folder (chest films in several encodings plus clutter) and the
    status each file must get. The generator's manifest.json is moved out of the folder, as the
    demo archive's is, so that it is not itself scored as a junk file."""
    from radflash.synthetic.dicom_archive import MANIFEST, write_archive

    base = tmp_path_factory.mktemp("archive")
    root = base / "export"
    write_archive(root, FILMS, seed=1)
    (root / MANIFEST).replace(base / MANIFEST)
    return root, expected_statuses(root, base)


@pytest.fixture(scope="module")
def reference(archive, tiny_model, tmp_path_factory):
    """One uninterrupted run with worker processes, written to disk: the baseline for the others."""
    from radflash.archive.verb import score

    out = tmp_path_factory.mktemp("ref") / "out"
    return score(archive[0], out, model=tiny_model, workers=2, batch_size=8, commit_every=16, progress=False)


def _by_path(table: pa.Table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


def assert_same_results(a: pa.Table, b: pa.Table) -> None:
    """Same files, same statuses; scores equal up to batch-composition rounding of float32 GEMMs."""
    ra, rb = _by_path(a), _by_path(b)
    assert ra.keys() == rb.keys()
    for path, row in ra.items():
        other = rb[path]
        for col, value in row.items():
            if isinstance(value, float):
                assert other[col] == pytest.approx(value, rel=1e-4, abs=1e-5), (path, col)
            else:
                assert other[col] == value, (path, col)


# ---- tests ---------------------------------------------------------------------------------------
def test_counts_add_up_and_every_file_once(archive, reference) -> None:
    root, expected = archive
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    status_paths = reference.status.column("path").to_pylist()
    assert len(status_paths) == len(set(status_paths)) == reference.discovered == len(files)
    assert sorted(status_paths) == files
    assert reference.scored + reference.skipped + reference.failed == reference.discovered
    assert reference.scored > 0 and reference.skipped > 0 and reference.failed > 0
    assert reference.results.num_rows == reference.scored
    statuses = dict(zip(status_paths, reference.status.column("status").to_pylist()))
    assert statuses == expected
    reasons = reference.status.column("reason").to_pylist()
    assert all(r for r, s in zip(reasons, statuses.values()) if s != "scored")  # every non-score says why

    m = read_manifest(reference.output)
    assert m["complete"] and m["counts"]["discovered"] == len(files)
    assert m["model"]["id"] == "test-tiny" and len(m["model"]["sha256"]) == 64
    assert {"radflash", "torch", "pydicom"} <= set(m["versions"])
    assert len(m["findings"]) == 14 and m["findings"]["edema"]["prompt"] == "There is edema"
    assert m["device"] == "cpu" and m["backend"] == "eager" and m["args"]["workers"] == 2
    assert m["timings"]["pipeline_wall_s"] > 0


def test_results_columns_and_no_phi(reference) -> None:
    results = read_table(reference.results_path)
    cols = results.column_names
    assert cols[:4] == ["path", "sop_instance_uid", "study_instance_uid", "series_instance_uid"]
    assert "pleural effusion.logit" in cols and "pleural effusion.prob" in cols
    assert not set(PHI_COLUMNS) & set(cols)
    assert not set(PHI_COLUMNS) & set(read_table(reference.status_path).column_names)
    for out_file in reference.output.rglob("*.parquet"):
        text = out_file.read_bytes()
        assert b"PHANTOM^" not in text and b"PH0000" not in text
    probs = np.array(results.column("edema.prob").to_pylist())
    logits = np.array(results.column("edema.logit").to_pylist())
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    assert all(results.column("sop_instance_uid").to_pylist())


def test_in_memory_inline_decode_matches(archive, tiny_model, reference) -> None:
    from radflash.archive.verb import score

    run = score(archive[0], None, model=tiny_model, workers=0, batch_size=5, progress=False)
    assert run.output is None and run.results_path is None
    assert_same_results(run.status, reference.status)
    assert_same_results(run.results, reference.results)


def test_sharded_runs_union_to_whole(archive, tiny_model, reference) -> None:
    from radflash.archive.verb import score

    runs = [score(archive[0], model=tiny_model, workers=0, num_parts=3, part_id=k, progress=False) for k in range(3)]
    parts = [set(r.status.column("path").to_pylist()) for r in runs]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert_same_results(pa.concat_tables([r.status for r in runs]), reference.status)
    assert_same_results(pa.concat_tables([r.results for r in runs]), reference.results)
    with pytest.raises(InputError, match="part_id"):
        score(archive[0], model=tiny_model, num_parts=2, part_id=2)


class MemorySource:
    """A network-like source: items arrive as bytes under their own keys; no file is ever named."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def __iter__(self):
        from radflash.io.source import SourceItem

        for key in sorted(self.blobs):
            yield SourceItem(key, data=self.blobs[key])

    def describe(self) -> dict:
        return {"kind": "memory", "items": len(self.blobs)}


def test_bytes_source_plugs_into_the_pipeline(archive, tiny_model, reference, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Same statuses and scores as the file run, keyed by the source's keys, through a worker
    process (bytes pickled over its pipe); a resume matches committed rows by key."""
    from radflash.archive.verb import score

    # a few scored films and all the clutter (other modalities, broken files: skipped/failed)
    every = reference.status.to_pylist()
    rows = [r for r in every if r["status"] == "scored"][:6] + [r for r in every if r["status"] != "scored"]
    assert {r["status"] for r in rows} == {"scored", "skipped", "failed"}
    ref_path = {f"wado:{i:03d}": r["path"] for i, r in enumerate(rows)}
    source = MemorySource({key: Path(path_from_text(path)).read_bytes() for key, path in ref_path.items()})
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))  # the worker spools each item here, then removes it
    out = tmp_path / "out"
    run = score(source, out, model=tiny_model, workers=1, batch_size=4, progress=False)
    assert list(spool.iterdir()) == []
    assert run.discovered == len(rows) and run.manifest["source"] == {"kind": "memory", "items": len(rows)}
    assert run.manifest["args"]["inputs"] is None
    assert len(run.results) == sum(r["status"] == "scored" for r in rows)
    for r in run.status.to_pylist():  # keys in the path column; statuses and reasons as for the file
        ref = rows[int(r["path"].removeprefix("wado:"))]
        for col in ("status", "reason", "sop_instance_uid", "modality", "view_position"):
            assert r[col] == ref[col], (r["path"], col)
    scored = {r["path"]: r for r in reference.results.to_pylist()}
    for r in run.results.to_pylist():
        ref = scored[ref_path[r["path"]]]
        assert r["sop_instance_uid"] == ref["sop_instance_uid"]
        for col in (c for c in ref if c.endswith((".logit", ".prob"))):
            assert r[col] == pytest.approx(ref[col], rel=1e-4, abs=1e-5), col
    again = score(source, out, model=tiny_model, resume=True, workers=0, progress=False)
    assert again.manifest["counts"]["processed_this_run"] == 0 and again.resumed == len(rows)
    with pytest.raises(InputError, match="shard"):
        score(source, model=tiny_model, num_parts=2, part_id=1, progress=False)


def test_csv_with_phi_and_thresholds(archive, tiny_model, tmp_path: Path) -> None:
    from radflash.archive.verb import score

    subset = archive[0] / "patient00"  # chest films only (both studies of one patient)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("edema: {prompt: There is edema, threshold: 0.5}\neffusion: There is pleural effusion\n")
    run = score(subset, tmp_path / "out", model=tiny_model, findings=prompts, workers=0, fmt="csv",
                include_phi=True, progress=False)
    assert run.results_path.suffix == ".csv" and run.status_path.suffix == ".csv"
    results, status = read_table(run.results_path), read_table(run.status_path)
    assert status.num_rows == run.discovered and results.num_rows == run.scored > 0
    assert {"patient_id", "patient_name", "edema.positive", "effusion.prob"} <= set(results.column_names)
    assert "atelectasis.prob" not in results.column_names
    assert all(n.startswith("PHANTOM^") for n in results.column("patient_name").to_pylist())
    assert all(i.startswith("PH") for i in results.column("patient_id").to_pylist())
    positive = results.column("edema.positive").to_pylist()
    assert positive == [p >= 0.5 for p in results.column("edema.prob").to_pylist()]
    assert all(v is None for v in results.column("effusion.positive").to_pylist())


def test_score_calibration_is_not_the_segmentation_thresholds(archive) -> None:
    """The trainer's map ``thresholds`` must not make a run "calibrated"; a score calibration
    (:mod:`radflash.calibration.scores`: temperature + threshold) rescales and decides."""
    from radflash.api import RadFlashModel
    from radflash.archive.verb import score
    from radflash.checkpoints.factory import random_checkpoint

    subset, findings = archive[0] / "patient02", {"edema": "There is edema", "effusion": "There is pleural effusion"}
    ck = random_checkpoint("tiny", seed=0, model_id="cal")
    ck.calibration = {"map_thresholds": {"edema": 0.3}}
    plain = score(subset, model=RadFlashModel(ck, device="cpu"), findings=findings, workers=0, progress=False)
    assert not plain.manifest["model"]["calibrated"] and "edema.positive" not in plain.results.column_names
    ck.calibration = {**ck.calibration, "temperature": {"edema": 2.0}, "threshold": {"edema": 0.5}}
    cal = score(subset, model=RadFlashModel(ck, device="cpu"), findings=findings, workers=0, progress=False)
    assert cal.manifest["model"]["calibrated"] and cal.scored == plain.scored > 0
    logits = np.array(cal.results.column("edema.logit").to_pylist())
    probs = np.array(cal.results.column("edema.prob").to_pylist())
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits / 2.0)), rtol=1e-5)
    assert cal.results.column("edema.positive").to_pylist() == [bool(p >= 0.5) for p in probs]


def test_existing_output_needs_resume(reference, tiny_model, archive) -> None:
    from radflash.archive.verb import score

    with pytest.raises(InputError, match="not empty"):
        score(archive[0], reference.output, model=tiny_model, progress=False)
    with pytest.raises(InputError, match="cannot resume"):
        score(archive[0], reference.output, model=tiny_model, findings=["There is edema"], resume=True,
              progress=False)
    # resuming a finished run is a no-op that rewrites the same consolidated files
    again = score(archive[0], reference.output, model=tiny_model, resume=True, workers=0, progress=False)
    assert again.resumed == reference.discovered and again.manifest["counts"]["processed_this_run"] == 0
    assert_same_results(again.results, reference.results)


# ---- worker crash isolation ---------------------------------------------------------------------
def crashy_loader(path: Path, rules):
    """Top-level (spawn-importable) loader that segfaults or hangs on files named for it."""
    if path.name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if path.name.startswith("hang"):
        time.sleep(600)
    from radflash.io.imageio import try_load

    return try_load(path, rules)


def test_worker_segfault_and_hang_fail_one_file_each(archive, reference, tiny_model, tmp_path: Path) -> None:
    import radflash
    from radflash.archive.pipeline import PipelineConfig, run_pipeline
    from radflash.archive.sinks import MemoryStore, TableSpec
    from radflash.archive.verb import resolve_findings
    from radflash.findings import default_prompts
    from radflash.io.selection import SelectionRules

    good = [r["path"] for r in reference.results.slice(0, 10).to_pylist()]
    paths = []
    for i, src in enumerate(good):
        prefix = {3: "crash", 6: "hang"}.get(i, "ok")
        dst = tmp_path / f"{prefix}{i:02d}.dcm"
        shutil.copy(src, dst)
        paths.append(dst)
    prompts = resolve_findings(default_prompts())
    spec = TableSpec(prompts.names)
    store = MemoryStore(spec)
    config = PipelineConfig(batch_size=4, workers=2, timeout=3.0, loader=crashy_loader, rules=SelectionRules())
    stats = run_pipeline(paths, radflash.load(tiny_model, device="cpu"), prompts, store, config)
    rows = _by_path(store.table())
    assert len(rows) == len(paths)
    assert "crashed" in rows[str(paths[3])]["reason"] and rows[str(paths[3])]["status"] == "failed"
    assert "timed out" in rows[str(paths[6])]["reason"] and rows[str(paths[6])]["status"] == "failed"
    assert stats.scored == len(paths) - 2 and stats.worker_restarts >= 1  # none needed after the last file


# ---- kill -9 and resume -------------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(archive, tiny_model, reference, tmp_path: Path) -> None:
    from radflash.archive.verb import score

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "radflash", "score", str(archive[0]), "-o", str(out), "--model", str(tiny_model),
           "--workers", "1", "--batch-size", "2", "--commit-every", "8", "-q"]
    kill9_after_second_part(cmd, out)
    committed = len(list((out / "parts").glob("part-*.parquet")))
    assert 2 <= committed < reference.discovered / 8

    with pytest.raises(InputError, match="not empty"):
        score(archive[0], out, model=tiny_model, progress=False)
    run = score(archive[0], out, model=tiny_model, resume=True, workers=0, batch_size=8, progress=False)
    assert run.resumed >= 16 and run.manifest["counts"]["processed_this_run"] == run.discovered - run.resumed
    status_paths = run.status.column("path").to_pylist()
    assert len(status_paths) == len(set(status_paths)) == reference.discovered  # no duplicates
    assert_same_results(read_table(run.status_path), reference.status)
    assert_same_results(read_table(run.results_path), reference.results)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_scores_and_reports(archive, tiny_model, tmp_path: Path) -> None:
    subset = archive[0] / "patient01"
    res = CliRunner().invoke(cli, ["score", str(subset), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
                                   "--workers", "0", "--format", "csv", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "results.csv").is_file() and (tmp_path / "o" / "manifest.json").is_file()
    res = CliRunner().invoke(cli, ["score", str(subset), "-o", str(tmp_path / "o"), "--model", str(tiny_model)])
    assert res.exit_code == 1 and "not empty" in res.output and "Traceback" not in res.output


def test_cli_bad_findings_file_is_one_line_error(archive, tiny_model, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("edema: [unclosed\n")
    for findings in (bad, tmp_path / "missing.yaml"):
        res = CliRunner().invoke(cli, ["score", str(archive[0]), "--model", str(tiny_model), "--findings",
                                       str(findings), "-q"])
        assert res.exit_code == 1, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and str(findings.name) in lines[0]


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--format", "xlsx"],
    ["--workers", "-1"],
    ["--batch-size", "0"],
    ["--num-parts", "2", "--part-id", "2"],
    ["--modalities", "C R;"],
    ["--resume"],
])
def test_cli_bad_flags_are_usage_errors(args: list[str]) -> None:
    res = CliRunner().invoke(cli, ["score", *args])
    assert res.exit_code == 2, res.output
    assert "Usage:" in res.output and "Traceback" not in res.output


def test_cli_without_inputs_scores_demo_archive(tmp_path: Path) -> None:
    """``radflash score -o OUT``: the embedded demo model on the embedded demo archive, with decode
    workers; every file gets the status the archive's manifest states."""
    import radflash
    from radflash.archive.verb import DEMO_ARCHIVE
    from radflash.errors import RadflashError

    # both are committed: their absence is a broken checkout or package, never a reason to skip
    assert DEMO_ARCHIVE.is_dir(), f"embedded demo archive missing: {DEMO_ARCHIVE}"
    assert (DEMO_ARCHIVE.parent / "demo_archive.manifest.json").is_file(), "demo_archive.manifest.json missing"
    try:
        radflash.load(device="cpu")
    except (RadflashError, OSError) as exc:
        pytest.fail(f"embedded demo model does not load: {exc}")
    manifest_dir = tmp_path / "expected"  # read_manifest reads <dir>/manifest.json
    manifest_dir.mkdir()
    shutil.copy(DEMO_ARCHIVE.parent / "demo_archive.manifest.json", manifest_dir / "manifest.json")
    expected = expected_statuses(DEMO_ARCHIVE, manifest_dir)

    res = CliRunner().invoke(cli, ["score", "-o", str(tmp_path / "demo"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "demo archive" in res.output
    m = read_manifest(tmp_path / "demo")
    assert m["demo_archive"] and m["complete"] and m["args"]["inputs"] == [str(DEMO_ARCHIVE)]
    want = {k: sum(v == k for v in expected.values()) for k in ("scored", "skipped", "failed")}
    assert {k: m["counts"][k] for k in want} == want and m["counts"]["discovered"] == len(expected)
    status = read_table(tmp_path / "demo" / "status.parquet")
    assert dict(zip(status.column("path").to_pylist(), status.column("status").to_pylist())) == expected
    results = read_table(tmp_path / "demo" / "results.parquet")
    assert results.num_rows == want["scored"] and len(m["findings"]) == 14
