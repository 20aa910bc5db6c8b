"""``score --ray`` throughput vs actor count, against the local pipeline, in one run.

    python benchmarks/bench_ray.py [--n 48] [--size 1024] [--model tiny] [--actors 1,2] [--append results.md]

* local        : ``radflash.archive.verb.score(folder, out)``: decode processes + batched inference
                 in this process (the default ``--workers``).
* ray, K actors: the same call with ``ray=RayOptions(actors=K)`` on a local ``ray.init(num_cpus=2)``:
                 decode as Ray tasks, inference in K CPU actors (torch threads: their CPU share).

Every path scores the same files (an equal mix of four encodings, written by
``bench_pipeline.write_dicom``) into a fresh folder; the tables are checked equal to the local run's.
Wall time is the whole ``score`` call (Ray: actor start and model load included; Ray itself is
started once, before). The per-image costs printed at the end (inference s/image in an actor,
decode CPU s/file) are what the README's cluster projection is computed from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import ENCODINGS, write_dicom  # one archive writer for both benches


def build_inputs(root: Path, n: int, size: int) -> Path:
    folder = root / "archive"
    folder.mkdir()
    syntaxes = list(ENCODINGS.values())
    for i in range(n):
        write_dicom(folder / f"img{i:04d}.dcm", size, syntaxes[i % len(syntaxes)], seed=i)
    return folder


def build_model(root: Path, preset: str) -> Path:
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    path = root / preset
    save_checkpoint(random_checkpoint(preset, seed=0, model_id=f"bench-{preset}"), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--model", default="tiny", help="random-weights preset (tiny, base)")
    parser.add_argument("--actors", default="1,2", help="comma-separated CPU actor counts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    parser.add_argument("--append", type=Path, default=None, help="append the markdown block to this file")
    args = parser.parse_args()

    import ray
    import torch

    from radflash.archive.ray_executor import RayOptions
    from radflash.archive.verb import score

    root = Path(tempfile.mkdtemp(prefix="radflash-bench-ray-"))
    folder = build_inputs(root, args.n, args.size)
    model = build_model(root, args.model)
    rows = []

    def run(label: str, ray_options: RayOptions | None):
        t0 = time.perf_counter()
        out = score(folder, root / f"out-{len(rows)}", model=model, batch_size=args.batch_size, progress=False,
                    ray=ray_options)
        wall = time.perf_counter() - t0
        rows.append((label, wall, out))
        print(f"{label}: {wall:.1f} s, {out.discovered / wall:.2f} images/s", flush=True)
        return out

    local = run("local pipeline (default --workers)", None)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for k in (int(a) for a in args.actors.split(",")):
            r = run(f"ray, {k} CPU actor{'s' if k > 1 else ''}", RayOptions(actors=k))
            assert r.status.equals(local.status), "ray status table differs from the local run's"
    finally:
        ray.shutdown()

    base = args.n / rows[0][1]
    lines = [f"## {dt.date.today()} · {platform.machine()} · {os.cpu_count()} cores · torch {torch.__version__} "
             f"({torch.get_num_threads()} threads) · ray {ray.__version__} (num_cpus={args.cpus}) · model random "
             f"{args.model} · {args.n} files of {args.size}² (4 encodings) · batch {args.batch_size}", "",
             "| path | wall s | images/s | vs local | actors (CPU each) | inference s/image | decode CPU s/file |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for label, wall, out in rows:
        t = out.manifest["timings"]
        ex = out.manifest.get("executor", {})
        actors = f"{ex['actors']} ({ex['cpus_per_actor']})" if ex else "-"
        per_image = t["inference_s"] / max(1, out.scored)
        per_file = t["decode_cpu_s"] / max(1, out.discovered)
        lines.append(f"| {label} | {wall:.1f} | {args.n / wall:.2f} | {args.n / wall / base:.2f}× | {actors} | "
                     f"{per_image:.3f} | {per_file:.3f} |")
    block = "\n".join(lines) + "\n"
    print(block)
    if args.append is not None:
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write("\n" + block)


if __name__ == "__main__":
    main()
