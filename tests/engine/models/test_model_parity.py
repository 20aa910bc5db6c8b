"""Numerical parity of the native RadZero modules with transformers' modules and the spec.

Fresh random weights and inputs on every run; float32 modules, float64 reference head.
"""

from __future__ import annotations

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.checkpoints.converters.radzero import released_to_native
from radflash.checkpoints.format import Checkpoint
from radflash.models.vit import interpolate_pos_grid
from radflash.tokenizer import PromptTokenizer
from tests.engine.hf_reference import ReleasedRadZero, Sizes, interpolate_pos_439, maps_from_sims
from tests.tolerances import Tol, tolerance

PROMPTS = ["There is pleural effusion", "There is no pneumothorax of the left lung", "cardiomegaly"]


def _native(ref: ReleasedRadZero, *, old_names: bool = False, image_size: int | None = None) -> RadFlashModel:
    size = image_size or ref.sizes.patch * ref.sizes.stored_grid
    pre = {"crop_size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    hf_cfg = {"vision_config": {"num_attention_heads": ref.sizes.heads},
              "text_config": {"layer_norm_eps": 1e-5, "pad_token_id": 1}}
    state, cfg = released_to_native(ref.state_dict(old_names=old_names), hf_cfg, pre)
    tok = PromptTokenizer(ref.tokenizer, pad_id=1, max_length=cfg.text.max_length)
    return RadFlashModel(Checkpoint(cfg, state, tok, model_id="parity"), device="cpu", dtype=torch.float32)


def f32_tol(expected: torch.Tensor, terms: int) -> Tol:
    """Two float32 implementations of the same layers: each rounds by about u·√terms of the
    activations' size, ``terms`` being the reductions the value went through."""
    return tolerance(torch.float32, terms=terms, magnitude=float(expected.detach().abs().max()))


def tower_terms(s: Sizes, layers: int, first: int = 0) -> int:
    """Reductions behind a tower output: an optional first projection, then per layer attention + MLP."""
    return first + layers * (s.hidden + s.mlp)


def prob_tol(logits: torch.Tensor, dtype: torch.dtype, terms: int) -> Tol:
    """sigmoid of float32 logits (error scaled by sigmoid′ ≤ ¼), stored in ``dtype``."""
    return tolerance(dtype, terms=terms, accumulate=torch.float32, magnitude=1 + float(logits.abs().max()) / 4)


@pytest.fixture(scope="module")
def ref() -> ReleasedRadZero:
    return ReleasedRadZero(Sizes())


@pytest.mark.parametrize("old_names", [False, True], ids=["tf5-names", "tf4.39-names"])
def test_vision_tower_matches_transformers_dinov2(ref: ReleasedRadZero, old_names: bool) -> None:
    model = _native(ref, old_names=old_names)
    pixels = torch.randn(3, 3, 56, 56)
    ours = model.module.vision(pixels)
    theirs = ref.vision(pixel_values=pixels).last_hidden_state
    s = ref.sizes
    f32_tol(theirs, tower_terms(s, s.vision_layers, first=3 * s.patch**2)).assert_close(ours, theirs)


def test_align_layers_match_transformers_dinov2_layers(ref: ReleasedRadZero) -> None:
    model = _native(ref)
    x = torch.randn(2, 17, ref.sizes.hidden)
    expected = x
    for layer in ref.align.encoder.layer:
        out = layer(expected)
        expected = out[0] if isinstance(out, tuple) else out
    f32_tol(expected, tower_terms(ref.sizes, ref.sizes.align_layers)).assert_close(model.module.align(x), expected)


def test_text_tower_matches_transformers_mpnet_mean_pooling(ref: ReleasedRadZero) -> None:
    model = _native(ref)
    ids, mask = model.tokenizer(PROMPTS)
    assert mask.sum(1).unique().numel() > 1, "prompts of different lengths exercise the padding mask"
    ours = model.module.text(ids, mask)
    theirs = ref.text_embeddings(PROMPTS)
    f32_tol(theirs, tower_terms(ref.sizes, ref.sizes.text_layers)).assert_close(ours, theirs)


def test_position_interpolation_follows_transformers_439_rule() -> None:
    grid = torch.randn(1, 16 * 16, 32)
    ours = interpolate_pos_grid(grid, 37, 37)
    expected = interpolate_pos_439(grid, 37, 37)
    f32_tol(expected, 16).assert_close(ours, expected)  # bicubic: 4×4 taps
    # and it is NOT the size-based rule of current transformers: the spec's reason for keeping it
    table = grid.reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(table, size=(37, 37), mode="bicubic", align_corners=False)
    assert (ours - by_size.permute(0, 2, 3, 1).reshape(1, -1, 32)).abs().max() > 1e-3


