"""Everything the report shows, collected from an output folder (never from the run in memory).

Reading the folder, not the verb's return value, is what lets ``radflash report OUT`` rebuild the
report after ``--resume``, from a crashed run (its committed parts), or from a run made on
another machine, and what makes the rebuilt file identical to the one the run wrote: the report
is a pure function of the folder's files and the two options (mode, PHI).

* score folders: ``manifest.json``, ``results.<fmt>`` and ``status.<fmt>`` (or, for a run that
  never finished, the committed ``parts/``), and ``gallery.json`` when ``--report-maps`` was given;
* segment folders: ``report.json``, each image's ``result.json`` and ``mask-*.png``, and
  ``gallery.json`` for the radiograph thumbnails. These are streamed (:mod:`.stream`), never read
  into lists, so the step costs the same memory for a million images as for ten: per prompt a
  histogram and running counts, the :data:`TABLE_ROWS` table rows of highest peak probability and
  the gallery's top-K. A run within those bounds gets the page a report of full lists would draw.

PHI follows the project's rule: patient name and ID appear only when the run recorded them
(``score --include-phi``) *and* the report is asked for them (``include_phi``); file names and
UIDs are not PHI here, as in the results tables themselves.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from radflash.archive.sinks import MANIFEST, PARTS_DIR, PHI_COLUMNS, read_manifest, read_table
from radflash.errors import InputError
from radflash.io.safe_paths import inside
from radflash.report.gallery import load_gallery, tiles_of
from radflash.report.stream import Best, Sample, scan_object
from radflash.report.svg import Histogram
from radflash.report.thumbnails import data_uri, decode_data_uri, mask_overlay, thumbnail_size

SEGMENT_REPORT = "report.json"  # radflash.segment.output.REPORT (that module imports torch-side code)
Mode = Literal["summary", "full"]
PROB_DECIMALS = 4  # table values: enough to sort and read, and keeps 100,000 rows × 14 findings small
# A segment report is made in passes over the run's records, holding only what it shows (the same
# page as from full lists while a run fits these bounds; bounded memory and HTML past them):
TABLE_ROWS = 100_000  # image rows in a segment report's table; past it, those with the highest peak
MAX_REASONS = 1_000  # reason groups listed; a reason first seen after that is counted as "other"
SAMPLE = 10_000  # values kept per statistic: medians exact up to this many, estimated (≈) past it
OTHER_REASONS = "(other reasons)"


@dataclass
class Column:
    """One table column: its heading, whether it sorts as text or number, and its finding if any."""

    label: str
    kind: Literal["text", "num"]
    finding: str | None = None


@dataclass
class ReasonGroup:
    """Skipped/failed files sharing one reason (numbers in the reason folded, so sizes group)."""

    status: str
    reason: str
    count: int
    example: str


@dataclass
class FindingSummary:
    """One finding (score) or prompt (segment): its values' histogram and its decisions."""

    name: str
    prompt: str
    values: np.ndarray | Histogram  # probabilities (score) or peak map probabilities (segment: binned)
    value_label: str
    threshold: float | None
    threshold_note: str
    positive: int | None = None  # images decided positive at the threshold (None: no decision)
    negative: int | None = None
    undecided: int = 0
    stats: list[tuple[str, str]] = field(default_factory=list)  # extra lines (segment: area)


@dataclass
class GalleryTile:
    label: str
    score: float
    image: str  # data URI
    height: int
    width: int
    point: tuple[float, float] | None = None
    caption: str = ""


@dataclass
class ReportData:
    """What :func:`radflash.report.html.render` draws; built by :func:`collect`."""

    kind: Literal["score", "segment"]
    title: str
    facts: list[tuple[str, str]]
    counts: list[tuple[str, int]]
    reasons: list[ReasonGroup]
    findings: list[FindingSummary]
    columns: list[Column]
    table: list[list[Any]]  # column-major: table[c][r]
    rows: int
    warnings: list[str] = field(default_factory=list)
    notice: str | None = None
    root: str | None = None  # the folder the image names are relative to
    gallery: list[tuple[str, list[GalleryTile]]] | None = None
    gallery_note: str | None = None
    include_phi: bool = False
    table_note: str | None = None  # why the table lists fewer images than the run has


