"""GPU benchmark of the fused kernels: Triton vs plain-torch eager vs torch.compile of the same reference.

    python benchmarks/bench_kernels.py [--only SUBSTRING] [--no-compile] [--reps 20] [--csv PATH]

Shapes come from ``benchmarks/shapes.py``; the baselines are ``vlcabs_ref`` / ``upsample_maps_ref``,
imported from radflash (the functions the tests check), never copies. Times are CUDA-event medians
over ``--reps`` runs after warm-up (which includes Triton autotuning and torch.compile). Achieved
bandwidth is reported against a measured device-to-device copy, the practical roofline.
One table per shape is printed; rows are appended to ``benchmarks/results/kernels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from radflash.kernels import set_kernel_backend, upsample_maps, upsample_maps_ref, vlcabs, vlcabs_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import HEAD_SHAPES, MAP_SHAPES, HeadShape, MapShape  # the script's folder: one registry

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"
TAU = 0.07
ELT = {"float32": 4, "float16": 2, "bfloat16": 2}
MAP_OUT_ELT = {"prob": None, "mask": 1, "both": None, "none": 0}  # None: prob_dtype's size (+1 for both)
FIELDS = ["date", "gpu", "torch", "triton", "cuda", "shape", "impl", "ms", "speedup_vs_eager", "bytes",
          "gb_s", "frac_copy_bw", "tflop_s", "max_abs_err"]


def time_cuda(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events; warm-up runs (autotune, compile) are excluded."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy GB/s (read + write) on 1 GiB: what a memory-bound kernel can hope for."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps)
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def head_case(s: HeadShape) -> tuple[dict[str, Callable[[], object]], int, float, Callable]:
    dtype = getattr(torch, s.dtype)
    tokens = torch.randn(s.b, s.n, s.d, device="cuda").to(dtype)
    text = torch.randn(s.t, s.d, device="cuda").to(dtype)
    ln = {"ln_weight": torch.ones(s.d, device="cuda"), "ln_bias": torch.zeros(s.d, device="cuda")} if s.fused_ln else {}
    kw = dict(ln, return_maps=s.return_maps)
    compiled = torch.compile(vlcabs_ref, dynamic=False)

    def triton_fn() -> object:
        with set_kernel_backend("triton"):
            return vlcabs(tokens, text, TAU, **kw)

    impls = {
        "triton": triton_fn,
        "torch eager": lambda: vlcabs_ref(tokens, text, TAU, **kw),
        "torch.compile": lambda: compiled(tokens, text, TAU, **kw),
    }
    elt = ELT[s.dtype]
    # Bytes moved (the minimum any implementation must move):
    #   read tokens B·N·D·elt + text T·D·elt + LayerNorm params 2·D·4, write logits B·T·4,
    #   and with maps write s for the patches B·T·(N−1)·elt.
    nbytes = s.b * s.n * s.d * elt + s.t * s.d * elt + (2 * s.d * 4 if s.fused_ln else 0) + s.b * s.t * 4
    if s.return_maps:
        nbytes += s.b * s.t * (s.n - 1) * elt
    # FLOPs: two B·T·N·D multiply-add contractions (similarity, weighted sum) = 4·B·T·N·D.
    flops = 4.0 * s.b * s.t * s.n * s.d
    return impls, nbytes, flops, lambda out: out[0]


def map_case(s: MapShape) -> tuple[dict[str, Callable[[], object]], int, float, Callable]:
    sim = (torch.randn(s.b, s.t, *s.grid, device="cuda") * 3).to(getattr(torch, s.sim_dtype))
    kw = {"output": s.output, "threshold": 0.5, "prob_dtype": getattr(torch, s.prob_dtype)}
    compiled = torch.compile(upsample_maps_ref, dynamic=False)

    def triton_fn() -> object:
        with set_kernel_backend("triton"):
            return upsample_maps(sim, s.size, **kw)

    impls = {
        "triton": triton_fn,
        "torch eager": lambda: upsample_maps_ref(sim, s.size, **kw),
        "torch.compile": lambda: compiled(sim, s.size, **kw),
    }
    out_elt = MAP_OUT_ELT[s.output] if MAP_OUT_ELT[s.output] is not None else ELT[s.prob_dtype] + (s.output == "both")
    h, w = s.size
    # Bytes moved: read the grid B·T·h·w·elt (tiny), write the maps B·T·H·W·out_elt
    # (fp16 probs 2 B, uint8 masks 1 B, "none" 0), plus the peaks B·T·(2·8 + 4).
    nbytes = s.b * s.t * s.grid[0] * s.grid[1] * ELT[s.sim_dtype] + s.b * s.t * h * w * out_elt + s.b * s.t * 20
    return impls, nbytes, 0.0, lambda out: out.peak_prob


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
    }


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    env = versions()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    copy_gbs = copy_bandwidth(args.reps)
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}")
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s\n")
    rows = []
    cases = [(s, head_case) for s in HEAD_SHAPES] + [(s, map_case) for s in MAP_SHAPES]
    for shape, make in cases:
        if args.only and args.only not in shape.name:
            continue
        impls, nbytes, flops, key = make(shape)
        if args.no_compile:
            impls.pop("torch.compile")
        reference = key(impls["torch eager"]())
        results = {}
        for impl, fn in impls.items():
            try:
                err = float((key(fn()).float() - reference.float()).abs().max())
                results[impl] = (time_cuda(fn, args.reps), err)
            except torch.cuda.OutOfMemoryError:
                results[impl] = (float("nan"), float("nan"))
            torch.cuda.empty_cache()
        eager_ms = results["torch eager"][0]
        print(f"== {shape.name}   bytes {nbytes / 1e6:.1f} MB" + (f"   {flops / 1e12:.2f} TFLOP" if flops else ""))
        print(f"{'impl':<15}{'ms':>10}{'speedup':>10}{'GB/s':>10}{'% copy':>9}{'TFLOP/s':>10}{'max|Δ|':>11}")
        for impl, (ms, err) in results.items():
            gbs = nbytes / (ms * 1e-3) / 1e9
            tflops = flops / (ms * 1e-3) / 1e12
            print(f"{impl:<15}{ms:>10.3f}{eager_ms / ms:>9.2f}×{gbs:>10.0f}{100 * gbs / copy_gbs:>8.0f}%"
                  f"{tflops:>10.1f}{err:>11.2e}")
            rows.append({"date": date, **env, "shape": shape.name, "impl": impl, "ms": round(ms, 4),
                         "speedup_vs_eager": round(eager_ms / ms, 3), "bytes": nbytes, "gb_s": round(gbs, 1),
                         "frac_copy_bw": round(gbs / copy_gbs, 3), "tflop_s": round(tflops, 2),
                         "max_abs_err": f"{err:.2e}"})
        print()
    return rows


def append_csv(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only shapes whose name contains this substring")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to build)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--csv", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device: this benchmark times GPU kernels; nothing to do.", file=sys.stderr)
        return 0
    rows = run(args)
    append_csv(rows, args.csv)
    print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