def test_position_table_is_computed_once_per_resolution(ref: ReleasedRadZero, monkeypatch) -> None:
    vision = _native(ref).module.vision
    calls = []
    original = vision._compute_table
    monkeypatch.setattr(vision, "_compute_table", lambda r, c: calls.append((r, c)) or original(r, c))
    with torch.no_grad():
        for _ in range(3):
            vision(torch.randn(1, 3, 70, 84))
        vision(torch.randn(1, 3, 56, 56))
    assert calls == [(5, 6), (4, 4)]


def test_vision_tower_at_new_resolution_uses_439_positions(ref: ReleasedRadZero, monkeypatch) -> None:
    """Whole backbone at a 5×6 grid vs transformers with its interpolation replaced by the 4.39 rule."""
    model = _native(ref)
    emb = ref.vision.embeddings

    def old_rule(embeddings, height, width):
        pos = emb.position_embeddings
        grid = interpolate_pos_439(pos[:, 1:], height // 14, width // 14).to(pos.dtype)
        return torch.cat([pos[:, :1], grid], dim=1)

    monkeypatch.setattr(emb, "interpolate_pos_encoding", old_rule)
    pixels = torch.randn(2, 3, 70, 84)
    theirs = ref.vision(pixel_values=pixels).last_hidden_state
    s = ref.sizes
    f32_tol(theirs, tower_terms(s, s.vision_layers, first=3 * s.patch**2)).assert_close(model.module.vision(pixels),
                                                                                          theirs)


def test_whole_model_logits_and_maps_match_spec_formulas(ref: ReleasedRadZero) -> None:
    model = _native(ref)
    pixels = torch.randn(3, 3, 56, 56)
    exp_logits, exp_sims = ref.logits_and_sims(pixels, PROMPTS)
    tokens = model.encode_images(pixels=pixels)
    scores = model.score(prompts=PROMPTS, tokens=tokens)
    assert scores.logits.shape == (3, len(PROMPTS))
    s = ref.sizes
    # the whole model: both towers, then the head's reductions over the tokens and the width
    terms = tower_terms(s, s.vision_layers + s.align_layers, first=3 * s.patch**2) + 17 + s.hidden
    f32_tol(exp_logits, terms).assert_close(scores.logits, exp_logits)
    prob_tol(exp_logits, torch.float32, terms).assert_close(scores.probs, torch.sigmoid(exp_logits))
    size = (61, 47)  # odd output size, non-square
    maps = model.similarity_maps(prompts=PROMPTS, tokens=tokens, size=size)
    expected = maps_from_sims(exp_sims, (4, 4), size)
    assert maps.probs.dtype == torch.float16
    prob_tol(exp_sims, torch.float16, terms + 4).assert_close(maps.probs, expected)
    assert maps.probs.shape == (3, len(PROMPTS), *size)


def test_api_preprocessing_matches_reference_pipeline(ref: ReleasedRadZero) -> None:
    """Grayscale images of any size → bicubic-antialias resize → 3 channels → mean/std."""
    model = _native(ref)
    images = [torch.rand(97, 83), torch.rand(56, 56)]
    resized = [
        torch.nn.functional.interpolate(im[None, None].double(), size=(56, 56), mode="bicubic",
                                        antialias=True, align_corners=False).clamp(0, 1)
        for im in images
    ]
    pixels = ((torch.cat(resized).expand(-1, 3, -1, -1) - 0.5) / 0.25).float()
    exp_logits, _ = ref.logits_and_sims(pixels, PROMPTS)
    s = ref.sizes
    terms = tower_terms(s, s.vision_layers + s.align_layers, first=3 * s.patch**2) + 17 + s.hidden
    # the preprocessing rounds the pixels to float32 once more: inside the same bound
    f32_tol(exp_logits, terms).assert_close(model.score(images, PROMPTS).logits, exp_logits)


def test_text_embeddings_are_cached_per_prompt(ref: ReleasedRadZero, monkeypatch) -> None:
    model = _native(ref)
    seen: list[int] = []
    original = model.module.text_features
    monkeypatch.setattr(model.module, "text_features", lambda i, m: seen.append(i.shape[0]) or original(i, m))
    first = model.encode_text(PROMPTS)
    again = model.encode_text([PROMPTS[2], "a new prompt", PROMPTS[0]])
    assert seen == [3, 1]
    torch.testing.assert_close(again[0], first[2])
    torch.testing.assert_close(again[2], first[0])
