"""``segment()`` and ``radflash segment``: sizes at the source resolution, outputs, safety, CLI errors.

Mechanics run on a random tiny model (fast); the quality check (Dice on phantoms) needs the
embedded demo model and is skipped until it exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from radflash.segment.prompts import resolve_prompts
from radflash.segment.verb import segment
from tests.engine.segment.test_seg_writers import make_dicom
from tests.tolerances import tolerance

PROMPTS = ["There is pneumothorax", "left lung"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    return save_checkpoint(random_checkpoint("tiny", seed=0, model_id="random-tiny"),
                           tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt: Path):
    from radflash.api import load

    return load(tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def cr_path() -> Path:
    """The 1955×1841 MONOCHROME1 CR from pydicom-data (odd size both ways)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom-data's RG1_UNCI.dcm is not installed")
    return Path(path)


def odd_png(path: Path, h: int = 233, w: int = 187) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[:h, :w]
    Image.fromarray(((xx * 3 + yy * 5) % 256).astype(np.uint8), mode="L").save(path)
    return path


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_mask_agrees_with_map(mask: np.ndarray, prob16: np.ndarray, threshold: float) -> None:
    """The mask is the kernel's ``prob > threshold`` in float32; the saved float16 map may only
    disagree where its rounding (≤ half an ulp) crosses the threshold."""
    prob = prob16.astype(np.float32)
    differ = (np.asarray(mask) > 0) != (prob > threshold)
    ulp = float(np.spacing(np.float16(max(threshold, 2.0**-14))))
    assert np.all(np.abs(prob[differ] - threshold) <= ulp), np.abs(prob[differ] - threshold).max()


# ---- in memory -------------------------------------------------------------------------------
def test_in_memory_maps_and_masks_at_each_image_size(tiny_model) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((301, 257), dtype=np.float32), rng.random((97, 203), dtype=np.float32)]
    run = segment(images, None, prompts=PROMPTS, thresholds=[0.5, 0.3], model=tiny_model, progress=False,
                  batch_size=2)
    assert run.outdir is None and run.report_path is None and not run.failures
    for img, res in zip(images, run.images):
        assert res.size == img.shape
        assert res.probs.shape == (2, *img.shape) and res.probs.dtype == np.float16
        assert res.masks.shape == (2, *img.shape) and res.masks.dtype == np.uint8
        kernel = tiny_model.similarity_maps(img, PROMPTS, output="mask", threshold=[0.5, 0.3])
        assert np.array_equal(res.masks, kernel.masks[0].numpy())  # one rule: the kernel's prob > thr
        for t, thr in enumerate((0.5, 0.3)):
            assert_mask_agrees_with_map(res.masks[t], res.probs[t], thr)
            g = res.groundings[PROMPTS[t]]
            x, y = g.point
            assert 0 <= x < img.shape[1] and 0 <= y < img.shape[0]
            fp16 = tolerance(np.float16, accumulate=np.float32).bound(1.0)  # probs ≤ 1 stored as fp16
            assert float(res.probs[t].max()) == pytest.approx(g.max_prob, abs=fp16)
            assert float(res.probs[t][y, x]) == pytest.approx(g.max_prob, abs=fp16)
            assert g.mask_pixels == int(res.masks[t].sum())
    assert run.report["counts"]["segmented"] == 2


def test_prompt_and_threshold_resolution() -> None:
    specs = resolve_prompts({"ptx": {"prompt": "There is pneumothorax", "threshold": 0.7}, "lung": "left lung",
                             "eff": "There is pleural effusion"},
                            {"lung": 0.4}, calibration={"map_thresholds": {"There is pleural effusion": 0.65}})
    assert [(s.name, s.threshold, s.threshold_source) for s in specs] == [
        ("ptx", 0.7, "prompt-file"), ("lung", 0.4, "argument"), ("eff", 0.65, "model")]
    # the trainer's calibration: name → threshold chosen for Dice; matched by name or default prompt text
    trained = resolve_prompts(["There is pneumothorax", "left lung"],
                              calibration={"map_thresholds": {"pneumothorax": 0.35}},
                              default_prompts={"pneumothorax": "There is pneumothorax"})
    assert [(s.threshold, s.threshold_source) for s in trained] == [(0.35, "model"), (0.5, "default")]
    # the score calibration's image-level thresholds are never used for pixel maps
    image_level = {"threshold": {"There is pneumothorax": 0.9}, "temperature": {"There is pneumothorax": 2.0}}
    assert resolve_prompts(["There is pneumothorax"], calibration=image_level)[0].threshold == 0.5
    assert [s.slug for s in resolve_prompts(["a/b", "a b", "../x"])] == ["a_b", "a_b-2", "x"]
    from radflash.errors import InputError

    with pytest.raises(InputError, match="2 thresholds"):
        resolve_prompts([*PROMPTS, "x"], [0.1, 0.2])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        resolve_prompts(PROMPTS, 1.5)


