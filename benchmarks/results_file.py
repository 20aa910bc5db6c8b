"""One results file per benchmark under ``benchmarks/results/``: each run appends a dated block."""

from __future__ import annotations

from pathlib import Path


def append_block(path: Path, title: str, block: str) -> None:
    """Print ``block`` and append it to ``path`` (``title`` heads a new or empty file)."""
    print(block)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or not path.read_text(encoding="utf-8").strip()
    with path.open("a", encoding="utf-8") as fh:
        fh.write((title.rstrip("\n") + "\n" if new else "\n") + block.rstrip("\n") + "\n")
    print(f"appended to {path}")
