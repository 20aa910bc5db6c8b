"""Score calibration: one temperature and one decision threshold per finding.

- Temperature T: minimises the NLL of sigmoid(logit / T) on a labelled set. With a = 1/T the NLL
  is convex in a (logistic regression through the origin), so a golden-section search over log a
  on [1e-3, 1e3] finds the optimum; 80 iterations shrink the bracket below 1e-6 in log space.
- Threshold on the calibrated probability: maximises Youden's J = TPR − FPR (default; it weighs
  sensitivity and specificity equally and does not depend on prevalence) or F1 (``rule="f1"``).
  Candidates are the midpoints between consecutive distinct probabilities, so the threshold sits
  between two observed scores; ties go to the LOWEST threshold (favours sensitivity: screening).

Stored in the checkpoint config's ``calibration`` field next to anything else there (the trainer
keeps segmentation ``map_thresholds`` in the same dict)::

    {"temperature": {name: T}, "threshold": {name: thr}, "threshold_rule": "youden",
     "fitted_on": "...", ...}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radflash.checkpoints.calibration import apply
from radflash.errors import InputError

log = logging.getLogger("radflash.calibration")


RULES = ("youden", "f1")
_GOLDEN = (math.sqrt(5) - 1) / 2


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under sigmoid(logits / T) (stable log-sigmoid form)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # −[y log σ(z) + (1−y) log σ(−z)] = softplus(z) − y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: Any, labels: Any, *, lo: float = 1e-3, hi: float = 1e3, iters: int = 80) -> float:
    """The T > 0 minimising :func:`nll` (golden-section search over log(1/T))."""
    z, y = _as_numpy(logits).ravel(), _as_numpy(labels).ravel()
    if z.size == 0 or z.shape != y.shape:
        raise InputError(f"need equal, non-empty logits and labels, got {z.shape} and {y.shape}")
    f = lambda log_a: nll(z, y, math.exp(-log_a))
    a, b = math.log(1 / hi), math.log(1 / lo)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return math.exp(-(a + b) / 2)


def fit_threshold(probs: Any, labels: Any, *, rule: str = "youden") -> float:
    """Threshold t on ``probs`` (positive ⇔ p ≥ t) maximising Youden's J or F1 (see module doc)."""
    if rule not in RULES:
        raise InputError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")
    p, y = _as_numpy(probs).ravel(), _as_numpy(labels).ravel().astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise InputError(f"a threshold needs positives and negatives, got {pos} positive and {neg} negative")
    values = np.unique(p)
    mids = (values[:-1] + values[1:]) / 2
    candidates = np.concatenate([[values[0] - 1e-6], mids, [values[-1] + 1e-6]])
    predicted = p[None, :] >= candidates[:, None]  # (C, N)
    tp = (predicted & y).sum(1)
    fp = (predicted & ~y).sum(1)
    if rule == "youden":
        score = tp / pos - fp / neg
    else:
        fn = pos - tp
        score = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = int(np.flatnonzero(score >= score.max() - 1e-12)[0])  # ties → lowest threshold
    return float(candidates[best])


def fit(logits: Any, labels: Any, names: Sequence[str], *, rule: str = "youden", fitted_on: str = "",
        known: Any = None) -> dict[str, Any]:
    """Per-finding temperature and threshold from (N, F) logits and labels; ``known`` masks missing labels.

    Findings without both positives and negatives are skipped (listed under ``"skipped"``) with a warning.
    """
    z, y = _as_numpy(logits), _as_numpy(labels).astype(bool)
    if z.ndim != 2 or z.shape != y.shape or z.shape[1] != len(names):
        raise InputError(f"logits {z.shape} and labels {y.shape} must both be (N, {len(names)})")
    mask = np.ones_like(y, dtype=bool) if known is None else _as_numpy(known).astype(bool)
    temperature: dict[str, float] = {}
    threshold: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    skipped: list[str] = []
    for j, name in enumerate(names):
        zj, yj = z[mask[:, j], j], y[mask[:, j], j]
        pos, neg = int(yj.sum()), int((~yj).sum())
        counts[name] = [pos, neg]
        if pos == 0 or neg == 0:
            log.warning("calibration: %s has %d positive and %d negative labels; not calibrated", name, pos, neg)
            skipped.append(name)
            continue
        t = fit_temperature(zj, yj)
        temperature[name] = t
        threshold[name] = fit_threshold(_sigmoid(zj / t), yj, rule=rule)
    out: dict[str, Any] = {"temperature": temperature, "threshold": threshold, "threshold_rule": rule,
                           "fitted_on": fitted_on, "counts": counts}
    if skipped:
        out["skipped"] = skipped
    return out


