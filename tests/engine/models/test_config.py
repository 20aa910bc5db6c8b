"""The model-config schema: types, ranges and cross-field rules, one-line errors naming the key.

Checkpoint-level behaviour (config.json against the weights, nothing allocated) lives in
test_checkpoint.py; this file checks the schema itself and the weight-shape table it implies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from radflash.checkpoints.format import weight_shapes
from radflash.errors import CheckpointError
from radflash.models import RadZero
from radflash.models.config import MAX_LAYERS, ModelConfig, TextConfig, VisionConfig, preset

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "engine" / "assets" / "demo" / "config.json"


def _demo_model_section() -> dict:
    return json.loads(DEMO_CONFIG.read_text())["model"]


def _error(section: dict) -> str:
    with pytest.raises(CheckpointError) as info:
        ModelConfig.from_dict(section, source="ckpt/config.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ckpt/config.json: ")
    return message


def _with(section: dict, path: str, value: object) -> dict:
    """A copy of ``section`` with the dotted key ``path`` set to ``value``."""
    out = json.loads(json.dumps(section))
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def test_shipped_demo_config_is_valid_and_round_trips() -> None:
    cfg = ModelConfig.from_dict(_demo_model_section())
    assert cfg.vision.layers == 3 and cfg.image_size == 168 and cfg.std == (0.25, 0.25, 0.25)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for name in ("tiny", "base"):
        assert ModelConfig.from_dict(preset(name).to_dict()) == preset(name)


@pytest.mark.parametrize(("key", "value", "expected"), [
    # the cases: each used to crash later (ZeroDivisionError, ~24 GB allocation, NaN scores)
    ("vision.heads", 0, "model.vision.heads: must be ≥ 1 (got 0)"),
    ("vision.patch", 0, "model.vision.patch: must be ≥ 1 (got 0)"),
    ("vision.layers", 1_000_000, f"model.vision.layers: must be ≤ {MAX_LAYERS} (got 1000000)"),
    ("std", [0, 0, 0], "model.std: every value must be > 0"),
    # more of the same family
    ("text.heads", 0, "model.text.heads: must be ≥ 1 (got 0)"),
    ("text.layers", -1, "model.text.layers: must be ≥ 1 (got -1)"),
    ("align_layers", -2, "model.align_layers: must be ≥ 0 (got -2)"),
    ("image_size", 0, "model.image_size: must be ≥ 1 (got 0)"),
    ("std", [0.2, -0.1, 0.3], "model.std: every value must be > 0"),
    ("std", [0.2, 0.3], "model.std: must be a list of 3 numbers"),
    ("mean", "0.5", "model.mean: must be a list of 3 numbers"),
    ("vision.eps", 0, "model.vision.eps: must be > 0 (got 0)"),
    ("vision.in_chans", 1, "model.vision.in_chans: must be 3 (got 1)"),
    ("vision.layers", 2.5, "model.vision.layers: must be an integer (got 2.5)"),
    ("vision.layers", True, "model.vision.layers: must be a number (got true)"),
    ("vision.hidden", "wide", "model.vision.hidden: must be an integer (got 'wide')"),
    ("text.buckets", 2, "model.text.buckets: must be ≥ 4 (got 2)"),
    ("architecture", "clip", "model.architecture: must be one of 'radzero', 'carzero' (got 'clip')"),
    ("vision", [], "model.vision: must be a mapping (got [])"),
])
def test_bad_values_name_the_key_and_the_expectation(key: str, value: object, expected: str) -> None:
    assert expected in _error(_with(_demo_model_section(), key, value))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_normalisation_is_refused(bad: str) -> None:
    # JSON has no NaN literal, but Python's json writes/reads one; strings are the other way in
    msg = _error(_with(_demo_model_section(), "mean", [0.5, float(bad), 0.5]))
    assert "model.mean.1: must be a finite number" in msg
    msg = _error(_with(_demo_model_section(), "std", [0.2, 0.2, bad]))
    assert "model.std.2: must be a finite number" in msg


@pytest.mark.parametrize(("changes", "expected"), [
    ({"vision.hidden": 190}, "model.vision: hidden 190 must be divisible by heads 3"),
    ({"text.heads": 5}, "model.text: hidden 192 must be divisible by heads 5"),
    ({"vision.hidden": 195}, "model: vision.hidden 195 must equal text.hidden 192"),
    ({"image_size": 170}, "model: image_size 170 must be a multiple of vision.patch 14"),
    ({"text.max_length": 129}, "model.text: max_length 129 + pad_id 1 + 1 must be ≤ max_positions 130"),
    ({"text.pad_id": 2048}, "model.text: pad_id 2048 must be < vocab 2048"),
    ({"text.max_distance": 8}, "model.text: max_distance 8 must be > buckets // 4 = 8"),
])
def test_cross_field_rules(changes: dict, expected: str) -> None:
    section = _demo_model_section()
    for key, value in changes.items():
        section = _with(section, key, value)
    assert expected in _error(section)


def test_unknown_keys_are_named_with_a_suggestion_or_the_known_ones() -> None:
    assert "model.vision.layer: unknown key (did you mean layers?)" in _error(
        _with(_demo_model_section(), "vision.layer", 3))
    msg = _error(_with(_demo_model_section(), "vision.registers", 4))
    known = "eps, heads, hidden, in_chans, layer_scale, layers, mlp, patch, "
    assert f"model.vision.registers: unknown key (known: {known}" in msg


def test_several_problems_are_joined_on_one_line() -> None:
    section = _with(_with(_demo_model_section(), "vision.heads", 0), "text.layers", 0)
    msg = _error(section)
    assert "model.vision.heads: must be ≥ 1 (got 0); model.text.layers: must be ≥ 1 (got 0)" in msg


def test_lax_numbers_from_strings_are_accepted() -> None:
    """JSON written by other tools sometimes quotes numbers; lax mode reads what was meant."""
    cfg = ModelConfig.from_dict(_with(_with(_demo_model_section(), "vision.layers", "2"), "text.eps", "1e-5"))
    assert cfg.vision.layers == 2 and cfg.text.eps == 1e-5


def test_direct_construction_and_replace_validate_too() -> None:
    with pytest.raises(ValidationError):
        VisionConfig(heads=0)
    with pytest.raises(ValidationError):
        dataclasses.replace(preset("tiny"), image_size=57)
    with pytest.raises(ValidationError):
        dataclasses.replace(preset("tiny"), std=(0.25, 0.0, 0.25))
    ok = dataclasses.replace(preset("tiny"), image_size=56)
    assert ok.grid == 4 and isinstance(ok.std, tuple)


def _random_config(gen: torch.Generator) -> ModelConfig:
    """A small valid config with sizes drawn at random (odd ones included)."""
    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=gen))

    heads = draw(1, 4)
    hidden = heads * draw(2, 9)
    patch = draw(2, 7)
    vocab = draw(8, 50)
    max_length = draw(4, 20)
    pad = draw(0, 3)
    return ModelConfig(
        vision=VisionConfig(hidden=hidden, layers=draw(1, 3), heads=heads, mlp=draw(3, 40), patch=patch,
                            pos_grid=draw(1, 6)),
        text=TextConfig(vocab=vocab, hidden=hidden, layers=draw(1, 3), heads=heads, mlp=draw(3, 40),
                        max_positions=max_length + pad + 1 + draw(0, 5), buckets=draw(4, 12), pad_id=pad,
                        max_length=max_length),
        align_layers=draw(0, 2), image_size=patch * draw(1, 5),
    )


def test_weight_shape_table_matches_a_real_model() -> None:
    """The meta-device table equals the real module's state dict, for random sizes and the presets."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    configs = [_random_config(gen) for _ in range(4)] + [preset("tiny")]
    for cfg in configs:
        real = {k: tuple(v.shape) for k, v in RadZero(cfg).state_dict().items()}
        assert weight_shapes(cfg) == real, cfg


def test_weight_shape_table_allocates_nothing(model_builds: list[str]) -> None:
    """Even the base preset's ~210 M parameters cost no memory: the model is built on meta only."""
    shapes = weight_shapes(preset("base"))
    assert model_builds == ["meta"]
    assert sum(torch.Size(s).numel() for s in shapes.values()) > 200_000_000
