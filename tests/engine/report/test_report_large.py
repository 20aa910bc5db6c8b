"""100,000 images: the report embeds the table once and renders it a page at a time, so it loads,
pages, sorts and filters in the browser without building 100,000 rows of DOM. Synthetic tables,
no model. Time bounds are generous ceilings for a hung or quadratic page, not speed targets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from radflash.archive.sinks import TableSpec, write_manifest, write_table
from radflash.findings import default_prompts
from radflash.report import write_report
from tests.engine.report.browser import console_errors, open_report

ROWS = 100_000
CEILING_S = 60.0


@pytest.fixture(scope="module")
def big_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    out = tmp_path_factory.mktemp("big") / "out"
    out.mkdir()
    names = tuple(default_prompts())
    rng = np.random.default_rng(12345)
    paths = [f"/archive/site{i % 7}/study{i // 7:05d}/img{i:06d}.dcm" for i in range(ROWS)]
    cols: dict[str, Any] = {"path": paths, "sop_instance_uid": [f"2.25.{i}" for i in range(ROWS)],
                            "study_instance_uid": [None] * ROWS, "series_instance_uid": [None] * ROWS}
    for n in names:
        logits = rng.normal(-2.0, 2.0, ROWS).astype(np.float32)
        cols[f"{n}.logit"] = logits
        cols[f"{n}.prob"] = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    results = pa.table(cols).cast(pa.schema([f for f in TableSpec(names).schema() if f.name in cols]))
    status = pa.table({"path": paths, "status": ["scored"] * ROWS, "reason": [None] * ROWS,
                       "sop_instance_uid": cols["sop_instance_uid"], "modality": ["CR"] * ROWS,
                       "view_position": ["PA"] * ROWS})
    write_table(results, out / "results.parquet", "parquet")
    write_table(status, out / "status.parquet", "parquet")
    write_manifest(out, {
        "manifest_version": 1, "complete": True, "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T01:00:00+00:00", "model": {"id": "synthetic", "sha256": "0" * 64},
        "findings": {n: {"prompt": p, "threshold": None} for n, p in default_prompts().items()},
        "source": {"kind": "files", "inputs": ["/archive"]}, "args": {"inputs": ["/archive"], "format": "parquet"},
        "counts": {"discovered": ROWS, "scored": ROWS, "skipped": 0, "failed": 0},
        "timings": {"images_per_s": 27.8, "total_s": 3600.0},
    })
    return out, results


@pytest.mark.slow
def test_report_builds_for_100k_rows(big_output: tuple[Path, pa.Table]) -> None:
    out, _ = big_output
    t0 = time.perf_counter()
    path = write_report(out)
    assert time.perf_counter() - t0 < CEILING_S
    size = path.stat().st_size
    assert size < 40 * 2**20, size  # the table is embedded once, compactly (not as 100,000 <tr>)
    assert path.read_text(encoding="utf-8").count("<tr") < 100


@pytest.mark.slow
def test_100k_rows_load_page_sort_and_filter_in_the_browser(chromium: Any,
                                                            big_output: tuple[Path, pa.Table]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, results = big_output
    path = write_report(out)
    t0 = time.perf_counter()
    open_report(chromium, path, timeout=CEILING_S)
    assert time.perf_counter() - t0 < CEILING_S
    shown = lambda: int(chromium.find_element(By.ID, "row-count").get_attribute("data-shown"))
    assert shown() == ROWS
    assert len(chromium.find_elements(By.CSS_SELECTOR, "#image-rows tr")) == 50  # one page of DOM only
    chromium.find_element(By.ID, "last").click()
    assert chromium.find_element(By.ID, "page-info").text == f"page {ROWS // 50} of {ROWS // 50}"

    finding = "pneumothorax"
    head = next(h for h in chromium.find_elements(By.CSS_SELECTOR, "#image-table th") if h.text == finding)
    col = int(head.get_attribute("data-col"))
    t0 = time.perf_counter()
    head.click()
    values = chromium.execute_script(
        "var c = arguments[0]; return Array.from(document.querySelectorAll('#image-rows tr'))"
        ".map(function (tr) { return +tr.children[c].getAttribute('data-value'); });", col)
    assert time.perf_counter() - t0 < CEILING_S
    probs = np.round(np.asarray(results.column(f"{finding}.prob").to_numpy(), dtype=np.float64), 4)
    assert values == sorted(values, reverse=True) and len(values) == 50
    assert values[0] == pytest.approx(probs.max())
    assert chromium.find_element(By.ID, "page-info").text.startswith("page 1 of")

    chromium.find_element(By.ID, "filter-text").send_keys("site3/study01")
    expected = sum("site3/study01" in p for p in results.column("path").to_pylist())
    WebDriverWait(chromium, CEILING_S).until(lambda d: shown() == expected)
    assert console_errors(chromium) == []
