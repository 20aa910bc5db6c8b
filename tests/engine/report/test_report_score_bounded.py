"""The score report in bounded memory: the results and status tables are streamed in record batches
(Parquet row groups, CSV blocks) and the page keeps per finding a histogram and counts, the
TABLE_ROWS table rows of highest probability and the gallery images' labels. A run within the
bounds gets, byte for byte, the page a report of whole tables draws (every number recomputed here
from the whole tables at once: an independent reference); a large run keeps memory and HTML flat.
Synthetic folders (records.py) and two real runs of the CLI."""

from __future__ import annotations

import dataclasses
import posixpath
import re
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import radflash.report.data as report_data
from radflash import __version__
from radflash.archive.sinks import read_manifest, write_manifest
from radflash.report import REPORT_HTML, write_report
from radflash.report.data import Column, FindingSummary, GalleryTile, ReasonGroup, ReportData, collect
from radflash.report.gallery import load_gallery
from radflash.report.html import render
from tests.conftest import seed_for
from tests.engine.report.conftest import run_cli
from tests.engine.report.records import score_tables, write_score_run

_POOLS: list[pa.MemoryPool] = []  # Arrow pools that measured a report's peak


@pytest.fixture()
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(seed_for(request.node.nodeid))


@pytest.fixture()
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record batches of 7 rows and CSV blocks of 2 KiB: every table crosses many batch boundaries."""
    monkeypatch.setattr(report_data, "BATCH_ROWS", 7)
    monkeypatch.setattr(report_data, "CSV_BLOCK", 2048)


@pytest.fixture(scope="module")
def decided(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with a findings file (one threshold: decisions for one finding) and --include-phi."""
    base = tmp_path_factory.mktemp("decided")
    findings = base / "findings.yaml"
    findings.write_text("effusion:\n  prompt: There is pleural effusion\n  threshold: 0.5\n"
                        "nodule: There is a lung nodule\n", encoding="utf-8")
    out = base / "out"
    result = run_cli("score", str(archive), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
                     "--findings", str(findings), "--include-phi", "-q")
    assert result.exit_code == 0, result.output
    return out


def _reference(data: ReportData, manifest: dict[str, Any], results: pa.Table, status: pa.Table,
               gallery: dict[str, Any] | None, *, include_phi: bool) -> ReportData:
    """``data`` with everything that comes from the tables recomputed from the whole tables at once,
    the way the report computed it before it streamed them."""
    res, st = results.to_pylist(), status.to_pylist()
    names = list(manifest["findings"])
    dicomweb = manifest["source"]["kind"] == "dicomweb"
    folders = {posixpath.dirname(r["path"]) for r in (res or st)}
    root = None if dicomweb or not folders else posixpath.commonpath(sorted(folders))
    root = root if root not in ("", "/") else None

    def label(r: dict[str, Any]) -> str:
        if dicomweb:
            return r["sop_instance_uid"] or r["path"]
        return posixpath.relpath(r["path"], root) if root else r["path"]

    groups: dict[tuple[str, str], list[str]] = {}
    for r in st:
        if r["status"] != "scored":
            reason = re.sub(r"\d[\d,._]*", "#", r["reason"] or "").strip() or "(no reason)"
            groups.setdefault((r["status"], reason), []).append(label(r))
    reasons = sorted((ReasonGroup(s, why, len(files), min(files)) for (s, why), files in groups.items()),
                     key=lambda g: (g.status, -g.count, g.reason))
    phi = include_phi and "patient_id" in results.column_names
    columns = [Column("image", "text")] + ([Column("patient ID", "text"), Column("patient name", "text")]
                                           if phi else [])
    table: list[list[Any]] = [[label(r) for r in res]]
    if phi:
        table += [[r["patient_id"] or "" for r in res], [r["patient_name"] or "" for r in res]]
    calibrated = bool(manifest["model"].get("calibrated"))
    findings = []
    for name in names:
        probs = np.array([np.nan if r[f"{name}.prob"] is None else r[f"{name}.prob"] for r in res], dtype=np.float64)
        columns.append(Column(name, "num", finding=name))
        table.append([None if np.isnan(v) else float(v) for v in np.round(probs, 4)])
        findings.append(_finding(name, manifest["findings"][name], probs, [r.get(f"{name}.positive") for r in res],
                                 calibrated))
    counts = [("discovered", len(st))] + [(s, sum(r["status"] == s for r in st))
                                          for s in ("scored", "skipped", "failed")]
    ref = dataclasses.replace(data, counts=counts, reasons=reasons, findings=findings, columns=columns, table=table,
                              rows=len(res), root=root, include_phi=phi, table_note=None)
    if gallery is not None:
        ref.gallery, ref.gallery_note = _gallery(gallery, names, {r["path"]: label(r) for r in res}, len(res))
    return ref


