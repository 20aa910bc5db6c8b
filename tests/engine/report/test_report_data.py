"""The report without a browser: what it collects, what it hides (PHI), rebuilds, modes and errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from radflash.archive.sinks import read_manifest, write_manifest
from radflash.errors import InputError
from radflash.report import REPORT_HTML, write_report
from radflash.report.data import collect
from radflash.report.gallery import GALLERY, ScoreGallery, load_gallery
from radflash.report.html import render, script_json
from radflash.report.svg import histogram_svg
from tests.engine.report.conftest import MAPS_K, run_cli


def _table_payload(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert match, "no embedded table data"
    return json.loads(match.group(1))


def test_score_writes_report_and_gallery(scored: Path) -> None:
    assert (scored / REPORT_HTML).is_file() and (scored / GALLERY).is_file()
    html = (scored / REPORT_HTML).read_text(encoding="utf-8")
    assert 'data-mode="full"' in html
    # self-contained: nothing is fetched from anywhere (no src/href to http(s), no external script)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<script src" not in html and "<link " not in html


def test_summary_counts_reasons_and_rows_come_from_the_tables(scored: Path) -> None:
    results, status = pq.read_table(scored / "results.parquet"), pq.read_table(scored / "status.parquet")
    data = collect(scored)
    statuses = status.column("status").to_pylist()
    assert dict(data.counts) == {"discovered": len(statuses), "scored": statuses.count("scored"),
                                 "skipped": statuses.count("skipped"), "failed": statuses.count("failed")}
    assert data.rows == results.num_rows == statuses.count("scored") > 0
    # every skipped/failed file is in exactly one reason group, and groups are per status
    assert sum(g.count for g in data.reasons) == statuses.count("skipped") + statuses.count("failed")
    for g in data.reasons:
        assert g.status in ("skipped", "failed") and g.count >= 1 and "#" not in g.example
    manifest = read_manifest(scored)
    facts = dict(data.facts)
    assert facts["model"] == manifest["model"]["id"] and facts["model sha256"] == manifest["model"]["sha256"]
    assert manifest["started"] in facts["run"]
    # one probability column per finding, values as in results.parquet (rounded to 4 decimals)
    payload = _table_payload((scored / REPORT_HTML).read_text(encoding="utf-8"))
    labels = [c["label"] for c in payload["columns"]]
    assert labels == ["image", *manifest["findings"]]
    name = next(iter(manifest["findings"]))
    got = np.array(payload["data"][labels.index(name)], dtype=np.float64)
    want = np.array(results.column(f"{name}.prob").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(got, want, atol=0.5e-4 + 1e-9)
    assert payload["rows"] == results.num_rows


def test_gallery_is_the_top_k_of_each_finding(scored: Path) -> None:
    """The running top-K over batches of 5 equals the top-K of the finished table (same pass)."""
    results = pq.read_table(scored / "results.parquet").to_pylist()
    saved = load_gallery(scored)
    assert saved is not None and saved["k"] == MAPS_K and saved["observed"] == len(results)
    for name, tiles in saved["findings"].items():
        want = sorted(results, key=lambda r: (-r[f"{name}.prob"], r["path"]))[:MAPS_K]
        assert [t["key"] for t in tiles] == [r["path"] for r in want], name
        for t in tiles:
            assert t["image"].startswith("data:image/jpeg;base64,")
            assert max(t["height"], t["width"]) <= 256
            x, y = t["point"]
            assert 0 <= x <= t["width"] and 0 <= y <= t["height"]


def test_rebuild_gives_an_identical_file(scored: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(scored, copy)  # as if the folder came from another machine
    before = (copy / REPORT_HTML).read_bytes()
    (copy / REPORT_HTML).unlink()
    result = run_cli("report", str(copy), "-q")
    assert result.exit_code == 0, result.output
    assert (copy / REPORT_HTML).read_bytes() == before


def test_summary_mode_has_no_pictures(scored: Path, tmp_path: Path) -> None:
    target = tmp_path / "summary.html"
    result = run_cli("report", str(scored), "--report", "summary", "--html", str(target))
    assert result.exit_code == 0, result.output
    html = target.read_text(encoding="utf-8")
    assert "data:image" not in html and "<img" not in html
    assert "--report summary" in html  # says why the gallery is missing


@pytest.fixture(scope="module")
def phi_run(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phi") / "out"
    result = run_cli("score", str(archive), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
                     "--include-phi", "-q")
    assert result.exit_code == 0, result.output
    return out


def test_patient_names_and_ids_only_with_include_phi(phi_run: Path, tmp_path: Path) -> None:
    results = pq.read_table(phi_run / "results.parquet")
    names = {n for n in results.column("patient_name").to_pylist() if n}
    ids = {i for i in results.column("patient_id").to_pylist() if i}
    assert names and ids  # the archive's headers carry them, and the run recorded them
    # the run itself was asked for PHI (score --include-phi): its report shows it
    html = (phi_run / REPORT_HTML).read_text(encoding="utf-8")
    assert all(n in html for n in names) and all(i in html for i in ids)
    # rebuilt without --include-phi: not one name or ID anywhere in the file
    run_cli("report", str(phi_run), "--html", str(tmp_path / "plain.html"), "-q")
    plain = (tmp_path / "plain.html").read_text(encoding="utf-8")
    for secret in names | ids:
        assert secret not in plain
        assert secret.split("^")[0] not in plain
    assert "no patient names or IDs" in plain
    assert "patient" not in json.dumps(_table_payload(plain)["columns"])


def test_no_report_and_no_gallery_with_report_none(archive: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("score", str(archive / "patient00"), "-o", str(out), "--model", str(tiny_model),
                     "--workers", "0", "--report", "none", "-q")
    assert result.exit_code == 0, result.output
    assert (out / "results.parquet").is_file()
    assert not (out / REPORT_HTML).exists() and not (out / GALLERY).exists()


@pytest.mark.parametrize("args, message", [
    (["--report", "summary", "--report-maps", "2"], "--report-maps draws the gallery of --report full"),
    (["--report-maps", "2"], "give -o OUT"),
])
def test_report_option_misuse_is_a_usage_error(args: list[str], message: str, tmp_path: Path) -> None:
    extra = ["-o", str(tmp_path / "o")] if "summary" in args else []
    result = run_cli("score", str(tmp_path), *extra, *args)
    assert result.exit_code == 2 and message in result.output


def test_report_on_a_folder_that_is_no_output_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("report", str(tmp_path))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "not a radflash score or segment output" in lines[0]
    missing = run_cli("report", str(tmp_path / "absent"))
    assert missing.exit_code == 1 and "not a folder" in missing.output


def test_an_unfinished_run_is_reported_from_its_parts(scored: Path, tmp_path: Path) -> None:
    copy = tmp_path / "crashed"
    shutil.copytree(scored, copy)
    for name in ("results.parquet", "status.parquet", GALLERY, REPORT_HTML):
        (copy / name).unlink()
    manifest = read_manifest(copy)
    manifest["complete"] = False
    for key in ("finished", "counts", "timings"):
        manifest.pop(key, None)
    write_manifest(copy, manifest)
    path = write_report(copy)
    html = path.read_text(encoding="utf-8")
    assert "did not finish" in html and "--resume" in html
    assert _table_payload(html)["rows"] == pq.read_table(scored / "results.parquet").num_rows


def test_resume_after_a_crash_reports_what_the_gallery_saw(archive: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A run that died saved no gallery; the resumed run's gallery covers the files it scored, and
    the report says so instead of passing a partial top-K off as the whole run's."""
    out = tmp_path / "out"
    args = ["score", str(archive), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
            "--commit-every", "8", "-q"]
    assert run_cli(*args).exit_code == 0
    parts = sorted((out / "parts").glob("part-*.parquet"))
    lost = pq.read_table(parts[-1])
    redo = lost.filter(pc.equal(lost.column("status"), "scored")).num_rows
    assert len(parts) > 1 and redo > 0
    parts[-1].unlink()  # as after kill -9 before the last commit
    for name in ("results.parquet", "status.parquet", REPORT_HTML):
        (out / name).unlink()
    result = run_cli(*args, "--resume", "--report-maps", "2")
    assert result.exit_code == 0, result.output
    saved = load_gallery(out)
    assert saved["observed"] == redo
    scored = pq.read_table(out / "results.parquet").num_rows
    html = (out / REPORT_HTML).read_text(encoding="utf-8")
    assert f"top 2 among the {redo} of {scored} scored images" in html
    assert 'data-mode="full"' in html and "<img" in html