def kind_of(out_dir: str | Path) -> Literal["score", "segment"]:
    """Which verb wrote ``out_dir``, or a one-line error naming the folder when neither did."""
    out = Path(out_dir)
    if not out.is_dir():
        raise InputError(f"{out}: not a folder")
    if (out / MANIFEST).is_file():
        return "score"
    if (out / SEGMENT_REPORT).is_file():
        return "segment"
    raise InputError(f"{out}: not a radflash score or segment output (no {MANIFEST} or {SEGMENT_REPORT})")


def collect(out_dir: str | Path, *, mode: Mode = "full", include_phi: bool = False) -> ReportData:
    """Read a score or segment output folder into :class:`ReportData`."""
    if kind_of(out_dir) == "score":
        return collect_score(Path(out_dir), mode=mode, include_phi=include_phi)
    return collect_segment(Path(out_dir), mode=mode)


# ---- score ---------------------------------------------------------------------------------------
def collect_score(out: Path, *, mode: Mode = "full", include_phi: bool = False) -> ReportData:
    manifest = read_manifest(out) or {}
    if not isinstance(manifest.get("findings"), dict):
        raise InputError(f"{out / MANIFEST}: not a radflash score manifest (no findings)")
    warnings: list[str] = []
    results, status = _score_tables(out, manifest, warnings)
    names = list(manifest["findings"])
    source_kind = (manifest.get("source") or {}).get("kind", "files")
    paths = [str(p) for p in results.column("path").to_pylist()] if "path" in results.column_names else []
    status_paths = [str(p) for p in status.column("path").to_pylist()]
    if source_kind == "dicomweb":
        uids = results.column("sop_instance_uid").to_pylist()
        labels = dict(zip(paths, [u or p for u, p in zip(uids, paths)]))
        root = None
        status_uids = status.column("sop_instance_uid").to_pylist()
        status_labels = {p: u or p for p, u in zip(status_paths, status_uids)}
    else:
        root = _common_root(paths or status_paths)
        labels = {p: _relative(p, root) for p in paths}
        status_labels = {p: _relative(p, root) for p in status_paths}

    columns = [Column("image", "text")]
    table: list[list[Any]] = [[labels[p] for p in paths]]
    phi = include_phi and all(c in results.column_names for c in PHI_COLUMNS)
    if include_phi and not phi:
        warnings.append("--include-phi: this run recorded no patient names or IDs (score without --include-phi)")
    if phi:
        for c, label in zip(PHI_COLUMNS, ("patient ID", "patient name")):
            columns.append(Column(label, "text"))
            table.append([v if v is not None else "" for v in results.column(c).to_pylist()])

    findings = []
    for name in names:
        spec = manifest["findings"][name] or {}
        probs = _floats(results, f"{name}.prob")
        columns.append(Column(name, "num", finding=name))
        table.append(_rounded(probs))
        calibrated = bool((manifest.get("model") or {}).get("calibrated"))
        findings.append(_score_finding(name, spec, probs, results, calibrated))

    counts_src = manifest.get("counts") or {}
    st = Counter(status.column("status").to_pylist())
    counts = [("discovered", len(status_paths)), ("scored", st.get("scored", 0)), ("skipped", st.get("skipped", 0)),
              ("failed", st.get("failed", 0))]
    if counts_src.get("discovered_all_shards") not in (None, len(status_paths)):
        counts.append(("discovered in all shards", int(counts_src["discovered_all_shards"])))
    reasons = _reason_groups(status, status_labels)
    model = manifest.get("model") or {}
    timings = manifest.get("timings") or {}
    facts = [
        ("model", str(model.get("id", "?"))),
        ("model sha256", str(model.get("sha256") or "?")),
        ("calibrated scores", "yes" if model.get("calibrated") else "no"),
        ("run", _dates(manifest.get("started"), manifest.get("finished"))),
        ("device / backend", f"{manifest.get('device', '?')} / {manifest.get('backend', '?')}"),
        ("throughput", _throughput(timings)),
        ("inputs", ", ".join(str(i) for i in ((manifest.get("args") or {}).get("inputs") or [])) or "?"),
    ]
    if root:
        facts.append(("image names relative to", root))
    if manifest.get("runs"):
        facts.append(("runs (resumed)", str(manifest["runs"])))
    if manifest.get("demo_archive"):
        facts.append(("archive", "the embedded demo archive (synthetic phantoms)"))
    versions = manifest.get("versions") or {}
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform")))
    if not manifest.get("complete", False):
        warnings.append("the run did not finish: counts and tables are from its committed parts; "
                        "continue it with radflash score … --resume")

    data = ReportData(kind="score", title="radflash score report", facts=facts, counts=counts, reasons=reasons,
                      findings=findings, columns=columns, table=table, rows=len(paths), warnings=warnings,
                      notice=_demo_notice(manifest), root=root, include_phi=phi)
    _score_gallery(data, out, mode, names, labels, scored=st.get("scored", 0))
    return data