def _finding(name: str, spec: dict[str, Any], probs: np.ndarray, positive: list[bool | None],
             calibrated: bool) -> FindingSummary:
    threshold = spec.get("threshold")
    finite = probs[np.isfinite(probs)]
    f = FindingSummary(name, spec["prompt"], probs, "probability", threshold, "")
    if any(v is not None for v in positive):
        f.positive, f.negative, f.undecided = positive.count(True), positive.count(False), positive.count(None)
        f.threshold_note = (f"threshold {threshold:g} (findings file)" if threshold is not None
                            else "threshold from the checkpoint's calibration")
    elif threshold is not None:
        f.positive, f.negative = int((finite >= threshold).sum()), int((finite < threshold).sum())
        f.threshold_note = f"threshold {threshold:g} (findings file)"
    else:
        f.threshold_note = f"no threshold: {'calibrated' if calibrated else 'uncalibrated'} probabilities, no decision"
        f.stats = [("p ≥ 0.5 (for orientation)", f"{int((finite >= 0.5).sum())} of {finite.size}")]
    return f


def _gallery(saved: dict[str, Any], names: list[str], labels: dict[str, str],
             scored: int) -> tuple[list[tuple[str, list[GalleryTile]]] | None, str]:
    rows = []
    for name in names:
        rows.append((name, [GalleryTile(labels[t["key"]], t["score"], t["image"], t["height"], t["width"],
                                        tuple(t["point"]) if t.get("point") else None,
                                        f"p {t['score']:.3f}" + (f" · map {t['map_peak']:.2f}"
                                                                 if t.get("map_peak") is not None else ""))
                            for t in saved["findings"].get(name, []) if t["key"] in labels]))
    k, observed = saved["k"], saved["observed"]
    if saved.get("note"):
        note = saved["note"]
    elif observed < scored:
        note = (f"top {k} among the {observed} of {scored} scored images the gallery saw (the others were scored "
                f"by a run without --report-maps)")
    else:
        note = f"top {k} per finding by probability, each with its similarity map (heat) and grounding point"
    return (rows if any(tiles for _, tiles in rows) else None), note


def _page(data: ReportData, mode: str) -> str:
    return render(data, mode=mode, version=__version__)


@pytest.mark.parametrize("run, mode, include_phi", [("scored", "full", False), ("scored", "summary", True),
                                                    ("decided", "summary", True), ("decided", "full", False)])