# ---- on disk: odd sizes, DICOM SEG, preview ----------------------------------------------------
def test_outputs_at_source_size_with_dicom_seg(tiny_model, cr_path: Path, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from PIL import Image

    png = odd_png(tmp_path / "chest.png")
    out = tmp_path / "out"
    run = segment([cr_path, png], out, prompts=PROMPTS, model=tiny_model, progress=False, preview=True,
                  formats=("png", "npz", "dicom-seg"), batch_size=2)
    assert not run.failures and len(run.images) == 2
    source = pydicom.dcmread(cr_path, stop_before_pixels=True)
    sizes = {str(cr_path): (1955, 1841), str(png): (233, 187)}
    for res in run.images:
        h, w = sizes[res.source]
        assert res.size == (h, w)
        folder = out / res.name
        record = json.loads((folder / "result.json").read_text())
        assert record["size"] == {"height": h, "width": w}
        assert [p["name"] for p in record["prompts"]] == PROMPTS
        pngs = []
        for p in record["prompts"]:
            m = np.asarray(Image.open(folder / f"mask-{p['file_key']}.png")) > 0
            assert m.shape == (h, w)
            assert int(m.sum()) == p["mask_pixels"]
            pngs.append(m)
        with np.load(folder / "maps.npz", allow_pickle=False) as npz:
            assert list(npz["_prompts"]) == PROMPTS
            for p, m in zip(record["prompts"], pngs):
                prob = npz[p["file_key"]]
                assert prob.shape == (h, w) and prob.dtype == np.float16
                assert_mask_agrees_with_map(m, prob, p["threshold"])
        assert Image.open(folder / "preview.png").size == (w, h)
        if res.source == str(cr_path):
            assert res.name == source.SOPInstanceUID
            seg = hd.seg.segread(folder / "seg.dcm")
            assert seg.get_source_image_uids()[0][2] == source.SOPInstanceUID
            assert seg.number_of_segments == 2
            pix = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)
            assert pix.shape == (1, h, w, 2)
            for t in range(2):
                assert np.array_equal(pix[0, ..., t] > 0, pngs[t])
            alg = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("radflash", "random-tiny")
        else:
            assert not (folder / "seg.dcm").exists()
            assert any("dicom-seg" in n for n in record["notes"])
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["counts"]["segmented"] == 2
    assert report["model"]["id"] == "random-tiny"
    assert {p["name"]: p["positives"] for p in report["prompts"]} == run.positives
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")
def test_hostile_uids_and_colliding_stems_stay_inside_outdir(tiny_model, tmp_path: Path) -> None:
    from pydicom import config

    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # write the invalid UIDs on purpose
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for i, uid in enumerate(["../../etc/x", "/abs/evil", "..", "../../../../../../tmp/pwned" + "9" * 300]):
                make_dicom(inputs / f"evil{i}.dcm", rows=33, cols=29, sop_uid=uid)
    finally:
        config.settings.writing_validation_mode = old
    odd_png(inputs / "a" / "IM1.png", 31, 27)
    odd_png(inputs / "b" / "IM1.png", 35, 21)
    before = files_under(tmp_path)
    out = tmp_path / "deep" / "er" / "out"
    run = segment([inputs], out, prompts=["../../x", "/etc/passwd"], model=tiny_model, progress=False,
                  preview=True, formats=("png", "npz", "dicom-seg"))
    created = files_under(tmp_path) - before
    assert created and all(out.resolve() in p.resolve().parents for p in created)
    assert not Path("/tmp/pwned").exists()
    names = [r.name for r in run.images]
    assert len(set(names)) == len(names)  # the two IM1.png (and any look-alike UIDs) do not collide
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) < 100
    assert (len(run.images) + len([f for f in run.failures if f.status != "partial"])) == 6
    by_file = {Path(r.source).name: r.name for r in run.images}
    if "evil2.dcm" in by_file:  # a UID with nothing usable left falls back to the file stem
        assert by_file["evil2.dcm"] == "evil2"


