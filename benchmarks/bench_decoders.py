"""Decode cost per transfer syntax and pixel-decoder plugin, on one 3000×2500 12-bit film.

Why: ``radflash.io.decoders.PREFERENCE`` orders the plugins of each syntax by this measurement,
and the README's bench table quotes it. Every plugin installed for a syntax is timed on the same
file in the same run (best of ``--repeats``, one process, file in the page cache), plus radflash's
full load (header checks, decode with the preferred plugin, modality LUT, window → [0, 1]).

The film is a synthetic phantom stored as 12 bits in 16 (8 bits for JPEG Baseline); the encoded
files come from DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv``) and pydicom's
OpenJPEG encoder, the encoders PACS use, so the decoders see real-world bit streams.

    python benchmarks/bench_decoders.py                       # writes benchmarks/results/decoders_cpu.{md,json}
    PYTHONPATH=/path/to/pylibjpeg-libjpeg python benchmarks/bench_decoders.py   # also time the GPL libjpeg

(libjpeg is GPL and no install of radflash pulls it; point PYTHONPATH at a ``pip install --target``
folder to time it without installing it.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (3000, 2500)  # rows × columns: a 35×43 cm CR plate at ~0.14 mm

# (label, transfer syntax UID, how to encode: "dcmtk <tool> <args>" or "pydicom", bits stored)
CASES = (
    ("Explicit VR Little Endian", "1.2.840.10008.1.2.1", None, 12),
    ("Explicit VR Big Endian", "1.2.840.10008.1.2.2", ("dcmconv", "+tb"), 12),
    ("Deflated Explicit VR LE", "1.2.840.10008.1.2.1.99", ("dcmconv", "+td"), 12),
    ("RLE Lossless", "1.2.840.10008.1.2.5", ("dcmcrle",), 12),
    ("JPEG Baseline (8-bit)", "1.2.840.10008.1.2.4.50", ("dcmcjpeg", "+eb"), 8),
    ("JPEG Extended (12-bit)", "1.2.840.10008.1.2.4.51", ("dcmcjpeg", "+ee"), 12),
    ("JPEG Lossless (Process 14)", "1.2.840.10008.1.2.4.57", ("dcmcjpeg", "+el"), 12),
    ("JPEG Lossless SV1", "1.2.840.10008.1.2.4.70", ("dcmcjpeg", "+e1"), 12),
    ("JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", ("dcmcjpls", "+el"), 12),
    ("JPEG 2000 Lossless", "1.2.840.10008.1.2.4.90", "pydicom", 12),
)


def film(bits: int, seed: int = 0) -> np.ndarray:
    """A phantom radiograph scaled to ``bits`` stored bits (uint16, or uint8 for 8 bits)."""
    from radflash.synthetic.phantoms import generate_phantom

    image = generate_phantom(seed, SHAPE).image.astype(np.float64)
    top = 2**bits - 1
    return np.clip(np.rint(image * top), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def write_native(path: Path, pixels: np.ndarray, bits: int) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def encode(src: Path, dst: Path, how: object) -> Path:
    if how is None:
        shutil.copyfile(src, dst)
    elif how == "pydicom":
        import pydicom
        from pydicom.uid import JPEG2000Lossless

        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(dst, enforce_file_format=True)
    else:
        tool, *args = how  # type: ignore[misc]
        subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return dst


def read_and_decode(path: Path, plugin: str) -> np.ndarray:
    """pydicom's read + decode with one named plugin ("" = pydicom's native path)."""
    import pydicom

    ds = pydicom.dcmread(path)
    if plugin:
        ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(repeats: int) -> dict:
    import pydicom

    from radflash.io import decoders
    from radflash.io.imageio import load_image
    from radflash.io.selection import SelectionRules
    from radflash.util.sysinfo import cpu_model, package_version

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {bits: write_native(Path(tmp) / f"native{bits}.dcm", film(bits), bits) for bits in (8, 12)}
        for label, uid, how, bits in CASES:
            path = encode(sources[bits], Path(tmp) / f"{uid}.dcm", how)
            reference = pydicom.dcmread(sources[bits]).pixel_array
            plugins = decoders.installed_plugins(uid) if decoders.PREFERENCE.get(uid) else ("",)
            timings: dict[str, float | None] = {}
            runnable = []
            for plugin in plugins:
                name = decoders.package_of(plugin, uid) if plugin else "native"
                if plugin and not decoders.can_read(plugin, uid, bits):
                    timings[name] = None  # the plugin refuses this bit depth
                    continue
                arr = read_and_decode(path, plugin)
                lossless = uid not in (decoders.JPEG_BASELINE, decoders.JPEG_EXTENDED)
                if lossless and not np.array_equal(arr, reference):
                    raise AssertionError(f"{label}: {name} decodes other values than were encoded")
                runnable.append((name, plugin))
            # interleaved rounds (A B C, A B C, ...): on a shared machine a load spike hits every plugin
            best: dict[str, float] = {}
            for _ in range(repeats):
                for name, plugin in runnable:
                    t = best_of(lambda f=path, p=plugin: read_and_decode(f, p), 1)
                    best[name] = min(best.get(name, t), t)
            timings.update(best)
            reason = decoders.decoder_reason(uid, bits)
            load = None
            used = None
            if reason is None:
                rules = SelectionRules.any_image()
                used = load_image(path, rules=rules).meta.decoder
                load = best_of(lambda f=path, r=rules: load_image(f, rules=r), repeats)
            size = round(path.stat().st_size / 1e6, 2)
            rows.append({"syntax": label, "uid": uid, "bits_stored": bits, "file_mb": size,
                         "decode_s": timings, "radflash_decoder": used, "radflash_load_s": load,
                         "refused": reason})
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "shape": list(SHAPE), "repeats": repeats, "rows": rows,
        "versions": {p: package_version(p) for p in ("pydicom", "python-gdcm", "pylibjpeg", "pylibjpeg-openjpeg",
                                                      "pylibjpeg-rle", "pylibjpeg-libjpeg", "pyjpegls", "pillow")},
    }


def markdown(result: dict) -> str:
    lines = [f"# Decode cost per transfer syntax ({result['shape'][0]}×{result['shape'][1]} film)", "",
             f"CPU: {result['cpu']} · {result['date']} · best of {result['repeats']} interleaved rounds · one process, "
             "file in the page cache · `python benchmarks/bench_decoders.py`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v), "",
             "| syntax | bits | file MB | decode per plugin (ms) | radflash uses | radflash load (ms) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        per = ", ".join(f"{k} {v * 1e3:.0f}" if v is not None else f"{k} refuses" for k, v in r["decode_s"].items())
        load = f"{r['radflash_load_s'] * 1e3:.0f}" if r["radflash_load_s"] is not None else f"skipped: {r['refused']}"
        lines.append(f"| {r['syntax']} | {r['bits_stored']} | {r['file_mb']} | {per or '-'} | "
                     f"{r['radflash_decoder'] or '-'} | {load} |")
    lines += ["", "radflash load = header checks + decode with the preferred plugin + modality LUT + window → "
              "float32 [0, 1]; the per-plugin column is pydicom's `dcmread` + `pixel_array` with that "
              "`decoding_plugin` alone."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "decoders_cpu")
    args = parser.parse_args()
    result = run(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
