"""The bench report: its types (rows, limits, memory peaks), JSON schema and renderings.

Apart from the harness so that the command line's table, the markdown and the plots
(:mod:`radflash.bench.plots`) depend only on what was measured, not on the code that measures it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radflash.util.timing import MemoryPeak, Peaks, Stats

SCHEMA = "radflash.bench/1"


STAGES = ("decode", "preprocess", "encode", "head", "maps")


E2E, SCORE = "e2e", "score"


FORMULAS = {
    "encode": ("FLOP per image = L·[2·N·(4·D² + 2·D·M) + 4·N²·D] + 2·P·(C·p²)·D, with L = vision + align "
               "layers, P = (S/p)² patches, N = P + 1 tokens, D width, M MLP width, C channels, p patch "
               "(qkv 6ND², proj 2ND², MLP 4NDM, scores + weighted sum 4N²D, patch-embedding conv)"),
    "head": ("bytes = B·N·D·e_tok (read tokens once) + T·D·e_txt (prompts) + B·T·4 (logits) + B·T·(N−1)·e_s "
             "(write s for the maps); FLOP = 4·B·T·N·D (similarities + weighted sum)"),
    "maps": "bytes = B·T·(N−1)·e_s (read s) + B·T·H·W·e_out (write probabilities; masks/peaks are smaller)",
    "matmul": "peak FLOP/s = 2·n³ / t for an n×n @ n×n matmul in the row's precision (best of 5; int8: "
              "torch._int_mm, int32 accumulation)",
    "copy": "copy bandwidth = 2·bytes / t (read + write) of a large float32 tensor copy (best of 5)",
    "fraction": "fraction = achieved rate at the median time / measured peak",
}


# CARZero's head is the cross-attention fusion (radflash.models.fusion), compute-bound: its limit is FLOP/s.
CARZERO_HEAD = ("FLOP = Σ over both directions (K = N image tokens for i2t, K = 1 + L prompt rows for t2i) of "
                "B·T·[ℓ·(2D² + 4·K·D + 4·D·F) + (ℓ−1)·2D² + 2·Σ w_k·w_(k+1)] + (B + T)·2D² + B·ℓ·4·N·D², with "
                "ℓ fusion layers, F FFN width, w = (D, MLP widths…, 1): per pair and direction the out-projection, "
                "attention over K keys, FFN and the scoring MLP in every layer and the query projection in all "
                "but the first; the first layer projects each distinct query once (T prompts, B images); the "
                "image keys/values once per image and layer (the prompt keys/values are cached, not counted)")


def formulas_for(family: str) -> dict[str, str]:
    """The formulas behind the ``physical limit`` column for a model family (no maps for CARZero)."""
    if family == "carzero":
        return {k: (CARZERO_HEAD if k == "head" else v) for k, v in FORMULAS.items() if k != "maps"}
    return dict(FORMULAS)


# ---- types -----------------------------------------------------------------------------------------
@dataclass
class Limit:
    kind: str  # "flop" or "bytes"
    amount: float  # per iteration (whole batch)
    achieved_per_s: float
    peak_per_s: float
    fraction: float
    others: dict[str, float] = field(default_factory=dict)  # fraction of other yardsticks, by name

    def describe(self) -> str:
        if self.kind == "flop":
            more = "".join(f"; {100 * f:.0f}% of {name}" for name, f in self.others.items())
            return f"{self.achieved_per_s / 1e12:.3g} TFLOP/s = {100 * self.fraction:.0f}% of matmul{more}"
        return f"{self.achieved_per_s / 1e9:.3g} GB/s = {100 * self.fraction:.0f}% of copy"


@dataclass
class Row:
    backend: str
    batch_size: int
    stage: str
    images: int  # images per timed iteration (B, or the archive size for `score`)
    radflash: Stats
    reference: Stats | None
    ratio: float | None  # reference median / radflash median
    images_per_s: float
    reference_images_per_s: float | None
    limit: Limit | None = None
    dtype: str | None = None  # the encoder's precision (fp32, bf16, fp16, int8; "default": the runtime's own)

    @property
    def label(self) -> str:
        """The table's backend cell: the precision named unless it is float32 (the default on every CPU)."""
        return self.backend if self.dtype in (None, "fp32") else f"{self.backend}/{self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "dtype": self.dtype, "batch_size": self.batch_size, "stage": self.stage,
            "images": self.images,
            "radflash": self.radflash.to_dict(),
            "reference": None if self.reference is None else self.reference.to_dict(),
            "ratio": self.ratio, "images_per_s": self.images_per_s,
            "reference_images_per_s": self.reference_images_per_s,
            "limit": None if self.limit is None else dataclasses.asdict(self.limit),
        }


@dataclass
class MemoryRow:
    backend: str  # a radflash backend, or "reference"
    batch_size: int
    peak: MemoryPeak

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "batch_size": self.batch_size, **self.peak.to_dict()}


@dataclass
class BenchReport:
    machine: dict[str, Any]
    config: dict[str, Any]
    peaks: Peaks | None
    rows: list[Row] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"what": ..., "reason": ...}
    formulas: dict[str, str] = field(default_factory=lambda: dict(FORMULAS))
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "machine": self.machine, "config": self.config,
            "peaks": None if self.peaks is None else self.peaks.to_dict(), "formulas": self.formulas,
            "rows": [r.to_dict() for r in self.rows], "memory": [m.to_dict() for m in self.memory],
            "skipped": self.skipped,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def row(self, backend: str, batch_size: int, stage: str) -> Row | None:
        return next((r for r in self.rows if (r.backend, r.batch_size, r.stage) == (backend, batch_size, stage)), None)

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(r.backend for r in self.rows))


