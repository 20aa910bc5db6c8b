"""Hostile archives: what a real PACS export or a malicious folder throws at ``radflash score``.

Every case must end as one status row with a reason (or a one-line error for a bad option), never
a traceback, a hang, a silent loss, a silently scored garbage image or unbounded memory.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from radflash.archive.sinks import LOCK_FILE, path_from_text, path_text, read_table
from radflash.cli import cli
from radflash.errors import InputError
from radflash.io.imageio import try_load
from tests.engine import dicom_factory as F

CHEST = {"BodyPartExamined": "CHEST", "ViewPosition": "PA"}
RSS_LIMIT_KB = 2_500_000  # the bound on a run's peak RSS (ru_maxrss is in KiB on Linux)


def film(path: Path, *, shape=(64, 64), ts=F.ExplicitVRLittleEndian, **attrs) -> Path:
    """A small chest film with a non-constant ramp (scored by default)."""
    rows, cols = shape
    pixels = (np.arange(rows * cols, dtype=np.uint32) % 4096).astype(np.uint16).reshape(shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    return F.write(F.make_dataset(pixels, transfer_syntax=ts, **{**CHEST, **attrs}), path)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width × height`` followed by a tiny (wrong) IDAT: a header bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def rle_claiming(path: Path, rows: int, cols: int) -> Path:
    """An RLE file holding an 8×8 image whose header claims ``rows × cols``."""
    ds = F.make_dataset(np.arange(64, dtype=np.uint16).reshape(8, 8), transfer_syntax=F.RLELossless, **CHEST)
    ds.Rows, ds.Columns = rows, cols
    return F.write(ds, path)


def statuses(table: pa.Table) -> dict[str, tuple[str, str | None]]:
    return {Path(path_from_text(r["path"])).name: (r["status"], r["reason"]) for r in table.to_pylist()}


# ---- loader-level cases: bombs, truncation, non-finite and constant images ------------------------
def test_header_bombs_fail_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom

    def never(self):
        raise AssertionError("a file over the pixel budget was decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(never))
    cases = [rle_claiming(tmp_path / "rle.dcm", 60000, 60000),
             F.write_deflated_zeros(tmp_path / "deflated.dcm", 12000, 12000, **CHEST),
             png_claiming(tmp_path / "bomb.png", 40000, 40000)]
    for path in cases:
        outcome = try_load(path)
        assert outcome.status == "failed", outcome
        assert outcome.reason.startswith("image too large") and "--max-pixels" in outcome.reason, outcome
    assert "3600.0 megapixels" in try_load(cases[0]).reason
    # the budget is an option: raised, the RLE file gets past it (and fails on its real content)
    from radflash.io.selection import SelectionRules

    raised = try_load(cases[0], SelectionRules(max_pixels=4_000_000_000))
    assert raised.status == "failed" and "image too large" not in raised.reason


def test_deflated_file_within_budget_still_decodes(tmp_path: Path) -> None:
    path = film(tmp_path / "d.dcm", ts=F.DeflatedExplicitVRLittleEndian)
    outcome = try_load(path)
    assert outcome.status == "loaded" and outcome.image.pixels.shape == (64, 64)


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"RescaleSlope": float("nan")}, "RescaleSlope is nan (not a finite number)"),
    ({"RescaleSlope": float("inf")}, "RescaleSlope is inf (not a finite number)"),
    ({"RescaleIntercept": 1e308}, "constant image after the modality LUT"),
    ({"RescaleSlope": 1e308}, "non-finite pixel values after the modality LUT"),
], ids=["slope-nan", "slope-inf", "intercept-1e308", "slope-overflow"])
def test_nonfinite_or_constant_after_modality_lut_fails(tmp_path: Path, attrs: dict, reason: str) -> None:
    outcome = try_load(film(tmp_path / "x.dcm", **attrs))
    assert outcome.status == "failed" and outcome.reason.startswith(reason), outcome


def test_window_that_flattens_everything_falls_back_to_min_max(tmp_path: Path) -> None:
    outcome = try_load(film(tmp_path / "w.dcm", WindowCenter=100000, WindowWidth=10))
    assert outcome.status == "loaded" and outcome.meta.voi == "minmax"
    assert outcome.image.pixels.min() == 0.0 and outcome.image.pixels.max() == 1.0


def test_constant_png_fails(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((20, 30), 77, np.uint8)).save(tmp_path / "flat.png")
    outcome = try_load(tmp_path / "flat.png")
    assert outcome.status == "failed" and outcome.reason.startswith("constant image"), outcome


def truncations(tmp_path: Path) -> dict[str, Path]:
    """Each way a copy can be cut short, next to its intact original."""
    native = film(tmp_path / "native.dcm").read_bytes()
    rle = film(tmp_path / "rle.dcm", ts=F.RLELossless).read_bytes()
    rows_at = native.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows: the image header is under way
    pixels_at = native.index(b"\xe0\x7f\x10\x00")
    cuts = {
        "last_byte.dcm": native[:-1],
        "inside_pixels.dcm": native[: pixels_at + 12 + 100],
        "pixel_header.dcm": native[: pixels_at + 6],
        "before_pixels.dcm": native[:pixels_at],
        "inside_header.dcm": native[: rows_at + 3],
        "rle_last_byte.dcm": rle[:-1],
    }
    out = {}
    for name, data in cuts.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def test_truncated_files_fail_as_truncated(tmp_path: Path) -> None:
    for name, path in truncations(tmp_path).items():
        outcome = try_load(path)
        assert outcome.status == "failed" and outcome.reason.startswith("truncated"), (name, outcome)
    assert try_load(tmp_path / "native.dcm").status == "loaded"
    assert try_load(tmp_path / "rle.dcm").status == "loaded"


def test_pixel_less_object_is_still_skipped(tmp_path: Path) -> None:
    ds = F.make_dataset(np.zeros((4, 4), np.uint16), **CHEST)
    for name in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "SamplesPerPixel", "PhotometricInterpretation", "PixelData"):
        delattr(ds, name)
    outcome = try_load(F.write(ds, tmp_path / "nopix.dcm"))
    assert (outcome.status, outcome.reason) == ("skipped", "no pixel data")


# ---- one score run over a hostile folder ------------------------------------------------------------
@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    film(root / "good.dcm")
    film(root / "sub" / "good2.dcm")
    raw = os.fsencode(root) + b"/bad\xff\xfe.dcm"  # not valid UTF-8: only a bytes path can name it
    with open(raw, "wb") as fh:
        fh.write(film(tmp_path / "src.dcm").read_bytes())
    (root / ".DS_Store").write_bytes(b"junk")
    film(root / ".hidden" / "x.dcm")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    os.symlink(root / "sub", root / "linked_dir")
    os.symlink(root / "missing", root / "dangling")
    os.mkfifo(root / "pipe")  # opening it would block forever
    film(root / "nan.dcm", RescaleSlope=float("nan"))
    film(root / "flat.dcm", shape=(16, 16), RescaleIntercept=1e308)
    rle_claiming(root / "bomb_rle.dcm", 60000, 60000)
    (root / "cut.dcm").write_bytes(film(tmp_path / "whole.dcm").read_bytes()[:-1])
    return root


EXPECTED = {
    "good.dcm": ("scored", None), "good2.dcm": ("scored", None), "bad\udcff\udcfe.dcm": ("scored", None),
    ".DS_Store": ("skipped", "hidden file"), ".hidden": ("skipped", "hidden folder (not searched)"),
    "loop_a": ("skipped", "symlink loop"), "loop_b": ("skipped", "symlink loop"),
    "linked_dir": ("skipped", "symlinked folder (not followed)"), "dangling": ("skipped", "broken symlink"),
    "pipe": ("skipped", "not a regular file (FIFO)"),
}


def test_hostile_folder_every_entry_accounted_for(hostile: Path, tiny_model: Path, tmp_path: Path) -> None:
    from radflash.archive.verb import score

    out = tmp_path / "out"
    run = score(hostile, out, model=tiny_model, workers=1, progress=False)
    got = statuses(read_table(run.status_path))
    for name, (status, reason) in EXPECTED.items():
        assert got[name][0] == status and (reason is None or got[name][1] == reason), (name, got[name])
    for name, prefix in (("nan.dcm", "RescaleSlope is nan"), ("flat.dcm", "constant image"),
                         ("bomb_rle.dcm", "image too large"), ("cut.dcm", "truncated")):
        assert got[name][0] == "failed" and got[name][1].startswith(prefix), (name, got[name])
    assert len(got) == run.discovered == len(EXPECTED) + 4 and run.scored == 3
    bad_path = str(hostile / "bad\udcff\udcfe.dcm")
    assert path_text(bad_path) in read_table(run.results_path).column("path").to_pylist()
    assert path_text(bad_path).endswith("bad\\xff\\xfe.dcm")
    assert (out / LOCK_FILE).is_file() and not statuses(run.status).keys() & {LOCK_FILE}

    again = score(hostile, out, model=tiny_model, workers=0, resume=True, progress=False)
    assert again.manifest["counts"]["processed_this_run"] == 0 and again.resumed == run.discovered
    assert again.status.num_rows == run.status.num_rows  # nothing rescored, nothing duplicated


# ---- resume ----------------------------------------------------------------------------------------
def test_resume_matches_files_spelled_differently(tmp_path: Path, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.archive.verb import score

    for i in range(3):
        film(tmp_path / "in" / f"f{i}.dcm")
    out = tmp_path / "out"
    first = score(tmp_path / "in", out, model=tiny_model, workers=0, progress=False)
    monkeypatch.chdir(tmp_path)
    again = score("in", out, model=tiny_model, workers=0, resume=True, progress=False)
    assert again.manifest["counts"]["processed_this_run"] == 0
    assert again.status.column("path").to_pylist() == first.status.column("path").to_pylist()
    assert all(Path(p).is_absolute() for p in first.status.column("path").to_pylist())

    with pytest.raises(InputError, match=r"rules\.modalities \['CR', 'DX'\] ≠ \['CR'\]"):
        score("in", out, model=tiny_model, workers=0, resume=True, progress=False, rules=_rules(modalities=("CR",)))
    with pytest.raises(InputError, match=r"rules\.max_pixels 50000000 ≠ 1000"):
        score("in", out, model=tiny_model, workers=0, resume=True, progress=False, max_pixels=1000)

    from radflash.api import RadFlashModel
    from radflash.checkpoints.factory import random_checkpoint

    other = RadFlashModel(random_checkpoint("tiny", seed=1, model_id="other"), device="cpu")
    with pytest.raises(InputError) as info:
        score("in", out, model=other, workers=0, resume=True, progress=False)
    old = json.loads((out / "manifest.json").read_text())["model"]["sha256"]
    assert old[:12] in str(info.value) and other.sha256[:12] in str(info.value)


def _rules(**kwargs):
    from radflash.io.selection import SelectionRules

    return SelectionRules(**kwargs)


# ---- concurrent runs --------------------------------------------------------------------------------
def test_second_run_into_a_locked_folder_refuses(tmp_path: Path, tiny_model: Path) -> None:
    film(tmp_path / "in" / "a.dcm")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom radflash.archive.sinks import OutputLock\n"
         "OutputLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            res = CliRunner().invoke(cli, ["score", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model),
                                           "--workers", "0", "-q", *extra])
            lines = [line for line in res.output.splitlines() if line.strip()]
            assert res.exit_code == 1 and len(lines) == 1, res.output
            assert "another radflash run" in lines[0] and f"pid {holder.pid} on " in lines[0], lines[0]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # the holder is gone: its lock file stays, but the kernel dropped the lock
    res = CliRunner().invoke(cli, ["score", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model),
                                   "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert read_table(out / "status.parquet").num_rows == 1


# ---- bad options: one line, before the model loads ----------------------------------------------------
def test_output_under_a_file_fails_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import radflash.api

    monkeypatch.setattr(radflash.api, "load", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "afile").write_text("x")
    film(tmp_path / "in" / "a.dcm")
    for command in (["score", str(tmp_path / "in")], ["segment", str(tmp_path / "in"), "--prompt", "There is edema"]):
        res = CliRunner().invoke(cli, [*command, "-o", str(tmp_path / "afile" / "sub"), "-q"])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and "afile is a file" in lines[0], res.output


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 7, reason="this machine has a cuda:7")
@pytest.mark.parametrize("command", ["score", "segment"])
def test_absent_device_is_an_error(tmp_path: Path, tiny_model: Path, command: str) -> None:
    film(tmp_path / "in" / "a.dcm")
    args = [command, str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
            "--device", "cuda:7", "-q"] + (["--prompt", "There is edema"] if command == "segment" else [])
    res = CliRunner().invoke(cli, args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "'cuda:7'" in lines[0], res.output
    assert "Traceback" not in res.output


def test_max_pixels_option_is_validated() -> None:
    res = CliRunner().invoke(cli, ["score", "--max-pixels", "lots"])
    assert res.exit_code == 2 and "--max-pixels" in res.output


# ---- peak memory of a whole run -------------------------------------------------------------------------
@pytest.mark.slow
def test_bombs_in_a_real_run_keep_peak_rss_bounded(tmp_path: Path, tiny_model: Path) -> None:
    """``radflash score`` in a child process on bombs (plus one good film): the bombs fail with the
    budget reason, the film is scored, and no process of the run exceeds 2.5 GB of RSS.

    The child runs under a fresh wrapper process, so ``RUSAGE_CHILDREN`` there counts only this
    run's processes (the CLI and its decode workers), not earlier children of the test session.
    """
    root = tmp_path / "in"
    root.mkdir()
    F.write_deflated_zeros(root / "deflated.dcm", 12000, 12000, **CHEST)
    rle_claiming(root / "rle.dcm", 60000, 60000)
    png_claiming(root / "bomb.png", 40000, 40000)
    film(root / "good.dcm")
    out = tmp_path / "out"
    wrapper = ("import resource, subprocess, sys\n"
               "rc = subprocess.run(sys.argv[1:]).returncode\n"
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "radflash", "score", str(root), "-o", str(out),
           "--model", str(tiny_model), "--workers", "2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rc, max_rss_kb = (int(v) for v in done.stdout.split()[-2:])
    assert rc == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert max_rss_kb < RSS_LIMIT_KB, f"peak RSS {max_rss_kb / 1e6:.2f} GB"
    got = statuses(read_table(out / "status.parquet"))
    assert got["good.dcm"] == ("scored", None)
    for name in ("deflated.dcm", "rle.dcm", "bomb.png"):
        assert got[name][0] == "failed" and got[name][1].startswith("image too large"), (name, got[name])
