"""The segment report in bounded memory: ``report.json`` and each ``result.json`` are streamed once;
what the page shows is kept as running aggregates and bounded samples. Small runs show every
record exactly as a report built from full lists; large ones keep memory and HTML flat.
Synthetic folders (tests/engine/report/records.py), no model."""

from __future__ import annotations

import json
import posixpath
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import radflash.report.data as report_data
import radflash.report.stream as stream
from radflash.report import write_report
from radflash.report.data import OTHER_REASONS, collect
from radflash.report.stream import Best, Sample, scan_object
from radflash.report.svg import BINS
from tests.conftest import seed_for
from tests.engine.report.records import PROMPTS, write_segment_run


@pytest.fixture()
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(seed_for(request.node.nodeid))


def test_scan_object_hands_over_array_items_and_keeps_the_rest(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "_CHUNK", 7)  # every value crosses chunk boundaries, numbers included
    doc = {"n": 12345678901234, "s": "é “q” \\ \n", "images": [{"x": [1.5e-7, -3]}, 98765, "a,b]", [], {}],
           "t": True, "failures": [], "z": None, "e": [1, 2]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    got: dict[str, list] = {"images": [], "failures": []}
    rest = scan_object(path, {k: got[k].append for k in got})
    assert got == {"images": doc["images"], "failures": []}
    assert rest == {k: v for k, v in doc.items() if k not in got}
    path.write_text(json.dumps(doc)[:-9], encoding="utf-8")  # cut short
    with pytest.raises(ValueError):
        scan_object(path, {"images": lambda _: None})
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON object"):
        scan_object(path, {})


def test_best_and_sample_match_the_whole_stream(rng: np.random.Generator) -> None:
    values = np.round(rng.random(5_000), 2).tolist()  # many ties
    best = Best(25, key=lambda iv: (-iv[1], iv[0] % 7))
    for item in enumerate(values):
        best.add(item)
    assert best.result() == sorted(enumerate(values), key=lambda iv: (-iv[1], iv[0] % 7))[:25]  # stable, as sorted

    small, large = Sample(len(values)), Sample(500)
    for v in values:
        small.add(v)
        large.add(v)
    assert small.exact and small.mean() == float(np.mean(values)) and small.median() == float(np.median(values))
    assert not large.exact and len(large.kept) == 500 and large.max == max(values)
    assert large.mean() == pytest.approx(np.mean(values)) and abs(large.median() - np.median(values)) < 0.1
    again = Sample(500)
    for v in values:
        again.add(v)
    assert again.kept == large.kept  # seeded: the same stream gives the same sample


def test_small_run_shows_every_record_as_from_full_lists(tmp_path: Path, rng: np.random.Generator) -> None:
    """Every number of the page recomputed here the way a report of full lists computed it."""
    out = tmp_path / "out"
    report = write_segment_run(out, 150, rng, failures=40, gallery_k=4)
    records = [json.loads((out / e["json"]).read_text()) for e in report["images"]]
    data = collect(out)
    root = "/archive"
    labels = [posixpath.relpath(e["source"], root) for e in report["images"]]
    assert data.root == root and data.rows == 150 and data.table_note is None
    assert data.table[0] == labels  # every image, in input order
    for t, name in enumerate(PROMPTS):
        g = [next((p for p in r["prompts"] if p["name"] == name), None) for r in records]
        peaks = np.array([np.nan if x is None else x["max_prob"] for x in g])
        areas = np.array([np.nan if x is None else 100 * x["mask_pixels"] / (r["size"]["height"] * r["size"]["width"])
                          for x, r in zip(g, records)])
        assert data.table[1 + 2 * t] == [None if np.isnan(v) else float(v) for v in np.round(peaks, 4)]
        assert data.table[2 + 2 * t] == [None if np.isnan(v) else float(v) for v in np.round(areas, 3)]
        f = data.findings[t]
        finite = peaks[np.isfinite(peaks)]
        np.testing.assert_array_equal(f.values.counts(), np.histogram(finite, bins=BINS, range=(0, 1))[0])
        positive = areas[areas > 0]
        assert (f.positive, f.negative) == (positive.size, np.isfinite(areas).sum() - positive.size)
        assert f.stats == [("mask area, positives (mean / median % of image)",
                            f"{positive.mean():.2f} / {np.median(positive):.2f}"),
                           ("peak probability (mean / max)", f"{finite.mean():.3f} / {finite.max():.3f}")]
        ranked = sorted((-x["max_prob"], e["name"], label) for x, e, label in zip(g, report["images"], labels) if x)
        name_, tiles = data.gallery[t]  # type: ignore[index]
        assert name_ == name and [(-tile.score, tile.label) for tile in tiles] == [(s, lab) for s, _, lab in ranked[:4]]
    groups: dict[tuple[str, str], list[str]] = {}
    for f in report["failures"]:
        reason = "truncated at byte #" if "byte" in f["reason"] else "# frames, no pixel data"
        groups.setdefault((f["status"], reason), []).append(posixpath.relpath(f["source"], root))
    assert sorted((g.status, g.reason, g.count, g.example) for g in data.reasons) == \
        sorted((s, r, len(files), min(files)) for (s, r), files in groups.items())


@pytest.mark.slow  # ~15 s: 15,000 result files read under tracemalloc
def test_large_run_keeps_memory_and_html_flat(tmp_path: Path, rng: np.random.Generator,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """N and 4N images past the bounds (lowered here so the test stays quick): the same peak memory
    and HTML size; the table keeps the images of highest peak, the histograms count every image."""
    rows, n = 200, 3_000
    monkeypatch.setattr(report_data, "TABLE_ROWS", rows)
    monkeypatch.setattr(report_data, "SAMPLE", 400)
    write_segment_run(tmp_path / "warm", 20, rng, failures=5, gallery_k=3)
    write_report(tmp_path / "warm")  # imports and caches: not part of what a run's size costs

    def build(size: int) -> tuple[int, int, Path]:
        out = tmp_path / f"run{size}"
        write_segment_run(out, size, rng, failures=size // 10, gallery_k=3)
        tracemalloc.start()
        try:
            path = write_report(out)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert path is not None
        return peak, path.stat().st_size, out

    small_peak, small_html, _ = build(n)
    large_peak, large_html, out = build(4 * n)
    assert large_peak < 1.25 * small_peak, (small_peak, large_peak)
    assert large_html < 1.1 * small_html, (small_html, large_html)

    data = collect(out)
    report = json.loads((out / "report.json").read_text())
    peaks = [max((p["max_prob"] for p in json.loads((out / e["json"]).read_text())["prompts"]), default=-1.0)
             for e in report["images"]]
    kept = sorted(range(len(peaks)), key=lambda i: (-peaks[i], i))[:rows]
    names = [posixpath.relpath(report["images"][i]["source"], "/archive") for i in sorted(kept)]
    assert data.rows == rows and data.table[0] == names  # the highest peaks, in input order
    assert data.table_note is not None and f"{4 * n:,} segmented" in data.table_note
    assert all(int(f.values.counts().sum()) == 4 * n - (f.name == PROMPTS[1]) * (4 * n // 50) for f in data.findings)
    assert "≈" in data.findings[0].stats[0][1]  # a median from the sample, marked as an estimate
    assert 'id="table-note"' in (out / "report.html").read_text()


def test_reason_groups_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_data, "MAX_REASONS", 3)
    reasons = report_data._Reasons()
    for i in range(50):  # a reason naming its file: one group per file without the bound
        reasons.add("failed", f"cannot identify image file 'x{chr(97 + i % 26)}{chr(97 + i // 26)}.png'", f"f{i:02d}")
    groups = reasons.result()
    assert len(groups) == 4 and sum(g.count for g in groups) == 50
    assert groups[0].reason == OTHER_REASONS and groups[0].count == 47 and groups[0].example == "f03"
