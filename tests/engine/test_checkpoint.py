"""Checkpoint format, converter round trip and the one-line errors for bad checkpoints/inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import radflash
from radflash.checkpoint import load_checkpoint, save_checkpoint
from radflash.convert import convert_radzero
from radflash.errors import CheckpointError, InputError
from radflash.factory import random_checkpoint
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
    assert "unknown config field(s) registers" in _error(load_checkpoint, tiny_folder)


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


def test_cuda_requested_without_cuda_warns_and_uses_cpu(tiny_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        model = radflash.load(tiny_folder, device="cuda")
    assert model.device.type == "cpu"
