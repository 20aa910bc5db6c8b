"""Stage costs in core-seconds per image on real-size films, and the pipeline limit they imply.

On a small CPU every stage of ``score`` competes for the same cores: decode workers, the feed
thread's resize, the encoder and the head. Wall time per stage says little there (stages overlap,
threads wait); CPU time does: if one image costs Σ core-seconds over all stages, ``cores`` cores
cannot score more than ``cores / Σ`` images per second however the threads are split. That is
the limit ``score``'s images/s is measured against (``benchmarks/bench_pipeline_limit.py``).

How each stage is timed, where it runs in ``score``:

* decode: in a spawn process that imports no torch (as the decode workers), ``resource.getrusage``
  of that process around the loader, per syntax, in full and (where the syntax can reduce)
  ``--fast-decode`` mode;
* resize: in this process, process CPU time around :func:`resize_for_model` (torch may use
  several threads: their CPU time counts);
* encoder and head: process CPU time around ``encode_images`` and ``score(tokens=...)`` over
  whole batches, divided by the batch size.

How ``score`` shares the cores is not tuned here: it runs the encoder with one thread per core and
the decode workers beside it at a lower priority (:data:`radflash.archive.decode_pool.DECODE_NICE`,
whose docstring gives the measurement); this module measures what each stage costs, and
``benchmarks/bench_pipeline_limit.py`` how close ``score`` comes to the limit.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

FILM_SHAPE = (3000, 2500)  # rows × columns: a 35×43 cm plate at ~0.14 mm
FILM_SYNTAXES = {  # name → transfer syntax UID (None: explicit VR little endian)
    "explicit": None,
    "rle": "1.2.840.10008.1.2.5",
    "j2k": "1.2.840.10008.1.2.4.90",
}
REDUCIBLE = ("j2k",)  # syntaxes whose --fast-decode row is measured too


def write_films(folder: str | Path, n: int, syntaxes: Sequence[str] = tuple(FILM_SYNTAXES), *,
                distinct: int = 3, seed: int = 0) -> dict[str, list[Path]]:
    """``n`` 3000×2500 12-bit MONOCHROME1 phantom films per syntax (``distinct`` different phantoms,
    cycled: a phantom costs ~5 s to draw at this size, a file ~1 s to encode)."""
    from radflash.errors import InputError
    from radflash.synthetic.dicom_archive import write_dicom
    from radflash.synthetic.phantoms import generate_phantom

    unknown = [s for s in syntaxes if s not in FILM_SYNTAXES]
    if unknown:
        raise InputError(f"unknown film syntax {', '.join(unknown)}; choose from {', '.join(FILM_SYNTAXES)}")
    folder = Path(folder)
    phantoms = [generate_phantom(seed + i, FILM_SHAPE) for i in range(max(1, min(distinct, n)))]
    out: dict[str, list[Path]] = {}
    for s in syntaxes:
        out[s] = [write_dicom(phantoms[i % len(phantoms)], folder / s / f"film-{i:03d}.dcm",
                              photometric="MONOCHROME1", bits_stored=12, transfer_syntax=FILM_SYNTAXES[s],
                              seed=seed * 1000 + i) for i in range(n)]
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _decode_cost(paths: list[str], min_size: int | None) -> tuple[float, list[np.ndarray], list[str]]:
    """In a torch-free spawn process: core-seconds per image of the loader, the pixels, the decoders."""
    from radflash.io.imageio import load_image

    load_image(paths[0], min_size=min_size)  # imports and first-call costs are not per image
    t0 = _cpu_s()
    images = [load_image(p, min_size=min_size) for p in paths]
    cost = (_cpu_s() - t0) / len(paths)
    return cost, [im.pixels for im in images], [str(im.meta.decoder) for im in images]


@dataclass(frozen=True)
class StageCost:
    """One syntax and decode mode: core-seconds per image of each stage, and the limit they imply."""

    syntax: str
    mode: str  # full | fast
    decoder: str
    decoded_shape: tuple[int, int]
    decode_s: float
    resize_s: float
    encoder_s: float
    head_s: float
    cores: int

    @property
    def total_s(self) -> float:
        return self.decode_s + self.resize_s + self.encoder_s + self.head_s

    @property
    def limit_images_per_s(self) -> float:
        """cores ÷ Σ(stage core-seconds per image): no thread split can score faster."""
        return self.cores / self.total_s if self.total_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": round(self.total_s, 4),
                "limit_images_per_s": round(self.limit_images_per_s, 4)}


@dataclass
class StageCosts:
    """Every syntax's :class:`StageCost` for one model, backend, precision and batch size."""

    cores: int
    model: str
    image_size: int
    backend: str
    precision: str
    batch_size: int
    rows: list[StageCost] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"cores": self.cores, "model": self.model, "image_size": self.image_size, "backend": self.backend,
                "precision": self.precision, "batch_size": self.batch_size, "rows": [r.to_dict() for r in self.rows]}

    def row(self, syntax: str, mode: str = "full") -> StageCost | None:
        return next((r for r in self.rows if (r.syntax, r.mode) == (syntax, mode)), None)

    def markdown(self) -> str:
        head = ("| syntax | decode | decoded | decode | resize | encoder | head | Σ core-s/img | limit img/s |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        return head + "".join(
            f"| {r.syntax} | {r.mode} ({r.decoder}) | {r.decoded_shape[0]}×{r.decoded_shape[1]} | {r.decode_s:.3f} | "
            f"{r.resize_s:.3f} | {r.encoder_s:.3f} | {r.head_s:.4f} | {r.total_s:.3f} | "
            f"{r.limit_images_per_s:.3f} |\n" for r in self.rows)