def _score_tables(out: Path, manifest: dict, warnings: list[str]) -> tuple[pa.Table, pa.Table]:
    """(results, status): the consolidated files, else the union of committed parts (unfinished run)."""
    fmt = (manifest.get("args") or {}).get("format") or "parquet"
    order = [fmt] + [f for f in ("parquet", "csv") if f != fmt]
    for ext in order:
        res, st = out / f"results.{ext}", out / f"status.{ext}"
        if res.is_file() and st.is_file():
            try:
                return read_table(res), read_table(st)
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{res}: unreadable table ({str(exc).splitlines()[0]})") from None
    parts = sorted((out / PARTS_DIR).glob("part-*.parquet")) if (out / PARTS_DIR).is_dir() else []
    if manifest.get("complete"):
        warnings.append("results/status tables are missing; shown from the committed parts")
    if not parts:
        empty = pa.table({"path": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                          "reason": pa.array([], pa.string())})
        return empty, empty
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{out / PARTS_DIR}: unreadable parts ({str(exc).splitlines()[0]})") from None
    table = table.sort_by("path")
    return table.filter(pc.equal(table.column("status"), "scored")), table


def _score_finding(name: str, spec: dict, probs: np.ndarray, results: pa.Table, calibrated: bool) -> FindingSummary:
    threshold = spec.get("threshold")
    col = f"{name}.positive"
    summary = FindingSummary(name, str(spec.get("prompt", name)), probs, "probability",
                             None if threshold is None else float(threshold), "")
    pos = results.column(col).to_pylist() if col in results.column_names else []
    if any(v is not None for v in pos):  # decisions made in the run (a findings-file or calibrated threshold)
        summary.positive = sum(v is True for v in pos)
        summary.negative = sum(v is False for v in pos)
        summary.undecided = sum(v is None for v in pos)
        summary.threshold_note = (f"threshold {float(threshold):g} (findings file)" if threshold is not None
                                  else "threshold from the checkpoint's calibration")
    elif threshold is not None:  # a table without decisions (older run): decide from the probability
        finite = probs[np.isfinite(probs)]
        summary.positive, summary.negative = int((finite >= threshold).sum()), int((finite < threshold).sum())
        summary.threshold_note = f"threshold {float(threshold):g} (findings file)"
    else:
        finite = probs[np.isfinite(probs)]
        summary.threshold_note = ("no threshold: " + ("calibrated" if calibrated else "uncalibrated")
                                  + " probabilities, no decision")
        summary.stats.append(("p ≥ 0.5 (for orientation)", f"{int((finite >= 0.5).sum())} of {finite.size}"))
    return summary


