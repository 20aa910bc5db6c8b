"""The model-family registry: a checkpoint's ``model.architecture`` picks the module that is built.

What matters to users: ``radflash.load`` builds the family the config names, an unknown family is
one line before anything is read or allocated, and a family without similarity maps gives one
clear error from the map paths (API and ``segment``) while scoring still works.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radflash.api import RadFlashModel, load
from radflash.checkpoints import format as ckpt_format
from radflash.checkpoints.factory import random_checkpoint
from radflash.checkpoints.format import Checkpoint, load_checkpoint, save_checkpoint
from radflash.errors import CheckpointError, InputError
from radflash.models import registry
from radflash.models.base import MEMBERS, ModelFamily
from radflash.models.config import ModelConfig, TextConfig, VisionConfig
from radflash.models.radzero import RadZero

SMALL = ModelConfig(
    vision=VisionConfig(hidden=48, layers=1, heads=4, mlp=96, pos_grid=4),
    text=TextConfig(vocab=300, hidden=48, layers=1, heads=4, mlp=96, max_positions=130, max_length=64),
    align_layers=1,
    image_size=56,
)
PROMPTS = ["There is pleural effusion", "There is no pneumothorax"]
NO_MAPS = "model family 'nomaps' has no similarity maps; use score"


class NoMapsFamily(nn.Module):
    """A stand-in family that scores but has no maps (the shape CARZero will have)."""

    supports_maps = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(3, cfg.vision.hidden)
        self.embed = nn.Embedding(cfg.text.vocab, cfg.text.hidden)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        patch = self.cfg.vision.patch
        cells = nn.functional.avg_pool2d(pixels, patch).flatten(2).transpose(1, 2)  # (B, N, 3)
        tokens = self.proj(cells)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1)

    def head(self, tokens: torch.Tensor, text: torch.Tensor, *,
             return_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert not return_maps, "the API must refuse maps before calling a family without them"
        return tokens[:, 0] @ text.to(tokens.dtype).T, None


class HeadlessFamily(nn.Module):
    """A broken family: no ``head``; the registry must name what is missing."""

    supports_maps = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids


@pytest.fixture
def families(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The registry with this module's fake families added (removed again after the test)."""
    table = {**registry.FAMILIES, "nomaps": f"{__name__}:NoMapsFamily", "headless": f"{__name__}:HeadlessFamily"}
    monkeypatch.setattr(registry, "FAMILIES", table)
    return table


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = random_checkpoint(SMALL, seed=0, model_id="small")
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("ckpt") / "small")


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((61, 53), dtype=np.float32) for _ in range(n)]


# ---- radzero through the registry -----------------------------------------------------------------
def test_load_builds_the_family_the_config_names(small_ckpt: Path) -> None:
    rf = load(small_ckpt, device="cpu")
    assert rf.family == "radzero" and type(rf.module) is RadZero and rf.supports_maps
    scores = rf.score(_images(), PROMPTS)
    assert scores.logits.shape == (2, 2) and torch.isfinite(scores.logits).all()
    maps = rf.similarity_maps(_images(1), PROMPTS)
    assert maps.probs.shape[-2:] == (61, 53)


def test_radzero_satisfies_the_family_protocol() -> None:
    module = registry.build(SMALL)
    assert isinstance(module, ModelFamily) and isinstance(module, RadZero)
    assert all(hasattr(module, m) for m in MEMBERS)
    assert RadZero.supports_maps is True  # a class attribute: known before anything is built
    assert registry.names()[0] == "radzero" and registry.family_class("radzero") is RadZero


# ---- unknown families -------------------------------------------------------------------------------
def test_unknown_family_in_config_json_is_one_line_before_allocation(
    small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in small_ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["architecture"] = "clip"
    (bad / "config.json").write_text(json.dumps(meta))

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built or weights read for an unknown family")

    monkeypatch.setattr(registry, "family_class", must_not_run)
    monkeypatch.setattr(ckpt_format, "_read_tensors", must_not_run)
    for loader in (load_checkpoint, load):
        with pytest.raises(CheckpointError) as info:
            loader(bad)
        message = str(info.value)
        assert "\n" not in message
        assert message == f"{bad / 'config.json'}: model.architecture: must be {registry.expected()} (got 'clip')"


def test_the_allowed_families_come_from_the_registry(families: dict[str, str]) -> None:
    assert ModelConfig.from_dict({"architecture": "nomaps"}).architecture == "nomaps"
    with pytest.raises(CheckpointError) as info:
        ModelConfig.from_dict({"architecture": "clip"}, source="c.json")
    families = "'radzero', 'carzero', 'nomaps', 'headless'"
    assert str(info.value) == f"c.json: model.architecture: must be one of {families} (got 'clip')"
    with pytest.raises(CheckpointError, match=r"^model.architecture: must be one of .* \(got 'gone'\)$"):
        registry.family_class("gone")


def test_a_family_missing_a_member_is_named(families: dict[str, str]) -> None:
    with pytest.raises(TypeError, match=r"'headless' .*missing: head\)$"):
        registry.build(dataclasses.replace(SMALL, architecture="headless"))


# ---- a family without maps ------------------------------------------------------------------------------
@pytest.fixture
def no_maps_model(families: dict[str, str]) -> RadFlashModel:
    cfg = dataclasses.replace(SMALL, architecture="nomaps")
    tokenizer = random_checkpoint(SMALL, seed=0).tokenizer
    state = {k: v.clone() for k, v in NoMapsFamily(cfg).state_dict().items()}
    return RadFlashModel(Checkpoint(config=cfg, state_dict=state, tokenizer=tokenizer, model_id="nomaps"),
                         device="cpu", dtype=torch.float32)


def test_family_without_maps_scores_but_refuses_maps(no_maps_model: RadFlashModel) -> None:
    rf = no_maps_model
    assert type(rf.module) is NoMapsFamily and not rf.supports_maps
    scores = rf.score(_images(), PROMPTS)
    assert scores.logits.shape == (2, 2) and torch.isfinite(scores.probs).all()
    tokens = rf.encode_images(_images(1))
    calls = (lambda: rf.similarity_maps(_images(1), PROMPTS),
             lambda: rf.similarity_maps(prompts=PROMPTS, tokens=tokens, size=(61, 53)),
             lambda: rf.head(tokens, PROMPTS, return_maps=True))
    for call in calls:
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == NO_MAPS


def test_segment_refuses_a_family_without_maps_once(no_maps_model: RadFlashModel) -> None:
    from radflash.segment.verb import segment

    with pytest.raises(InputError) as info:
        segment(_images(3), prompts=PROMPTS, model=no_maps_model, device="cpu", progress=False)
    assert str(info.value) == NO_MAPS