def test_model_without_maps_gets_a_note_not_a_gallery(scored: Path, tmp_path: Path) -> None:
    class NoMaps:
        supports_maps = False
        family = "scores-only"

    gallery = ScoreGallery(2)
    gallery(NoMaps(), None, [], None, [])  # type: ignore[arg-type]
    assert gallery.note and "no similarity maps" in gallery.note and not gallery.top.lists
    copy = tmp_path / "copy"
    shutil.copytree(scored, copy)
    gallery.save(copy)
    html = write_report(copy).read_text(encoding="utf-8")
    assert "has no similarity maps" in html and "<img" not in html


def test_histogram_bars_count_every_value() -> None:
    values = np.random.default_rng(0).random(1000)
    svg = histogram_svg(values, threshold=0.3)
    counts = [int(c) for c in re.findall(r'data-count="(\d+)"', svg)]
    assert len(counts) == 20 and sum(counts) == 1000
    assert counts == np.histogram(values, bins=20, range=(0, 1))[0].tolist()
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([\d.]+)"', svg)]
    assert all((h > 0) == (c > 0) for h, c in zip(heights, counts))
    assert 'class="threshold"' in svg


def test_embedded_text_cannot_close_the_script_or_inject_markup(scored: Path) -> None:
    data = collect(scored)
    data.table[0][0] = '</script><script>alert(1)</script>'
    data.facts.append(("inputs", "<img src=x onerror=alert(1)>"))
    html = render(data, mode="summary", version="test")
    assert html.count("</script>") == 2  # the data block's and the code block's
    assert "<img src=x" not in html
    assert json.loads(script_json({"a": "</script>"}))["a"] == "</script>"