def _saved_gallery(out: Path, mode: Mode, kind: str) -> tuple[dict[str, Any] | None, str | None]:
    """The run's saved gallery of ``kind`` for a full report, else None with the note saying why."""
    if mode != "full":
        return None, "Gallery left out (--report summary): no images of patients in this file."
    saved = load_gallery(out)
    if saved is None or saved.get("kind") != kind:
        verb = "scored" if kind == "score" else "made"
        return None, f"No gallery: the run was {verb} without --report-maps K."
    return saved, None


def _score_gallery(data: ReportData, out: Path, mode: Mode, names: list[str], labels: dict[str, str],
                   scored: int) -> None:
    saved, data.gallery_note = _saved_gallery(out, mode, "score")
    if saved is None:
        return
    tiles = tiles_of(saved)
    data.gallery = []
    for name in names:
        data.gallery.append((name, [GalleryTile(labels.get(t.key, posixpath.basename(t.key)), t.score, t.image,
                                                t.height, t.width, t.point,
                                                f"p {t.score:.3f}" + (f" · map {t.map_peak:.2f}"
                                                                      if t.map_peak is not None else ""))
                                    for t in tiles.get(name, []) if t.key in labels]))
    notes = [saved["note"]] if saved.get("note") else []
    observed = int(saved.get("observed", 0))
    k = int(saved.get("k", 0))
    if saved.get("note"):
        pass  # no gallery at all (a family without maps): the note says why; counts would mislead
    elif observed < scored:
        notes.append(f"top {k} among the {observed} of {scored} scored images the gallery saw (the others were "
                     f"scored by a run without --report-maps)")
    else:
        notes.append(f"top {k} per finding by probability, each with its similarity map (heat) and grounding point")
    data.gallery_note = "; ".join(notes)
    if not any(t for _, t in data.gallery):
        data.gallery = None


