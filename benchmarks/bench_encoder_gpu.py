"""Image-encoder throughput on a GPU: eager bf16 vs the compiled backends, with the physical limit.

    python benchmarks/bench_encoder_gpu.py [--backends eager,compile,tensorrt] [--iterations 20]
                                           [--batch-sizes 1,32] [--append benchmarks/results/encoder_gpu.md]

Shapes: ``cpu_shapes.ENCODER_GPU`` (RadZero base, random weights, at 518², batch 1..64). For
each backend and batch B: median / p95 latency over CUDA-event-timed iterations (warm-up and
compilation excluded), images/s, and

    achieved TFLOP/s = B · FLOP/image / median time,
    FLOP/image       = L·[2·N·(4·D² + 2·D·M) + 4·N²·D] + 2·P·(C·p²)·D   (radflash.bench.harness.encoder_flops;
                       ≈ 0.35 TFLOP for L = 14, N = 1370, D = 768, M = 3072)

as a fraction of a measured bf16 matmul rate (2·n³ / t for an 8192² @ 8192² matmul, best of 5;
radflash.util.timing.measure_peaks), the practical ceiling for these GEMM-dominated layers. The
eager bf16 row is the baseline of the ``× eager`` column. Without CUDA it exits with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="eager,compile", help="comma-separated (eager, compile, tensorrt, "
                        "onnxruntime)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated subset of the registry's batch sizes "
                        "(each new size is one more compile per compiled backend; gpu_check.sh uses 1,32)")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_encoder_gpu.py: no CUDA device is available, nothing to measure "
              "(this script needs a GPU; use `radflash bench --device cpu` for the CPU paths).", file=sys.stderr)
        return 2

    from cpu_shapes import ENCODER_GPU

    from radflash.api import RadFlashModel
    from radflash.bench.harness import encoder_flops
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.errors import BackendUnavailable
    from radflash.util.sysinfo import machine_info, one_line
    from radflash.util.timing import Stats, measure_peaks, time_fn

    device = torch.device("cuda")
    peaks = measure_peaks(device, torch.bfloat16)
    info = machine_info(device)
    rows = []
    for shape in ENCODER_GPU:
        ckpt = random_checkpoint(shape.preset, seed=0)
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, image_size=shape.image_size))
        model = RadFlashModel(ckpt, device=device, dtype=torch.bfloat16)
        flops = encoder_flops(model.config, shape.image_size)
        base: dict[int, float] = {}
        for name in args.backends.split(","):
            try:
                model.set_backend(name.strip())
            except (BackendUnavailable, ImportError) as exc:
                print(f"skip {name}: {exc}", file=sys.stderr)
                continue
            for b in batches(shape.batches, args.batch_sizes):
                pixels = torch.randn(b, 3, shape.image_size, shape.image_size, device=device, dtype=torch.bfloat16)
                st = Stats.from_seconds(time_fn(lambda p=pixels, m=model: m.encode_images(pixels=p), device=device,
                                                iterations=args.iterations, warmup=args.warmup))
                tflops = b * flops / (st.median_ms / 1e3) / 1e12
                if name == "eager":
                    base[b] = st.median_ms
                speedup = f"{base[b] / st.median_ms:.2f}×" if b in base else "—"
                p95 = "—" if st.p95_ms is None else f"{st.p95_ms:.3g}"  # None below 20 iterations
                rows.append(f"| {shape.name} | {name} | {b} | {st.median_ms:.3g} | {p95} | "
                            f"{1e3 * b / st.median_ms:.4g} | {tflops:.3g} | "
                            f"{100 * tflops * 1e12 / peaks.matmul_flops_per_s:.0f}% | {speedup} |")
                print(rows[-1], flush=True)
    header = [f"## {info['date']} · encoder on {info['gpu']}", "", f"- machine: {one_line(info)}",
              f"- measured bf16 matmul: {peaks.matmul_flops_per_s / 1e12:.1f} TFLOP/s (n={peaks.matmul_shape})",
              f"- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items() if v)}", "",
              "| shape | backend | B | median ms | p95 ms | img/s | TFLOP/s | of matmul | × eager |",
              "|---|---|---|---|---|---|---|---|---|"]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.append is not None:
        args.append.parent.mkdir(parents=True, exist_ok=True)
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def batches(registry: tuple[int, ...], wanted: str | None) -> tuple[int, ...]:
    """The registry's batch sizes, or the requested ones (which must come from the registry)."""
    if not wanted:
        return registry
    sizes = tuple(int(b) for b in wanted.split(","))
    unknown = sorted(set(sizes) - set(registry))
    if unknown:
        raise SystemExit(f"--batch-sizes {unknown} not in the shape registry {registry} (benchmarks/cpu_shapes.py)")
    return sizes


if __name__ == "__main__":
    sys.exit(main())
