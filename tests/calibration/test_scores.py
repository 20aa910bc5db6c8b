"""Score calibration: temperature fit, threshold rules, apply(), storage in the checkpoint, CLI."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from radflash.calibration.reliability import expected_calibration_error, plot_reliability
from radflash.calibration.scores import fit, fit_temperature, fit_threshold, nll
from radflash.checkpoints.calibration import apply
from radflash.errors import InputError

Z_SCORE = 6.0  # statistical bounds below are this many standard errors: a false alarm ~1e-9 per check


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh data on every seed, replayable from the per-test seed (tests/conftest.py)."""
    return np.random.default_rng(np.random.randint(2**31))


@pytest.mark.parametrize("t_true", [0.4, 2.5])
def test_temperature_fit_recovers_a_known_temperature(t_true: float, rng: np.random.Generator) -> None:
    z = rng.normal(0, 4, 40_000)
    p = 1 / (1 + np.exp(-z / t_true))
    y = rng.random(z.size) < p
    t = fit_temperature(z, y)
    # The fit is a maximum-likelihood estimate of a = 1/T with Fisher information Σ z²·p(1−p), so
    # its relative standard error is 1 / (a·√I), and T/T_true − 1 ≈ −(â − a)/a.
    rel_se = t_true / math.sqrt(np.sum(z**2 * p * (1 - p)))
    assert abs(t / t_true - 1) < Z_SCORE * rel_se
    assert nll(z, y, t) <= min(nll(z, y, t * 1.1), nll(z, y, t / 1.1))


def test_threshold_rules_on_a_hand_checked_example() -> None:
    p = [0.2, 0.3, 0.6, 0.7, 0.9]
    y = [0, 1, 0, 1, 1]
    # Youden J at the midpoints 0.25/0.45/0.65/0.8: 0.5, 1/6, 2/3, 1/3 → 0.65
    assert fit_threshold(p, y, rule="youden") == pytest.approx(0.65)
    # F1 at 0.25: tp 3, fp 1 → 6/7; at 0.65: tp 2, fn 1 → 4/5 → 0.25
    assert fit_threshold(p, y, rule="f1") == pytest.approx(0.25)
    # ties go to the lowest threshold: J = 0.5 at both 0.225 and 0.6
    assert fit_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.225)
    with pytest.raises(InputError):
        fit_threshold([0.1, 0.2], [1, 1])


def test_apply_temperature_and_thresholds() -> None:
    cal = {"temperature": {"a": 2.0, "b": 0.5}, "threshold": {"a": 0.7}}
    z = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    probs, positive = apply(cal, ["a", "b"], z)
    torch.testing.assert_close(probs, torch.sigmoid(z / torch.tensor([2.0, 0.5])))
    assert positive.tolist() == [[True, True], [False, True]]  # b has no threshold → 0.5
    probs_np, none = apply({"temperature": {"a": 2.0}}, ["a", "c"], z.numpy())
    assert none is None and probs_np[0, 1] == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))))
    with pytest.raises(InputError):
        apply(cal, ["a"], z)


def test_fit_skips_findings_without_both_classes() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 2))
    y = np.stack([z[:, 0] > 0, np.zeros(50, dtype=bool)], axis=1)
    cal = fit(z, y, ["x", "never"], fitted_on="synthetic")
    assert set(cal["temperature"]) == {"x"} and cal["skipped"] == ["never"] and cal["fitted_on"] == "synthetic"


def test_calibration_survives_save_load_and_is_applied(tmp_path: Path) -> None:
    from radflash.api import RadFlashModel
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import load_checkpoint, save_checkpoint
    from radflash.models.config import preset

    ck = random_checkpoint(dataclasses.replace(preset("tiny"), image_size=56), seed=0)
    rng = np.random.default_rng(2)
    names = list(ck.prompts)[:3]
    z = rng.normal(0, 3, (200, 3))
    y = rng.random(z.shape) < 1 / (1 + np.exp(-z / 1.7))
    ck.calibration = {"map_thresholds": {"seg": 0.4}, **fit(z, y, names, fitted_on="synthetic")}
    loaded = load_checkpoint(save_checkpoint(ck, tmp_path / "ck"))
    assert loaded.calibration == ck.calibration  # JSON round-trips Python floats exactly
    model = RadFlashModel(loaded, device="cpu")
    probs, positive = apply(model.calibration, names, torch.from_numpy(z))
    t = torch.tensor([ck.calibration["temperature"][n] for n in names], dtype=torch.float64)
    torch.testing.assert_close(probs, torch.sigmoid(torch.from_numpy(z) / t).float())
    thr = torch.tensor([ck.calibration["threshold"][n] for n in names])
    assert torch.equal(positive, probs >= thr)


def _ece_bound(p: np.ndarray, bins: int = 10) -> float:
    """What sampling noise alone can give a perfectly calibrated p: per bin b (weight w_b), the
    observed rate deviates from the mean confidence with standard error σ_b = √Σp(1−p) / n_b, so
    E[ECE] ≤ √(2/π)·Σ w_b σ_b, and the sum of the independent bins adds Z_SCORE·√Σ w_b² σ_b²."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    var = np.bincount(idx, weights=p * (1 - p), minlength=bins)
    seen = n > 0
    w, sigma = n[seen] / p.size, np.sqrt(var[seen]) / n[seen]
    return math.sqrt(2 / math.pi) * float(np.sum(w * sigma)) + Z_SCORE * math.sqrt(float(np.sum((w * sigma) ** 2)))


def test_reliability_plot_and_ece(tmp_path: Path, rng: np.random.Generator) -> None:
    p = rng.random(20_000)
    y = rng.random(p.size) < p
    assert expected_calibration_error(p, y) < _ece_bound(p)
    assert expected_calibration_error(np.clip(p * 1.6, 0, 1), y) > 0.1
    out = plot_reliability({"calibrated": (p, y)}, tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_scores_cli_with_a_labels_csv(tmp_path: Path) -> None:
    from PIL import Image

    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import load_checkpoint, save_checkpoint
    from radflash.cli import cli
    from radflash.models.config import preset

    ck = random_checkpoint(dataclasses.replace(preset("tiny"), image_size=56), seed=0)
    src = save_checkpoint(ck, tmp_path / "src")
    names = list(ck.prompts)[:2]
    rng = np.random.default_rng(4)
    rows = []
    for i in range(16):
        Image.fromarray((rng.random((64, 80)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", names[0]: i % 2, names[1]: "" if i == 0 else (i // 2) % 2})
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", *names])
        writer.writeheader()
        writer.writerows(rows)
    res = CliRunner().invoke(cli, ["calibrate", "scores", str(src), "--labels", str(tmp_path / "labels.csv"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    cal = load_checkpoint(tmp_path / "out").calibration
    assert set(cal["temperature"]) == set(names) and set(cal["threshold"]) == set(names)
    assert cal["threshold_rule"] == "youden" and cal["counts"][names[1]] == [8, 7]
    assert (tmp_path / "out" / "reliability.png").exists()
    bad = CliRunner().invoke(cli, ["calibrate", "scores", str(src), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "exactly one" in bad.output