# ---- segment -------------------------------------------------------------------------------------
def collect_segment(out: Path, *, mode: Mode = "full") -> ReportData:
    """Two streamed passes over ``report.json`` (its header and the images' common folder, then each
    image's ``result.json`` and each failure), keeping running aggregates and bounded samples only."""
    path = out / SEGMENT_REPORT
    roots = _CommonRoot()

    def image_root(entry: Any) -> None:
        source = _entry_source(entry)
        if source is not None and source.startswith("/"):
            roots.add(source)

    report = _scan_segment_report(path, {"images": image_root, "failures": lambda _: None})
    if not isinstance(report.get("prompts"), list):
        raise InputError(f"{path}: not a radflash segment report (no prompts)")
    prompts = [p for p in report["prompts"] if isinstance(p, dict) and "name" in p]
    names = [str(p["name"]) for p in prompts]
    root = roots.root()
    saved, gallery_note = _saved_gallery(out, mode, "segment")
    images = _SegmentImages(out, names, root, gallery_k=int(saved.get("k", 0)) if saved is not None else None)
    reasons = _Reasons()

    def failure(f: Any) -> None:
        source = str(f.get("source"))
        reasons.add(str(f.get("status")), str(f.get("reason") or ""), _relative(source, root) if root else source)

    _scan_segment_report(path, {"images": images.add, "failures": failure})

    rows = sorted(images.rows.result(), key=lambda r: r[1])  # the kept rows, in input order
    columns = [Column("image", "text")]
    table: list[list[Any]] = [[label for _, _, label, _ in rows]]
    findings = []
    for t, p in enumerate(prompts):
        name = str(p["name"])
        columns += [Column(f"{name} peak", "num", finding=name), Column(f"{name} area %", "num", finding=name)]
        table += [_rounded(np.asarray([v[2 * t] for *_, v in rows], dtype=np.float64)),
                  _rounded(np.asarray([v[2 * t + 1] for *_, v in rows], dtype=np.float64), 3)]
        thr = p.get("threshold")
        st = images.stats[name]
        area, peak = st.area, st.peak
        stats = [("mask area, positives (mean / median % of image)",
                  f"{area.mean():.2f} / {'' if area.exact else '≈'}{area.median():.2f}" if area.count else "–"),
                 ("peak probability (mean / max)", f"{peak.mean():.3f} / {peak.max:.3f}" if peak.count else "–")]
        findings.append(FindingSummary(
            name, str(p.get("prompt", name)), st.peaks, "peak map probability",
            None if thr is None else float(thr),
            f"mask threshold {float(thr):g} ({p.get('threshold_source', '?')}); positive = non-empty mask"
            if thr is not None else "no threshold", positive=st.positive, negative=st.decided - st.positive,
            stats=stats))

    c = report.get("counts") or {}
    counts = [(k, int(c.get(k, 0))) for k in ("inputs", "segmented", "skipped", "failed", "partial") if k in c]
    model = report.get("model") or {}
    elapsed = report.get("elapsed_s")
    n = images.count
    facts = [
        ("model", str(model.get("id", "?"))),
        ("model sha256", str(model.get("sha256") or "?")),
        ("run", _dates(report.get("started"), report.get("finished"))),
        ("device", str(report.get("device", "?"))),
        ("throughput", f"{n / elapsed:.2f} images/s ({n} images in {elapsed:.1f} s, model load included)"
         if elapsed and n else "–"),
        ("outputs", ", ".join(report.get("formats") or []) + (" + preview" if report.get("preview") else "")),
    ]
    if root:
        facts.append(("image names relative to", root))
    if report.get("radflash_version"):
        facts.append(("versions", f"radflash {report['radflash_version']}"))
    warnings = ([] if report.get("complete", True)
                else ["the run did not finish: only the images it completed are shown"])
    data = ReportData(kind="segment", title="radflash segment report", facts=facts, counts=counts,
                      reasons=reasons.result(), findings=findings, columns=columns, table=table, rows=len(rows),
                      warnings=warnings, notice=model.get("notice"), root=root, gallery_note=gallery_note)
    if n > len(rows):
        data.table_note = (f"The table lists the {len(rows):,} images with the highest peak probability (any "
                           f"prompt) of the {n:,} segmented; every image is in report.json.")
    if saved is not None:
        _segment_gallery(data, out, saved, images, names)
    return data


def _scan_segment_report(path: Path, arrays: dict[str, Any]) -> dict[str, Any]:
    try:
        return scan_object(path, arrays)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable segment report ({exc})") from None


def _entry_source(entry: Any) -> str | None:
    """An image entry's source, or None for an entry with no result JSON (not shown)."""
    if not isinstance(entry, dict) or not entry.get("json"):
        return None
    return str(entry.get("source", entry.get("name", "")))


@dataclass
class _PromptStats:
    """One prompt's running aggregates over the images (its card in the report)."""

    peaks: Histogram = field(default_factory=Histogram)
    peak: Sample = field(default_factory=lambda: Sample(SAMPLE))  # finite peak probabilities
    area: Sample = field(default_factory=lambda: Sample(SAMPLE))  # positives' mask area, % of the image
    positive: int = 0
    decided: int = 0

    def add(self, peak: float, area: float) -> None:
        self.peaks.add(peak)
        if np.isfinite(peak):
            self.peak.add(peak)
        if area > 0:
            self.positive += 1
        if np.isfinite(area):
            self.decided += 1
            if area > 0:
                self.area.add(area)


