"""CARZero on CPU: radflash's cached prompt-K/V head against the released per-image loop and the per-pair loop.

    python benchmarks/bench_carzero.py [--batch 8] [--prompts 14,190] [--iterations 2] [--warmup 1]
                                       [--pair-iterations 1] [--threads 1] [--out benchmarks/results/carzero_cpu.md]

One run, one process, random weights at the published sizes (preset ``carzero``: MAE ViT-B/16 at
224², BERT-base, the 4-layer fusion of width 768 with 4 heads, FFN 1024, MLP 1024-512-256-1; speed
depends only on shapes). For each prompt count T the same batch of B synthetic 8-bit radiographs
(512×416, so the letterbox resizes by a non-integer factor and pads) is scored by:

* radflash: ``preprocess`` → ``encode_images`` → ``module.head(tokens, text)``, where ``text`` is
  the packed prompt features (t and the keys/values of every prompt's 98 rows in every decoder
  layer) from ``encode_text``, computed once per prompt set;
* the reference (:class:`radflash.bench.carzero_reference.ReferenceCARZero`, the same weights):
  the released preprocessing → transformers ``ViTModel`` (eager, fp32) → the released
  ``get_dqn_similarities`` loop (``head(loop="image")``): per image one i2t and one t2i call of the
  ``nn.MultiheadAttention`` fusion, every prompt's keys/values projected again for every image;
* the per-pair loop (``head(loop="pair")``, head only): one i2t and one t2i call per (image,
  prompt) pair, so the image keys/values are projected again for every prompt as well.

``head`` and ``e2e`` (preprocess + encode + head) are segments of the same timed iteration;
radflash and reference iterations alternate, so a change of load on the shared machine hits both.
Prompt encoding (BERT; radflash pads to the longest prompt, the released tokenizer call to 97
pieces and aggregates words in a Python loop) is once per prompt set and reported on its own
line, measured once. Before timing, the scores of all three are checked equal (within 1e-4 of
max |S|): the ratios compare the same computation. T = 14 is the first 14 of the 190 prompts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from results_file import append_block

DEFAULT_OUT = Path(__file__).parent / "results" / "carzero_cpu.md"
IMAGE_SHAPE = (512, 416)  # H×W of the synthetic radiographs (non-square: the letterbox pads)
S_CHECK = 1e-4  # |S_ref − S_radflash| / max |S| allowed before timing (tested at 1e-5 on the tiny preset)

TITLE = """# CARZero on CPU: cached prompt keys/values vs the released per-image loop

