"""Archive-scoring throughput: the pipeline vs a plain serial loop, and decode speed per encoding.

    python benchmarks/bench_pipeline.py [--n 64] [--size 1024] [--workers 2] [--append results.md]

* serial   : for each file, one at a time: ``try_load`` → ``model.preprocess`` → ``model.score``
             (what a user writes without radflash's pipeline).
* pipeline : ``radflash.archive.verb.score(files, workers=W)``: decode in W processes (no torch in them;
             the parent resizes), batched inference, everything written to memory. Its wall time
             includes spawning the workers.
* decode   : ``try_load`` alone, serially, per transfer syntax (images/s and decoded MP/s).

Both end-to-end paths see the same files (an equal mix of the four encodings) in the same run;
the model is the embedded demo model if present, else a random "tiny" one (same shapes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ENCODINGS = {
    "uncompressed": "1.2.840.10008.1.2.1",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
    "deflated": "1.2.840.10008.1.2.1.99",
}


def write_dicom(path: Path, size: int, syntax: str, seed: int) -> None:
    """A 12-bit chest-like DX image: smooth anatomy-ish background + noise (compresses realistically)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 2000 + 1200 * np.sin(3 * x + seed) * np.cos(2 * y) - 900 * np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) * 8)
    img = np.clip(img + rng.normal(0, 40, img.shape), 0, 4095).astype(np.uint16)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = img.tobytes()
    ts = UID(syntax)
    if ts.is_compressed:
        ds.compress(ts)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)


def make_files(root: Path, n: int, size: int) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for k, (name, syntax) in enumerate(ENCODINGS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        files[name] = []
        for i in range(n // len(ENCODINGS)):
            p = root / name / f"{i:04d}.dcm"
            write_dicom(p, size, syntax, seed=1000 * k + i)
            files[name].append(p)
    return files


def load_model():
    import radflash
    from radflash.api import DEMO_MODEL

    if (DEMO_MODEL / "config.json").exists():
        return radflash.load(device="cpu"), "demo"
    from radflash.api import RadFlashModel
    from radflash.checkpoints.factory import random_checkpoint

    return RadFlashModel(random_checkpoint("tiny", seed=0), device="cpu"), "random tiny"


def bench_serial(model, paths: list[Path], prompts: list[str], rules) -> float:
    from radflash.io.imageio import try_load

    t0 = time.perf_counter()
    for p in paths:
        out = try_load(p, rules)
        if out.status == "loaded":
            model.score(out.image.pixels, prompts)
    return time.perf_counter() - t0


def bench_decode(paths: list[Path], rules) -> tuple[float, float]:
    from radflash.io.imageio import try_load

    t0 = time.perf_counter()
    pixels = 0
    for p in paths:
        out = try_load(p, rules)
        assert out.status == "loaded", (p, out.reason)
        pixels += out.image.pixels.size
    dt_s = time.perf_counter() - t0
    return len(paths) / dt_s, pixels / dt_s / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="files in the end-to-end set (split over 4 encodings; "
                    "64 keeps a run near 1 minute on 2 cores)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--append", type=Path, default=None, help="append a Markdown row block to this file")
    args = ap.parse_args()

    import torch

    from radflash.archive.verb import score
    from radflash.findings import default_prompts
    from radflash.io.selection import SelectionRules

    rules = SelectionRules()
    model, model_name = load_model()
    prompts = list(default_prompts().values())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        files = make_files(root, args.n, args.size)
        all_files = sorted(p for ps in files.values() for p in ps)
        print(f"wrote {len(all_files)} files of {args.size}² in {time.perf_counter() - t0:.1f} s")

        model.score(np.zeros((args.size, args.size), np.float32), prompts)  # warm-up
        decode = {name: bench_decode(ps[: max(4, len(ps) // 2)], rules) for name, ps in files.items()}
        serial_s = bench_serial(model, all_files, prompts, rules)
        run = score(all_files, None, model=model, workers=args.workers, batch_size=args.batch_size,
                    progress=False)
        assert run.scored == len(all_files), run.counts
        pipe_s = run.manifest["timings"]["pipeline_wall_s"]
        inline = score(all_files, None, model=model, workers=0, batch_size=args.batch_size, progress=False)
        inline_s = inline.manifest["timings"]["pipeline_wall_s"]

    n = len(all_files)
    rows = [
        ("serial loop (1 file at a time)", serial_s, 1.0),
        (f"pipeline, --workers 0, batch {args.batch_size}", inline_s, serial_s / inline_s),
        (f"pipeline, --workers {args.workers}, batch {args.batch_size} (incl. worker start)", pipe_s,
         serial_s / pipe_s),
    ]
    header = (f"\n## {dt.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads) · model {model_name} "
              f"({model.config.image_size}²) · {n} files of {args.size}² (4 encodings)\n")
    lines = [header, "| path | wall s | images/s | speed-up vs serial |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {n / s:.1f} | {x:.2f}× |" for name, s, x in rows]
    lines += ["", "| encoding (decode only, serial) | images/s | decoded MP/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {ips:.1f} | {mps:.1f} |" for name, (ips, mps) in decode.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        args.append.parent.mkdir(parents=True, exist_ok=True)
        with open(args.append, "a", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
