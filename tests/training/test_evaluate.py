"""Evaluation metrics against hand/brute-force counts and scikit-learn, on fresh random inputs with ties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn import metrics  # the independent reference; a test-only dependency ('test' extra)

from radflash.training.evaluate import auprc, auroc, box_mask, dice, pointing_hit, roc_curve
from tests.tolerances import Tol, tolerance


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator drawn from the per-test seed (tests/conftest.py), so every run replays."""
    return np.random.default_rng(np.random.randint(2**31))


def _tied_sample(rng: np.random.Generator, n: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores that separate the classes a little, rounded so many of them tie; both classes present."""
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    pos, neg = rng.choice(n, 2, replace=False)
    labels[pos], labels[neg] = True, False
    scores = np.round(rng.normal(size=n) + 0.7 * labels, decimals)
    scores[neg] = scores[pos]  # at least one positive–negative tie, whatever the rounding gave
    return scores, labels


def _float64_sum_tol(n: int) -> Tol:
    """AUROC/AP are sums of at most n terms in [0, 1], computed in float64."""
    return tolerance(np.float64, terms=n)


def _auroc_brute(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(pos > neg) + ½ P(tie) by counting every positive/negative pair."""
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n", [2, 7, 17, 101])
def test_auroc_matches_pairwise_count(n: int, rng: np.random.Generator) -> None:
    tol = _float64_sum_tol(n * n)
    for _ in range(5):
        labels = rng.random(n) < 0.4
        labels[0], labels[-1] = True, False  # both classes present
        scores = np.round(rng.normal(size=n) + labels, 1)  # rounding makes ties
        assert auroc(scores, labels) == tol.approx(_auroc_brute(scores, labels))


def test_auroc_edge_cases() -> None:
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_roc_curve_area_equals_auroc(rng: np.random.Generator) -> None:
    scores, labels = _tied_sample(rng, 60, 1)
    fpr, tpr = roc_curve(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids = ties count ½
    assert area == _float64_sum_tol(60).approx(auroc(scores, labels))


@pytest.mark.parametrize(("n", "decimals"), [(3, 0), (17, 1), (60, 1), (250, 2), (1000, 3)])
def test_roc_curve_matches_sklearn(n: int, decimals: int, rng: np.random.Generator) -> None:
    scores, labels = _tied_sample(rng, n, decimals)
    fpr, tpr = roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)  # count / count: both sides round the same quotient
    np.testing.assert_array_equal(tpr, sk_tpr)


@pytest.mark.parametrize(("n", "decimals"), [(3, 0), (17, 1), (60, 1), (250, 2), (1000, 3)])
def test_auroc_and_auprc_match_sklearn_with_ties(n: int, decimals: int, rng: np.random.Generator) -> None:
    tol = _float64_sum_tol(n)
    for _ in range(4):
        scores, labels = _tied_sample(rng, n, decimals)
        assert len(np.unique(scores)) < n, "the sample must contain ties"
        assert auroc(scores, labels) == tol.approx(metrics.roc_auc_score(labels, scores))
        assert auprc(scores, labels) == tol.approx(metrics.average_precision_score(labels, scores))


@pytest.mark.parametrize("n", [5, 40, 300])
def test_metrics_do_not_depend_on_input_order(n: int, rng: np.random.Generator) -> None:
    """Tied scores are one threshold: shuffling the rows must not change either area."""
    scores, labels = _tied_sample(rng, n, 0)  # integers: heavy ties
    tol = _float64_sum_tol(n)
    for _ in range(5):
        perm = rng.permutation(n)
        assert auprc(scores[perm], labels[perm]) == tol.approx(auprc(scores, labels))
        assert auroc(scores[perm], labels[perm]) == tol.approx(auroc(scores, labels))


def test_auprc_ties_from_the_issue() -> None:
    """One tie between a positive and a negative: precision ½ at recall 1, whichever comes first."""
    assert auprc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == 0.5
    assert auprc(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 0])) == 0.5
    assert np.isnan(auprc(np.array([0.5, 0.1]), np.array([0, 0])))


def test_auprc_by_hand() -> None:
    # descending: 0.9(+) 0.8(-) 0.7(+) 0.1(-): precision at positives 1/1 and 2/3
    assert auprc(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == _float64_sum_tol(2).approx((1 + 2 / 3) / 2)
    assert auprc(np.array([0.3, 0.2]), np.array([1, 1])) == 1.0


def test_dice_by_hand() -> None:
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:5] = True  # 4 pixels, overlap 2
    assert dice(a, b) == pytest.approx(2 * 2 / 7)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_pointing_game_and_boxes() -> None:
    m = box_mask((1, 2, 3, 4), (5, 6))  # rows 1..2, cols 2..3
    assert m.sum() == 4 and m[1, 2] and m[2, 3] and not m[3, 3] and not m[1, 4]
    assert pointing_hit((2, 3), m)
    assert not pointing_hit((0, 0), m)


def test_evaluate_phantoms_end_to_end(tmp_path) -> None:
    """The verb runs on a small random model and writes a complete report (values not checked)."""
    import dataclasses
    import json

    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint
    from radflash.models.config import preset
    from radflash.training.evaluate import evaluate_phantoms

    base = preset("tiny")
    cfg = dataclasses.replace(base, image_size=56, align_layers=1,
                              vision=dataclasses.replace(base.vision, layers=1),
                              text=dataclasses.replace(base.text, layers=1))
    ckpt = save_checkpoint(random_checkpoint(cfg, seed=0), tmp_path / "m")
    report = evaluate_phantoms(ckpt, seed=5, n=8, val_seed=6, val_n=6, size=64, device="cpu",
                               held_out=[("lung nodule", "left lower lung")], out=tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0
    assert set(data["findings"]) == {"pleural effusion", "pneumothorax", "cardiomegaly", "lung nodule",
                                     "lung mass", "consolidation", "atelectasis"}
    assert 0.0 <= report.pointing_game <= 1.0 and 0.0 <= report.mean_dice <= 1.0
    held = data["held_out"]["lung nodule @ left lower lung"]
    assert held["positives"] == 48 and 0.0 <= held["auroc"] <= 1.0
    with pytest.raises(Exception, match="must differ"):
        evaluate_phantoms(ckpt, seed=5, val_seed=5, device="cpu")


def test_evaluate_a_family_without_maps_gives_classification_metrics(tmp_path) -> None:
    """CARZero has no maps: AUROC/AUPRC from its scores (equal to scoring the same phantoms directly),
    map metrics NaN ("not measured"), no threshold chosen."""
    import math

    import radflash
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint
    from radflash.training.data import PhantomDataset
    from radflash.training.evaluate import evaluate_phantoms, phantom_eval_prompts

    ckpt = save_checkpoint(random_checkpoint("carzero-tiny", seed=0), tmp_path / "cz")
    report = evaluate_phantoms(ckpt, seed=5, n=12, val_seed=6, val_n=4, size=64, device="cpu")
    assert "no maps" in report.threshold_source
    assert math.isnan(report.pointing_game) and math.isnan(report.mean_dice)
    model = radflash.load(ckpt, device="cpu")
    prompts = phantom_eval_prompts(model)
    ds = PhantomDataset(seed=5, length=12, size=64)
    samples = [ds[i] for i in range(12)]
    logits = model.score([s.image for s in samples], list(prompts.values())).logits.numpy()
    for j, name in enumerate(prompts):
        labels = np.array([bool(s.labels.get(name, False)) for s in samples])
        if labels.any() and not labels.all():
            assert report.findings[name].auroc == pytest.approx(auroc(logits[:, j], labels))