def stage_costs(model: RadFlashModel, films: dict[str, list[Path]], *, batch_size: int = 1,
                repeats: int = 2, cores: int | None = None) -> StageCosts:
    """Core-seconds per image of decode (per syntax, full and fast), resize, encoder and head."""
    import torch

    from radflash.archive.decode_check import min_size_of
    from radflash.archive.decode_pool import resize_for_model
    from radflash.util.sysinfo import usable_cores

    geometry = model.preprocessing.geometry
    min_size = min_size_of(geometry)
    costs = StageCosts(cores or usable_cores(), model.model_id, model.config.image_size, model.backend_name,
                       model.precision, batch_size)
    decoded: list[tuple[str, str, float, list[np.ndarray], list[str]]] = []
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        for syntax, paths in films.items():
            for mode in ("full", "fast") if syntax in REDUCIBLE else ("full",):
                cost, pixels, names = pool.submit(_decode_cost, [str(p) for p in paths],
                                                  min_size if mode == "fast" else None).result()
                decoded.append((syntax, mode, cost, pixels, names))
    resized: list[np.ndarray] = []
    resize_cost: dict[tuple[str, str], float] = {}
    for syntax, mode, _, pixels, _ in decoded:
        t0 = time.process_time()
        out = [resize_for_model(p, geometry) for p in pixels]
        resize_cost[(syntax, mode)] = (time.process_time() - t0) / len(pixels)
        resized.extend(out)
    prompts = list(model.default_prompts.values())[:14] or ["There is pleural effusion"]
    model.encode_text(prompts)
    batch = torch.from_numpy(np.stack([resized[i % len(resized)] for i in range(batch_size)]))
    with torch.inference_mode():
        tokens = model.encode_images(pixels=model.preprocess(batch))  # warm-up (first-call costs)
        t0 = time.process_time()
        for _ in range(repeats):
            tokens = model.encode_images(pixels=model.preprocess(batch))
        encoder = (time.process_time() - t0) / (repeats * batch_size)
        model.score(tokens=tokens, prompts=prompts)
        t0 = time.process_time()
        for _ in range(repeats):
            model.score(tokens=tokens, prompts=prompts)
        head = (time.process_time() - t0) / (repeats * batch_size)
    for syntax, mode, cost, pixels, names in decoded:
        costs.rows.append(StageCost(syntax, mode, names[0], tuple(pixels[0].shape), round(cost, 4),
                                    round(resize_cost[(syntax, mode)], 4), round(encoder, 4), round(head, 5),
                                    costs.cores))
    return costs


def stage_cost_lines(costs: dict[str, Any]) -> list[str]:
    """``radflash bench --films``'s printout of a :meth:`StageCosts.to_dict`: one line per syntax and mode."""
    lines = [f"stage costs (core-s/image, {costs['cores']} cores, {costs['backend']} {costs['precision']}, "
             f"batch {costs['batch_size']}, {costs['image_size']}² input):"]
    for r in costs["rows"]:
        lines.append(f"  {r['syntax']:<9} {r['mode']:<4} decode {r['decode_s']:.3f}  resize {r['resize_s']:.3f}  "
                     f"encoder {r['encoder_s']:.3f}  head {r['head_s']:.4f}  Σ {r['total_s']:.3f}  "
                     f"→ limit {r['limit_images_per_s']:.2f} img/s")
    return lines
