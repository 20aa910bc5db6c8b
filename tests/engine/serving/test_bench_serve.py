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
    assert all(r["sent"] > 0 and r["state"] in ("steady", "overloaded", "unsettled") for r in rows)
    assert all(r["converged"] == (r["state"] == "steady") for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "batching (max batch 2) / no batching: throughput" in table and "| backlog |" in table
    assert "| sent /s |" in table and "| state |" in table
    # off a terminal, one line per load as it ends (a run of minutes shows it is alive), none with --quiet
    lines = [line for line in result.output.splitlines() if line.startswith("bench serve: ")]  # stderr (click 8.1 too)
    assert [line.split(":")[1].split(",")[0].split()[0] for line in lines] == ["closed", "open", "closed", "open"]
    assert all("window(s)" in line and "results/s" in line for line in lines), lines


def test_a_load_is_steady_overloaded_or_not_yet_settled() -> None:
    """The settling rule on window sequences: a light open loop's Poisson spread is no reason to run
    on, a closed loop still needs 10%, and a queue that keeps growing is an overload, not noise."""
    from radflash.serving.bench import verdict

    # 2.7/s in 15-s windows: ~40 results each, ±16% from the arrivals alone
    light = [2.1, 2.8, 2.5]
    assert verdict(light, [0, 1, 0, 2], window=15, offered=2.7) == "steady"
    assert verdict(light, [0, 1, 0, 2], window=15, offered=None) is None  # closed loop: 10%
    assert verdict([5.0, 5.3, 5.2], [16] * 4, window=15, offered=None) == "steady"
    assert verdict([5.0, 5.3], [0, 1, 2], window=15, offered=None) is None  # fewer than three windows
    assert verdict([0.0, 2.7, 2.7], [0, 0, 0, 0], window=15, offered=2.7) is None  # nothing came back in one
    # 4.3/s into a node that does 3.9/s: the queue gains ~6 per window. 18 in three windows is within
    # the arrivals' own noise (3.31 × √65 ≈ 27): steady for now, a slow leak needs longer windows to
    # show; 36 is not; neither is an overload (more than one window's 65 arrivals)
    assert verdict([3.9, 4.0, 3.9], [0, 6, 12, 18], window=15, offered=4.3) == "steady"
    assert verdict([3.9, 4.0, 3.9], [0, 12, 24, 36], window=15, offered=4.3) is None  # 36 > 27
    # 6.6/s into 3.9/s: +40 per window, 120 in three, more than one window's 99 arrivals
    assert verdict([3.9, 4.0, 3.9], [0, 40, 80, 120], window=15, offered=6.6) == "overloaded"
    assert verdict([3.9, 4.0, 3.9], [0, 40, 30, 120], window=15, offered=6.6) is None  # gained, not throughout
    # a big open load in long windows gets no more than the closed loop's 10%
    assert verdict([100.0, 112.0, 106.0], [0, 0, 0, 0], window=60, offered=106) is None
    assert verdict([100.0, 104.0, 106.0], [0, 0, 0, 0], window=60, offered=106) == "steady"
