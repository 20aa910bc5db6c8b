"""``radflash bench serve`` (a subcommand of the ``bench`` group): a short real run writes its
table and JSON, derives open loads from the measured capacity, and pairs every load with its
``--max-batch 1`` twin; ``bench-serve`` is gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner


@pytest.mark.slow  # ~20 s: four loads of three 1-s windows, a node each
def test_bench_serve_measures_capacity_then_runs_fractions_of_it_with_and_without_batching(tmp_path: Path) -> None:
    from radflash.cli import cli

    runner = CliRunner()
    gone = runner.invoke(cli, ["bench-serve", "--help"])
    assert gone.exit_code == 2 and "No such command" in gone.output
    usage = runner.invoke(cli, ["bench", "serve", "--load-fractions", "0.5"])
    assert usage.exit_code == 2 and "needs --concurrency" in usage.output
    bad = runner.invoke(cli, ["bench", "serve", "--concurrency", "2", "--load-fractions", "0.5,x"])
    assert bad.exit_code == 2 and "fractions" in bad.output

    out = tmp_path / "serve_bench"
    result = runner.invoke(cli, ["bench", "serve", "--concurrency", "2", "--load-fractions", "0.5", "--window", "1",
                                 "--max-windows", "3", "--max-batch", "2", "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["label"].split(" ")[0], r["max_batch"]) for r in rows] == [
        ("closed", 2), ("open", 2), ("closed", 1), ("open", 1)]
    capacity = rows[0]["throughput"]
    assert capacity > 0 and rows[1]["offered"] == round(0.5 * capacity, 2) == rows[3]["offered"]
    assert all(len(r["windows"]) == 3 and r["wall_s"] >= 3 for r in rows)  # three 1-s windows each
    table = out.with_suffix(".md").read_text()
    assert "batching (max batch 2) / no batching: throughput" in table and "| backlog |" in table
