"""Applying a checkpoint's score calibration: per-finding temperature and decision threshold.

Scoring (:mod:`radflash.archive`) needs only this half; the fitting, with its CSV reading and
plots, is :mod:`radflash.calibration.scores`, outside the engine, so the engine never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from radflash.errors import InputError

if TYPE_CHECKING:
    import torch


def score_calibrated(calibration: dict | None) -> bool:
    """Whether a checkpoint carries image-level score calibration (:mod:`radflash.calibration.scores`:
    per-finding ``temperature``/``threshold``). The same dict may hold only the trainer's
    segmentation-map ``map_thresholds``, which say nothing about image-level probabilities."""
    return bool(calibration) and bool(calibration.get("temperature") or calibration.get("threshold"))


def apply(calibration: dict, names: list[str], logits: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibrated probabilities sigmoid(logit / T_name) (B, F) and, when thresholds are stored, p ≥ thr.

    Findings without a stored temperature keep T = 1; without a stored threshold they use 0.5 (the
    uncalibrated sigmoid decision). ``positive`` is ``None`` when the calibration has no thresholds.
    ``logits`` may be a tensor or an array; results are CPU/same-device tensors.
    """
    import torch  # here, not at the top: the serve node's --status/--retry-dead read this module without a model

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