class _SegmentImages:
    """A segment run's images, each read once (its entry in ``report.json``, then its ``result.json``):
    per-prompt aggregates, the table's :data:`TABLE_ROWS` rows of highest peak probability, and per
    prompt the ``gallery_k`` gallery candidates (None: no gallery), ranked as the gallery ranks them."""

    def __init__(self, out: Path, names: list[str], root: str | None, gallery_k: int | None) -> None:
        self.out, self.names, self.root = out, names, root
        self.count = 0
        self.stats = {name: _PromptStats() for name in names}
        # rows: (-highest peak, input index, label, [peak, area] per prompt)
        self.rows: Best[tuple[float, int, str, list[float]]] = Best(TABLE_ROWS, key=lambda r: r[:2])
        # tiles: (-peak, image name, label, size, mask file, grounding)
        self.tiles = (None if gallery_k is None else
                      {name: Best(gallery_k, key=lambda c: c[:2]) for name in names})

    def add(self, entry: Any) -> None:
        source = _entry_source(entry)
        if source is None:
            return
        rel = str(entry["json"])
        try:
            record = json.loads(inside(self.out, *rel.split("/")).read_text(encoding="utf-8"))
        except (OSError, ValueError, InputError) as exc:
            raise InputError(f"{self.out / rel}: unreadable image result ({exc})") from None
        root = self.root
        label = _relative(source, root) if root and source.startswith("/") else source
        size = record.get("size") or {}
        pixels = max(1, int(size.get("height", 1)) * int(size.get("width", 1)))
        grounding = {q.get("name"): q for q in reversed(record.get("prompts", []))}  # the first one per name
        values: list[float] = []
        for name in self.names:
            g = grounding.get(name)
            peak = np.nan if g is None else float(g.get("max_prob", np.nan))
            area = np.nan if g is None else 100.0 * float(g.get("mask_pixels", 0)) / pixels
            self.stats[name].add(peak, area)
            values += [peak, area]
            if g is not None and self.tiles is not None:
                mask = (record.get("files") or {}).get(f"mask:{name}")
                self.tiles[name].add((-float(g.get("max_prob", 0.0)), str(entry.get("name", "")), label, size,
                                      mask, g))
        top = max((v for v in values[0::2] if np.isfinite(v)), default=-np.inf)
        self.rows.add((-top, self.count, label, values))
        self.count += 1


def _segment_gallery(data: ReportData, out: Path, saved: dict[str, Any], images: _SegmentImages,
                     names: list[str]) -> None:
    """Per prompt, the top-K images by peak probability with that prompt's mask (from its PNG) overlaid."""
    from radflash.segment.writers import PALETTE

    assert images.tiles is not None
    k = int(saved.get("k", 0))
    thumbs: dict[str, str] = saved.get("thumbnails") or {}
    data.gallery = []
    missing = 0
    for t, name in enumerate(names):
        tiles = []
        for neg, image_name, label, size, mask_rel, g in images.tiles[name].result():
            h0, w0 = int(size.get("height", 1)), int(size.get("width", 1))
            gray = decode_data_uri(thumbs[image_name]) if image_name in thumbs else None
            th, tw = gray.shape if gray is not None else thumbnail_size(h0, w0)
            mask = _read_mask(out, mask_rel) if mask_rel else None
            if mask is None:
                missing += 1
                mask = np.zeros((th, tw), np.uint8)
            img = mask_overlay(gray, mask, PALETTE[t % len(PALETTE)], size=(th, tw))
            x, y = (g.get("point") or [0, 0])[:2]
            area = 100.0 * g.get("mask_pixels", 0) / max(1, h0 * w0)
            tiles.append(GalleryTile(label, -neg, data_uri(img), th, tw, ((x + 0.5) * tw / w0, (y + 0.5) * th / h0),
                                     f"peak {-neg:.3f} · area {area:.1f}%"))
        data.gallery.append((name, tiles))
    notes = [saved["note"]] if saved.get("note") else []
    notes.append(f"top {k} per prompt by peak probability, mask overlaid, grounding point marked")
    if missing:
        notes.append(f"{missing} tile(s) without a mask: the run wrote no PNG masks (--format png)")
    data.gallery_note = "; ".join(notes)


def _read_mask(out: Path, rel: str) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(inside(out, *rel.split("/"))) as img:
            return np.asarray(img.convert("L")) > 0
    except (OSError, InputError, ValueError):
        return None


# ---- shared helpers ------------------------------------------------------------------------------
_NUMBER = re.compile(r"\d[\d,._]*")


