"""End-to-end archive scoring: counts, crash isolation, kill -9 + resume, sharding, formats, PHI, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from radflash.cli import cli
from radflash.errors import InputError
from radflash.writers import PHI_COLUMNS, read_manifest, read_table

N_FILES = 200


# ---- archive + model fixtures --------------------------------------------------------------------
def _fallback_archive(out: Path, n: int, seed: int) -> dict[str, str]:
    """Mixed encodings/modalities/views plus corrupt files, for when training.phantom_dicom is absent.

    Returns path → expected status.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    rng = np.random.default_rng(seed)
    encodings = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian]
    expected: dict[str, str] = {}
    for i in range(n):
        sub = out / f"study{i % 7}" / f"series{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:04d}.dcm"
        if i % 41 == 7:  # not an image at all: loaders may call it failed or skipped, never scored
            path.write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(300))
            expected[str(path)] = "failed|skipped"
            continue
        modality, view = ("CT", "AXIAL") if i % 13 == 4 else ("DX" if i % 2 else "CR", "PA" if i % 3 else "AP")
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        fm.MediaStorageSOPInstanceUID = generate_uid()
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = fm
        ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", view
        ds.PatientName, ds.PatientID = "Doe^Jane", f"PID{i:05d}"
        size = int(rng.integers(48, 96))
        ds.Rows, ds.Columns, ds.SamplesPerPixel = size, size + 8, 1
        ds.PhotometricInterpretation = "MONOCHROME1" if i % 5 == 0 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size + 8), dtype=np.uint16).tobytes()
        ts = encodings[i % len(encodings)]
        if ts in (RLELossless, JPEG2000Lossless):
            ds.compress(ts)
        elif ts == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, enforce_file_format=True)
        if i % 29 in (11, 19) and modality != "CT":  # truncated pixel data: the header reads, decoding fails
            path.write_bytes(path.read_bytes()[:-500])
            # a short native PixelData is unambiguous; a cut encapsulated one may not even parse
            expected[str(path)] = "failed" if ts == ExplicitVRLittleEndian else "failed|skipped"
        else:
            expected[str(path)] = "skipped" if modality == "CT" else "scored"
    return expected


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str] | None]:
    """A few hundred mixed files; expected statuses where the generator states them."""
    out = tmp_path_factory.mktemp("archive")
    try:
        from radflash.training.phantom_dicom import write_archive
    except ImportError:
        return out, _fallback_archive(out, N_FILES, seed=1)
    written = write_archive(out, N_FILES, seed=1)
    expected = getattr(written, "expected", None) or getattr(written, "statuses", None)
    return out, ({str(k): v for k, v in expected.items()} if isinstance(expected, dict) else None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radflash.checkpoint import save_checkpoint
    from radflash.factory import random_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(random_checkpoint("tiny", seed=0, model_id="test-tiny"), path)
    return path


@pytest.fixture(scope="module")
def reference(archive, tiny_model, tmp_path_factory):
    """One uninterrupted run with worker processes, written to disk: the baseline for the others."""
    from radflash.score import score

    out = tmp_path_factory.mktemp("ref") / "out"
    run = score(archive[0], out, model=tiny_model, workers=2, batch_size=8, commit_every=64, progress=False)
    return run


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
    if expected is not None:
        assert statuses.keys() == expected.keys()
        wrong = {p: (s, expected[p]) for p, s in statuses.items() if s not in expected[p].split("|")}
        assert not wrong
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
        assert b"Doe^Jane" not in text and b"PID0" not in text
    probs = np.array(results.column("edema.prob").to_pylist())
    logits = np.array(results.column("edema.logit").to_pylist())
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    assert all(results.column("sop_instance_uid").to_pylist())


def test_in_memory_inline_decode_matches(archive, tiny_model, reference) -> None:
    from radflash.score import score

    run = score(archive[0], None, model=tiny_model, workers=0, batch_size=5, progress=False)
    assert run.output is None and run.results_path is None
    assert_same_results(run.status, reference.status)
    assert_same_results(run.results, reference.results)


def test_sharded_runs_union_to_whole(archive, tiny_model, reference) -> None:
    from radflash.score import score

    runs = [score(archive[0], model=tiny_model, workers=0, num_parts=3, part_id=k, progress=False) for k in range(3)]
    parts = [set(r.status.column("path").to_pylist()) for r in runs]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert_same_results(pa.concat_tables([r.status for r in runs]), reference.status)
    assert_same_results(pa.concat_tables([r.results for r in runs]), reference.results)
    with pytest.raises(InputError, match="part_id"):
        score(archive[0], model=tiny_model, num_parts=2, part_id=2)


def test_csv_with_phi_and_thresholds(archive, tiny_model, tmp_path: Path) -> None:
    from radflash.score import score

    subset = next(p for p in sorted(archive[0].iterdir()) if p.is_dir())
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("edema: {prompt: There is edema, threshold: 0.5}\neffusion: There is pleural effusion\n")
    run = score(subset, tmp_path / "out", model=tiny_model, findings=prompts, workers=0, fmt="csv",
                include_phi=True, progress=False)
    assert run.results_path.suffix == ".csv" and run.status_path.suffix == ".csv"
    results, status = read_table(run.results_path), read_table(run.status_path)
    assert status.num_rows == run.discovered and results.num_rows == run.scored > 0
    assert {"patient_id", "patient_name", "edema.positive", "effusion.prob"} <= set(results.column_names)
    assert "atelectasis.prob" not in results.column_names
    assert set(results.column("patient_name").to_pylist()) <= {"Doe^Jane"} or all(results.column("patient_id"))
    positive = results.column("edema.positive").to_pylist()
    assert positive == [p >= 0.5 for p in results.column("edema.prob").to_pylist()]
    assert all(v is None for v in results.column("effusion.positive").to_pylist())


def test_existing_output_needs_resume(reference, tiny_model, archive) -> None:
    from radflash.score import score

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
    from radflash.imageio import try_load

    return try_load(path, rules)


def test_worker_segfault_and_hang_fail_one_file_each(archive, reference, tiny_model, tmp_path: Path) -> None:
    import radflash
    from radflash.findings import default_prompts
    from radflash.pipeline import PipelineConfig, run_pipeline
    from radflash.score import resolve_findings
    from radflash.selection import SelectionRules
    from radflash.writers import MemoryStore, TableSpec

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
    from radflash.score import score

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "radflash", "score", str(archive[0]), "-o", str(out), "--model", str(tiny_model),
           "--workers", "1", "--batch-size", "2", "--commit-every", "8", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("part-00001.parquet")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part committed within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not read_manifest(out)["complete"], "the run finished before it could be killed"
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
    subset = next(p for p in sorted(archive[0].iterdir()) if p.is_dir())
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
    from radflash.score import DEMO_ARCHIVE

    if not DEMO_ARCHIVE.is_dir() or not (Path(__file__).parents[2] / "engine/assets/demo/config.json").exists():
        pytest.skip("embedded demo archive/model not built yet")
    res = CliRunner().invoke(cli, ["score", "-o", str(tmp_path / "demo"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "demo archive" in res.output
    m = read_manifest(tmp_path / "demo")
    assert m["demo_archive"] and m["counts"]["scored"] > 0 and m["counts"]["failed"] > 0
