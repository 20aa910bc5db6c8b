"""``radflash sentences``: report tables in three formats → Parquet + summary + training JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from radflash.cli import cli

ROWS = [
    {"image_path": "p10/a.png", "report": "Moderate right effusion. No pneumothorax."},
    {"image_path": "p10/b.png",
     "report": "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion."},
    {"image_path": "p11/c.png", "report": None},
]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["image_path,report"] + [f'{r["image_path"]},"{r["report"] or ""}"' for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_sentences_command(tmp_path: Path, suffix: str) -> None:
    src = _write(tmp_path / f"reports{suffix}", ROWS)
    out = tmp_path / "out" / "s.parquet"
    res = CliRunner().invoke(cli, ["sentences", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out).to_pylist()
    assert [r["image_path"] for r in rows] == [r["image_path"] for r in ROWS]
    assert rows[0]["sentences"] == ["There is pleural effusion of the right lung", "There is no pneumothorax"]
    assert rows[0]["mentions"][0] == {"finding": "pleural effusion", "certainty": "present", "location": "right lung"}
    assert all(s.startswith("There is no ") for s in rows[1]["sentences"])
    assert rows[2]["sentences"] == [] and all(r["error"] is None for r in rows)
    assert "pleural effusion" in (tmp_path / "out" / "s.summary.csv").read_text()
    data = json.loads((tmp_path / "out" / "s.sentences.json").read_text())
    assert set(data) == {"p10/a.png", "p10/b.png"}


def test_training_reads_the_json(tmp_path: Path) -> None:
    """The companion JSON is exactly what MimicStyleDataset(sentences=...) takes."""
    from radflash.training.data import MimicStyleDataset

    for r in ROWS:
        (tmp_path / r["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / r["image_path"])
    src = _write(tmp_path / "reports.csv", ROWS)
    res = CliRunner().invoke(cli, ["sentences", str(src), "-o", str(tmp_path / "s.parquet"), "-q"])
    assert res.exit_code == 0, res.output
    ds = MimicStyleDataset(tmp_path, sentences=tmp_path / "s.sentences.json")
    assert len(ds) == 2 and ds[0].sentences[0] == "There is pleural effusion of the right lung"
    # The Parquet table itself is accepted too (``data.sentences: s.parquet``), with the same items.
    table = MimicStyleDataset(tmp_path, sentences=tmp_path / "s.parquet")
    assert table.items == ds.items


def test_column_option_and_missing_column(tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": 1, "body": "Small left pneumothorax."}) + "\n")
    res = CliRunner().invoke(cli, ["sentences", str(src), "-o", str(tmp_path / "o.parquet")])
    assert res.exit_code == 2 and "--column" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["sentences", str(src), "-o", str(tmp_path / "o.parquet"), "--column", "body"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "o.parquet").column("sentences").to_pylist() == [
        ["There is pneumothorax of the left lung"]]
    assert not (tmp_path / "o.sentences.json").exists()  # no image column, no training JSON
    bad = tmp_path / "r.xlsx"
    bad.write_text("x")
    res = CliRunner().invoke(cli, ["sentences", str(bad), "-o", str(tmp_path / "o.parquet")])
    assert res.exit_code == 1 and "unknown table type" in res.output


class _Llm(BaseHTTPRequestHandler):
    """Answers valid JSON for reports mentioning an effusion, prose (invalid) otherwise."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        report = body["messages"][-1]["content"]
        content = (json.dumps([{"finding": "effusion", "certainty": "present", "location": "right base"}])
                   if "effusion" in report else "I think the lungs look fine")
        out = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def llm() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Llm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_llm_rows_fail_alone(tmp_path: Path, llm: str) -> None:
    src = _write(tmp_path / "r.parquet", [*ROWS[:2], {"image_path": "x.png", "report": "Heart is normal."}])
    res = CliRunner().invoke(cli, ["sentences", str(src), "-o", str(tmp_path / "o.parquet"), "--llm", llm, "-q"])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert rows[0]["sentences"] == ["There is pleural effusion of the right lung"] and rows[0]["error"] is None
    assert rows[2]["sentences"] == [] and "not valid JSON" in rows[2]["error"]
    assert "1 failed" in res.output
