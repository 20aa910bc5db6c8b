"""CPU encoder: every runtime × precision, radflash's ``auto`` choice and OpenVINO standalone, side by side.

    python benchmarks/bench_cpu_precision.py --model base --batch-sizes 1 --iterations 3

Times the image tower (the ≥95% of the work that precision and runtime change) of a preset model in
interleaved rounds (each round runs every candidate once, so load from other jobs on a shared machine
hits all of them alike), after one warm-up each, on the same preprocessed phantoms; reports images/s,
the ratio to eager float32, the fraction of the GEMM rate measured in the candidate's own precision
in the same run (FLOPs from :func:`radflash.bench.harness.encoder_flops`), and the max |Δprob| against
eager float32 over the model's default prompts (the bound ``auto`` applies: 0.02). The OpenVINO peer
is the same exported graph compiled with OpenVINO's own CPU defaults. ``auto`` is what
``--backend auto --dtype auto`` picks here (its own measurement, then timed like the others), and
also timed alone, before any other runtime exists in the process, as ``score`` runs it (the table's
rows share one process with a dozen compiled runtimes and their idle thread pools).
Appends a markdown block to ``benchmarks/results/cpu-<cpu kind>.md`` (:func:`radflash.util.sysinfo.cpu_kind`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from results_file import append_block

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="preset (random weights of that size): base, tiny, carzero")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results file (default: one per CPU model)")
    parser.add_argument("--quantize", action="store_true",
                        help="first make the NNCF INT8 OpenVINO model of the preset (what `radflash calibrate quantize "
                             "--backend openvino` does; kept in the cache by model hash, reused when present), so "
                             "the table has an openvino/int8 row and auto can choose it")
    parser.add_argument("--profile", action="store_true",
                        help="also say where the OpenVINO rows' time goes (the CPU plugin's per-node counters: weight "
                             "GEMMs, attention, the rest), each group's rate against its precision's GEMM rate")
    args = parser.parse_args()

    from radflash.api import RadFlashModel
    from radflash.backends import make_backend
    from radflash.backends.auto import probabilities, probe_pixels, probe_prompts
    from radflash.backends.openvino import OpenVINOBackend
    from radflash.bench.harness import (
        encoder_attention_flops,
        encoder_flops,
        float_attention,
        gemm_rates,
        int8_yardsticks,
        unquantised_precision,
    )
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.devices import native_precisions
    from radflash.errors import BackendUnavailable, InputError
    from radflash.models.config import preset
    from radflash.util.sysinfo import cpu_kind, cpu_slug, package_version

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.model)
    model = RadFlashModel(random_checkpoint(cfg, seed=0, model_id=f"random-{args.model}"), device="cpu")
    flops = encoder_flops(cfg, cfg.image_size)
    attention = encoder_attention_flops(cfg, cfg.image_size)
    quantized = None
    if args.quantize:
        quantized = quantize(model)
    rates = gemm_rates(["fp32", *native_precisions()], torch.device("cpu"))
    lines = [f"## {datetime.now(timezone.utc).isoformat(timespec='seconds')} · {cpu_kind()} · "
             f"{torch.get_num_threads()} threads · {args.model} encoder S={cfg.image_size} "
             f"({flops / 1e9:.0f} GFLOP/image, {attention / 1e9:.0f} of them in attention's activation products)", "",
             "- GEMM rates measured here (n=1024): "
             + ", ".join(f"{k} {v / 1e9:.0f} G(FL)OP/s" for k, v in rates.items()),
             f"- versions: torch {torch.__version__}, onnxruntime {package_version('onnxruntime')}, "
             f"openvino {package_version('openvino')}, nncf {package_version('nncf')}",
             f"- interleaved rounds: {args.iterations} timed batches per candidate after 1 warm-up; ratio = "
             "eager fp32 median / candidate median in the same run"]
    if quantized:
        lines.append(f"- openvino/int8: {quantized}")
    lines.append("")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        pixels = probe_pixels(model, b)
        prompts = probe_prompts(model)
        # auto first, in a process holding no other backend (as in `score`): its measurement and its choice
        # are not slowed by a dozen compiled runtimes alive beside them
        start = time.perf_counter()
        auto = make_backend("auto", model, precision="auto", batch_size=b)
        auto_s = time.perf_counter() - start
        sel = auto.selection
        with torch.inference_mode():  # alone in the process, as `score` runs it (the table's rows share it)
            alone = []
            for _ in range(args.iterations):
                t = time.perf_counter()
                auto.encode(pixels)
                alone.append(time.perf_counter() - t)
        candidates = {}
        for name, prec in [("eager", "fp32"), ("eager", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                           ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]:
            if prec not in native_precisions():
                continue
            try:
                candidates[f"{name}/{prec}"] = make_backend(name, model, precision=prec, batch_size=b)
            except (BackendUnavailable, InputError, ImportError) as exc:
                print(f"skip {name}/{prec}: {exc}")
        # The peers: the same graphs compiled with OpenVINO's own CPU defaults, no radflash settings — the
        # float32 export (OpenVINO picks its precision) and, where it exists, the same NNCF INT8 model.
        for prec in ("fp32", "int8"):
            try:
                peer = OpenVINOBackend(model, precision=prec, config={}, cache=False)
            except (BackendUnavailable, InputError, ImportError) as exc:
                print(f"skip openvino standalone {prec}: {exc}")
                continue
            peer._queue = None  # OpenVINO's defaults: one synchronous request
            raw = peer.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            candidates["openvino-standalone/int8" if prec == "int8" else f"openvino-standalone/default={raw}"] = peer
        candidates[f"auto→{sel['chosen']}/{sel['precision']}"] = auto
        with torch.inference_mode():
            ref = probabilities(model, model.module.image_tokens(pixels), prompts)
            dprob = {}
            for name, backend in candidates.items():  # warm-up + agreement
                dprob[name] = float((probabilities(model, backend.encode(pixels), prompts) - ref).abs().max())
            samples: dict[str, list[float]] = {n: [] for n in candidates}
            for _ in range(args.iterations):
                for name, backend in candidates.items():
                    t = time.perf_counter()
                    backend.encode(pixels)
                    samples[name].append(time.perf_counter() - t)
        med = {n: statistics.median(s) for n, s in samples.items()}
        base = med["eager/fp32"]
        lines += [f"### batch {b}", "",
                  f"auto's own measurement took {auto_s:.1f} s ({'cached' if sel['cached'] else 'measured'}): "
                  f"{sel['reason']}", "", measurement_line(sel), "",
                  f"auto's encoder alone in the process (timed right after its choice, before any other runtime "
                  f"was built, as `score` runs it; median of {args.iterations}): "
                  f"{b / statistics.median(alone):.3g} img/s", "",
                  "| candidate | img/s | × eager fp32 | fraction of GEMM rate | max abs Δprob |",
                  "|---|---|---|---|---|"]
        for name, m in med.items():
            tail = re.split(r"[/=]", name)[-1]
            prec = {"f32": "fp32", "float32": "fp32", "bfloat16": "bf16", "f16": "fp16"}.get(tail, tail)
            rate = rates.get(prec)
            frac = "—" if rate is None else f"{flops * b / m / rate:.0%} of {prec}"
            if prec == "int8":  # also against the mix the recipe builds, and the dynamic-Linear rate
                rest = unquantised_precision(name.removeprefix("auto→"), candidates[name])
                yardsticks = int8_yardsticks(cfg, cfg.image_size, rates, rest=rest,
                                             float_share=float_attention(candidates[name]))
                frac += "".join(f"; {flops * b / m / r:.0%} of {k}" for k, r in yardsticks.items())
            lines.append(f"| {name} | {b / m:.3g} | {base / m:.2f}× | {frac} | {dprob[name]:.2g} |")
        lines.append("")
        if args.profile:
            lines += profile_lines(candidates, pixels, rates, flops=flops, attention=attention)
    out = args.out or RESULTS / f"cpu-{cpu_slug()}.md"
    append_block(out, f"# CPU encoder paths on {cpu_kind()}", "\n".join(lines))


def profile_lines(candidates: dict[str, Any], pixels: torch.Tensor, rates: dict[str, float], *, flops: float,
                  attention: float) -> list[str]:
    """Per OpenVINO row (radflash's settings and auto's), where a batch's time goes by the plugin's own counters."""
    from radflash.backends.openvino import OpenVINOBackend
    from radflash.bench.harness import float_attention, mixed_rate, unquantised_precision
    from radflash.bench.openvino_profile import profile

    lines = ["| OpenVINO row | group | ms per batch | share | achieved G(FL)OP/s | fraction of |",
             "|---|---|---|---|---|---|"]
    for name, backend in candidates.items():
        if not isinstance(backend, OpenVINOBackend) or "standalone" in name:
            continue
        share = float_attention(backend) if backend.precision == "int8" else 0.0
        rest = unquantised_precision("openvino", backend)
        for g in profile(backend, pixels, flops={"weight GEMMs": flops - attention, "attention": attention}):
            if g.name != "attention" or share == 0.0:
                prec, rate = backend.precision, rates.get(backend.precision)
            elif share == 1.0:
                prec, rate = rest, rates.get(rest)
            else:  # Q·Kᵀ in int8, P·V in the rest precision: the bound of that mix
                prec = f"int8 Q·Kᵀ + {rest} P·V" if share == 0.5 else f"int8 + {share:.0%} {rest}"
                rate = (None if "int8" not in rates or rest not in rates
                        else mixed_rate(rates["int8"], rates[rest], share))
            of = "—" if g.rate is None or rate is None else f"{g.rate / rate:.0%} of {prec}"
            achieved = "—" if g.rate is None else f"{g.rate / 1e9:.0f}"
            lines.append(f"| {name} | {g.name} | {1e3 * g.seconds:.1f} | {g.share:.0%} | {achieved} | {of} |")
    return [*lines, ""]


def quantize(model: RadFlashModel) -> str:
    """The preset's NNCF INT8 OpenVINO IR, made like ``radflash calibrate quantize --backend openvino`` makes it
    (:func:`radflash.calibration.quantize.quantize_openvino`: 16 demo phantoms, 8 held out for the report) unless
    the cache has it already (a random preset has no checkpoint folder: the IR is kept by model hash,
    :func:`radflash.backends.openvino.int8_model_path`). Returns a line for the results block."""
    from radflash.backends.openvino import int8_model_path
    from radflash.calibration.quantize import quantize_openvino
    from radflash.errors import BackendUnavailable, InputError

    path = int8_model_path(model)
    if path.exists() and path.with_suffix(".bin").exists():
        return f"NNCF INT8 IR reused from {path}"
    start = time.perf_counter()
    try:
        report = quantize_openvino(model)
    except (BackendUnavailable, InputError, ImportError) as exc:
        print(f"skip --quantize: {exc}")
        return f"not quantised ({exc})"
    summary = report.summary().replace("\n", "; ")
    return f"NNCF INT8 IR made here in {time.perf_counter() - start:.0f} s: {summary}"


def measurement_line(sel: dict[str, Any]) -> str:
    """What auto's measurement cost and what each candidate became (from its decision record)."""
    if sel.get("measure_s") is None:
        return f"auto did not measure here: {sel['reason']}"
    statuses: dict[str, list[str]] = {}
    for name, c in sel.get("candidates", {}).items():
        if c.get("status") != "left out":
            statuses.setdefault(c["status"], []).append(name)
    cached = f" (when measured, {sel.get('measured_at')}; cached now)" if sel.get("cached") else ""
    return (f"auto's measurement{cached}: {sel['measure_s']:.1f} s of warm-ups and timed batches + "
            f"{sel.get('build_s', 0):.1f} s of builds; screened at batch {sel.get('screen_batch')}; "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in statuses.items()))


if __name__ == "__main__":
    main()
