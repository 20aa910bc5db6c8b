"""Map supervision on phantoms: which prompts are true where, and the loss against a literal loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radflash.preprocess import Preprocessing
from radflash.training.config import ModelSection, TrainConfig, model_config
from radflash.training.data import Collator, PhantomDataset, prompt_grid_masks, with_plain_twins
from radflash.training.losses import map_loss
from radflash.training.phantoms import generate_phantom
from radflash.training.trainer import build_tokenizer, map_prompts
from tests.tolerances import tolerance


def _block_mean(mask: np.ndarray, g: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(g, h // g, g, w // g).mean(axis=(1, 3))


def test_grid_masks_cover_plain_located_and_containing_prompts() -> None:
    ph = generate_phantom(3, 64, findings=[("pneumothorax", "right upper lung"), ("lung nodule", "left lower lung"),
                                           ("lung nodule", "left upper lung")])
    got = prompt_grid_masks(ph.findings, 8)
    ptx, nod_low, nod_up = (f.mask for f in ph.findings)
    expected = {
        "There is pneumothorax": ptx,
        "There is pneumothorax of the right upper lung": ptx,
        "There is pneumothorax of the right lung": ptx,  # apical is inside "right lung"
        "There is lung nodule": nod_low | nod_up,
        "There is lung nodule of the left lower lung": nod_low,
        "There is lung nodule of the left upper lung": nod_up,
        "There is lung nodule of the left lung": nod_low | nod_up,
    }
    assert set(got) == set(expected)
    for prompt, mask in expected.items():
        tol = tolerance(got[prompt].dtype, terms=(mask.shape[0] // 8) * (mask.shape[1] // 8))  # one block mean
        np.testing.assert_allclose(got[prompt], _block_mean(mask.astype(np.float64), 8), rtol=tol.rtol, atol=tol.atol,
                                   err_msg=prompt)


def test_plain_twins_only_for_located_positive_sentences() -> None:
    sents = ("There is lung nodule of the left upper lung", "There may be consolidation of the right lower lung",
             "There is no pneumothorax", "There is cardiomegaly", "There is lung nodule of the right lower lung")
    rng = np.random.default_rng(0)
    assert with_plain_twins(sents, 0.0, rng) == sents
    assert with_plain_twins(sents, 1.0, rng) == (*sents, "There is lung nodule", "There may be consolidation")
    counts = [len(with_plain_twins(sents, 0.5, np.random.default_rng(i))) - len(sents) for i in range(400)]
    assert 0.8 < np.mean(counts) < 1.5  # two distinct heads at p = 0.5 (the nodule one can come twice)


def test_dataset_twins_are_seeded_and_pool_keys_are_prompts() -> None:
    ds = PhantomDataset(seed=0, length=12, size=56, pool=4, augment=True, mask_grid=4, plain_sentence_prob=1.0)
    ds.prefill(1)
    a, b = ds[1], ds[5]  # same pooled phantom, fresh augmentation
    assert a.sentences == b.sentences and not np.array_equal(a.image, b.image)
    assert ds[1].sentences == a.sentences
    for s in (ds[i] for i in range(4)):
        located = [t for t in s.sentences if " of the " in t and not t.startswith("There is no")]
        assert all(t.partition(" of the ")[0] in s.sentences for t in located)
        assert all(k.startswith("There is ") for k in s.grid_masks)


def test_map_prompts_hold_out_the_zero_shot_combos() -> None:
    cfg = TrainConfig.from_dict({"steps": 1, "map_loss_weight": 1.0, "map_located": True,
                                 "data": {"exclude": [["lung nodule", "left lower lung"]]}})
    prompts = map_prompts(cfg)
    assert "There is lung nodule" in prompts and "There is pneumothorax of the left upper lung" in prompts
    assert "There is lung nodule of the left lower lung" not in prompts
    assert len(prompts) == len(set(prompts)) == 7 + 22 - 1  # 22 located combos (cardiomegaly has no location)
    cfg.map_located = False
    assert len(map_prompts(cfg)) == 7


@pytest.mark.parametrize(("config", "message"), [
    ({"map_loss_weight": 1.0, "data": {"source": "mimic", "root": "x"}}, "need data.source: phantoms"),
    ({"data": {"source": "mimic", "root": "x", "plain_sentence_prob": 0.5}}, "need data.source: phantoms"),
    ({"map_balanced": True}, "set map_loss_weight > 0"),
    ({"map_loss_weight": 1.0, "map_pointing_weight": -1.0}, "must be ≥ 0"),
    ({"data": {"plain_sentence_prob": 1.5}}, r"in \[0, 1\]"),
])
def test_map_options_are_validated(config: dict, message: str) -> None:
    from radflash.errors import InputError

    with pytest.raises(InputError, match=message):
        TrainConfig.from_dict({"steps": 1, **config}, source="run.yaml")


def _literal_map_loss(s: torch.Tensor, target: torch.Tensor, balanced: bool, pointing: float) -> torch.Tensor:
    """The documented formula, one map at a time, in float64."""
    b, f, n = s.shape
    total, hits, point = 0.0, 0, 0.0
    for i in range(b):
        for j in range(f):
            x, t = s[i, j].double(), target[i, j].double()
            cov = float(t.sum())
            w = min(max((n - cov) / cov, 1.0), 1e3) if (balanced and cov > 0) else 1.0
            for k in range(n):
                p = 1.0 / (1.0 + np.exp(-float(x[k])))
                total -= w * float(t[k]) * np.log(p) + (1 - float(t[k])) * np.log(1 - p)
            if cov > 0:
                hits += 1
                logz = float(torch.logsumexp(x, 0))
                point -= sum(float(t[k]) / cov * (float(x[k]) - logz) for k in range(n))
    loss = total / (b * f * n)
    return torch.tensor(loss + (pointing * point / hits if hits else 0.0), dtype=torch.float64)


@pytest.mark.parametrize(("balanced", "pointing"), [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_map_loss_equals_literal_formula(balanced: bool, pointing: float) -> None:
    cfg = model_config(ModelSection(image_size=56, vision={"layers": 1}, text={"layers": 1}, align_layers=1))
    ds = PhantomDataset(seed=int(torch.randint(0, 10_000, ())), length=5, size=56, mask_grid=cfg.grid)
    prompts = ["There is pleural effusion", "There is lung mass", "There is pneumothorax of the right lung"]
    collate = Collator(build_tokenizer("phantom", cfg), Preprocessing(56, cfg.mean, cfg.std),
                       map_prompts=prompts, grid=cfg.grid)
    batch = collate([ds[i] for i in range(5)])
    assert [batch.texts[r] for r in batch.map_rows] == prompts
    for j in range(5):  # a prompt that is false of the image has an empty target
        for f, prompt in enumerate(prompts):
            assert (prompt in ds[j].grid_masks) == bool(batch.map_targets[j, f].any())
    # fresh random features, one target forced so that both map kinds always occur
    batch.map_targets[0, 0] = torch.rand(cfg.grid, cfg.grid) * (torch.rand(cfg.grid, cfg.grid) < 0.2)
    batch.map_targets[0, 0, 0, 0] = 0.6
    tokens = torch.randn(5, cfg.grid**2 + 1, 16, dtype=torch.float64)
    text = torch.randn(len(batch.texts), 16, dtype=torch.float64)

    from radflash.models import RadZero

    model = RadZero(cfg).double()
    got = map_loss(model, tokens, text, batch, balanced=balanced, pointing_weight=pointing)
    v = torch.nn.functional.normalize(tokens[:, 1:], dim=-1)
    t = torch.nn.functional.normalize(text[batch.map_rows], dim=-1)
    s = torch.einsum("bnd,fd->bfn", v, t) / model.log_tau.exp()
    expected = _literal_map_loss(s.detach(), batch.map_targets.flatten(2), balanced, pointing)
    # map_loss computes in float32 whatever the inputs (it casts, so bf16 autocast is safe): sums
    # over the grid cells of every (image, prompt), of terms up to |s| = 1/τ in size
    tol = tolerance(torch.float32, terms=s.numel(), magnitude=float(s.detach().abs().max()))
    tol.assert_close(got.detach(), expected)
