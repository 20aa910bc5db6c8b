"""Short CPU training runs: the loss goes down, checkpoints load, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import radflash
from radflash.checkpoints.format import load_checkpoint
from radflash.errors import InputError
from radflash.training.config import TrainConfig
from radflash.training.data import Collator, MimicStyleDataset, batch_indices
from radflash.training.state import STATE_FILE
from radflash.training.trainer import lr_at, train
from tests.tolerances import tolerance
from tests.training.resume import assert_resume_is_exact

SENTENCES = [
    "There is nodule of the left upper lung", "There is no pneumothorax", "There is pleural effusion",
    "There is cardiomegaly", "There is no pleural effusion", "There is consolidation of the right lung",
]


@pytest.fixture(scope="module")
def mimic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 small PNGs whose bright square's position goes with their sentences."""
    root = tmp_path_factory.mktemp("mimic")
    rng = np.random.default_rng(0)
    table = {}
    for i in range(16):
        img = (rng.random((64, 64)) * 60).astype(np.uint8)
        k = i % 4
        img[8 + 12 * k: 20 + 12 * k, 10:40] = 230
        name = f"p{i:02d}/img{i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)
        table[name] = [SENTENCES[k], SENTENCES[(k + 1 + i // 4) % 6]]
    (root / "sentences.json").write_text(json.dumps(table))
    return root


def _config(root: Path, out: Path, **kw) -> TrainConfig:
    data = {
        "model": {"preset": "tiny", "tokenizer": "basic", "image_size": 56, "align_layers": 1,
                  "vision": {"layers": 1}, "text": {"layers": 1}},
        "data": {"source": "mimic", "root": str(root), "sentences": str(root / "sentences.json")},
        "seed": 3, "steps": 8, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 4,
        "output": str(out), "threads": 2,
    }
    data.update(kw)
    return TrainConfig.from_dict(data)


def test_training_lowers_loss_and_resume_is_exact(mimic_folder: Path, tmp_path: Path) -> None:
    full = train(_config(mimic_folder, tmp_path / "full"), progress=False)
    losses = [v for _, v in full.losses]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0

    assert_resume_is_exact(full, _config(mimic_folder, tmp_path / "resumed"))


def test_checkpoint_is_loadable_and_backbone_can_be_frozen(mimic_folder: Path, tmp_path: Path) -> None:
    init = train(_config(mimic_folder, tmp_path / "init", steps=1), progress=False).final_checkpoint
    cfg = _config(mimic_folder, tmp_path / "frozen", steps=2, freeze_backbone=True, checkpoint_every=0,
                  model={"init": str(init), "tokenizer": "checkpoint"})
    result = train(cfg, progress=False)
    before, after = load_checkpoint(init).state_dict, load_checkpoint(result.final_checkpoint).state_dict
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("align."))
    assert not torch.equal(before["log_tau"], after["log_tau"])
    model = radflash.load(result.final_checkpoint, device="cpu")
    img = np.zeros((64, 64), np.float32)
    assert model.score([img], ["There is cardiomegaly"]).logits.shape == (1, 1)


def test_collate_deduplicates_sentences(mimic_folder: Path) -> None:
    ds = MimicStyleDataset(mimic_folder, sentences=mimic_folder / "sentences.json")
    ckpt = radflash.checkpoints.factory.random_checkpoint("tiny")
    from radflash.preprocess import Preprocessing

    batch = Collator(ckpt.tokenizer, Preprocessing(56, (0.5,) * 3, (0.25,) * 3))([ds[i] for i in range(8)])
    assert batch.pixels.shape == (8, 3, 56, 56)
    assert len(batch.texts) == len(set(batch.texts)) == batch.input_ids.shape[0]
    assert batch.owner.tolist() == [j for j in range(8) for _ in range(2)]
    assert [batch.texts[i] for i in batch.text_index] == [s for j in range(8) for s in ds[j].sentences]


def test_batch_order_is_a_function_of_the_step() -> None:
    seen = [i for step in range(4) for i in batch_indices(step, batch_size=5, length=20, seed=1)]
    assert sorted(seen) == list(range(20))  # one epoch = a permutation
    ranks = [batch_indices(7, batch_size=3, length=50, seed=2, rank=r, world_size=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert lr_at(0, lr=1.0, warmup=4, total=10) == 0.25
    assert lr_at(4, lr=1.0, warmup=4, total=10) == 1.0
    assert lr_at(10, lr=1.0, warmup=4, total=10) == pytest.approx(0.0)


def test_config_and_data_errors_are_clear(mimic_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown key"):
        TrainConfig.from_dict({"steps": 1, "learning_rate": 1})
    with pytest.raises(InputError, match="exactly one of steps or epochs"):
        TrainConfig.from_dict({})
    bad = tmp_path / "reports.csv"
    bad.write_text("path,impression\nx.png,hello\n")
    with pytest.raises(InputError, match="no report column"):
        MimicStyleDataset(mimic_folder, reports=bad)
    missing = tmp_path / "s.json"
    missing.write_text(json.dumps({"nope.png": ["There is cardiomegaly"]}))
    with pytest.raises(InputError, match="not found"):
        MimicStyleDataset(mimic_folder, sentences=missing)


def test_cli_reports_user_errors_without_traceback(tmp_path: Path) -> None:
    from radflash.cli import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 1\nbatch_sizes: 4\n")
    result = CliRunner().invoke(cli, ["train", str(cfg)])
    assert result.exit_code == 1
    assert f"{cfg}: batch_sizes: unknown key (did you mean batch_size?)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(mimic_folder: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 ranks × 4 images) takes the same steps as 1 process × 8 images.

    The loss over the all-gathered batch equals the single-process loss, and the gathered
    gradients (summed by all_gather's backward, averaged by DDP) equal the single-process ones.
    Both are compared where they are pure functions of the data: at step 1, before the runs can
    drift, through the loss and AdamW's first moment (``exp_avg`` = (1 − β₁)·gradient, linear in the
    gradient). The weights themselves are not compared elementwise: AdamW's first update is
    lr·g/(|g| + ε), so a gradient of rounding-noise size flips sign and moves the weight by up to
    2·lr however correct the gathering is. Step 2's loss (the next global batch, split across the
    ranks) is held to a first-order bound from the measured weight difference.
    """
    import os
    import subprocess
    import sys

    import yaml
    from safetensors import safe_open


    base = _config(mimic_folder, tmp_path / "single", steps=2, checkpoint_every=1, warmup_steps=1,
                   grad_clip=0).to_dict()  # unclipped: exp_avg is exactly (1 − β₁)·gradient
    train(TrainConfig.from_dict(base), progress=False)
    ddp_cfg = {**base, "batch_size": 4, "output": str(tmp_path / "ddp")}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp_cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "radflash", "train", str(tmp_path / "ddp.yaml"), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def state(run: str, step: int) -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
        """AdamW's first moments, the logged losses and the weights saved at ``step``."""
        folder = tmp_path / run / "checkpoints" / f"step_{step:06d}"
        with safe_open(str(folder / STATE_FILE), framework="pt") as fh:
            meta = json.loads(fh.metadata()["radflash.trainer"])
            moments = {k: fh.get_tensor(k) for k in fh.keys() if k.endswith(".exp_avg")}  # noqa: SIM118
        return moments, [v for _, v in meta["losses"]], load_checkpoint(folder).state_dict

    m_ref, loss_ref, w1_ref = state("single", 1)
    m_ddp, loss_ddp, w1_ddp = state("ddp", 1)
    assert loss_ddp[0] == tolerance(torch.float32, terms=8).approx(loss_ref[0])
    assert m_ddp.keys() == m_ref.keys()
    for k, ref in m_ref.items():
        # Each weight's gradient sums 8 images × ≤ 130 token positions: float32 rounding, normwise.
        tol = tolerance(torch.float32, terms=8 * 130, magnitude=float(ref.abs().max()))
        assert (m_ddp[k] - ref).abs().max() <= tol.bound(float(ref.abs().max())), k

    m2_ref, losses_ref, _ = state("single", 2)
    _, losses_ddp, _ = state("ddp", 2)
    # exp_avg₂ = β₁·exp_avg₁ + (1 − β₁)·g₂ with β₁ = 0.9, so the step-2 gradient is read off the state.
    grad2 = sum(float(((m2_ref[k] - 0.9 * m_ref[k]) / 0.1).double().pow(2).sum()) for k in m_ref) ** 0.5
    drift = sum(float((w1_ddp[k].double() - v.double()).pow(2).sum()) for k, v in w1_ref.items()) ** 0.5
    bound = 2 * grad2 * drift + tolerance(torch.float32, terms=8).bound(abs(losses_ref[1]))
    assert abs(losses_ddp[1] - losses_ref[1]) <= bound


def test_duplicate_sentences_are_not_negatives() -> None:
    """mask_duplicates removes exactly the pairs (sentence k, image j≠g(k) owning the same text)."""
    import dataclasses

    from radflash.models import RadZero
    from radflash.models.config import preset
    from radflash.training.data import Batch, text_hash
    from radflash.training.losses import contrastive_loss, multi_positive_nce

    cfg = dataclasses.replace(preset("tiny"), image_size=28)
    model = RadZero(cfg)
    texts = ["a", "b", "c"]
    batch = Batch(torch.randn(3, 3, 28, 28), torch.randint(4, 50, (3, 5)), torch.ones(3, 5, dtype=torch.long),
                  text_index=torch.tensor([0, 1, 0, 2, 1]), owner=torch.tensor([0, 0, 1, 1, 2]), texts=texts,
                  text_hash=torch.tensor([text_hash(t) for t in texts]))
    tokens = model.head_norm(model.image_tokens(batch.pixels))
    text = model.text_features(batch.input_ids, batch.attention_mask)
    cos = model.cosine(tokens, text)[:, batch.text_index].T
    dup = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    expected = multi_positive_nce(cos.masked_fill(dup, float("-inf")), batch.owner, model.log_tau.exp())
    got = contrastive_loss(model, tokens, text, batch, mask_duplicates=True)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert torch.isfinite(model.log_tau.grad) and model.log_tau.grad != 0
    plain = contrastive_loss(model, tokens, text, batch)
    torch.testing.assert_close(plain, multi_positive_nce(cos, batch.owner, model.log_tau.exp()))
