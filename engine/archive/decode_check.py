"""``--fast-decode``'s agreement: the run's probabilities against the full decode's, on a probe batch.

A reduced decode (:func:`radflash.io.decoders.decode_reduced`) feeds the model a slightly
different S×S image than the reference preprocessing (full decode, then resize): 0.1–0.4% of the
range on average, a few percent at sharp edges. Whether that moves the model's output is a
property of the model and the archive, so every fast run measures it on its own files: the first
few scored files that were actually decoded reduced are decoded again in full, scored in one
batch, and the largest |Δprob| against the run's own rows goes into ``manifest.json``
(``decode.agreement``). The probe runs after the pipeline, so the run's images/s is unaffected.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from radflash.archive.decode_pool import Decoded, resize_for_model
from radflash.archive.pipeline import PromptSet, Scorer

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.io.selection import SelectionRules
    from radflash.preprocess import Preprocessing

log = logging.getLogger("radflash.score")

PROBES = 4  # files re-decoded in full: one small batch, ~1 s of decode each for a 3000×2500 JPEG 2000
TOLERANCE = 0.02  # the same max |Δprob| the measured backend/precision choice holds candidates to
REDUCED_MARKERS = ("reduced", "DCT-scaled")  # how radflash.io.decoders names a reduced decode


def min_size_of(geometry: Preprocessing) -> int:
    """The side a reduced decode must keep: the model input, or CARZero's letterbox when larger
    (the longer side is resized to it; the shorter-side rule then covers both)."""
    return max(int(geometry.image_size), int(geometry.letterbox or 0))


def decode_settings(fast: bool, geometry: Preprocessing) -> dict[str, Any]:
    """The manifest's ``decode`` entry before the run: the mode and, when fast, the kept side."""
    return {"mode": "fast", "min_size": min_size_of(geometry), "agreement": None} if fast else \
        {"mode": "full", "agreement": None}


def agreement(model: RadFlashModel, prompts: PromptSet, results: pa.Table, status: pa.Table, *,
              rules: SelectionRules | None, probes: int = PROBES) -> dict[str, Any]:
    """max |Δprob| between the run's rows and a full decode of up to ``probes`` of its files.

    Files decoded reduced are probed first (the others were decoded in full and agree by
    construction); items without a readable path (network sources) cannot be decoded again and
    are not probed.
    """
    from radflash.io.imageio import load_image

    t0 = time.perf_counter()
    reduced = {p for p, d in zip(status.column("path").to_pylist(), status.column("decoder").to_pylist())
               if d and any(m in d for m in REDUCED_MARKERS)}
    paths = [p for p in results.column("path").to_pylist() if p and os.path.isfile(p)]
    paths = sorted(paths, key=lambda p: p not in reduced)[:probes]  # stable: reduced ones first
    if not paths:
        return {"probes": 0, "max_abs_dprob": None, "tolerance": TOLERANCE,
                "note": "no scored file readable again (network source or nothing scored)"}
    geometry = model.preprocessing.geometry
    items = []
    for i, path in enumerate(paths):
        image = load_image(path, rules=rules)  # the reference: every pixel decoded
        items.append(Decoded(i, path, path, "loaded", None, resize_for_model(image.pixels, geometry), image.meta))
    full = np.asarray([r.probs for r in Scorer(model, prompts)(items)], dtype=np.float64)
    index = {p: i for i, p in enumerate(results.column("path").to_pylist())}
    columns = [results.column(f"{name}.prob").to_numpy(zero_copy_only=False) for name in prompts.names]
    run = np.asarray([[float(c[index[p]]) for c in columns] for p in paths], dtype=np.float64)
    worst = float(np.max(np.abs(run - full)))
    out = {"probes": len(paths), "reduced_probes": sum(p in reduced for p in paths),
           "max_abs_dprob": round(worst, 6), "tolerance": TOLERANCE, "within": worst <= TOLERANCE,
           "seconds": round(time.perf_counter() - t0, 3)}
    if worst > TOLERANCE:
        log.warning("--fast-decode moved probabilities by up to %.4f (> %.2f) on %d probe files; "
                    "rerun without --fast-decode for the reference preprocessing", worst, TOLERANCE, len(paths))
    return out
