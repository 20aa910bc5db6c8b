"""The segment report: per-prompt summary (area, peak probability), mask overlays from the PNGs the
run wrote over thumbnails kept in the same pass, rebuild, and rendering in Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radflash.report import REPORT_HTML
from radflash.report.data import collect
from radflash.report.gallery import GALLERY, load_gallery
from radflash.report.svg import BINS, Histogram
from tests.engine.report.browser import console_errors, open_report
from tests.engine.report.conftest import run_cli

PROMPTS = ("There is pleural effusion", "left lung")


@pytest.fixture(scope="module")
def segmented(archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "out"
    args = ["segment", str(archive / "patient00"), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
            "--threshold", "0.5", "--report-maps", "2", "-q"]
    for p in PROMPTS:
        args += ["--prompt", p]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return out


def _images(out: Path) -> list[dict]:
    report = json.loads((out / "report.json").read_text())
    return [json.loads((out / e["json"]).read_text()) for e in report["images"]]


def test_prompt_summary_and_table_come_from_the_image_results(segmented: Path) -> None:
    images = _images(segmented)
    data = collect(segmented)
    assert data.kind == "segment" and data.rows == len(images) > 2
    assert [f.name for f in data.findings] == list(PROMPTS)
    for f in data.findings:
        peaks = [next(p for p in im["prompts"] if p["name"] == f.name)["max_prob"] for im in images]
        # binned as the run streams by: the counts of every image's peak, not the values themselves
        assert isinstance(f.values, Histogram)
        np.testing.assert_array_equal(f.values.counts(), np.histogram(np.clip(peaks, 0, 1), bins=BINS, range=(0, 1))[0])
        positives = sum(next(p for p in im["prompts"] if p["name"] == f.name)["mask_pixels"] > 0 for im in images)
        assert f.positive == positives and f.negative == len(images) - positives
        assert f.threshold == 0.5
    labels = [c.label for c in data.columns]
    assert labels == ["image", *[f"{p} {kind}" for p in PROMPTS for kind in ("peak", "area %")]]


def test_gallery_overlays_each_prompts_top_k(segmented: Path) -> None:
    saved = load_gallery(segmented)
    assert saved is not None and saved["kind"] == "segment" and saved["thumbnails"]
    images = _images(segmented)
    data = collect(segmented)
    assert data.gallery is not None
    for name, tiles in data.gallery:
        ranked = sorted(images, key=lambda im: -next(p for p in im["prompts"] if p["name"] == name)["max_prob"])
        assert [t.score for t in tiles] == pytest.approx(
            [next(p for p in im["prompts"] if p["name"] == name)["max_prob"] for im in ranked[:2]])
        for t in tiles:
            assert t.image.startswith("data:image/jpeg;base64,") and max(t.height, t.width) <= 256
    # every top-K image's thumbnail was kept in the run's pass (so no tile is drawn on black), and no other
    entries = json.loads((segmented / "report.json").read_text())["images"]
    top = set()
    for name in PROMPTS:
        peak = {e["name"]: next(p for p in im["prompts"] if p["name"] == name)["max_prob"]
                for e, im in zip(entries, images)}
        top |= set(sorted(peak, key=lambda k: (-peak[k], k))[:2])
    assert set(saved["thumbnails"]) == top


def test_segment_report_rebuilds_identically(segmented: Path) -> None:
    before = (segmented / REPORT_HTML).read_bytes()
    result = run_cli("report", str(segmented), "-q")
    assert result.exit_code == 0, result.output
    assert (segmented / REPORT_HTML).read_bytes() == before
    assert (segmented / GALLERY).is_file()
    assert re.search(r'data-kind="segment" data-mode="full"', before.decode())


def test_segment_report_renders_in_chromium(chromium: Any, segmented: Path) -> None:
    from selenium.webdriver.common.by import By

    open_report(chromium, segmented / REPORT_HTML)
    rows = chromium.find_elements(By.CSS_SELECTOR, "#image-rows tr")
    assert len(rows) == len(_images(segmented))
    images = chromium.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(images) == 2 * len(PROMPTS)
    assert all(chromium.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    assert console_errors(chromium) == []
