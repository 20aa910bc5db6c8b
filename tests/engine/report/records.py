"""Synthetic segment output folders, written directly (no model): ``report.json`` listing the images and
failures, one ``result.json`` per image, and optionally a ``gallery.json``, in the layout ``segment``
writes, so the report code reads them exactly as it reads a real run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ("pleural effusion", "left lung")


def write_segment_run(out: Path, n: int, rng: np.random.Generator, *, failures: int = 0,
                      gallery_k: int | None = None) -> dict[str, Any]:
    """A segment folder of ``n`` images over several sites; returns the report it wrote.

    Peaks are rounded to two decimals (ties, ranked by name), one image in 50 has no grounding for
    the second prompt (missing values), and failure reasons carry numbers (grouped as ``#``).
    """
    (out / "results").mkdir(parents=True)
    images = []
    for i in range(n):
        name = f"img{i:06d}"
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        groundings = []
        for t, prompt in enumerate(PROMPTS):
            if t == 1 and i % 50 == 7:
                continue
            masked = int(rng.integers(0, h * w // 4)) if rng.random() < 0.4 else 0
            groundings.append({"name": prompt, "prompt": f"There is {prompt}", "threshold": 0.5,
                               "max_prob": round(float(rng.random()), 2), "mask_pixels": masked,
                               "point": [int(rng.integers(0, w)), int(rng.integers(0, h))], "positive": masked > 0})
        rel = f"results/{name}.json"
        record = {"name": name, "size": {"height": h, "width": w}, "prompts": groundings, "files": {"json": rel},
                  "notes": []}
        (out / rel).write_text(json.dumps(record), encoding="utf-8")
        images.append({"source": f"/archive/site{i % 3}/study{i // 3:05d}/{name}.dcm", "name": name, "json": rel,
                       "positive": [g["name"] for g in groundings if g["positive"]]})
    failed = [{"source": f"/archive/site{i % 3}/broken{i}.dcm", "status": "failed" if i % 3 else "skipped",
               "reason": f"truncated at byte {1000 + i}" if i % 2 else f"{i % 4} frames, no pixel data"}
              for i in range(failures)]
    report = {
        "complete": True, "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T01:00:00+00:00",
        "elapsed_s": 3600.0, "radflash_version": "0.0-test",
        "model": {"id": "synthetic", "sha256": "0" * 64, "notice": None},
        "device": "cpu", "formats": ["png"], "preview": False,
        "prompts": [{"name": p, "prompt": f"There is {p}", "threshold": 0.5, "threshold_source": "cli"}
                    for p in PROMPTS],
        "counts": {"segmented": n, "skipped": sum(f["status"] == "skipped" for f in failed),
                   "failed": sum(f["status"] == "failed" for f in failed), "partial": 0, "inputs": n + failures},
        "images": images, "failures": failed,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if gallery_k is not None:
        (out / "gallery.json").write_text(json.dumps({"gallery_version": 1, "kind": "segment", "k": gallery_k,
                                                      "note": None, "thumbnails": {}}), encoding="utf-8")
    return report