`python benchmarks/bench_carzero.py` (random weights at the published sizes: ViT-B/16 224², BERT-base,
4-layer fusion of width 768). radflash: `module.head(tokens, text)` with the prompt features (t and every
layer's prompt keys/values) computed once per prompt set. Reference: the released `get_dqn_similarities`
loop with the same weights (per image one i2t and one t2i call of the `nn.MultiheadAttention` fusion; every
prompt's keys/values projected again for every image). Per-pair: one i2t and one t2i call per (image,
prompt) pair. `e2e` = preprocess + encode + head per batch of B (prompt encoding excluded: once per prompt
set, its own line). Compare ratios within a block: the 2 cores are shared with other jobs.
"""


@dataclass
class Samples:
    """Seconds per timed iteration, by side and stage."""

    ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, side: str, stage: str, seconds: float) -> None:
        self.ms.setdefault(side, {}).setdefault(stage, []).append(1e3 * seconds)

    def median(self, side: str, stage: str) -> float | None:
        values = self.ms.get(side, {}).get(stage)
        return float(np.median(values)) if values else None

    def count(self, side: str, stage: str) -> int:
        return len(self.ms.get(side, {}).get(stage, []))


def synthetic_images(b: int) -> list[np.ndarray]:
    """B smooth chest-like uint8 images with a little noise (seeded)."""
    rng = np.random.default_rng(0)
    h, w = IMAGE_SHAPE
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for k in range(b):
        img = 0.5 + 0.3 * np.sin(3 * xx + k) * np.cos(2 * yy) - 0.2 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) * 8)
        out.append((255 * np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)).astype(np.uint8))
    return out


def build(name: str, threads: int):
    from radflash.api import RadFlashModel
    from radflash.bench.carzero_reference import ReferenceCARZero
    from radflash.checkpoints.factory import random_checkpoint

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rf = RadFlashModel(random_checkpoint(name, seed=0, model_id=f"random-{name}"), device="cpu",
                       dtype=torch.float32)
    ref = ReferenceCARZero.from_model(rf)
    print(f"models built in {time.perf_counter() - t0:.0f} s", flush=True)
    return rf, ref


def check_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    if not err <= S_CHECK:
        raise SystemExit(f"{name}: scores differ from radflash's by {err:.2e} of max |S| (> {S_CHECK}); not timing")
    print(f"  {name}: S equal to radflash's within {err:.1e} of max |S|", flush=True)


@torch.inference_mode()
def iteration(clock, model, images: list[np.ndarray], text) -> torch.Tensor:
    """preprocess → encode → head on one side (radflash or the reference), a clock mark after each."""
    pixels = model.preprocess(images)
    clock.mark("preprocess")
    tokens = model.encode_images(pixels=pixels) if hasattr(model, "encode_images") else model.image_tokens(pixels)
    clock.mark("encode")
    if hasattr(model, "module"):  # radflash: the family head on the cached packed prompt features
        scores, _ = model.module.head(tokens, text)
    else:  # the reference: the released per-image loop
        scores, _ = model.head(tokens, text, loop="image")
    clock.mark("head")
    return scores


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from radflash.bench.carzero_reference import ReferenceText
    from radflash.bench.inputs import bench_prompts
    from radflash.util.timing import StageClock

    rf, ref = build(args.preset, args.threads)
    counts = sorted(args.prompts)
    prompts = bench_prompts(counts[-1], list(rf.default_prompts.values()))
    images = synthetic_images(args.batch)
    cpu = torch.device("cpu")
    once: dict[str, float] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        rf.encode_text(prompts)
        once["radflash"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_text_all = ref.text_features(prompts)
        once["reference"] = time.perf_counter() - t0
    print(f"prompt encoding, T={len(prompts)}: radflash {once['radflash']:.1f} s, reference {once['reference']:.1f} s",
          flush=True)

    rows = []
    warm = args.warmup
    for t in counts:
        text_rf = rf.encode_text(prompts[:t])  # from the per-prompt cache
        text_ref = ReferenceText(ref_text_all.words[:t], ref_text_all.sent[:t])
        outputs: dict[str, torch.Tensor] = {}
        sides = (("radflash", rf, text_rf), ("reference", ref, text_ref))
        samples = Samples()
        clock = StageClock(cpu)
        for r in range(warm + args.iterations):
            heads = {}
            for side, model, text in sides:
                clock.start()
                outputs[side] = iteration(clock, model, images, text)
                stages = clock.stop()
                heads[side] = 1e3 * stages["head"]
                if r >= warm:
                    samples.add(side, "head", stages["head"])
                    samples.add(side, "e2e", stages["total"])
            print(f"  T={t} round {r + 1}/{warm + args.iterations}{' (warm-up)' if r < warm else ''}: head "
                  f"radflash {heads['radflash']:.0f} ms, reference {heads['reference']:.0f} ms", flush=True)
        warm = 0  # the first prompt count warmed both sides up
        # the heads compared on the same tokens (each side's own preprocessing rounds differently: the
        # reference to 8 bits, as cv2 does); the towers' equality is tested on the tiny preset
        tokens = ref.image_tokens(ref.preprocess(images))
        with torch.inference_mode():
            want, _ = rf.module.head(tokens, text_rf)
        check_equal(f"T={t} reference (per-image loop)", ref.head(tokens, text_ref, loop="image")[0], want)
        pair_s = []
        for _ in range(args.pair_iterations):
            t0 = time.perf_counter()
            pair_scores, _ = ref.head(tokens, text_ref, loop="pair")
            pair_s.append(time.perf_counter() - t0)
        if pair_s:
            samples.ms.setdefault("pair", {})["head"] = [1e3 * s for s in pair_s]
            check_equal(f"T={t} per-pair loop", pair_scores, want)
        rows.append({"t": t, "samples": samples})
        print(f"T={t}: head radflash {samples.median('radflash', 'head'):.0f} ms, reference "
              f"{samples.median('reference', 'head'):.0f} ms, per-pair {samples.median('pair', 'head') or 0:.0f} ms",
              flush=True)
    return rows, {"prompt_encoding_s": once, "t_max": len(prompts)}


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.3g}")


def ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.1f}×"


def markdown(args: argparse.Namespace, rows: list[dict], extra: dict, load_start: float, wall_s: float) -> str:
    from radflash.bench.harness import carzero_head_flops
    from radflash.models.config import preset
    from radflash.util.sysinfo import machine_info, one_line

    cfg = preset(args.preset)
    b = args.batch
    lines = [
        f"## {datetime.date.today()} · CPU · preset {args.preset} · B = {b} · "
        f"T = {', '.join(str(r['t']) for r in rows)}",
        "",
        f"- machine: {one_line(machine_info('cpu'))} · {torch.get_num_threads()} torch thread(s) · python "
        f"{platform.python_version()} · load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        f"- {args.iterations} timed iterations per side after {args.warmup} warm-up round (medians); per-pair "
        f"loop {args.pair_iterations} iteration(s), head only; whole run {wall_s / 60:.1f} min",
        f"- images: {b} synthetic 8-bit {IMAGE_SHAPE[0]}×{IMAGE_SHAPE[1]} radiographs; fp32, eager",
        "",
        "| B | T | stage | radflash ms | reference ms (released per-image loop) | ratio | per-pair loop ms | ratio "
        "| radflash head GFLOP/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        t, s = row["t"], row["samples"]
        for stage in ("head", "e2e"):
            ours, theirs, pair = s.median("radflash", stage), s.median("reference", stage), s.median("pair", stage)
            gflops = (f"{carzero_head_flops(cfg, b, t) / (ours / 1e3) / 1e9:.1f}"
                      if stage == "head" and ours else "—")
            lines.append(f"| {b} | {t} | {stage} | {fmt_ms(ours)} | {fmt_ms(theirs)} | {ratio(theirs, ours)} | "
                         f"{fmt_ms(pair)} | {ratio(pair, ours)} | {gflops} |")
    once = extra["prompt_encoding_s"]
    lines.append(f"| — | {extra['t_max']} | prompt encoding (once per prompt set) | {fmt_ms(1e3 * once['radflash'])} | "
                 f"{fmt_ms(1e3 * once['reference'])} | {ratio(once['reference'], once['radflash'])} | — | — | — |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Images per batch B.")
    parser.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")], default=[14, 190],
                        help="Comma-separated prompt counts T.")
    parser.add_argument("--iterations", type=int, default=2, help="Timed iterations per side and T.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds before the first T.")
    parser.add_argument("--pair-iterations", type=int, default=1, help="Timed runs of the per-pair loop (0: skip).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a machine shared with other jobs, see `radflash bench --threads`).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to append the block to.")
    parser.add_argument("--preset", default="carzero", help="Model preset (carzero-tiny: a seconds-long smoke run).")
    args = parser.parse_args()
    if args.batch < 1 or args.iterations < 1 or args.warmup < 0 or args.pair_iterations < 0 or min(args.prompts) < 1:
        parser.error("batch, iterations and prompt counts must be ≥ 1; warmup and pair-iterations ≥ 0")
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    rows, extra = run(args)
    append_block(args.out, TITLE, markdown(args, rows, extra, load_start, time.perf_counter() - start))


if __name__ == "__main__":
    main()
