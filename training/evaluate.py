"""Zero-shot evaluation: classification, grounding and segmentation (the RadZero protocol).

Everything goes through the public API (``radflash.load`` → ``model.score`` /
``model.similarity_maps``), so what is measured is exactly what users run.

- Classification: AUROC (Mann–Whitney rank statistic, ties averaged) and AUPRC (average
  precision over distinct thresholds, as scikit-learn computes it) on the logits, per finding and
  macro-averaged.
- Grounding: pointing game, the arg-max pixel of the similarity map must fall inside a
  ground-truth box (the RadZero definition; the mask when a sample has no box), over positive images.
- Segmentation: Dice on positive images at a threshold chosen on a separate VALIDATION split
  (the reference picks it on the test set, which flatters the result), and specificity on
  negative images = fraction of pixels left unmarked (every pixel of a negative is a true negative).

Metrics are plain numpy functions on arrays, tested against brute-force counts and scikit-learn.
The same threshold choice, made on validation phantoms at the end of training, gives the map
thresholds a trained checkpoint carries (:func:`calibrate_map_thresholds`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from radflash.checkpoints.format import Checkpoint
    from radflash.training.config import TrainConfig

THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05))


# ---- metrics on arrays --------------------------------------------------------------------------
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what the Mann–Whitney U needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + ½ P(tie); NaN without both classes."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _curve_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true, false) positives at each distinct score, highest score first.

    Tied scores form one threshold: counting them one by one would make the result depend on
    the order of the input (a positive listed before a tied negative would look better ranked).
    """
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    return np.cumsum(y)[last], np.cumsum(~y)[last]


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: Σ over distinct thresholds of (recall gained) × precision there.

    This is scikit-learn's ``average_precision_score`` (no interpolation); ties between scores are
    one threshold, so the value does not depend on input order. NaN without positives.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if not labels.any():
        return float("nan")
    tp, fp = _curve_counts(scores, labels)
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(recall_gain * precision))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    tp, fp = _curve_counts(scores, labels)
    tpr = np.r_[0.0, tp / max(1, int(labels.sum()))]
    fpr = np.r_[0.0, fp / max(1, int((~labels).sum()))]
    return fpr, tpr


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P∩T| / (|P|+|T|); 1.0 when both are empty (nothing to find, nothing marked)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def pointing_hit(peak: Sequence[int], truth: np.ndarray) -> bool:
    """Whether the arg-max pixel ``(row, col)`` lies in the ground-truth mask."""
    r, c = int(peak[0]), int(peak[1])
    return bool(np.asarray(truth, dtype=bool)[r, c])