def test_mask_rule_is_strictly_greater_at_the_threshold(tiny_model) -> None:
    """A pixel exactly at the threshold is not in the mask, in segment and in ground_map alike."""
    from radflash.segment.grounding import ground_map

    img = np.random.default_rng(3).random((37, 41), dtype=np.float32)
    maps = tiny_model.similarity_maps(img, PROMPTS[:1], output="prob")
    thr = float(maps.probs[0, 0].float().flatten()[123])  # a threshold on the float16 map's own values
    run = segment([img], None, prompts=PROMPTS[:1], thresholds=thr, model=tiny_model, progress=False)
    kernel = tiny_model.similarity_maps(img, PROMPTS[:1], output="mask", threshold=thr).masks[0, 0].numpy()
    assert np.array_equal(run.images[0].masks[0], kernel)
    prob = np.full((5, 6), 0.25, np.float32)
    prob[1, 1:3] = 0.5
    prob[3, 4] = 0.75
    assert ground_map(prob, 0.5).mask_pixels == 1 and ground_map(prob, 0.25).mask_pixels == 3


def test_decode_workers_give_the_same_outputs_in_input_order(tiny_model, tmp_path: Path) -> None:
    """Files decoded by the score pipeline's worker processes: same results and names as in-process."""
    inputs = tmp_path / "in"
    for k, (h, w) in enumerate([(31, 27), (35, 21), (40, 44), (29, 33)]):
        (inputs / f"d{k}").mkdir(parents=True)
        odd_png(inputs / f"d{k}" / "IM1.png", h, w)  # same stems: names depend on order
    (inputs / "d9").mkdir()
    (inputs / "d9" / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    runs = [segment([inputs], None, prompts=PROMPTS, model=tiny_model, progress=False, workers=n) for n in (0, 2)]
    assert [r.source for r in runs[0].images] == sorted(str(p) for p in inputs.rglob("*.png"))
    assert [(r.source, r.name) for r in runs[0].images] == [(r.source, r.name) for r in runs[1].images]
    assert [r.name for r in runs[0].images] == ["IM1", "IM1-2", "IM1-3", "IM1-4"]
    for a, b in zip(runs[0].images, runs[1].images):
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.probs, b.probs)
    assert runs[0].failures == runs[1].failures and runs[1].failures[0].status == "failed"


def test_nifti_and_seg_use_the_loader_metadata(tiny_model, tmp_path: Path) -> None:
    """ImageMeta.pixel_spacing (Imager Pixel Spacing here) scales the NIfTI; kind "dicom" gates the SEG."""
    import nibabel as nib  # in the test extra: never skipped
    (tmp_path / "in").mkdir()
    src = make_dicom(tmp_path / "in" / "cr.dcm", rows=33, cols=29)
    run = segment([src], tmp_path / "out", prompts=PROMPTS, model=tiny_model, progress=False,
                  formats=("nifti", "dicom-seg"))
    assert not run.failures
    folder = tmp_path / "out" / run.images[0].name
    img = nib.load(folder / "masks.nii.gz")
    assert img.shape == (29, 33, 2) and img.header.get_zooms() == pytest.approx((0.139, 0.139, 1.0))
    assert (folder / "seg.dcm").is_file()


def test_unreadable_file_is_recorded_and_run_continues(tiny_model, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 50)
    odd_png(inputs / "ok.png", 41, 39)
    out = tmp_path / "out"
    run = segment([inputs], out, prompts=PROMPTS, model=tiny_model, progress=False)
    assert len(run.images) == 1 and run.images[0].source.endswith("ok.png")
    assert len(run.failures) == 1 and run.failures[0].source.endswith("broken.dcm") and run.failures[0].reason
    report = json.loads((out / "report.json").read_text())
    assert report["failures"][0]["source"].endswith("broken.dcm")
    assert (out / run.images[0].name / "result.json").is_file()


# ---- CLI ---------------------------------------------------------------------------------------
def _cli():
    from radflash.cli import cli

    return cli


