"""``score --dtype auto`` end to end against ``score --dtype float32`` on real-size films (#29's second target).

    python benchmarks/bench_score_auto.py [--films 12] [--model base] [--syntax explicit] [--batch-size 1]
        [--quantize] [--rounds 2] [--out FILE]  (default: benchmarks/results/score-auto-<cpu kind>.md)

What a user runs: a checkpoint folder (random weights of a preset, written to a temporary folder) given
to ``score`` by path, on an archive of 3000×2500 12-bit films. With ``--quantize`` the NNCF INT8
OpenVINO model is made beside the checkpoint first (``radflash calibrate quantize --backend openvino``
on the demo phantoms), so ``auto`` may choose it. The first ``auto`` run pays ``auto``'s own
measurement (reported from its manifest, with the choice and every candidate's timing); then
``--dtype float32`` and ``--dtype auto`` (the cached decision) run in interleaved rounds. Each run's
images/s is the pipeline's own (``manifest.json``: scored ÷ ``pipeline_wall_s``; model load excluded).
The auto decision cache is a fresh folder (``RADFLASH_CACHE``), so the measurement is this run's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from results_file import append_block

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=int, default=12)
    ap.add_argument("--model", default="base", help="preset whose random-weight checkpoint is scored")
    ap.add_argument("--syntax", default="explicit", help="explicit, rle or j2k")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: score's)")
    ap.add_argument("--quantize", action="store_true", help="make the OpenVINO INT8 model first (auto may pick it)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results file (default: one per CPU kind)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="radflash-score-auto-") as tmp:
        os.environ["RADFLASH_CACHE"] = str(Path(tmp) / "cache")  # before radflash reads it: a fresh decision
        os.environ.setdefault("RADFLASH_NO_DEMO_NOTICE", "1")
        run_all(args, Path(tmp))


def run_all(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from radflash.archive.verb import score
    from radflash.bench.pipeline_limit import write_films
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint
    from radflash.util.sysinfo import cpu_kind, cpu_slug, machine_info

    ckpt = save_checkpoint(random_checkpoint(args.model, seed=0, model_id=f"random-{args.model}"), tmp / "ckpt")
    t0 = time.perf_counter()
    archive = write_films(tmp / "films", args.films, (args.syntax,))[args.syntax][0].parent
    print(f"{args.films} {args.syntax} films written in {time.perf_counter() - t0:.0f} s")
    quant = None
    if args.quantize:
        from radflash.calibration.quantize import quantize_openvino

        t0 = time.perf_counter()
        report = quantize_openvino(str(ckpt))
        written = json.loads(report.path.with_suffix(".json").read_text())  # the agreement report beside it
        quant = {"seconds": round(time.perf_counter() - t0, 1), "max_abs_dprob": written["max_abs_dprob"]}
        print(f"INT8 OpenVINO model made in {quant['seconds']} s (max |Δprob| {quant['max_abs_dprob']:.4g})")

    def one(dtype: str, tag: str) -> dict:
        out = tmp / f"run-{tag}"
        run = score(archive, out, model=str(ckpt), dtype=dtype, batch_size=args.batch_size, workers=args.workers,
                    progress=False)
        m = json.loads((out / "manifest.json").read_text())
        ips = run.scored / m["timings"]["pipeline_wall_s"]
        print(f"{tag}: {ips:.3f} img/s ({m['backend']}/{m['precision']}, load {m['timings']['load_model_s']:.1f} s)")
        return {"images_per_s": ips, "manifest": m}

    first = one("auto", "auto-first")  # pays the measurement; its decision is cached for the rounds
    runs: dict[str, list[float]] = {"float32": [], "auto": []}
    for r in range(args.rounds):
        for dtype in runs:
            runs[dtype].append(one(dtype, f"{dtype}-{r}")["images_per_s"])
    med = {d: statistics.median(v) for d, v in runs.items()}
    m = first["manifest"]
    sel = m.get("backend_selection") or {}
    machine = machine_info(torch.device("cpu"))
    timed = {n: c for n, c in sel.get("candidates", {}).items() if c.get("ms_per_batch") is not None}
    lines = [
        f"\n## {datetime.now(timezone.utc).isoformat(timespec='seconds')} · {cpu_kind()} · "
        f"{machine.get('cpu_cores_usable')} cores · random {args.model}, {args.films} {args.syntax} 3000×2500 films, "
        f"batch {args.batch_size}\n",
        f"`python benchmarks/bench_score_auto.py --films {args.films} --model {args.model} --syntax {args.syntax} "
        f"--batch-size {args.batch_size} --rounds {args.rounds}{' --quantize' if args.quantize else ''}`\n",
        f"- auto chose **{m['backend']}/{m['precision']}**: {sel.get('reason')}",
        f"- auto's measurement (first run's model load, measurement included): {m['timings']['load_model_s']:.1f} s"
        + (f"; measure_s {sel['measure_s']}" if "measure_s" in sel else ""),
        "- candidates (ms per batch): " + (", ".join(f"{n} {c['ms_per_batch']:.0f}" for n, c in timed.items())
                                           or "none timed"),
        f"- cores: {json.dumps(m.get('cores'))}",
        *([f"- INT8 model made in {quant['seconds']} s, max |Δprob| {quant['max_abs_dprob']:.4g}"] if quant else []),
        "",
        "| score | img/s (median) | rounds | × float32 |",
        "|---|---|---|---|",
        *(f"| --dtype {d} | {med[d]:.3f} | {', '.join(f'{x:.3f}' for x in runs[d])} | {med[d] / med['float32']:.2f}× |"
          for d in runs),
        "",
        f"`score --dtype auto` / `--dtype float32`: **{med['auto'] / med['float32']:.2f}×** (target ≥ 2× on a CPU "
        "with native bf16 or VNNI, ≥ 1.5× on AVX2 only).",
        "",
    ]
    out = args.out or RESULTS / f"score-auto-{cpu_slug()}.md"
    append_block(out, "# score --dtype auto vs --dtype float32, end to end", "\n".join(lines))


if __name__ == "__main__":
    main()