def box_mask(box: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of a box ``(row0, col0, row1, col1)``, end-exclusive."""
    r0, c0, r1, c1 = (int(v) for v in box)
    out = np.zeros(shape, dtype=bool)
    out[max(0, r0):r1, max(0, c0):c1] = True
    return out


# ---- running a model over a labelled dataset ---------------------------------------------------
@dataclass
class Predictions:
    """What the model said about every image, reduced to what the metrics need (no full maps kept)."""

    names: list[str]
    prompts: list[str]
    logits: np.ndarray  # (N, F)
    labels: np.ndarray  # (N, F) bool
    hits: np.ndarray  # (N, F) pointing-game hit, NaN where the finding is absent
    dice: np.ndarray  # (N, F, len(THRESHOLDS)) Dice on positives, NaN on negatives
    spec: np.ndarray  # (N, F, len(THRESHOLDS)) unmarked-pixel fraction on negatives, NaN on positives


def predict(model: Any, dataset: Any, prompts: dict[str, str], *, batch_size: int = 16,
            thresholds: Sequence[float] = THRESHOLDS, progress: bool = False) -> Predictions:
    """Score and map every image of ``dataset`` (samples with ``labels``/``masks``) for ``prompts``.

    A family without maps (CARZero) is scored only: its pointing, Dice and specificity stay NaN,
    which the report shows as "n/a" rather than as a number it cannot have measured.
    """
    names, texts = list(prompts), list(prompts.values())
    n, f, k = len(dataset), len(names), len(thresholds)
    logits = np.zeros((n, f))
    labels = np.zeros((n, f), dtype=bool)
    hits = np.full((n, f), np.nan)
    dices = np.full((n, f, k), np.nan)
    spec = np.full((n, f, k), np.nan)
    thr = torch.tensor(list(thresholds), dtype=torch.float32)
    from radflash.util.progress import progress_bar

    bar = progress_bar(n, desc="evaluate", enabled=progress)
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = [s.image for s in samples]
        tokens = model.encode_images(images)
        logits[start:start + len(samples)] = model.score(prompts=texts, tokens=tokens).logits.float().cpu().numpy()
        for b, s in enumerate(samples):
            labels[start + b] = [bool(s.labels.get(name, False)) for name in names]
        if not model.supports_maps:
            if bar is not None:
                bar.update(len(samples))
            continue
        maps = model.similarity_maps(prompts=texts, tokens=tokens, size=images[0].shape, output="prob")
        probs = maps.probs.float()  # (B, F, H, W)
        peaks = maps.peak.cpu().numpy()
        for b, s in enumerate(samples):
            row = start + b
            for j, name in enumerate(names):
                present = bool(labels[row, j])
                marked = probs[b, j][None] >= thr[:, None, None]  # (K, H, W)
                if present:
                    truth = s.masks[name]
                    hits[row, j] = pointing_hit(peaks[b, j], _boxes_or_mask(s, name))
                    t = torch.from_numpy(np.asarray(truth, dtype=bool))
                    inter = (marked & t).flatten(1).sum(1).double()
                    denom = marked.flatten(1).sum(1).double() + float(t.sum())
                    dices[row, j] = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), 1.0).numpy()
                else:
                    spec[row, j] = 1.0 - marked.flatten(1).double().mean(1).numpy()
        if bar is not None:
            bar.update(len(samples))
    if bar is not None:
        bar.close()
    return Predictions(names, texts, logits, labels, hits, dices, spec)


def _boxes_or_mask(sample: Any, name: str) -> np.ndarray:
    boxes = sample.boxes.get(name)
    if not boxes:
        return np.asarray(sample.masks[name], dtype=bool)
    return np.logical_or.reduce([box_mask(b, sample.image.shape) for b in boxes])


def choose_thresholds(model: Any, dataset: Any, *, prompts: dict[str, str],
                      thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """Per prompt, the map threshold with the best mean Dice on the positives of ``dataset``.

    Call it on a validation split, never on the images you report on.
    """
    pred = predict(model, dataset, prompts, thresholds=thresholds)
    out = {}
    for j, name in enumerate(pred.names):
        pos = pred.labels[:, j]
        if pos.any():
            out[name] = float(thresholds[int(np.argmax(np.nanmean(pred.dice[pos, j], axis=0)))])
    return out


# ---- the report ---------------------------------------------------------------------------------
@dataclass
class FindingMetrics:
    prompt: str
    positives: int
    negatives: int
    auroc: float
    auprc: float
    pointing_game: float
    threshold: float
    dice: float
    dice_at_0_5: float
    specificity: float


@dataclass
class EvalReport:
    model: str
    data: str
    n: int
    macro_auroc: float
    macro_auprc: float
    pointing_game: float
    mean_dice: float
    mean_specificity: float
    threshold_source: str
    findings: dict[str, FindingMetrics] = field(default_factory=dict)
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nanmean(x: Sequence[float]) -> float:
    arr = np.asarray(list(x), dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def summarise(pred: Predictions, thresholds: dict[str, float], *, model: str, data: str,
              threshold_source: str, grid: Sequence[float] = THRESHOLDS) -> EvalReport:
    """Per-finding and macro metrics; Dice/specificity at each prompt's chosen threshold."""
    findings = {}
    grid_arr = np.asarray(grid)
    for j, name in enumerate(pred.names):
        pos = pred.labels[:, j]
        t = thresholds.get(name, 0.5)
        k = int(np.argmin(np.abs(grid_arr - t)))
        k05 = int(np.argmin(np.abs(grid_arr - 0.5)))
        findings[name] = FindingMetrics(
            prompt=pred.prompts[j], positives=int(pos.sum()), negatives=int((~pos).sum()),
            auroc=auroc(pred.logits[:, j], pos), auprc=auprc(pred.logits[:, j], pos),
            pointing_game=_nanmean(pred.hits[pos, j]), threshold=float(grid_arr[k]),
            dice=_nanmean(pred.dice[pos, j, k]), dice_at_0_5=_nanmean(pred.dice[pos, j, k05]),
            specificity=_nanmean(pred.spec[~pos, j, k]),
        )
    vals = list(findings.values())
    return EvalReport(
        model=model, data=data, n=len(pred.logits),
        macro_auroc=_nanmean(m.auroc for m in vals), macro_auprc=_nanmean(m.auprc for m in vals),
        pointing_game=_nanmean(pred.hits[pred.labels]),
        mean_dice=_nanmean(m.dice for m in vals), mean_specificity=_nanmean(m.specificity for m in vals),
        threshold_source=threshold_source, findings=findings,
    )


def plot_roc(pred: Predictions, path: str | Path, *, title: str = "") -> Path:
    """One ROC curve per finding (AUROC in the legend); Agg backend."""
    from radflash.util.plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, name in enumerate(pred.names):
        y = pred.labels[:, j]
        if y.any() and not y.all():
            fpr, tpr = roc_curve(pred.logits[:, j], y)
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({auroc(pred.logits[:, j], y):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.6)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title or "zero-shot ROC")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=100)


