"""Checkpoint format, converter round trip and the one-line errors for bad checkpoints/inputs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import radflash
from radflash.checkpoints.converters.radzero import convert_radzero
from radflash.checkpoints.factory import random_checkpoint
from radflash.checkpoints.format import load_checkpoint, save_checkpoint
from radflash.errors import CheckpointError, InputError
from radflash.models.config import preset
from tests.engine.hf_reference import ReleasedRadZero, Sizes

PROMPTS = ["There is pleural effusion", "There is pneumothorax of the right lung"]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return save_checkpoint(random_checkpoint("tiny"), tmp_path / "ckpt")


@pytest.mark.parametrize("single_file", [False, True], ids=["folder", "single-file"])
def test_save_load_round_trip_gives_identical_scores(tmp_path: Path, single_file: bool) -> None:
    ckpt = random_checkpoint("tiny")
    path = save_checkpoint(ckpt, tmp_path / ("m.safetensors" if single_file else "m"))
    a = radflash.RadFlashModel(ckpt, device="cpu")
    b = radflash.load(path, device="cpu")
    images = np.random.rand(2, 64, 80).astype(np.float32)
    torch.testing.assert_close(a.score(images, PROMPTS).logits, b.score(images, PROMPTS).logits, rtol=0, atol=0)
    assert b.sha256 and len(b.sha256) == 64
    assert b.default_prompts == ckpt.prompts


@pytest.mark.parametrize("old_names", [True, False], ids=["tf4.39-names", "tf5-names"])
def test_converter_round_trip_matches_transformers_reference(tmp_path: Path, old_names: bool) -> None:
    ref = ReleasedRadZero(Sizes())
    src = ref.write_release(tmp_path / "hf", old_names=old_names, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    from click.testing import CliRunner

    from radflash.cli import cli

    result = CliRunner().invoke(cli, ["convert", "radzero", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = radflash.load(tmp_path / "out", device="cpu")
    assert model.config.mean == (0.3, 0.4, 0.5) and model.config.std == (0.2, 0.25, 0.3)
    assert model.config.image_size == 56
    pixels = torch.randn(2, 3, 56, 56)
    expected, _ = ref.logits_and_sims(pixels, PROMPTS)
    got = model.score(prompts=PROMPTS, tokens=model.encode_images(pixels=pixels)).logits
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises((CheckpointError, InputError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_missing_tensor_is_named(tiny_folder: Path) -> None:
    state = load_file(str(tiny_folder / "model.safetensors"))
    del state["vision.blocks.1.attn.qkv.weight"]
    save_file(state, str(tiny_folder / "model.safetensors"))
    msg = _error(radflash.load, tiny_folder, device="cpu")
    assert "missing" in msg and "vision.blocks.1.attn.qkv.weight" in msg and str(tiny_folder) in msg


def test_wrong_shape_and_unexpected_tensors_are_named_together(tiny_folder: Path) -> None:
    state = load_file(str(tiny_folder / "model.safetensors"))
    state["head_norm.weight"] = torch.ones(7)
    state["extra.tensor"] = torch.zeros(2)
    save_file(state, str(tiny_folder / "model.safetensors"))
    msg = _error(radflash.load, tiny_folder, device="cpu")
    assert "head_norm.weight (7,)≠(192,)" in msg and "unexpected: extra.tensor" in msg


def test_unknown_config_field(tiny_folder: Path) -> None:
    meta = json.loads((tiny_folder / "config.json").read_text())
    meta["model"]["vision"]["registers"] = 4
    (tiny_folder / "config.json").write_text(json.dumps(meta))
    msg = _error(load_checkpoint, tiny_folder)
    assert msg.startswith(f"{tiny_folder / 'config.json'}: model.vision.registers: unknown key (known: ")


def _edit_meta(path: Path, edit: Callable[[dict], None]) -> None:
    """Change the config of a folder or single-file checkpoint in place (weights untouched)."""
    if path.is_dir():
        meta = json.loads((path / "config.json").read_text())
        edit(meta)
        (path / "config.json").write_text(json.dumps(meta))
        return
    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
    tensors = load_file(str(path))
    meta = json.loads(header["radflash.config"])
    edit(meta)
    save_file(tensors, str(path), metadata={**header, "radflash.config": json.dumps(meta)})


def _set(key: str, value: object) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = key.split(".")
        node = meta
        for part in parents:
            node = node[part]
        node[last] = value
    return edit


@pytest.mark.parametrize("single_file", [False, True], ids=["folder", "single-file"])
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("model.vision.layers", 1_000_000, "model.vision.layers: must be ≤ 256 (got 1000000)"),
    ("model.vision.heads", 0, "model.vision.heads: must be ≥ 1 (got 0)"),
    ("model.vision.patch", 0, "model.vision.patch: must be ≥ 1 (got 0)"),
    ("model.std", [0, 0, 0], "model.std: every value must be > 0, images are divided by it (got [0.0, 0.0, 0.0])"),
    ("model_id", 5, "model_id: must be a string (got 5)"),
    ("format_version", "one", "format_version: must be an integer (got 'one')"),
    ("modelid", "x", "modelid: unknown key (did you mean model_id?)"),
])
def test_bad_config_is_one_line_before_any_model_is_built(tmp_path: Path, model_builds: list[str], single_file: bool,
                                                         key: str, value: object, expected: str) -> None:
    """The issue's cases: these used to divide by zero, allocate ~24 GB, or score NaN with exit 0."""
    cfg = dataclasses.replace(preset("tiny"), image_size=56)
    path = save_checkpoint(random_checkpoint(cfg), tmp_path / ("m.safetensors" if single_file else "m"))
    _edit_meta(path, _set(key, value))
    model_builds.clear()
    msg = _error(radflash.load, path, device="cpu")
    where = path if single_file else path / "config.json"
    assert msg.startswith(f"{where}: ") and expected in msg
    assert model_builds == []