# ---- the verb behind `radflash calibrate scores` ------------------------------------------------
def read_labels_csv(path: str | Path, names: Sequence[str]) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    """CSV with a ``path`` column (relative to the CSV) and one 0/1 column per finding (blank = unknown).

    Returns image paths, labels (N, F), known mask (N, F) and the finding names found (in CSV order).
    """
    import csv

    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"{path}: no rows")
    columns = list(rows[0])
    if "path" not in columns:
        raise InputError(f"{path}: needs a 'path' column (found {', '.join(columns)})")
    found = [c for c in columns if c != "path"]
    unknown = [c for c in found if c not in names]
    if unknown:
        raise InputError(f"{path}: column(s) {', '.join(unknown)} are not findings of this model "
                         f"({', '.join(names)})")
    labels = np.zeros((len(rows), len(found)), dtype=bool)
    known = np.zeros_like(labels)
    for i, row in enumerate(rows):
        for j, name in enumerate(found):
            value = (row.get(name) or "").strip().lower()
            if value in ("", "na", "nan", "-1", "unknown"):
                continue
            if value not in ("0", "1", "true", "false", "0.0", "1.0"):
                raise InputError(f"{path}: row {i + 2}, column {name}: expected 0/1 or blank, got {value!r}")
            labels[i, j] = value in ("1", "true", "1.0")
            known[i, j] = True
    images = [(path.parent / row["path"]) for row in rows]
    return images, labels, known, found


@dataclass
class ScoreCalibrationReport:
    checkpoint: Path
    calibration: dict[str, Any]
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    plot: Path | None

    def summary(self) -> str:
        temps = ", ".join(f"{k} T={v:.3g} thr={self.calibration['threshold'][k]:.3f}"
                          for k, v in self.calibration["temperature"].items())
        return (f"wrote {self.checkpoint} (calibration fitted on {self.calibration['fitted_on']})\n{temps}\n"
                f"on the fit set: NLL {self.nll_before:.4f} → {self.nll_after:.4f}, "
                f"ECE {self.ece_before:.4f} → {self.ece_after:.4f}"
                + (f"\nreliability diagram: {self.plot}" if self.plot else ""))


def calibrate_scores(
    model_path: str | Path | None,
    out: str | Path,
    *,
    labels_csv: str | Path | None = None,
    phantoms: int | None = None,
    seed: int = 2,
    rule: str = "youden",
    batch_size: int = 16,
    plot: bool = True,
) -> ScoreCalibrationReport:
    """Fit per-finding temperatures and thresholds on a labelled set and save the checkpoint to ``out``.

    The fitted values are merged into the checkpoint's existing ``calibration`` (other keys, such as
    the trainer's segmentation thresholds, are kept). The reliability diagram is drawn on the fit set.
    """
    from radflash.api import DEMO_MODEL, RadFlashModel
    from radflash.calibration import phantom_samples, read_image
    from radflash.calibration.reliability import expected_calibration_error, plot_reliability
    from radflash.checkpoints.format import load_checkpoint, save_checkpoint

    if (labels_csv is None) == (phantoms is None):
        raise InputError("give exactly one of labels_csv= or phantoms=")
    source = Path(model_path) if model_path is not None else DEMO_MODEL
    ckpt = load_checkpoint(source)
    model = RadFlashModel(ckpt, device="auto")
    if phantoms is not None:
        try:
            from radflash.training.evaluate import phantom_eval_prompts
        except ImportError as exc:
            raise InputError(f"phantoms are not available in this build ({exc})") from None
        prompts = phantom_eval_prompts(model)
        names = list(prompts)
        samples = phantom_samples(int(phantoms), seed=seed, size=model.config.image_size)
        items = [samples[i] for i in range(len(samples))]
        images = [s.image for s in items]
        labels = np.array([[bool(s.labels.get(n, False)) for n in names] for s in items])
        known = np.ones_like(labels)
        fitted_on = f"phantoms seed={seed} n={phantoms}"
    else:
        paths, labels, known, names = read_labels_csv(labels_csv, list(model.default_prompts))
        prompts = {n: model.default_prompts[n] for n in names}
        images = [read_image(p) for p in paths]
        fitted_on = f"{Path(labels_csv).name} n={len(paths)}"
    texts = [prompts[n] for n in names]
    logits = []
    for start in range(0, len(images), batch_size):
        logits.append(model.score(images[start:start + batch_size], texts).logits.cpu().numpy())
    z = np.concatenate(logits).astype(np.float64)
    fitted = fit(z, labels, names, rule=rule, fitted_on=fitted_on, known=known)
    calibration = {**ckpt.calibration, **fitted}
    ckpt.calibration = calibration
    saved = save_checkpoint(ckpt, out)
    probs_after = apply(fitted, names, torch.from_numpy(z))[0].numpy()
    probs_before = _sigmoid(z)
    fit_cols = [j for j, n in enumerate(names) if n in fitted["temperature"]]
    sel = known[:, fit_cols]
    pb, pa, y = probs_before[:, fit_cols][sel], probs_after[:, fit_cols][sel], labels[:, fit_cols][sel]
    nll_b = nll(z[:, fit_cols][sel], y, 1.0) if len(y) else float("nan")
    nll_a = float(np.mean(-(y * np.log(np.clip(pa, 1e-12, 1)) + (1 - y) * np.log(np.clip(1 - pa, 1e-12, 1)))))
    plot_path = None
    if plot and len(y):
        where = saved if saved.is_dir() else saved.parent
        plot_path = plot_reliability({"before (T=1)": (pb, y), "after (per-finding T)": (pa, y)},
                                     where / "reliability.png", title=f"{model.model_id}: {fitted_on}")
    return ScoreCalibrationReport(saved, calibration, nll_b, nll_a, expected_calibration_error(pb, y),
                                  expected_calibration_error(pa, y), plot_path)
