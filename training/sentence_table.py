"""A table of reports → a table of training sentences (the ``radflash sentences`` verb).

Input: CSV, Parquet or JSONL with one report per row. Output: a Parquet file with every input
column plus ``sentences`` (list of str), ``mentions`` (list of {finding, certainty, location}) and
``error`` (null, or why that row failed: one bad row must not cost a night-long extraction), a
``<stem>.summary.csv`` with counts per finding and certainty, and — when the table has an image
column — ``<stem>.sentences.json`` in the ``{image_path: [sentence, ...]}`` form that
``radflash train`` reads as ``data.sentences``.

Only pyarrow is used (already a core dependency), not pandas.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from radflash.errors import InputError, RadflashError
from radflash.training.sentences import Mention, extract_mentions

REPORT_COLUMNS = ("report", "text", "findings", "impression")
IMAGE_COLUMNS = ("path", "image_path", "dicom_id")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Extractor = Callable[[str], list[Mention]]


def read_table(path: str | Path) -> pa.Table:
    """CSV (``.csv``/``.tsv``), Parquet or JSON lines, chosen by the file suffix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: reports table not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".jsonl", ".ndjson", ".json"):
            return pajson.read_json(path)
        if suffix in (".csv", ".tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
            # every column as text: ids like "0012" must stay strings
            names = pacsv.read_csv(path, parse_options=parse).column_names
            convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
            return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read the table ({exc})") from None
    raise InputError(f"{path}: unknown table type {suffix!r}; use .csv, .tsv, .parquet or .jsonl")


def pick_column(table: pa.Table, wanted: str | None, candidates: tuple[str, ...], what: str,
                path: str | Path) -> str | None:
    """The named column, else the first candidate present (case-insensitive), else None."""
    names = table.column_names
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


@dataclass
class SentenceTable:
    """What :func:`extract_table` made: the output table, per-finding counts and the failed rows."""

    table: pa.Table
    report_column: str
    image_column: str | None
    summary: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: int = 0

    def summary_rows(self) -> list[tuple[str, int, int, int]]:
        """(finding, present, possible, absent), most-mentioned first."""
        names = {f for f, _ in self.summary}
        rows = [(f, self.summary[f, "present"], self.summary[f, "possible"], self.summary[f, "absent"]) for f in names]
        return sorted(rows, key=lambda r: (-sum(r[1:]), r[0]))


def extract_table(table: pa.Table, *, report_column: str, image_column: str | None = None,
                  extractor: Extractor = extract_mentions,
                  on_row: Callable[[], None] | None = None) -> SentenceTable:
    """Extract every row; a row whose extraction raises gets an ``error`` and empty lists."""
    mention_type = pa.list_(pa.struct([("finding", pa.string()), ("certainty", pa.string()),
                                       ("location", pa.string())]))
    sentences, mentions, errors = [], [], []
    out = SentenceTable(table, report_column, image_column)
    for value in table.column(report_column).to_pylist():
        try:
            found = extractor(value if isinstance(value, str) else "" if value is None else str(value))
            sentences.append([m.sentence() for m in found])
            mentions.append([{"finding": m.finding, "certainty": m.certainty, "location": m.location}
                             for m in found])
            errors.append(None)
            out.summary.update((m.finding, m.certainty) for m in found)
        except (RadflashError, ValueError) as exc:  # the LLM path fails per row; keep going
            sentences.append([])
            mentions.append([])
            errors.append(str(exc) or type(exc).__name__)
            out.errors += 1
        if on_row is not None:
            on_row()
    for name in ("sentences", "mentions", "error"):
        if name in table.column_names:
            table = table.drop_columns([name])
    out.table = (table.append_column("sentences", pa.array(sentences, pa.list_(pa.string())))
                 .append_column("mentions", pa.array(mentions, mention_type))
                 .append_column("error", pa.array(errors, pa.string())))
    return out


def training_json(result: SentenceTable, images_root: str | Path | None = None) -> dict[str, list[str]]:
    """``{image_path: [sentences]}`` for ``radflash train``'s ``data.sentences``. A ``dicom_id`` column
    is resolved under ``images_root`` the way the trainer's report reader does (``**/<dicom_id>.jpg``)."""
    if result.image_column is None:
        return {}
    keys = result.table.column(result.image_column).to_pylist()
    index: dict[str, str] = {}
    if result.image_column == "dicom_id" and images_root is not None:
        root = Path(images_root)
        index = {p.stem: str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES}
    out: dict[str, list[str]] = {}
    for key, sents in zip(keys, result.table.column("sentences").to_pylist(), strict=True):
        if key is None or not sents:
            continue  # the trainer drops images without a sentence anyway
        name = str(key).strip()
        if result.image_column == "dicom_id":
            name = index.get(name, f"{name}.jpg")
        out.setdefault(name, []).extend(s for s in sents if s not in out.get(name, []))
    return out


def write_outputs(result: SentenceTable, out: str | Path, *, images_root: str | Path | None = None) -> list[Path]:
    """Write the Parquet, the summary CSV and (with an image column) the training JSON; return their paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.table, out)
    written = [out]
    summary = out.with_name(out.stem + ".summary.csv")
    with open(summary, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["finding", "present", "possible", "absent"])
        writer.writerows(result.summary_rows())
    written.append(summary)
    data = training_json(result, images_root)
    if data:
        path = out.with_name(out.stem + ".sentences.json")
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        written.append(path)
    return written