# ---- rendering ----------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


HEADERS = ["backend", "B", "stage", "median ms", "p95 ms", "p99 ms", "img/s", "ref median ms", "ratio ref/rf",
           "physical limit"]


_TAILS = {"p95 ms": "p95_ms", "p99 ms": "p99_ms"}


def headers(report: BenchReport) -> list[str]:
    """:data:`HEADERS` less the tail percentiles that no row has enough samples for (see ``timing.MIN_SAMPLES``)."""
    return [h for h in HEADERS
            if h not in _TAILS or any(getattr(r.radflash, _TAILS[h]) is not None for r in report.rows)]


def table_rows(report: BenchReport) -> list[list[str]]:
    """The rows shared by the terminal table and the markdown table, in the columns of :func:`headers`."""
    cols = headers(report)
    out = []
    for r in report.rows:
        cells = {
            "backend": r.label, "B": str(r.batch_size), "stage": r.stage, "median ms": _fmt(r.radflash.median_ms),
            "p95 ms": _fmt(r.radflash.p95_ms), "p99 ms": _fmt(r.radflash.p99_ms), "img/s": _fmt(r.images_per_s),
            "ref median ms": _fmt(None if r.reference is None else r.reference.median_ms),
            "ratio ref/rf": "—" if r.ratio is None else f"{r.ratio:.2f}×",
            "physical limit": "—" if r.limit is None else r.limit.describe(),
        }
        out.append([cells[h] for h in cols])
    return out


def summary_lines(report: BenchReport) -> list[str]:
    from radflash.util.sysinfo import one_line

    c = report.config
    lines = [
        f"machine: {one_line(report.machine)}",
        f"model {c['model']} · S={c['image_size']} (N={c['tokens']} tokens, D={c['width']}) · {c['dtype']} on "
        f"{c['device']} ({c['threads']} threads) · T={c['prompts']} prompts · "
        f"{c['iterations']} iterations after {c['warmup']} warm-up · "
        f"archive {c['archive_files']} files" + (f", maps at {c['map_size'][0]}×{c['map_size'][1]}"
                                                 if c.get("map_size") else ", no maps (the family has none)"),
    ]
    if c.get("gemm_rates"):
        rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in c["gemm_rates"].items())
        lines.append(f"measured GEMM rates (G(FL)OP/s, n=1024, {c['threads']} threads): {rates}")
    if report.peaks is not None:
        p = report.peaks
        lines.append(f"measured peaks: matmul {p.matmul_flops_per_s / 1e12:.3g} TFLOP/s ({p.matmul_dtype}, "
                     f"n={p.matmul_shape}) · copy {p.copy_bytes_per_s / 1e9:.3g} GB/s ({p.copy_mib} MiB)")
    for m in report.memory:
        cuda_mb = m.peak.cuda_max_allocated_mb
        cuda = "" if cuda_mb is None else f", CUDA max allocated {cuda_mb:.0f} MB"
        lines.append(f"peak memory {m.backend} B={m.batch_size}: RSS {m.peak.cpu_peak_rss_mb:.0f} MB "
                     f"({m.peak.rss_scope}){cuda}")
    if c.get("auto_selection"):
        from radflash.backends.auto import summary

        lines.append(f"backend {summary(c['auto_selection'])}")
    tails = [h.removesuffix(" ms") for h in _TAILS if h not in headers(report)]
    if tails and report.rows:
        lines.append(f"{'/'.join(tails)} not shown: at most {max(r.radflash.n for r in report.rows)} samples per "
                     f"line (p95 needs ≥ 20, p99 ≥ 100)")
    lines += [f"skipped {s['what']}: {s['reason']}" for s in report.skipped]
    return lines


def render_table(report: BenchReport):
    """A rich Table of all rows (the CLI prints it with the summary lines)."""
    from rich.table import Table

    table = Table(title="radflash bench (ratio = reference time / radflash time)", title_justify="left")
    for h in headers(report):
        table.add_column(h, justify="left" if h in ("backend", "stage", "physical limit") else "right",
                         no_wrap=h != "physical limit")
    previous = None
    for r, cells in zip(report.rows, table_rows(report)):
        group = (r.label, r.batch_size)
        if previous is not None and group != previous:
            table.add_section()
        table.add_row(*cells, style="bold" if r.stage in (E2E, SCORE) else None)
        previous = group
    return table


def to_markdown(report: BenchReport) -> str:
    """One self-contained block (date, machine, versions, config, table, formulas) to append to a results file."""
    c, m = report.config, report.machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [f"## {m['date']} · {c['device']} · {c['model']} S={c['image_size']}", ""]
    lines += [f"- {line}" for line in summary_lines(report)]
    lines += [f"- versions: python {m['python']}, {versions}", "",
              "| " + " | ".join(headers(report)) + " |", "|" + "|".join("---" for _ in headers(report)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    lines += ["", "Formulas:", ""] + [f"- {k}: {v}" for k, v in report.formulas.items()]
    return "\n".join(lines) + "\n"