# ---- the verb behind `radflash evaluate` --------------------------------------------------------
def phantom_eval_prompts(model: Any) -> dict[str, str]:
    """Prompts for the phantom findings: the checkpoint's own where it names them, else canonical."""
    from radflash.synthetic.phantoms import FINDINGS
    from radflash.training.data import canonical_prompt

    own = getattr(model, "default_prompts", {}) or {}
    return {name: own.get(name, canonical_prompt(name, None)) for name in FINDINGS}


def held_out_metrics(model: Any, dataset: Sequence[Any], combos: Sequence[tuple[str, str]], *, seed: int,
                     size: int = 224, n_positive: int = 48, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Zero-shot test of (finding, location) combinations never seen in training.

    Random phantoms rarely show a given combination, so ``n_positive`` extra phantoms are drawn with
    exactly that finding at that location (seeded from the test seed); the negatives are the test
    images that do not show it there. The location-specific prompt (``prompt_for(finding,
    location)``) must rank positives first: ``auroc`` against all those negatives (the same finding
    elsewhere included), ``auroc_vs_absent`` against images without the finding; ``auroc_finding_prompt``
    is the plain finding prompt on the latter split; ``pointing_game`` on the positives.
    """
    from radflash.training.data import PhantomDataset
    from radflash.training.data import canonical_prompt as prompt_for

    out: dict[str, dict[str, float]] = {}
    for k, (finding, location) in enumerate(combos):
        pos_ds = PhantomDataset(seed=seed + 7919 * (k + 1), length=n_positive, size=size,
                                findings=[(finding, location)])
        pos_ds = [pos_ds[i] for i in range(len(pos_ds))]  # drawn once, scored with two prompts
        scores = {}
        for key, prompt in (("combo", prompt_for(finding, location)), ("plain", prompt_for(finding, None))):
            pos = predict(model, pos_ds, {finding: prompt}, batch_size=batch_size, thresholds=(0.5,))
            neg = predict(model, dataset, {finding: prompt}, batch_size=batch_size, thresholds=(0.5,))
            scores[key] = (pos, neg)
        pos, neg = scores["combo"]
        elsewhere = np.array([location not in dataset[i].locations.get(finding, ()) for i in range(len(dataset))])
        neg_keep = elsewhere  # every test image that does not show the combination
        absent = ~neg.labels[:, 0]
        y_all = np.r_[np.ones(len(pos.logits), bool), np.zeros(int(neg_keep.sum()), bool)]
        y_abs = np.r_[np.ones(len(pos.logits), bool), np.zeros(int(absent.sum()), bool)]
        plain_pos, plain_neg = scores["plain"]
        out[f"{finding} @ {location}"] = {
            "positives": len(pos.logits),
            "negatives": int(neg_keep.sum()),
            "auroc": auroc(np.r_[pos.logits[:, 0], neg.logits[neg_keep, 0]], y_all),
            "auroc_vs_absent": auroc(np.r_[pos.logits[:, 0], neg.logits[absent, 0]], y_abs),
            "auroc_finding_prompt": auroc(np.r_[plain_pos.logits[:, 0], plain_neg.logits[absent, 0]], y_abs),
            "pointing_game": _nanmean(pos.hits[:, 0]),
        }
    return out


def evaluate_phantoms(
    model_path: str | Path | None = None,
    *,
    seed: int = 1000,
    n: int = 200,
    val_seed: int = 2000,
    val_n: int = 100,
    size: int = 224,
    threshold: str = "validation",
    fixed_threshold: float = 0.5,
    held_out: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = False,
) -> EvalReport:
    """Evaluate a checkpoint (default: the demo model) on fresh phantoms; optionally write JSON + ROC PNG.

    ``threshold`` picks the segmentation threshold: ``validation`` (chosen on ``val_seed`` images),
    ``checkpoint`` (the checkpoint's ``calibration["map_thresholds"]``) or ``fixed``.
    ``held_out`` defaults to the combos recorded in the checkpoint's calibration (``held_out``).
    """
    import radflash
    from radflash.errors import InputError
    from radflash.training.data import PhantomDataset

    if seed == val_seed:
        raise InputError("--seed and --val-seed must differ: thresholds are never chosen on the test images")
    model = radflash.load(model_path, device=device)
    prompts = phantom_eval_prompts(model)
    test_ds = PhantomDataset(seed=seed, length=n, size=size)
    test = [test_ds[i] for i in range(n)]  # drawn once: several passes below (drawing costs more than scoring)
    if not model.supports_maps:  # scores only: no map threshold to choose
        thresholds, source = {}, f"none: model family {model.family!r} has no maps (classification metrics only)"
    elif threshold == "validation":
        val = PhantomDataset(seed=val_seed, length=val_n, size=size)
        thresholds = choose_thresholds(model, val, prompts=prompts)
        source = f"validation phantoms seed={val_seed} n={val_n}"
    elif threshold == "checkpoint":
        thresholds = dict(model.calibration.get("map_thresholds", {}))
        if not thresholds:
            raise InputError(f"{model.model_id}: the checkpoint has no calibrated thresholds; "
                             "use --threshold validation")
        source = "checkpoint calibration"
    else:
        thresholds = dict.fromkeys(prompts, fixed_threshold)
        source = f"fixed {fixed_threshold}"
    pred = predict(model, test, prompts, batch_size=batch_size, progress=progress)
    report = summarise(pred, thresholds, model=model.model_id, data=f"phantoms seed={seed} n={n} size={size}",
                       threshold_source=source)
    combos = held_out if held_out is not None else [tuple(c) for c in model.calibration.get("held_out", [])]
    if combos:
        report.held_out = held_out_metrics(model, test, combos, seed=seed, size=size, batch_size=batch_size)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        plot_roc(pred, out / "roc.png", title=f"{model.model_id}: {report.data}")
    return report


# ---- thresholds stored with a trained checkpoint -------------------------------------------------
def calibrate_map_thresholds(ck: Checkpoint, cfg: TrainConfig) -> dict[str, Any]:
    """Per-prompt segmentation thresholds chosen on phantom VALIDATION images (not the test seed).

    The trainer stores the result in the checkpoint's ``calibration``, where ``segment`` reads it
    (:data:`radflash.segment.prompts.MAP_THRESHOLDS`).
    """
    from radflash.api import RadFlashModel
    from radflash.training.data import PhantomDataset

    model = RadFlashModel(ck, device="cpu")
    val = PhantomDataset(seed=cfg.data.val_seed, length=cfg.calibrate_n, size=cfg.data.size)
    thresholds = choose_thresholds(model, val, prompts=ck.prompts)
    return {
        "map_thresholds": thresholds,
        "map_thresholds_chosen_on": f"phantoms seed={cfg.data.val_seed} n={cfg.calibrate_n}",
        "map_thresholds_metric": "mean Dice on positive validation images",
    }
