"""``segment`` keeps memory bounded by the batch, not the archive (radflash.segment.ledger).

Three claims: (a) no per-image object (result, grounding, failure, claimed output name)
stays in memory as a run goes on, at N images as at 4N; (b) ``report.json`` is what the
in-memory implementation wrote: rebuilt here from the per-image files alone and compared, text
included; (c) a run killed mid-way has written a valid record of what it committed, and running
it again gives exactly the outputs of an uninterrupted run. All on the random tiny model and
images of a few hundred pixels.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from radflash.segment.grounding import Grounding
from radflash.segment.ledger import LEDGER_SUFFIX, RunLedger, SpilledList
from radflash.segment.output import report_chunks
from radflash.segment.results import ImageResult, InputFailure
from radflash.segment.verb import segment
from tests.engine.segment.test_seg_writers import make_dicom

PROMPTS = {"pneumothorax – links": "There is pneumothorax", "lung": "left lung"}  # non-ASCII on purpose
TIMING_KEYS = ("started", "finished", "elapsed_s")


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    """The session's tiny checkpoint (tests/engine/conftest.py), loaded once for this module."""
    from radflash.api import load

    return load(tiny_model, device="cpu")


def random_png(path: Path) -> Path:
    """A small grey PNG of random size and content (numpy's per-test seed: replayable)."""
    from PIL import Image

    h, w = np.random.randint(20, 40, size=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.random((h, w)) * 255).astype(np.uint8), mode="L").save(path)
    return path


def broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM" + b"\x00" * 50)
    return path


def png_archive(root: Path, n: int, n_broken: int = 2) -> Path:
    """``n`` PNGs in sub-folders whose stems collide (names get -2, -3...), plus broken files."""
    for i in range(n):
        random_png(root / f"d{i % 4}" / f"IM{i // 4}.png")
    for i in range(n_broken):
        broken(root / f"d{i}" / f"zz-broken-{i}.dcm")
    return root


def dicom_archive(root: Path, n: int, n_broken: int = 2) -> Path:
    """Broken files first, then ``n`` DICOMs (each its own study)."""
    for i in range(n_broken):
        broken(root / f"a-broken-{i}.dcm")
    for i in range(n):
        h, w = np.random.randint(20, 40, size=2)
        make_dicom(root / f"b-{i:04d}.dcm", rows=int(h), cols=int(w))
    return root


def reference_report(out: Path, inputs: list[Path], failed: list[Path], run_report: dict) -> dict:
    """``report.json`` as the in-memory implementation built it, from the per-image files on disk.

    Images in input order (the sorted file walk), each found by the ``source`` in its own
    ``result.json``; per-prompt positives and the counts summed over those records. The fields
    that do not depend on the images (model, prompts' settings, timings) are taken from the run.
    """
    records = {}
    for path in out.glob("*/result.json"):
        rec = json.loads(path.read_text(encoding="utf-8"))
        records[rec["source"]] = (path.parent.name, rec)
    assert sorted(records) == sorted(map(str, inputs))
    images = []
    for src in sorted(map(str, inputs)):
        name, rec = records[src]
        images.append({"source": src, "name": name, "json": rec["files"]["json"],
                       "positive": [p["name"] for p in rec["prompts"] if p["positive"]]})
    positives = Counter(name for img in images for name in img["positive"])
    expected = dict(run_report)
    expected["prompts"] = [{**p, "positives": positives[p["name"]]} for p in run_report["prompts"]]
    expected["counts"] = {"segmented": len(images), "skipped": 0, "failed": len(failed), "partial": 0,
                          "inputs": len(images) + len(failed)}
    expected["images"] = images
    by_source = {f["source"]: f for f in run_report["failures"]}
    assert sorted(by_source) == sorted(map(str, failed))
    assert all(f["status"] == "failed" and f["reason"] for f in by_source.values())
    expected["failures"] = [by_source[str(p)] for p in sorted(failed, key=lambda p: (p.parent, p.name))]
    return expected


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