def test_config_that_does_not_describe_the_weights_fails_from_the_header(tmp_path: Path,
                                                                         model_builds: list[str]) -> None:
    """More layers than stored, or a different width: refused from the safetensors header, on meta only."""
    tiny = preset("tiny")
    cfg = dataclasses.replace(tiny, image_size=56, vision=dataclasses.replace(tiny.vision, layers=2))
    path = save_checkpoint(random_checkpoint(cfg), tmp_path / "m")
    model_builds.clear()
    radflash.load(path, device="cpu")  # control: a good checkpoint builds a real model
    assert model_builds == ["meta", "cpu"]

    _edit_meta(path, _set("model.vision.layers", 3))
    model_builds.clear()
    msg = _error(radflash.load, path, device="cpu")
    assert msg.startswith(f"{path / 'model.safetensors'}: weights do not match the config; ")
    assert "missing: vision.blocks.2." in msg and "unexpected" not in msg
    assert model_builds == ["meta"]

    _edit_meta(path, _set("model.vision.layers", 2))
    _edit_meta(path, _set("model.vision.pos_grid", 8))
    model_builds.clear()
    msg = _error(load_checkpoint, path)
    assert msg.endswith("weights do not match the config; 1 wrong shape (file≠config): "
                        "vision.pos_embed (1, 257, 192)≠(1, 65, 192)")
    assert model_builds == ["meta"]


def test_newer_format_version_asks_for_an_upgrade(tiny_folder: Path) -> None:
    def newer(meta: dict) -> None:
        meta["format_version"] = 99
        meta["field_from_the_future"] = 1

    _edit_meta(tiny_folder, newer)
    assert "format version 99 is newer than this radflash supports (1); upgrade radflash" in _error(
        load_checkpoint, tiny_folder)


def test_cli_score_with_a_bad_checkpoint_is_one_line(tiny_folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radflash.cli import cli

    _edit_meta(tiny_folder, _set("model.std", [0, 0, 0]))
    inputs = tmp_path / "in"
    inputs.mkdir()
    res = CliRunner().invoke(cli, ["score", str(inputs), "-o", str(tmp_path / "out"), "--model", str(tiny_folder),
                                   "-q"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith(f"Error: {tiny_folder / 'config.json'}: model.std: every value must be > 0")


def test_non_safetensors_weights_are_refused(tiny_folder: Path) -> None:
    torch.save({"a": torch.zeros(1)}, tiny_folder / "model.safetensors")  # a pickle in disguise
    msg = _error(load_checkpoint, tiny_folder)
    assert "not a safetensors file" in msg and "pickle" in msg


def test_converter_refuses_pickled_release(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text("{}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    assert "pickled weights are never loaded" in _error(convert_radzero, tmp_path, tmp_path / "out")


def test_hf_folder_passed_to_load_gets_a_conversion_hint(tmp_path: Path) -> None:
    src = ReleasedRadZero(Sizes()).write_release(tmp_path / "hf")
    (src / "tokenizer.json").exists()
    msg = _error(load_checkpoint, src)
    assert "radflash convert radzero" in msg


def test_empty_prompt_list_and_bad_prompts(tiny_folder: Path) -> None:
    model = radflash.load(tiny_folder, device="cpu")
    image = np.random.rand(40, 40).astype(np.float32)
    assert "empty" in _error(model.score, image, [])
    assert "single string" in _error(model.score, image, "There is edema")
    assert "non-empty strings" in _error(model.encode_text, ["ok", "  "])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 40, 40), (1, 1, 1, 40, 40)])
def test_images_of_the_wrong_rank(tiny_folder: Path, shape: tuple[int, ...]) -> None:
    model = radflash.load(tiny_folder, device="cpu")
    msg = _error(model.score, np.zeros(shape, np.float32), PROMPTS)
    assert "grayscale" in msg and str(shape) in msg


def test_similarity_maps_at_source_size_and_threshold_count(tiny_folder: Path) -> None:
    model = radflash.load(tiny_folder, device="cpu")
    images = np.random.rand(2, 67, 45).astype(np.float32)
    maps = model.similarity_maps(images, PROMPTS)
    assert maps.probs.shape == (2, 2, 67, 45)
    assert "3 thresholds given for 2 prompts" in _error(model.similarity_maps, images, PROMPTS,
                                                       threshold=[0.1, 0.2, 0.3])
    mixed = [np.random.rand(50, 40).astype(np.float32), np.random.rand(30, 30).astype(np.float32)]
    assert "different sizes" in _error(model.similarity_maps, mixed, PROMPTS)


def test_bad_device_string(tiny_folder: Path) -> None:
    assert "unknown device" in _error(radflash.load, tiny_folder, device="tpu")


def test_cuda_requested_without_cuda_is_an_error(tiny_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for device in ("cuda", "cuda:7", torch.device("cuda", 1)):
        assert "CUDA is not available" in _error(radflash.load, tiny_folder, device=device)
    assert radflash.load(tiny_folder, device="auto").device.type == "cpu"
