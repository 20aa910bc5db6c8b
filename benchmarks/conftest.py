"""Benchmarks: ``python -m pytest benchmarks --benchmark-enable [--results-md FILE]``.

Without ``--benchmark-enable`` (the repository default) every benchmark runs once, as a smoke
test. With ``--results-md`` the measured medians are appended to FILE as one dated block with
the machine and versions (the one-results-file convention).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import shapes`, `import cpu_shapes`
os.environ.setdefault("RADFLASH_NO_DEMO_NOTICE", "1")

import radflash  # noqa: F401  (drops the checkout from sys.path: see radflash._detach_checkout)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--results-md", default=None, help="append measured medians to this markdown file")


@pytest.fixture(scope="session")
def results_log(request: pytest.FixtureRequest):
    rows: list[tuple[str, float, str]] = []
    yield rows
    path = request.config.getoption("--results-md")
    if path and rows:
        from radflash.util.sysinfo import machine_info, one_line

        info = machine_info("cpu")
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        lines = [f"## {info['date']} · CPU paths (pytest-benchmark)", "", f"- machine: {one_line(info)}",
                 f"- versions: python {info['python']}, {versions}", "",
                 "| benchmark | median ms | throughput (formula) |", "|---|---|---|"]
        lines += [f"| {name} | {ms:.3g} | {rate} |" for name, ms, rate in rows]
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if target.exists() and target.stat().st_size else "") + "\n".join(lines) + "\n")


@pytest.fixture
def record(benchmark, results_log):
    """``record(name, amount, unit)`` after a benchmark: rate = amount / median, logged if measured."""

    def _record(name: str, amount: float, unit: str, formula: str) -> None:
        benchmark.extra_info.update({"amount": amount, "unit": unit, "formula": formula})
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        median = stats.stats.median
        rate = amount / median
        scale, prefix = next(((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
                              if rate >= s), (1, ""))
        results_log.append((name, 1e3 * median, f"{rate / scale:.3g} {prefix}{unit}/s ({formula})"))

    return _record
