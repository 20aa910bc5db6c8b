"""Image-encoder throughput per backend: eager vs torch.compile vs ONNX Runtime fp32 / int8.

CPU section (always): tiny and base (random weights: speed depends only on shapes) at batch 1
and 8. Base runs at 224² on CPU instead of 518² (≈ 6.5× fewer tokens; 518² takes seconds per
image on a 2-core box); say so wherever the numbers are quoted. Ratios are vs eager from the SAME
run. The int8 graph is calibrated on a few synthetic images (throughput does not depend on the
calibration data).

GPU section (only with CUDA): base at 518², eager bf16 vs compile + CUDA graphs, batch 1..64,
timed with CUDA events.

    python benchmarks/bench_backends.py [--out benchmarks/results/backends_cpu.md] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# (preset, image size) per case: the one registry of shapes this benchmark uses
CPU_CASES = {"tiny@224": ("tiny", 224), "base@224": ("base", 224)}
CPU_BATCHES = (1, 8)
GPU_CASES = {"base@518": ("base", 518)}
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def make_model(preset: str, size: int, *, device: str = "cpu", dtype: str = "float32"):
    import dataclasses

    from radflash.api import RadFlashModel
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.models.config import preset as get_preset

    cfg = dataclasses.replace(get_preset(preset), image_size=size)
    return RadFlashModel(random_checkpoint(cfg, seed=0), device=device, dtype=dtype)


def images_per_s(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *, budget_s: float,
                 rounds: int = 5, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Images/s per function: after one warm-up call each, ``rounds`` interleaved timing blocks of about
    ``budget_s / rounds`` seconds each, median per function. Interleaving keeps the ratios fair when the
    machine's load changes during the run (the dev box is shared)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)  # warm-up (compiles, allocates)
        sync()
        for _ in range(rounds):
            for name, fn in fns.items():
                iters, start = 0, time.perf_counter()
                while iters < 1 or time.perf_counter() - start < budget_s / rounds:
                    fn(x)
                    iters += 1
                sync()
                samples[name].append(iters * x.shape[0] / (time.perf_counter() - start))
    return {name: float(np.median(v)) for name, v in samples.items()}


def cpu_backends(model, tmp: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from radflash.backends import make_backend
    from radflash.backends.export import export_onnx
    from radflash.calibration.quantize import quantize_onnxruntime

    size = model.config.image_size
    fp32 = tmp / f"{size}-fp32.onnx"
    export_onnx(model, fp32, validate=False)
    int8 = tmp / f"{size}-int8.onnx"
    yy, xx = np.mgrid[:size, :size] / size
    synthetic = [np.clip(0.5 + 0.3 * np.sin(5 * xx + i) * np.cos(3 * yy), 0, 1).astype(np.float32) for i in range(8)]
    quantize_onnxruntime(fp32, int8, model.preprocess(synthetic).float())
    return {
        "eager": make_backend("eager", model).encode,
        "compile": make_backend("compile", model, buckets=CPU_BATCHES).encode,
        "onnxruntime fp32": make_backend("onnxruntime", model, onnx_path=fp32).encode,
        "onnxruntime int8": make_backend("onnxruntime", model, precision="int8", onnx_path=int8).encode,
    }


def run_cpu(budget_s: float) -> list[str]:
    rows = []
    for case, (preset, size) in CPU_CASES.items():
        model = make_model(preset, size)
        with tempfile.TemporaryDirectory() as tmp:
            backends = cpu_backends(model, Path(tmp))
            for batch in CPU_BATCHES:
                x = torch.randn(batch, 3, size, size)
                speeds = images_per_s(backends, x, budget_s=budget_s * len(backends))
                base = speeds["eager"]
                for name, ips in speeds.items():
                    row = f"| {case} | {batch} | {name} | {ips:.2f} | {ips / base:.2f}× |"
                    print(row, flush=True)
                    rows.append(row)
    return rows


def run_gpu(budget_s: float) -> list[str]:
    from radflash.backends import make_backend

    rows = []
    sync = torch.cuda.synchronize
    for case, (preset, size) in GPU_CASES.items():
        model = make_model(preset, size, device="cuda", dtype="bfloat16")
        eager = make_backend("eager", model).encode
        compiled = make_backend("compile", model, buckets=GPU_BATCHES)
        compiled.warmup()
        for batch in GPU_BATCHES:
            x = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
            speeds = images_per_s({"eager bf16": eager, "compile + CUDA graphs bf16": compiled.encode}, x,
                                  budget_s=2 * budget_s, sync=sync)
            e = speeds["eager bf16"]
            for name, ips in speeds.items():
                row = f"| {case} | {batch} | {name} | {ips:.1f} | {ips / e:.2f}× |"
                print(row, flush=True)
                rows.append(row)
    return rows


def header(title: str, device: str) -> list[str]:
    import onnxruntime

    return [
        f"## {title}",
        "",
        f"{datetime.date.today()} · {device} · torch {torch.__version__} ({torch.get_num_threads()} threads) · "
        f"onnxruntime {onnxruntime.__version__} · python {platform.python_version()} · "
        f"load average at start {os.getloadavg()[0]:.1f}",
        "",
        "| model | batch | backend | images/s | vs eager |",
        "|---|---|---|---|---|",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown table(s) here.")
    parser.add_argument("--budget", type=float, default=3.0, help="Seconds timed per cell (after warm-up).")
    parser.add_argument("--gpu-only", action="store_true")
    args = parser.parse_args()
    lines: list[str] = []
    if not args.gpu_only:
        cpu = platform.processor() or platform.machine()
        lines += header("CPU: image encoder throughput (random weights; base at 224², not 518²)", cpu)
        print("\n".join(lines), flush=True)
        lines += run_cpu(args.budget)
    if torch.cuda.is_available():
        gpu = header("GPU: base at 518², eager bf16 vs compile + CUDA graphs", torch.cuda.get_device_name())
        print("\n".join(gpu), flush=True)
        lines += ["", *gpu, *run_gpu(args.budget)]
    else:
        print("(no CUDA device: GPU section skipped)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