# ---- (a) nothing per image stays in memory ----------------------------------------------------
class Census:
    """An observer that, at the run's last image, counts what the process still holds per image:
    live results, groundings and failures, and any set or dict holding the names or study UIDs
    handed out so far (the old name allocator and per-study SEG counters)."""

    def __init__(self, total: int) -> None:
        self.total, self.seen = total, 0
        self.keys: set[str] = set()
        self.found: dict[str, int] = {}

    def __call__(self, item, result: ImageResult) -> None:
        self.seen += 1
        self.keys.add(result.name.lower())
        self.keys.add(item.meta.study_instance_uid)
        if self.seen == self.total:
            self.found = self._count()

    def _count(self) -> dict[str, int]:
        gc.collect()
        objs = gc.get_objects()
        live = Counter(type(o).__name__ for o in objs if type(o) in (ImageResult, Grounding, InputFailure))
        half = max(3, len(self.keys) // 2)
        # a dict of str → int is not tracked by the GC itself: look at what tracked objects refer to
        containers = {id(c): c for o in objs for c in (o, *gc.get_referents(o))
                      if type(c) in (set, dict) and len(c) >= half and c is not self.keys}
        holders = sum(1 for c in containers.values() if sum(k in c for k in self.keys) >= half)
        return {"ImageResult": live["ImageResult"], "Grounding": live["Grounding"],
                "InputFailure": live["InputFailure"], "holders": holders}


def test_per_image_state_does_not_grow_with_the_archive(model, tmp_path: Path) -> None:
    found = {}
    for n in (3, 12):
        archive = dicom_archive(tmp_path / f"in{n}", n)
        census = Census(n)
        run = segment([archive], tmp_path / f"out{n}", prompts=PROMPTS, model=model, progress=False,
                      formats=("dicom-seg",), observer=census, workers=0, batch_size=2)
        assert census.seen == n and run.counts == {"segmented": n, "skipped": 0, "failed": 2, "partial": 0}
        assert isinstance(run.images, SpilledList) and isinstance(run.failures, SpilledList)
        found[n] = census.found
    # the image being observed (and its groundings) is alive; nothing of the earlier ones is
    assert found[3] == found[12] == {"ImageResult": 1, "Grounding": len(PROMPTS), "InputFailure": 0,
                                     "holders": 0}
    # what was kept on disk reads back in input order, and no scratch file is left behind
    assert [Path(r.source).name for r in run.images] == [f"b-{i:04d}.dcm" for i in range(12)]
    assert [r.files["dicom-seg"] for r in run.images[-2:]] == [f"{r.name}/seg.dcm" for r in run.images[10:]]
    assert not list((tmp_path / "out12").glob(f"*{LEDGER_SUFFIX}"))


def test_ledger_sequences_and_sets(tmp_path: Path) -> None:
    ledger = RunLedger(tmp_path)
    assert not list(tmp_path.iterdir())  # unlinked as soon as open
    seen = []
    items = ledger.sequence("x", lambda v: {"v": v}, lambda d: d["v"], on_append=seen.append)
    values = list(range(600))  # more than one read-back chunk
    for v in values:
        items.append(v)
    assert len(items) == 600 and list(items) == values == seen and items == values
    assert items[0] == 0 and items[-1] == 599 and items[598:] == [598, 599]
    with pytest.raises(IndexError):
        items[600]
    items[-1] = 1000  # rewritten in place, length unchanged
    assert items[599] == 1000 and len(items) == 600 and list(items)[-2:] == [598, 1000]
    names = ledger.members("names")
    names.add("im1")
    assert "im1" in names and "im2" not in names and len(names) == 1
    ledger.close()


# ---- (b) the report is what it was -------------------------------------------------------------
def test_report_equals_one_built_from_the_per_image_files(model, tmp_path: Path) -> None:
    archive = png_archive(tmp_path / "in", 10)
    out = tmp_path / "out"
    run = segment([archive], out, prompts=PROMPTS, model=model, progress=False, formats=("png",),
                  workers=0, batch_size=3)
    text = (out / "report.json").read_text(encoding="utf-8")
    report = json.loads(text)
    # the streamed text is exactly json.dumps(indent=2, ensure_ascii=False) of the same content
    assert text == json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    assert "pneumothorax – links" in text
    inputs, failed = sorted(archive.rglob("*.png")), sorted(archive.rglob("*.dcm"))
    assert report == reference_report(out, inputs, failed, report)
    assert [r.name for r in run.images][:4] == ["IM0", "IM1", "IM2", "IM0-2"]  # collisions as before
    assert run.report["images"] == report["images"] and run.report["failures"] == report["failures"]
    assert run.positives == {p["name"]: p["positives"] for p in report["prompts"]}


def test_report_text_matches_json_dumps_for_any_shape() -> None:
    cases = [{}, {"images": []}, {"a": [], "b": [{}], "c": {"d": [1, [2, {}]], "e": None}, "f": "ä\n\"x"},
             {"n": 1.5, "images": [{"x": [1, 2], "y": {"z": []}}, {"x": []}], "failures": [], "t": True}]
    for case in cases:
        assert "".join(report_chunks(case)) == json.dumps(case, indent=2, ensure_ascii=False)


# ---- (c) a killed run, run again ---------------------------------------------------------------
class Crash(RuntimeError):
    pass


def crash_after(k: int):
    seen = []

    def observer(item, result) -> None:
        seen.append(result.name)
        if len(seen) > k:  # dies while segmenting image k + 1, after its files were written
            raise Crash(f"simulated crash at image {k + 1}")
    return observer


def folder_state(out: Path) -> dict[str, object]:
    """Every output file's content (npz by their arrays: zip members carry write times)."""
    state: dict[str, object] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                state[rel] = {k: npz[k].tolist() for k in npz.files}
        elif rel == "report.json":
            state[rel] = without_timings(json.loads(path.read_text(encoding="utf-8")))
        else:
            state[rel] = path.read_bytes()
    return state


def test_crashed_run_keeps_its_record_and_a_rerun_equals_an_uninterrupted_one(model, tmp_path: Path) -> None:
    archive = png_archive(tmp_path / "in", 8)
    args = dict(prompts=PROMPTS, model=model, progress=False, formats=("png", "npz"), workers=0, batch_size=3)
    segment([archive], tmp_path / "whole", **args)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        segment([archive], out, observer=crash_after(5), **args)
    partial = json.loads((out / "report.json").read_text(encoding="utf-8"))
    # the image it died on had its files written (the observer runs after them): listed, as before
    assert not partial["complete"] and partial["counts"]["segmented"] == len(partial["images"]) == 6
    for entry in partial["images"]:  # what it committed is listed, and there
        assert json.loads((out / entry["json"]).read_text(encoding="utf-8"))["source"] == entry["source"]
    assert not list(out.rglob(".tmp-*"))
    segment([archive], out, **args)
    assert folder_state(out) == folder_state(tmp_path / "whole")


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from radflash.segment.verb import segment

    seen = []
    def observer(item, result):
        seen.append(result.name)
        if len(seen) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    segment([sys.argv[1]], sys.argv[2], prompts={prompts!r}, model=sys.argv[3], device="cpu", progress=False,
            formats=("png",), workers=0, batch_size=2, observer=observer)
""")


def test_sigkilled_run_leaves_valid_files_and_no_scratch(tiny_model: Path, model, tmp_path: Path) -> None:
    archive = png_archive(tmp_path / "in", 6, n_broken=0)
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(prompts=PROMPTS)
    proc = subprocess.run([sys.executable, "-c", script, str(archive), str(out), str(tiny_model)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    written = sorted(out.glob("*/result.json"))
    assert len(written) == 4 and not (out / "report.json").exists()
    assert not list(out.glob(f"*{LEDGER_SUFFIX}"))  # the ledger was unlinked when opened
    for path in written:
        json.loads(path.read_text(encoding="utf-8"))
    args = dict(prompts=PROMPTS, model=model, progress=False, formats=("png",), workers=0, batch_size=2)
    segment([archive], out, **args)
    segment([archive], tmp_path / "whole", **args)
    assert folder_state(out) == folder_state(tmp_path / "whole")