def test_cli_bad_prompt_file_is_one_line_error(tmp_path: Path, tiny_ckpt: Path) -> None:
    png = odd_png(tmp_path / "x.png", 20, 20)
    bad = tmp_path / "prompts.yaml"
    bad.write_text("ptx: {prompt: There is pneumothorax, threshold: high}\n")
    for prompts_file in (bad, tmp_path / "missing.yaml"):
        res = CliRunner().invoke(_cli(), ["segment", str(png), "-o", str(tmp_path / "o"), "--prompts",
                                          str(prompts_file), "--model", str(tiny_ckpt), "--quiet"])
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and prompts_file.name in lines[0]


def test_cli_needs_a_prompt_and_valid_formats(tmp_path: Path) -> None:
    png = odd_png(tmp_path / "x.png", 20, 20)
    res = CliRunner().invoke(_cli(), ["segment", str(png), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--prompt" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(_cli(), ["segment", str(png), "-o", str(tmp_path / "o"), "--prompt", "x",
                                      "--format", "png,jpeg"])
    assert res.exit_code == 2 and "jpeg" in res.output


def test_cli_prompts_file_and_summary(tmp_path: Path, tiny_ckpt: Path) -> None:
    png = odd_png(tmp_path / "x.png", 45, 38)
    prompts = tmp_path / "p.yaml"
    prompts.write_text("ptx: {prompt: There is pneumothorax, threshold: 0.99}\nlung: left lung\n")
    res = CliRunner().invoke(_cli(), ["segment", str(png), "-o", str(tmp_path / "o"), "--prompts", str(prompts),
                                      "--prompt", "right lung", "--threshold", "0.2", "--format", "png",
                                      "--model", str(tiny_ckpt), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "positive" in res.output and "right lung" in res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(p["name"], p["threshold"]) for p in report["prompts"]] == [("ptx", 0.99), ("lung", 0.2),
                                                                        ("right lung", 0.2)]


def test_cli_subprocess_end_to_end(tmp_path: Path, tiny_ckpt: Path) -> None:
    png = odd_png(tmp_path / "scan 1.png", 51, 43)
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "radflash", "segment", str(png), "-o", str(out), "--prompt", "left lung",
         "--format", "png,npz", "--format", "nifti", "--preview", "--model", str(tiny_ckpt), "--device", "cpu",
         "--batch-size", "1", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    folder = out / "scan_1"
    for name in ("result.json", "maps.npz", "mask-left_lung.png", "masks.nii.gz", "preview.png"):
        assert (folder / name).is_file(), name
    assert (out / "report.json").is_file()


# ---- quality on phantoms (demo model) ----------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * float((a & b).sum()) / float(denom)


def final_demo_model():
    """The embedded demo model. It is committed, so a missing or unloadable one is a failure, not a skip."""
    from radflash.api import DEMO_MODEL, load
    from radflash.errors import RadflashError

    try:
        return load(None, device="cpu")
    except (RadflashError, OSError) as exc:
        pytest.fail(f"the embedded demo model {DEMO_MODEL} does not load: {exc}")


@pytest.mark.slow
def test_demo_model_dice_on_phantoms() -> None:
    """The issue's target: mean Dice of ``segment``'s masks ≥ 0.5 for effusion and pneumothorax."""
    from radflash.training import phantoms, sentences

    model = final_demo_model()
    names = [f for f in phantoms.FINDINGS if "effusion" in f or "pneumothorax" in f]
    assert len(names) == 2, names
    scores: dict[str, list[float]] = {}
    for finding in names:
        for k in range(12):
            # location None: the phantom generator picks one; prompt_for gives the generic sentence
            ph = phantoms.generate_phantom(1000 + k, 224, findings=[(finding, None)])
            truth = np.any([np.asarray(f.mask, bool) for f in ph.findings if f.name == finding], axis=0)
            # keyed by the finding name, so the checkpoint's calibrated map threshold applies
            run = segment([np.asarray(ph.image, dtype=np.float32)], None,
                          prompts={finding: sentences.prompt_for(finding, None)}, model=model, progress=False)
            scores.setdefault(finding, []).append(_dice(run.images[0].masks[0], truth))
    means = {f: float(np.mean(v)) for f, v in scores.items()}
    print("mean Dice:", means)
    for finding, mean in means.items():
        assert mean >= 0.5, f"{finding}: mean Dice {mean:.3f} < 0.5 ({scores[finding]})"
