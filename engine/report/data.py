"""Everything the report shows, collected from an output folder (never from the run in memory).

Reading the folder, not the verb's return value, is what lets ``radflash report OUT`` rebuild the
report after ``--resume``, from a crashed run (its committed parts), or from a run made on
another machine, and what makes the rebuilt file identical to the one the run wrote: the report
is a pure function of the folder's files and the two options (mode, PHI).

* score folders: ``manifest.json``, ``results.<fmt>`` and ``status.<fmt>`` (or, for a run that
  never finished, the committed ``parts/``), and ``gallery.json`` when ``--report-maps`` was given;
* segment folders: ``report.json``, each image's ``result.json`` and ``mask-*.png``, and
  ``gallery.json`` for the radiograph thumbnails.

Both are streamed (score: the tables in Arrow record batches; segment: :mod:`.stream`), never read
whole or into lists, so the step costs the same memory for a million images as for ten: per
finding or prompt a histogram and running counts, the :data:`TABLE_ROWS` table rows of highest
(peak) probability and the gallery's top-K. A run within those bounds gets the page a report of
full tables and lists would draw, byte for byte.

PHI follows the project's rule: patient name and ID appear only when the run recorded them
(``score --include-phi``) *and* the report is asked for them (``include_phi``); file names and
UIDs are not PHI here, as in the results tables themselves.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from radflash.archive.sinks import MANIFEST, PARTS_DIR, PHI_COLUMNS, TableSpec, read_manifest
from radflash.errors import InputError
from radflash.io.safe_paths import inside
from radflash.report.gallery import Tile, load_gallery, tiles_of
from radflash.report.stream import Best, Sample, scan_object
from radflash.report.svg import Histogram
from radflash.report.thumbnails import data_uri, decode_data_uri, mask_overlay, thumbnail_size

SEGMENT_REPORT = "report.json"  # radflash.segment.output.REPORT (that module imports torch-side code)
Mode = Literal["summary", "full"]
PROB_DECIMALS = 4  # table values: enough to sort and read, and keeps 100,000 rows × 14 findings small
# A report is made in passes over the run's records, holding only what it shows (the same page as
# from full lists while a run fits these bounds; bounded memory and HTML past them):
TABLE_ROWS = 100_000  # image rows in the table; past it, those with the highest (peak) probability
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
BATCH_ROWS = 16_384  # rows read at a time from a results/status table: the step's memory, not the run's
# bytes of a CSV table parsed at a time (a record batch); Arrow's streaming reader reads up to 32
# blocks ahead in the background, so this also caps that (8 MiB), whatever the file's size
CSV_BLOCK = 1 << 18


def collect_score(out: Path, *, mode: Mode = "full", include_phi: bool = False) -> ReportData:
    """Two streamed passes over the results and status tables (the images' common folder, then what
    the page shows), keeping per finding a histogram and counts, the :data:`TABLE_ROWS` table rows of
    highest probability and the gallery images' labels: never a whole table."""
    manifest = read_manifest(out) or {}
    if not isinstance(manifest.get("findings"), dict):
        raise InputError(f"{out / MANIFEST}: not a radflash score manifest (no findings)")
    warnings: list[str] = []
    names = list(manifest["findings"])
    tables = _score_tables(out, manifest, names, warnings)
    dicomweb = (manifest.get("source") or {}).get("kind", "files") == "dicomweb"
    root = None if dicomweb else _score_root(tables)
    label: Callable[[str, str | None], str] = ((lambda path, uid: uid or path) if dicomweb
                                               else (lambda path, uid: _relative(path, root)))
    result_columns = tables.columns("results")
    phi = include_phi and all(c in result_columns for c in PHI_COLUMNS)
    if include_phi and not phi:
        warnings.append("--include-phi: this run recorded no patient names or IDs (score without --include-phi)")
    saved, gallery_note = _saved_gallery(out, mode, "score")
    tiles = tiles_of(saved) if saved is not None else {}
    images = _ScoreImages(manifest["findings"], label, uids=dicomweb, phi=phi,
                          gallery_keys={t.key for lst in tiles.values() for t in lst})
    for batch in tables.batches("results", [c for c in images.columns() if c in result_columns]):
        images.add(batch)

    statuses: Counter[str] = Counter()
    reasons = _Reasons()
    discovered = 0
    status_columns = tables.columns("status")
    wanted = ["path", "status", "reason"] + (["sop_instance_uid"] if dicomweb else [])
    for batch in tables.batches("status", [c for c in wanted if c in status_columns]):
        discovered += batch.num_rows
        status = _strings(batch, "status")
        statuses.update({vc["values"]: vc["counts"] for vc in pc.value_counts(status).to_pylist()})
        failed = batch.filter(pc.fill_null(pc.not_equal(status, "scored"), False))
        rows = [_strings(failed, c).to_pylist() for c in ("path", "status", "reason", "sop_instance_uid")]
        for p, s, r, u in zip(*rows):
            reasons.add(s, r or "", label(str(p), u))

    kept = images.rows.result(["_order"] if tables.files else ["path", "_order"])  # parts: in path order
    columns = [Column("image", "text")]
    table: list[list[Any]] = [images.labels_of(kept)]
    if phi:
        for c, heading in zip(PHI_COLUMNS, ("patient ID", "patient name")):
            columns.append(Column(heading, "text"))
            table.append([v if v is not None else "" for v in kept.column(c).to_pylist()])
    calibrated = bool((manifest.get("model") or {}).get("calibrated"))
    findings = []
    for name in names:
        columns.append(Column(name, "num", finding=name))
        table.append(_rounded(kept.column(f"{name}.prob").to_numpy()))
        findings.append(images.findings[name].summary(name, manifest["findings"][name] or {}, calibrated))

    counts_src = manifest.get("counts") or {}
    counts = [("discovered", discovered), ("scored", statuses.get("scored", 0)),
              ("skipped", statuses.get("skipped", 0)), ("failed", statuses.get("failed", 0))]
    if counts_src.get("discovered_all_shards") not in (None, discovered):
        counts.append(("discovered in all shards", int(counts_src["discovered_all_shards"])))
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

    data = ReportData(kind="score", title="radflash score report", facts=facts, counts=counts,
                      reasons=reasons.result(), findings=findings, columns=columns, table=table, rows=kept.num_rows,
                      warnings=warnings, notice=_demo_notice(manifest), root=root, include_phi=phi,
                      gallery_note=gallery_note)
    if images.count > kept.num_rows:
        data.table_note = (f"The table lists the {kept.num_rows:,} images with the highest probability (any "
                           f"finding) of the {images.count:,} scored; every image is in {tables.where}.")
    if saved is not None:
        _score_gallery(data, saved, tiles, names, images.labels, scored=statuses.get("scored", 0))
    return data


