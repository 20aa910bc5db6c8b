"""Applying a checkpoint's score calibration (fitting lives in radflash.calibration.scores)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from radflash.errors import InputError


# ---- inference + writing -----------------------------------------------------------------------
def score_calibrated(calibration: dict | None) -> bool:
    """Whether a checkpoint carries image-level score calibration (:mod:`radflash.calibration.scores`:
    per-finding ``temperature``/``threshold``). The same dict may hold only the trainer's
    segmentation-map ``thresholds``, which say nothing about image-level probabilities."""
    return bool(calibration) and bool(calibration.get("temperature") or calibration.get("threshold"))


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def apply(calibration: dict, names: list[str], logits: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibrated probabilities sigmoid(logit / T_name) (B, F) and, when thresholds are stored, p ≥ thr.

    Findings without a stored temperature keep T = 1; without a stored threshold they use 0.5 (the
    uncalibrated sigmoid decision). ``positive`` is ``None`` when the calibration has no thresholds.
    ``logits`` may be a tensor or an array; results are CPU/same-device tensors.
    """
    z = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    z = z.float()
    if z.ndim != 2 or z.shape[1] != len(names):
        raise InputError(f"logits of shape {tuple(z.shape)} do not match {len(names)} finding names")
    temps = calibration.get("temperature") or {}
    thrs = calibration.get("threshold") or {}
    t = torch.tensor([float(temps.get(n, 1.0)) for n in names], device=z.device)
    probs = torch.sigmoid(z / t)
    if not thrs:
        return probs, None
    thr = torch.tensor([float(thrs.get(n, 0.5)) for n in names], device=z.device)
    return probs, probs >= thr
