"""report.html in a real headless Chromium (file://, no server): table, paging, sorting, filtering,
charts and gallery, and a console without errors. Skipped with the reason when Chromium,
chromedriver or selenium is missing."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from radflash.report import REPORT_HTML
from tests.engine.report.browser import console_errors, open_report

WAIT_S = 30.0  # generous: only a bound for a hung page, never a speed assertion


def _by_id(drv: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, element_id)


def _select(drv: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(_by_id(drv, element_id)).select_by_value(value)


def _shown(drv: Any) -> int:
    return int(_by_id(drv, "row-count").get_attribute("data-shown"))


def _wait_shown(drv: Any, n: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, WAIT_S).until(lambda d: _shown(d) == n)


def _column(drv: Any, col: int) -> list[str]:
    """The visible page's cells of column ``col``: the exact value for numbers, else the text."""
    return drv.execute_script(
        "var c = arguments[0]; return Array.from(document.querySelectorAll('#image-rows tr')).map(function (tr) {"
        " var td = tr.children[c]; return td.getAttribute('data-value') || td.textContent; });", col)


def _header(drv: Any, label: str) -> Any:
    from selenium.webdriver.common.by import By

    heads = drv.find_elements(By.CSS_SELECTOR, "#image-table th")
    return next(h for h in heads if h.text.rstrip(" ▲▼") == label)


@pytest.fixture
def page(chromium: Any, scored: Path) -> Any:
    open_report(chromium, scored / REPORT_HTML)
    console_errors(chromium)  # drain what an earlier test left
    yield chromium
    assert console_errors(chromium) == []


@pytest.fixture(scope="module")
def results(scored: Path) -> list[dict]:
    root = _root(scored)
    rows = pq.read_table(scored / "results.parquet").to_pylist()
    for r in rows:
        r["name"] = r["path"][len(root) + 1:]
    return rows


def _root(scored: Path) -> str:
    import os
    import posixpath

    paths = pq.read_table(scored / "status.parquet").column("path").to_pylist()
    return os.path.commonpath(sorted({posixpath.dirname(p) for p in paths}))


def test_table_has_one_row_per_scored_image_across_pages(page: Any, results: list[dict]) -> None:
    _select(page, "page-size", "10")
    names: list[str] = []
    while True:
        names += _column(page, 0)
        nxt = _by_id(page, "next")
        if not nxt.is_enabled():
            break
        nxt.click()
    assert len(results) > 10  # more than one page
    assert len(names) == len(results) == _shown(page)
    assert sorted(names) == sorted(r["name"] for r in results)
    assert _by_id(page, "page-info").text == f"page {-(-len(results) // 10)} of {-(-len(results) // 10)}"


def test_sorting_a_column_orders_its_values(page: Any, results: list[dict], scored: Path) -> None:
    _select(page, "page-size", "1000")
    finding = "pleural effusion"
    head = _header(page, finding)
    head.click()  # numbers: highest first
    assert head.get_attribute("aria-sort") == "descending"
    col = int(head.get_attribute("data-col"))
    values = [float(v) for v in _column(page, col)]
    assert values == sorted(values, reverse=True) and len(values) == len(results)
    assert values[0] == pytest.approx(max(r[f"{finding}.prob"] for r in results), abs=1e-4)
    head.click()
    assert head.get_attribute("aria-sort") == "ascending"
    values = [float(v) for v in _column(page, col)]
    assert values == sorted(values)
    name_head = _header(page, "image")
    name_head.click()  # text: A → Z first
    assert _column(page, 0) == sorted(r["name"] for r in results)
    name_head.click()
    assert _column(page, 0) == sorted((r["name"] for r in results), reverse=True)


def test_filtering_reduces_the_rows_correctly(page: Any, results: list[dict]) -> None:
    _select(page, "page-size", "1000")
    _by_id(page, "filter-text").send_keys("PATIENT01")  # case-insensitive substring of the name
    expected = [r for r in results if "patient01" in r["name"].lower()]
    assert 0 < len(expected) < len(results)
    _wait_shown(page, len(expected))
    assert sorted(_column(page, 0)) == sorted(r["name"] for r in expected)
    # and a value filter on one finding, at its median over the filtered rows
    finding = "cardiomegaly"
    cut = float(np.median([round(r[f"{finding}.prob"], 4) for r in expected]))
    col = int(_header(page, finding).get_attribute("data-col"))
    _select(page, "filter-col", str(col))
    _by_id(page, "filter-min").send_keys(repr(cut))
    both = [r for r in expected if round(r[f"{finding}.prob"], 4) >= cut]
    assert 0 < len(both) <= len(expected)
    _wait_shown(page, len(both))
    assert all(float(v) >= cut for v in _column(page, col))
    assert sorted(_column(page, 0)) == sorted(r["name"] for r in both)
    _by_id(page, "filter-text").clear()
    _select(page, "filter-col", "")
    _wait_shown(page, len(results))


def test_histograms_and_gallery_render_non_blank(page: Any, results: list[dict], scored: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    charts = page.find_elements(By.CSS_SELECTOR, "svg.histogram")
    assert len(charts) == 14  # one per default finding
    for chart in charts:
        counts = page.execute_script(
            "var svg = arguments[0]; return Array.from(svg.querySelectorAll('rect.bar')).map(function (r) {"
            " return [+r.getAttribute('data-count'), r.getBoundingClientRect().height]; });", chart)
        assert sum(c for c, _ in counts) == len(results)
        assert all((h > 0) == (c > 0) for c, h in counts) and any(h > 0 for _, h in counts)
    images = page.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(images) == 14 * 3
    for img in images:
        assert page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    # pixels on screen: the first tile and the first histogram are not one flat colour
    for element in (images[0], charts[0]):
        page.execute_script("arguments[0].scrollIntoView()", element)
        shot = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), dtype=np.float64)
        assert shot.std() > 10, shot.std()
    points = page.find_elements(By.CSS_SELECTOR, "#gallery svg.point circle")
    assert len(points) == 2 * len(images)


def test_the_demo_command_report_shows_summary_histograms_table_and_gallery(chromium: Any, tmp_path: Path) -> None:
    """README's main job (`radflash score -o OUT`: demo model, demo archive of phantoms) → a full report."""
    from selenium.webdriver.common.by import By

    from tests.engine.report.conftest import run_cli

    out = tmp_path / "demo"
    result = run_cli("score", "-o", str(out), "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    scored = pq.read_table(out / "results.parquet").num_rows
    open_report(chromium, out / REPORT_HTML)
    console_errors(chromium)
    assert _shown(chromium) == scored > 0
    assert len(chromium.find_elements(By.CSS_SELECTOR, "svg.histogram")) == 14
    images = chromium.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert len(images) == 14 * min(4, scored)  # the demo default: --report-maps 4
    assert all(chromium.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
    assert console_errors(chromium) == []