def test_write_report_refuses_unknown_modes(scored: Path) -> None:
    with pytest.raises(InputError, match="unknown report mode"):
        write_report(scored, mode="everything")
    assert write_report(scored, mode="none") is None


def test_thresholds_give_decision_counts_and_a_line(archive: Path, tiny_model: Path, tmp_path: Path) -> None:
    findings = tmp_path / "findings.yaml"
    findings.write_text("effusion:\n  prompt: There is pleural effusion\n  threshold: 0.5\n"
                        "nodule: There is a lung nodule\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("score", str(archive / "patient01"), "-o", str(out), "--model", str(tiny_model),
                     "--workers", "0", "--findings", str(findings), "-q")
    assert result.exit_code == 0, result.output
    results = pq.read_table(out / "results.parquet").to_pylist()
    effusion, nodule = collect(out).findings
    decided = [r["effusion.positive"] for r in results]
    assert decided == [r["effusion.prob"] >= 0.5 for r in results]
    assert (effusion.positive, effusion.negative) == (decided.count(True), decided.count(False))
    assert effusion.threshold == 0.5 and "findings file" in effusion.threshold_note
    assert nodule.positive is None and nodule.threshold is None and "no threshold" in nodule.threshold_note
    html = (out / REPORT_HTML).read_text(encoding="utf-8")
    assert html.count('class="threshold"') == 1 and f'data-positive="{effusion.positive}"' in html


def test_gallery_merged_from_actor_copies_equals_one_local_gallery() -> None:
    """Under Ray each actor keeps its own top-K and ships tiles as they enter it; whatever the split
    of the images over actors, the order of their batches and of the deltas' arrival, the driver's
    merge is exactly the gallery one local pass gives."""
    from radflash.report.gallery import Tile

    rng = np.random.default_rng(np.random.randint(2**31))
    names = ["effusion", "edema", "mass"]
    scores = np.round(rng.random((60, len(names))), 2)  # rounded: ties, broken by key
    batches = [list(range(i, min(60, i + 5))) for i in range(0, 60, 5)]

    def feed(gallery: ScoreGallery, rows: list[int]) -> None:
        """What ScoreGallery._observe does per batch: only candidates entering the top-K get a tile."""
        gallery.observed += len(rows)
        for j, name in enumerate(names):
            cands = [(float(scores[r, j]), f"img{r:02d}") for r in rows]
            for key in gallery.top.winners(name, cands):
                r = int(key[3:])
                gallery.top.add(name, Tile(key=key, score=float(scores[r, j]), image=f"jpeg-{key}", height=8,
                                           width=8, point=(1.5, 2.5), map_peak=0.5))

    local = ScoreGallery(MAPS_K)
    for rows in batches:
        feed(local, rows)
    driver = ScoreGallery(MAPS_K)
    actors = [driver.for_worker() for _ in range(3)]
    deltas = []
    for rows in batches:
        actor = actors[int(rng.integers(len(actors)))]
        feed(actor, rows)
        deltas.append(json.loads(json.dumps(actor.take_delta())))  # through JSON, as the Arrow column carries it
    for i in rng.permutation(len(deltas)):
        driver.merge_delta(deltas[i])
    assert driver.observed == local.observed == 60
    assert driver.top.lists == local.top.lists
    assert sum(len(t) for d in deltas for t in d["tiles"].values()) < 60 * len(names)  # only entrants travel
