"""The embedded demo model meets its documented zero-shot targets on FRESH held-out phantoms.

The seeds differ from the training seed (0), the validation seed used for calibration (1) and the
seeds quoted in README.md, so this is a genuinely unseen sample.
"""

from __future__ import annotations

import pytest

import radflash
from radflash.api import DEMO_MODEL

NOTICE = "radflash demo model: trained on synthetic phantom radiographs only — NOT for clinical use."


def test_demo_checkpoint_metadata() -> None:
    model = radflash.load(device="cpu")
    assert model.notice == NOTICE
    from radflash.training.phantoms import FINDINGS

    assert set(FINDINGS) <= set(model.default_prompts)
    assert (DEMO_MODEL / "model.safetensors").stat().st_size < 10 * 2**20
    assert model.calibration.get("held_out")


@pytest.fixture(scope="module")
def report():
    from radflash.training.evaluate import evaluate_phantoms

    return evaluate_phantoms(None, seed=777, n=160, val_seed=778, val_n=64, threshold="checkpoint", device="cpu")


@pytest.mark.slow
def test_demo_model_meets_targets(report) -> None:
    """The issue's targets (README, seed 1000: macro AUROC 0.999, pointing 0.901, held-out 0.99/1.00,
    Dice effusion 0.90, pneumothorax 0.86)."""
    assert report.macro_auroc >= 0.90, report.macro_auroc
    assert report.pointing_game >= 0.80, report.pointing_game
    assert len(report.held_out) == 2
    for combo, m in report.held_out.items():
        assert m["auroc"] >= 0.80, (combo, m)
    for name in ("pleural effusion", "pneumothorax"):
        assert report.findings[name].dice >= 0.5, (name, report.findings[name])


@pytest.mark.slow
def test_demo_model_keeps_its_measured_quality(report) -> None:
    """What the shipped demo achieves, with margin for a fresh sample: a regression guard for
    retraining that is stricter than the issue's targets. Nodule pointing is not guarded: on a 12×12
    patch grid the arg-max pixel is a patch centre, and only about a third of nodule boxes hold one."""
    for name, m in report.findings.items():
        assert m.auroc >= 0.95, (name, m)
        if name != "lung nodule":
            assert m.pointing_game >= 0.85 and m.dice >= 0.5, (name, m)
