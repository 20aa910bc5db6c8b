"""Synthetic output folders, written directly (no model), in the layout the verbs write, so the report
code reads them exactly as it reads a real run's: for ``segment`` a ``report.json`` listing the images
and failures, one ``result.json`` per image; for ``score`` the results and status tables and the
manifest; both optionally with a ``gallery.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radflash.archive.sinks import STATUS_COLUMNS, TableSpec, write_manifest, write_table

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


FINDINGS = ("effusion", "nodule", "cardiomegaly")
# reasons as runs write them: numbers (grouped as #), and text CSV must quote (comma, quote, line break, "NA")
REASONS = ("truncated at byte {i}", 'cannot decode, "JPEG 2000" frame {i}\nsecond line', "NA", "")


def score_tables(n: int, rng: np.random.Generator, *, failures: int = 0, phi: bool = False,
                 positive: bool = False) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(results, status, all rows with every column: what its parts hold) of a score run of ``n`` images
    and ``failures`` skipped/failed files, sorted by path as ``score`` writes them. Probabilities are
    rounded to two decimals (ties), one image in 40 has no probability for the second finding, and
    patient IDs and some UIDs look numeric (a CSV reader must keep them text)."""
    spread = [i * n // max(failures, 1) for i in range(failures)]  # beside image j: as often in any stretch
    paths = sorted([f"/archive/site{i % 3}/study{i // 3:05d}/img{i:06d}.dcm" for i in range(n)]
                   + [f"/archive/site{j % 3}/study{j // 3:05d}/broken{i:05d}.dcm" for i, j in enumerate(spread)])
    spec = TableSpec(FINDINGS, include_phi=phi, with_positive=positive)
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"path": path, "sop_instance_uid": f"2.25.{i}" if i % 9 else "2.25",
                               "modality": "CR", "view_position": "PA"}
        if "broken" in path:
            row.update(status="failed" if i % 3 else "skipped", reason=REASONS[i % 4].format(i=1000 + i))
            rows.append(row)
            continue
        probs = [round(float(rng.random()), 2) for _ in FINDINGS]
        if i % 40 == 7:
            probs[1] = None
        row.update(status="scored", probs=probs, logits=[0.0 if p is None else p - 0.5 for p in probs])
        if phi:
            row.update(patient_id=f"{i % 97:05d}", patient_name=f"Doe^J{i % 5}")
        if positive:
            row["positive"] = [None if p is None or i % 11 == 3 else p >= 0.5 for p in probs]
        rows.append(row)
    cols: dict[str, list[Any]] = {f.name: [] for f in spec.schema()}
    for row in rows:
        for c in cols:
            name, _, field = c.partition(".")
            if not field:
                cols[c].append(row.get(c))
            else:
                values = row.get({"prob": "probs", "logit": "logits", "positive": "positive"}[field])
                cols[c].append(None if values is None else values[FINDINGS.index(name)])
    table = pa.table(cols, schema=spec.schema())
    scored = table.filter(pc.equal(table.column("status"), "scored"))
    return scored.select(spec.result_columns()), table.select(list(STATUS_COLUMNS)), table


def write_score_run(out: Path, results: pa.Table, status: pa.Table, *, fmt: str = "parquet",
                    dicomweb: bool = False, thresholds: dict[str, float] | None = None,
                    gallery_k: int | None = None) -> None:
    """A score folder holding ``results`` and ``status`` (Parquet in row groups of CHUNK_ROWS, as
    ``score`` consolidates them, or CSV), its manifest and optionally a gallery of the top-K per finding."""
    out.mkdir(parents=True)
    for name, table in (("results", results), ("status", status)):
        if fmt == "parquet":
            pq.write_table(table, out / f"{name}.parquet", row_group_size=4096)
        else:
            write_table(table, out / f"{name}.csv", "csv")
    thresholds = thresholds or {}
    write_manifest(out, {
        "manifest_version": 1, "complete": True, "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T01:00:00+00:00", "model": {"id": "synthetic", "sha256": "0" * 64},
        "findings": {n: {"prompt": f"There is {n}", "threshold": thresholds.get(n)} for n in FINDINGS},
        "source": {"kind": "dicomweb" if dicomweb else "files"},
        "args": {"inputs": ["/archive"], "format": fmt},
        "timings": {"images_per_s": 27.8, "total_s": 3600.0},
    })
    if gallery_k is not None:
        rows = results.to_pylist()
        tile = "data:image/jpeg;base64,/9j/"
        findings = {n: [{"key": r["path"], "score": r[f"{n}.prob"], "image": tile, "height": 8, "width": 6,
                         "point": [1.5, 2.5], "map_peak": 0.5}
                        for r in sorted((r for r in rows if r[f"{n}.prob"] is not None),
                                        key=lambda r: (-r[f"{n}.prob"], r["path"]))[:gallery_k]]
                    for n in FINDINGS}
        (out / "gallery.json").write_text(json.dumps({"gallery_version": 1, "kind": "score", "k": gallery_k,
                                                      "observed": len(rows), "note": None, "findings": findings}))
