"""``score`` end to end on real-size JPEG 2000 films, with and without ``--fast-decode``, against the
pipeline limit cores ÷ Σ(stage core-seconds per image) (#29 item 5).

    python benchmarks/bench_pipeline_limit.py [--films 12] [--model base] [--backend openvino --dtype bfloat16]
        [--rounds 2] [--workers N] [--batch-size 1] [--nice-baseline] [--quantize]
        [--out benchmarks/results/pipeline-limit-cpu.md]

The stage costs come from :func:`radflash.bench.pipeline_limit.stage_costs` (the same code as
``radflash bench --films``); the two score modes run interleaved (full, fast, full, fast...) on the
same archive, and each run's images/s is the pipeline's own (``manifest.json`` timings: decode,
resize, encode and write overlapped; model load and the fast run's agreement probe excluded).
``--nice-baseline`` adds full-decode runs with the decode workers at nice 0, the measurement behind
:data:`radflash.archive.decode_pool.DECODE_NICE`. The CPU is named in the results; compare ratios
from one run only on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from results_file import append_block

MACHINE_KEYS = ("cpu", "cpu_cores_usable", "torch_threads", "versions")
RESULTS = Path(__file__).resolve().parent / "results" / "pipeline-limit-cpu.md"


def _model(name: str, backend: str, dtype: str | None, *, quantize: bool = False):
    from radflash.api import RadFlashModel, as_model
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.models.config import PRESETS

    if name in PRESETS and not Path(name).exists():
        model = RadFlashModel(random_checkpoint(name, seed=0, model_id=f"random-{name}"), device="cpu")
    else:
        model = as_model(None if name == "demo" else name, device="cpu")
    if quantize:  # the NNCF INT8 OpenVINO model (in the cache by model hash), for --dtype int8 or auto
        from radflash.backends.openvino import int8_model_path
        from radflash.calibration.quantize import quantize_openvino

        if not int8_model_path(model).exists():  # made once per model and versions
            quantize_openvino(model)
    if backend != "eager" or dtype:
        model.set_backend(backend, dtype=dtype)
    return model


def _cpu_family() -> str:
    """' (family F model M)' from /proc/cpuinfo: 'AMD EPYC' alone does not name the generation."""
    try:
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                                                  Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)}
        return f" (family {info['cpu family']} model {info['model']})"
    except (OSError, KeyError, ValueError):
        return ""


def _score(archive: Path, out: Path, model, args, *, fast: bool, nice: int) -> dict:
    """One ``score`` run; its images/s over the pipeline's own wall time (model load excluded)."""
    from unittest import mock

    import radflash.archive.verb as verb
    from radflash.archive.pipeline import PipelineConfig

    config = functools.partial(PipelineConfig, decode_nice=nice)  # the decode workers' niceness, for this run only
    with mock.patch.object(verb, "PipelineConfig", config):
        run = verb.score(archive, out, model=model, batch_size=args.batch_size, workers=args.workers,
                         fast_decode=fast, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["timings"]
    return {"images_per_s": run.scored / t["pipeline_wall_s"], "wall_s": t["pipeline_wall_s"],
            "decode_cpu_s": t["decode_cpu_s"], "agreement": manifest["decode"].get("agreement"),
            "cores": manifest.get("cores"), "scored": run.scored}


def main() -> None:
    import torch

    from radflash.archive.decode_pool import DECODE_NICE
    from radflash.bench.pipeline_limit import stage_costs, write_films
    from radflash.util.sysinfo import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=int, default=12, help="JPEG 2000 films in the scored archive")
    ap.add_argument("--model", default="base", help="preset (random weights), checkpoint path, or 'demo'")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="decode processes beside the encoder (default: score's)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every mode")
    ap.add_argument("--nice-baseline", action="store_true",
                    help=f"also score in full with the decode workers at nice 0 (score's: {DECODE_NICE})")
    ap.add_argument("--quantize", action="store_true",
                    help="make the OpenVINO INT8 model first (for --dtype int8, or one auto may choose)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    machine = machine_info(torch.device("cpu"))
    model = _model(args.model, args.backend, args.dtype, quantize=args.quantize)
    modes = {"full": (False, DECODE_NICE), "fast": (True, DECODE_NICE)}
    if args.nice_baseline:
        modes["full, nice 0"] = (False, 0)
    with tempfile.TemporaryDirectory(prefix="radflash-pipeline-limit-") as tmp:
        t0 = time.perf_counter()
        costs_films = write_films(Path(tmp) / "costs", 2)
        archive = write_films(Path(tmp) / "archive", args.films, ("j2k",))["j2k"][0].parent
        print(f"films written in {time.perf_counter() - t0:.0f} s")
        costs = stage_costs(model, costs_films, batch_size=args.batch_size)
        print(costs.markdown())
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode, (fast, nice) in modes.items():
                runs[mode].append(_score(archive, Path(tmp) / f"run-{len(runs[mode])}-{r}-{fast}-{nice}", model, args,
                                         fast=fast, nice=nice))
                x = runs[mode][-1]
                print(f"round {r} {mode}: {x['images_per_s']:.3f} img/s ({x['scored']} films in {x['wall_s']:.1f} s)")
    best = {m: max(x["images_per_s"] for x in v) for m, v in runs.items()}
    limits = {"full": costs.row("j2k", "full").limit_images_per_s, "fast": costs.row("j2k", "fast").limit_images_per_s}
    limit = {m: limits["fast" if fast else "full"] for m, (fast, _) in modes.items()}
    worst_dprob = max(x["agreement"]["max_abs_dprob"] for x in runs["fast"])
    cpu = f"{machine.get('cpu') or 'CPU'}{_cpu_family()}"
    split = runs["full"][0]["cores"]
    lines = [
        f"\n## {datetime.now(timezone.utc).date()} — {cpu}, {costs.cores} cores; {costs.model} {costs.image_size}², "
        f"{costs.backend} {costs.precision}, batch {args.batch_size}, {split['decode_workers']} decode worker(s) "
        f"beside {split['encoder_threads']} encoder threads\n",
        f"`python benchmarks/bench_pipeline_limit.py --films {args.films} --model {args.model} "
        f"--backend {args.backend} --dtype {args.dtype} --batch-size {args.batch_size}"
        + ("" if args.workers is None else f" --workers {args.workers}")
        + f" --rounds {args.rounds}{' --nice-baseline' if args.nice_baseline else ''}"
        + f"{' --quantize' if args.quantize else ''}`\n",
        "Stage costs (core-seconds per image, 3000×2500 12-bit phantom films):\n",
        costs.markdown(),
        f"score on {args.films} JPEG 2000 films, {args.rounds} interleaved rounds (best round; all rounds: "
        + "; ".join(f"{m} " + ", ".join(f"{x['images_per_s']:.3f}" for x in v) for m, v in runs.items()) + "):\n",
        "| mode | decode nice | img/s | pipeline limit img/s | fraction of limit |\n|---|---|---|---|---|",
        *(f"| {m} | {modes[m][1]} | {best[m]:.3f} | {limit[m]:.3f} | {best[m] / limit[m]:.0%} |" for m in modes),
        "\nPer interleaved round, fast / full: " + ", ".join(
            f"{f['images_per_s'] / g['images_per_s']:.2f}×" for g, f in zip(runs["full"], runs["fast"])) + ".",
        f"\n`--fast-decode` / full, best rounds: **{best['fast'] / best['full']:.2f}×** (target ≥ 1.5×); "
        f"max |Δprob| on the probe batch: {worst_dprob:.4g} (target ≤ 0.02).\n",
        f"Machine: {json.dumps({k: machine.get(k) for k in MACHINE_KEYS})}\n",
    ]
    append_block(args.out, "# score vs the pipeline limit (cores ÷ Σ stage core-seconds per image)", "\n".join(lines))


if __name__ == "__main__":
    main()