@dataclass
class _ScoreTables:
    """A score folder's results and status tables, read in record batches of :data:`BATCH_ROWS` rows:
    the consolidated files, or for a run that never finished the committed parts (whose scored rows
    are its results). A CSV file is read back with the run's column types (``schema``) as ``score``
    writes it (every string quoted, a null left empty), so it gives what the Parquet file would."""

    files: dict[str, Path]  # "results"/"status" → its file; empty: read the parts
    parts: list[Path]
    schema: pa.Schema
    where: str  # where every image's row is, for the table's note

    def columns(self, name: str) -> list[str]:
        """The table's columns (the parts': those of any part)."""
        try:
            paths = [self.files[name]] if self.files else self.parts
            return list(dict.fromkeys(c for p in paths for c in _column_names(p)))
        except (OSError, pa.ArrowException, csv.Error) as exc:
            raise self._unreadable(name, exc) from None

    def batches(self, name: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The table's ``columns`` in row order (a batch from a part without one of them lacks it)."""
        try:
            if not self.files:
                for part in self.parts:
                    yield from _part_batches(part, columns, scored=name == "results")
            elif self.files[name].suffix == ".csv":
                types = {c: self.schema.field(c).type for c in columns if c in self.schema.names}
                yield from pacsv.open_csv(self.files[name], read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
                                          parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                          convert_options=pacsv.ConvertOptions(
                                              column_types=types, include_columns=columns, strings_can_be_null=True,
                                              quoted_strings_can_be_null=False))
            else:
                yield from pq.ParquetFile(self.files[name]).iter_batches(BATCH_ROWS, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(name, exc) from None

    def _unreadable(self, name: str, exc: Exception) -> InputError:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        if self.files:
            return InputError(f"{self.files[name]}: unreadable table ({why})")
        return InputError(f"{self.parts[0].parent}: unreadable parts ({why})")


def _score_tables(out: Path, manifest: dict, names: list[str], warnings: list[str]) -> _ScoreTables:
    """The consolidated files (the run's format first), else the committed parts (unfinished run)."""
    schema = TableSpec(tuple(names), include_phi=True, with_positive=True).schema()  # every column's type
    fmt = (manifest.get("args") or {}).get("format") or "parquet"
    for ext in [fmt] + [f for f in ("parquet", "csv") if f != fmt]:
        res, st = out / f"results.{ext}", out / f"status.{ext}"
        if res.is_file() and st.is_file():
            return _ScoreTables({"results": res, "status": st}, [], schema, res.name)
    parts = sorted((out / PARTS_DIR).glob("part-*.parquet")) if (out / PARTS_DIR).is_dir() else []
    if manifest.get("complete"):
        warnings.append("results/status tables are missing; shown from the committed parts")
    return _ScoreTables({}, parts, schema, "the committed parts")


def _column_names(path: Path) -> list[str]:
    if path.suffix != ".csv":
        return pq.read_schema(path).names
    with open(path, encoding="utf-8", newline="") as fh:
        return next(csv.reader(fh), [])


def _part_batches(part: Path, columns: list[str], *, scored: bool) -> Iterator[pa.RecordBatch]:
    """One committed part's ``columns`` (those it has); ``scored``: its scored rows only (results)."""
    parquet = pq.ParquetFile(part)
    have = set(parquet.schema_arrow.names)
    for batch in parquet.iter_batches(BATCH_ROWS, columns=[c for c in dict.fromkeys([*columns, "status"])
                                                           if c in have]):
        yield batch.filter(pc.equal(batch.column("status"), "scored")) if scored else batch


def _score_root(tables: _ScoreTables) -> str | None:
    """The deepest folder holding every scored image (every discovered file when none was scored)."""
    for name in ("results", "status"):
        roots, rows = _CommonRoot(), 0
        for batch in tables.batches(name, ["path"]):
            rows += batch.num_rows
            for path in batch.column("path").to_pylist():
                roots.add(str(path))
        if rows:
            return roots.root()
    return None


class _FindingCounts:
    """One finding's running counts over the scored images (its card in the report)."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.values = Histogram()
        self.rows = self.true = self.false = 0  # the run's decisions (``<finding>.positive``)
        self.finite = self.above = self.half = 0  # finite probabilities; ≥ the threshold; ≥ 0.5

    def add(self, probs: np.ndarray, positive: pa.Array | None) -> None:
        self.values.add_array(probs)
        finite = probs[np.isfinite(probs)]
        self.rows += probs.size
        self.finite += finite.size
        self.half += int((finite >= 0.5).sum())
        if self.threshold is not None:
            self.above += int((finite >= self.threshold).sum())
        if positive is not None:
            positive = positive.cast(pa.bool_())
            true = int(pc.sum(positive).as_py() or 0)
            self.true += true
            self.false += len(positive) - positive.null_count - true

    def summary(self, name: str, spec: dict, calibrated: bool) -> FindingSummary:
        threshold = self.threshold
        summary = FindingSummary(name, str(spec.get("prompt", name)), self.values, "probability", threshold, "")
        if self.true or self.false:  # decisions made in the run (a findings-file or calibrated threshold)
            summary.positive, summary.negative = self.true, self.false
            summary.undecided = self.rows - self.true - self.false
            summary.threshold_note = (f"threshold {threshold:g} (findings file)" if threshold is not None
                                      else "threshold from the checkpoint's calibration")
        elif threshold is not None:  # a table without decisions (older run): decide from the probability
            summary.positive, summary.negative = self.above, self.finite - self.above
            summary.threshold_note = f"threshold {threshold:g} (findings file)"
        else:
            summary.threshold_note = ("no threshold: " + ("calibrated" if calibrated else "uncalibrated")
                                      + " probabilities, no decision")
            summary.stats.append(("p ≥ 0.5 (for orientation)", f"{self.half} of {self.finite}"))
        return summary


class _ScoreImages:
    """A score run's results, a record batch at a time: per finding its :class:`_FindingCounts`, the
    table's :data:`TABLE_ROWS` rows of highest probability (any finding; ties: the first read), and
    the labels of the images the gallery shows."""

    def __init__(self, findings: dict[str, Any], label: Callable[[str, str | None], str], *, uids: bool,
                 phi: bool, gallery_keys: set[str]) -> None:
        self.names, self.label = list(findings), label
        self.findings = {name: _FindingCounts(None if (spec or {}).get("threshold") is None
                                              else float(spec["threshold"])) for name, spec in findings.items()}
        self.text = ["path"] + (["sop_instance_uid"] if uids else []) + (list(PHI_COLUMNS) if phi else [])
        schema = pa.schema([(c, pa.string()) for c in self.text] + [(f"{n}.prob", pa.float64()) for n in self.names]
                           + [("_top", pa.float64()), ("_order", pa.int64())])
        self.rows = _TopRows(TABLE_ROWS, schema)
        self.keys = pa.array(sorted(gallery_keys), pa.string())
        self.labels: dict[str, str] = {}  # gallery image → its label
        self.count = 0

    def columns(self) -> list[str]:
        return self.text + [f"{n}.{c}" for n in self.names for c in ("prob", "positive")]

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        probs = [_floats(batch, f"{name}.prob") for name in self.names]
        for name, p in zip(self.names, probs):
            col = f"{name}.positive"
            self.findings[name].add(p, batch.column(col) if col in batch.schema.names else None)
        top = np.full(n, -np.inf)
        for p in probs:
            top = np.fmax(top, p)  # NaN (no probability) never wins
        text = [_strings(batch, c) for c in self.text]
        self.rows.add(pa.Table.from_arrays([*text, *(pa.array(p) for p in probs), pa.array(top),
                                            pa.array(np.arange(self.count, self.count + n))],
                                           schema=self.rows.schema))
        if len(self.keys):
            shown = batch.filter(pc.fill_null(pc.is_in(text[0], value_set=self.keys), False))
            for path, uid in zip(_strings(shown, "path").to_pylist(), _strings(shown, "sop_instance_uid").to_pylist()):
                self.labels[str(path)] = self.label(str(path), uid)
        self.count += n

    def labels_of(self, kept: pa.Table) -> list[str]:
        uids = kept.column("sop_instance_uid").to_pylist() if "sop_instance_uid" in self.text else None
        return [self.label(str(p), uids[i] if uids else None) for i, p in enumerate(kept.column("path").to_pylist())]


class _TopRows:
    """The ``limit`` rows of highest ``_top`` (ties: lowest ``_order``) among the Arrow tables added,
    cut back to ``limit`` each time twice that many are held: memory for ``2 × limit`` rows, not the run's."""

    def __init__(self, limit: int, schema: pa.Schema) -> None:
        self.limit, self.schema = limit, schema
        self.parts: list[pa.Table] = [schema.empty_table()]
        self.held = 0

    def add(self, table: pa.Table) -> None:
        self.parts.append(table)
        self.held += table.num_rows
        if self.held >= 2 * self.limit:
            self._cut()

    def _cut(self) -> None:
        table = pa.concat_tables(self.parts)
        best = pc.sort_indices(table, sort_keys=[("_top", "descending"), ("_order", "ascending")])[: self.limit]
        self.parts = [table.take(best)]
        self.held = self.parts[0].num_rows

    def result(self, order: list[str]) -> pa.Table:
        """The kept rows, sorted by the ``order`` columns."""
        if self.held > self.limit:
            self._cut()
        table = pa.concat_tables(self.parts)
        return table.take(pc.sort_indices(table, sort_keys=[(c, "ascending") for c in order]))


def _saved_gallery(out: Path, mode: Mode, kind: str) -> tuple[dict[str, Any] | None, str | None]:
    """The run's saved gallery of ``kind`` for a full report, else None with the note saying why."""
    if mode != "full":
        return None, "Gallery left out (--report summary): no images of patients in this file."
    saved = load_gallery(out)
    if saved is None or saved.get("kind") != kind:
        verb = "scored" if kind == "score" else "made"
        return None, f"No gallery: the run was {verb} without --report-maps K."
    return saved, None


def _score_gallery(data: ReportData, saved: dict[str, Any], tiles: dict[str, list[Tile]], names: list[str],
                   labels: dict[str, str], scored: int) -> None:
    """Per finding, the saved top-K tiles of images in the results (``labels``: their labels)."""
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


def _floats(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A column as float64, NaN where null (all NaN where the batch lacks it)."""
    if column not in batch.schema.names:
        return np.full(batch.num_rows, np.nan)
    return np.asarray(batch.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _strings(batch: pa.RecordBatch, column: str) -> pa.Array:
    """A text column (all null where the batch lacks it)."""
    if column not in batch.schema.names:
        return pa.nulls(batch.num_rows, pa.string())
    return batch.column(column).cast(pa.string())


def _rounded(values: np.ndarray, decimals: int = PROB_DECIMALS) -> list[float | None]:
    rounded = np.round(np.asarray(values, dtype=np.float64), decimals)
    return [None if not np.isfinite(v) else float(v) for v in rounded.tolist()]


class _CommonRoot:
    """The deepest folder holding every path added (stored paths are absolute, '/'-separated text),
    one at a time: one running folder, not a set of folders (``commonpath`` of the folders so far
    with the next gives the same folder as of all at once)."""

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