def _reason_groups(status: pa.Table, labels: dict[str, str]) -> list[ReasonGroup]:
    rows = zip(status.column("status").to_pylist(), status.column("reason").to_pylist(),
               status.column("path").to_pylist())
    return _group([(s, r or "", labels.get(str(p), str(p))) for s, r, p in rows if s != "scored"])


def _group(items: list[tuple[str, str, str]]) -> list[ReasonGroup]:
    """Group (status, reason, file) by status and reason with its numbers folded to ``#``."""
    reasons = _Reasons()
    for status, reason, label in items:
        reasons.add(status, reason, label)
    return reasons.result()


class _Reasons:
    """Skipped/failed files grouped by status and reason (numbers folded to ``#``, so sizes group),
    counted as they stream by: per group a count and its smallest file name. At most
    :data:`MAX_REASONS` groups (a reason naming its file would make one per file); a reason first
    seen after that is counted in its status's :data:`OTHER_REASONS` group."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], tuple[int, str]] = {}  # (status, reason) → (files, example)

    def add(self, status: str, reason: str, label: str) -> None:
        key = (status, _NUMBER.sub("#", reason).strip() or "(no reason)")
        if key not in self.groups and len(self.groups) >= MAX_REASONS:
            key = (status, OTHER_REASONS)
        count, example = self.groups.get(key, (0, label))
        self.groups[key] = (count + 1, min(example, label))

    def result(self) -> list[ReasonGroup]:
        """Most frequent first, then alphabetical, so the order is stable."""
        out = [ReasonGroup(s, r, n, example) for (s, r), (n, example) in self.groups.items()]
        return sorted(out, key=lambda g: (g.status, -g.count, g.reason))


def _floats(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray([np.nan if v is None else float(v) for v in table.column(column).to_pylist()], dtype=np.float64)


def _rounded(values: np.ndarray, decimals: int = PROB_DECIMALS) -> list[float | None]:
    rounded = np.round(np.asarray(values, dtype=np.float64), decimals)
    return [None if not np.isfinite(v) else float(v) for v in rounded.tolist()]


def _common_root(paths: list[str]) -> str | None:
    """The deepest folder holding every path (stored paths are absolute, '/'-separated text)."""
    roots = _CommonRoot()
    for p in paths:
        roots.add(p)
    return roots.root()


class _CommonRoot:
    """:func:`_common_root` of paths added one at a time: one running folder, not a set of folders
    (``commonpath`` of the folders so far with the next gives the same folder as of all at once)."""

    def __init__(self) -> None:
        self.first: str | None = None
        self.common: str | None = None
        self.many = False  # more than one distinct folder seen
        self.mixed = False  # absolute and relative paths: no common folder

    def add(self, path: str) -> None:
        if not path or self.mixed:
            return
        folder = posixpath.dirname(path)
        if self.first is None:
            self.first = self.common = folder
        elif folder != self.first:
            self.many = True
            try:
                self.common = os.path.commonpath([self.common, folder])  # type: ignore[list-item]
            except ValueError:
                self.mixed = True

    def root(self) -> str | None:
        if self.first is None or self.mixed:
            return None
        root = self.common if self.many else self.first
        return root if root not in ("", "/") else None


def _relative(path: str, root: str | None) -> str:
    if root and path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path


def _dates(started: str | None, finished: str | None) -> str:
    if started and finished:
        return f"{started} → {finished} (UTC)"
    return f"{started or '?'} → not finished"


def _throughput(timings: dict) -> str:
    ips, total = timings.get("images_per_s"), timings.get("total_s")
    if ips is None:
        return "–"
    return f"{ips:g} files/s (pipeline)" + (f", {total:g} s in all" if total is not None else "")


def _demo_notice(manifest: dict) -> str | None:
    model_id = str((manifest.get("model") or {}).get("id", ""))
    if "demo" in model_id:
        return "Demo model trained on synthetic phantom radiographs only — not for clinical use."
    return None
