"""Micro-benchmark of CARZero's fusion-decoder cross-attention: ``cross_attention_ref`` vs the Triton kernel.

    python benchmarks/bench_cross_attention.py [--reps 20] [--dtype bfloat16] [--only i2t] [--csv PATH]

Shapes are CARZero's (width 768 = 4 heads × Dh 192): "i2t" attends all T prompts (Q = T) to one
image's 197 tokens (N = B images); "t2i" attends all B images (Q = B) to one prompt's 98 tokens
(N = T prompts). Inputs are laid out as the decoder passes them: queries shared by every batch row
(an ``expand``ed view, stride 0 on N) and keys/values as views of one fused k/v projection.

With CUDA: the reference (``cross_attention_ref``, SDPA in float32) and the Triton kernel
(``cross_attention`` with the "triton" backend; warm-up includes autotuning), timed by CUDA events,
GPU shapes, ``--dtype`` (default bfloat16). Without CUDA: only the reference, CPU shapes (sized so
the whole run takes well under a minute on 2 cores), float32, timed by ``perf_counter``.
Times are medians over ``--reps`` calls. ``--csv`` appends the rows to a file (nothing is written
otherwise).

Per call: FLOP = 4·N·Q·K·H·Dh (two contractions); bytes = (N·Q + 2·N·K + N·Q)·H·Dh·e at least
(q read, k and v read, out written; the expanded q is counted per row, as each row reads it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from radflash.kernels import cross_attention, cross_attention_ref, set_kernel_backend
from radflash.util.timing import time_fn

H, DH = 4, 192
IMAGE_TOKENS, TEXT_TOKENS = 197, 98  # 14×14 patches + CLS at 224²; the text encoder's padded length


@dataclass(frozen=True)
class AttnShape:
    mode: str  # "i2t" or "t2i"
    images: int  # B
    prompts: int  # T

    @property
    def n(self) -> int:
        return self.images if self.mode == "i2t" else self.prompts

    @property
    def q(self) -> int:
        return self.prompts if self.mode == "i2t" else self.images

    @property
    def k(self) -> int:
        return IMAGE_TOKENS if self.mode == "i2t" else TEXT_TOKENS

    @property
    def name(self) -> str:
        return f"{self.mode} B{self.images} T{self.prompts} (N{self.n} Q{self.q} K{self.k})"


# Kept here rather than in shapes.py: only this script uses them. T = 14 findings or ~200 phrases.
GPU_SHAPES = tuple(AttnShape(m, b, t) for m in ("i2t", "t2i") for b, t in ((64, 14), (64, 200), (256, 200)))
CPU_SHAPES = tuple(AttnShape(m, b, t) for m in ("i2t", "t2i") for b, t in ((1, 14), (8, 14), (8, 200)))


def make_inputs(s: AttnShape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    q = torch.randn(1, s.q, H, DH, device=device).to(dtype).expand(s.n, -1, -1, -1)
    kv = torch.randn(s.n, s.k, 2, H, DH, device=device).to(dtype)
    return q, kv[:, :, 0], kv[:, :, 1]


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median milliseconds per call (radflash's own timer: CUDA events on a GPU; warm-ups, autotuning
    included, are excluded)."""
    return statistics.median(time_fn(fn, device=device, iterations=reps, warmup=3)) * 1e3


def implementations(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    with_triton: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """The reference first (the baseline of the speed-up and error columns), then the Triton kernel."""

    def triton_fn() -> torch.Tensor:
        with set_kernel_backend("triton"):
            return cross_attention(q, k, v)

    impls = {"ref": lambda: cross_attention_ref(q, k, v)}
    if with_triton:
        impls["triton"] = triton_fn
    return impls


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if gpu else cpu
    print(f"{where}  torch {torch.__version__}  {dtype}".replace("torch.", ""))
    if not gpu:
        print("no CUDA device: timing the reference only (the Triton kernel needs a GPU)")
    print(f"{'shape':<36}{'impl':<8}{'ms':>10}{'× ref':>8}{'TFLOP/s' if gpu else 'GFLOP/s':>9}{'GB/s':>8}"
          f"{'max|Δ|':>10}")
    timer = functools.partial(median_ms, device=torch.device(device))
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for s in GPU_SHAPES if gpu else CPU_SHAPES:
        if args.only and args.only not in s.name:
            continue
        q, k, v = make_inputs(s, dtype, device)
        impls = implementations(q, k, v, with_triton=gpu)
        flops = 4.0 * s.n * s.q * s.k * H * DH
        nbytes = (2 * s.n * s.q + 2 * s.n * s.k) * H * DH * q.element_size()
        with torch.inference_mode():
            reference = impls["ref"]().float()
            ref_ms = None
            for impl, fn in impls.items():
                err = float((fn().float() - reference).abs().max())
                ms = timer(fn, args.reps)
                ref_ms = ref_ms or ms
                rate = flops / (ms * 1e-3) / (1e12 if gpu else 1e9)
                gbs = nbytes / (ms * 1e-3) / 1e9
                print(f"{s.name:<36}{impl:<8}{ms:>10.3f}{ref_ms / ms:>7.2f}×{rate:>9.2f}{gbs:>8.0f}{err:>10.2e}")
                rows.append({"date": date, "device": where, "torch": torch.__version__, "dtype": str(dtype),
                             "shape": s.name, "impl": impl, "ms": round(ms, 4),
                             "speedup_vs_ref": round(ref_ms / ms, 3), "flop_s": f"{flops / (ms * 1e-3):.3e}",
                             "gb_s": round(gbs, 1), "max_abs_err": f"{err:.2e}"})
        if gpu:
            torch.cuda.empty_cache()
    return rows


def append_csv(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only shapes whose name contains this substring (e.g. i2t, B256)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV file")
    args = parser.parse_args(argv)
    rows = run(args)
    if args.csv and rows:
        append_csv(rows, args.csv)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