def test_real_runs_render_as_from_whole_tables(run: str, mode: str, include_phi: bool, small_batches: None,
                                               request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(run)
    data = collect(out, mode=mode, include_phi=include_phi)  # type: ignore[arg-type]
    ref = _reference(data, read_manifest(out) or {}, pq.read_table(out / "results.parquet"),
                     pq.read_table(out / "status.parquet"), load_gallery(out) if mode == "full" else None,
                     include_phi=include_phi)
    assert _page(data, mode) == _page(ref, mode)
    if (run, mode) == ("scored", "full"):  # the page the run itself wrote (its default mode)
        assert (out / REPORT_HTML).read_text(encoding="utf-8") == _page(ref, mode)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("dicomweb", [False, True], ids=["files", "dicomweb"])
def test_small_runs_render_as_from_whole_tables(fmt: str, dicomweb: bool, tmp_path: Path, rng: np.random.Generator,
                                                small_batches: None) -> None:
    """Files: the run's decisions; DICOMweb: thresholds without decisions (an older run) and a finding
    with neither. CSV is read back with the run's types: the reference's text stays text ("00042",
    "2.25", "NA", reasons with commas, quotes and line breaks), so both formats give one page."""
    results, status, _ = score_tables(300, rng, failures=60, phi=True, positive=not dicomweb)
    out = tmp_path / "out"
    write_score_run(out, results, status, fmt=fmt, dicomweb=dicomweb, thresholds={"effusion": 0.5, "nodule": 0.3},
                    gallery_k=3)
    data = collect(out, mode="full", include_phi=True)
    assert data.table_note is None and data.gallery and data.include_phi
    ref = _reference(data, read_manifest(out) or {}, results, status, load_gallery(out), include_phi=True)
    assert _page(data, "full") == _page(ref, "full")


def test_unfinished_run_is_streamed_from_its_parts(tmp_path: Path, rng: np.random.Generator,
                                                   small_batches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts in no particular order: the table in path order, as from the parts' sorted union; past
    TABLE_ROWS, the rows of highest probability (ties: the first read) in path order."""
    results, status, rows = score_tables(300, rng, failures=40, positive=True)
    out = tmp_path / "out"
    write_score_run(out, results, status)
    for name in ("results.parquet", "status.parquet"):
        (out / name).unlink()
    (out / "parts").mkdir()
    chunks = np.array_split(rng.permutation(rows.num_rows), 6)
    for i, chunk in enumerate(chunks):
        pq.write_table(rows.take(chunk), out / "parts" / f"part-{i:05d}.parquet")
    manifest = read_manifest(out) or {}
    write_manifest(out, {**manifest, "complete": False})
    data = collect(out)
    assert "did not finish" in " ".join(data.warnings)
    assert _page(data, "summary") == _page(_reference(data, manifest, results, status, None, include_phi=False),
                                           "summary")

    monkeypatch.setattr(report_data, "TABLE_ROWS", 50)
    arrived = [r for r in rows.take(np.concatenate(chunks)).to_pylist() if r["status"] == "scored"]
    top = [max((r[f"{n}.prob"] for n in manifest["findings"] if r[f"{n}.prob"] is not None), default=-np.inf)
           for r in arrived]
    kept = sorted(range(len(arrived)), key=lambda i: (-top[i], i))[:50]
    bounded = collect(out)
    assert bounded.table[0] == sorted(posixpath.relpath(arrived[i]["path"], "/archive") for i in kept)
    assert bounded.table_note is not None and "the committed parts" in bounded.table_note


@pytest.mark.slow  # ~4 s each: tables of 11,000 and 44,000 rows written, then reported under tracemalloc
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_large_run_keeps_memory_and_html_flat(fmt: str, tmp_path: Path, rng: np.random.Generator,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """N and 4N images past the bounds (lowered here so the test stays quick): the same peak memory,
    Python's (tracemalloc) and Arrow's (its allocator's peak), and the same HTML size; the table keeps
    the images of highest probability, the counts and histograms cover every image."""
    rows, n = 500, 10_000
    monkeypatch.setattr(report_data, "TABLE_ROWS", rows)
    monkeypatch.setattr(report_data, "BATCH_ROWS", 2048)
    monkeypatch.setattr(report_data, "CSV_BLOCK", 1 << 14)  # read-ahead (32 blocks) < even the small file
    warm_tables = score_tables(50, rng, failures=10, phi=True, positive=True)
    write_score_run(tmp_path / "warm", *warm_tables[:2], fmt=fmt, gallery_k=3)
    write_report(tmp_path / "warm", include_phi=True)  # imports and caches: not part of what a run's size costs

    def build(size: int) -> tuple[int, int, int, Path, pa.Table]:
        results, status, _ = score_tables(size, rng, failures=size // 10, phi=True, positive=True)
        out = tmp_path / f"run{size}"
        write_score_run(out, results, status, fmt=fmt, gallery_k=3)
        default = pa.default_memory_pool()
        pool = pa.proxy_memory_pool(default)
        _POOLS.append(pool)  # outlives every buffer it gave (freeing one after its pool would crash)
        pa.set_memory_pool(pool)
        tracemalloc.start()
        try:
            path = write_report(out, include_phi=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            pa.set_memory_pool(default)
        assert path is not None
        return peak, pool.max_memory(), path.stat().st_size, out, results

    small_peak, small_arrow, small_html, _, _ = build(n)
    large_peak, large_arrow, large_html, out, results = build(4 * n)
    assert large_peak < 1.25 * small_peak, (small_peak, large_peak)
    assert large_arrow < 1.25 * small_arrow, (small_arrow, large_arrow)
    assert large_html < 1.1 * small_html, (small_html, large_html)

    data = collect(out, include_phi=True)
    res = results.to_pylist()
    names = [f.name for f in data.findings]
    top = [max((r[f"{f}.prob"] for f in names if r[f"{f}.prob"] is not None), default=-np.inf) for r in res]
    kept = sorted(sorted(range(len(res)), key=lambda i: (-top[i], i))[:rows])
    assert data.rows == rows and data.table[0] == [posixpath.relpath(res[i]["path"], "/archive") for i in kept]
    assert data.table[1] == [res[i]["patient_id"] for i in kept]
    assert data.table_note is not None and f"{4 * n:,} scored" in data.table_note
    for f in data.findings:
        probs = np.array([np.nan if r[f"{f.name}.prob"] is None else r[f"{f.name}.prob"] for r in res])
        np.testing.assert_array_equal(f.values.counts(),  # type: ignore[union-attr]
                                      np.histogram(probs[np.isfinite(probs)], bins=20, range=(0, 1))[0])
        decided = [r[f"{f.name}.positive"] for r in res]
        assert (f.positive, f.negative, f.undecided) == (decided.count(True), decided.count(False), decided.count(None))
    assert sum(g.count for g in data.reasons) == 4 * n // 10
    assert dict(data.counts) == {"discovered": 4 * n + 4 * n // 10, "scored": 4 * n,
                                 "skipped": sum(g.count for g in data.reasons if g.status == "skipped"),
                                 "failed": sum(g.count for g in data.reasons if g.status == "failed")}
    assert 'id="table-note"' in (out / REPORT_HTML).read_text(encoding="utf-8")
