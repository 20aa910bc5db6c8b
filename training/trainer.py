"""Contrastive training of RadZero and CARZero models.

One YAML file describes a run (:class:`radflash.training.config.TrainConfig`); :func:`train` runs
it on one device or, under ``torchrun``, on several (DDP). The model's family (the preset's or the
init checkpoint's ``architecture``) picks the objective:

- RadZero: multi-positive NCE over minimal sentences (every sentence of an image is a positive);
- CARZero: each image is paired with one of its sentences per use, and the symmetric cross-entropy
  is taken on both of the fusion decoder's (B, B) score matrices, no temperature.

The recipe follows the RadZero paper: AdamW, linear warm-up then cosine decay, gradient clipping,
bf16 autocast on CUDA, optionally a frozen vision tower. This module is the loop; the losses are in
:mod:`radflash.training.losses`,
the DDP plumbing in :mod:`radflash.training.distributed`, the map thresholds stored with each
checkpoint are chosen by :func:`radflash.training.evaluate.calibrate_map_thresholds`.

Checkpoints are written in the engine's own format (``save_checkpoint``), so a training output is
directly usable by ``radflash.load``; the optimiser/RNG state needed by ``--resume`` sits beside it
(:mod:`radflash.training.state`, no pickle).

Resumption is exact: data order is a pure function of the step (:func:`data.batch_indices`), the
learning rate a pure function of the step (:func:`lr_at`), and the optimiser state is restored
bit for bit, so N/2 steps + resume + N/2 steps reproduces an uninterrupted N-step run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from radflash.checkpoints.factory import random_model, wordpiece_tokenizer
from radflash.checkpoints.format import Checkpoint, check_state_dict, load_checkpoint, save_checkpoint
from radflash.errors import InputError
from radflash.models import RadZero
from radflash.models.config import ModelConfig
from radflash.models.registry import build
from radflash.preprocess import Preprocessing
from radflash.tokenizer import PromptTokenizer
from radflash.training.config import TrainConfig, model_config
from radflash.training.data import (
    Batch,
    Collator,
    MimicStyleDataset,
    OneSentencePerUse,
    PhantomDataset,
    batch_indices,
    batch_uses,
)
from radflash.training.distributed import resolve_device, world_info
from radflash.training.evaluate import calibrate_map_thresholds
from radflash.training.losses import carzero_pair_loss, contrastive_loss, map_loss
from radflash.training.plots import plot_losses
from radflash.training.state import (
    STATE_FILE,
    export_checkpoint,
    find_latest,
    load_trainer_state,
    prune_checkpoints,
    save_trainer_state,
)

log = logging.getLogger("radflash.training")


MIN_LOG_TAU, MAX_LOG_TAU = math.log(0.01), 0.0  # CLIP-style clamp: τ in [0.01, 1]


# ---- building blocks ----------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_ratio × lr``.

    A pure function of the step (no scheduler object), so resuming needs only the step number.
    """
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_tokenizer(kind: str, cfg: ModelConfig) -> PromptTokenizer:
    """A fresh tokenizer for ``cfg``'s text tower: ``phantom`` (the demo vocabulary) or ``basic``.

    Shaped like the tower's own: MPNet special tokens for RadZero, BERT's (``[CLS] … [SEP]``, pad 0)
    for a BERT tower (CARZero), with the config's text cleaning, which is part of the model.
    """
    style = "bert" if cfg.text.kind == "bert" else "mpnet"
    if kind == "phantom":
        from radflash.training.vocab import build_tokenizer as phantom_tokenizer

        tok = phantom_tokenizer(style=style)
    else:
        tok = wordpiece_tokenizer(vocab_size=None, style=style)
    if tok.get_vocab_size() > cfg.text.vocab:
        raise InputError(f"tokenizer has {tok.get_vocab_size()} tokens but the model vocabulary is {cfg.text.vocab}")
    pad = tok.id_to_token(cfg.text.pad_id)
    if pad not in ("<pad>", "[PAD]"):  # padded rows must embed as the tower's padding token
        raise InputError(f"model.text.pad_id {cfg.text.pad_id} is {pad!r} in the {kind} tokenizer, "
                         "not its padding token")
    return PromptTokenizer(tok, pad_id=cfg.text.pad_id, max_length=cfg.text.max_length, cleaning=cfg.text.cleaning)


def phantom_prompts() -> dict[str, str]:
    """Default prompts of a phantom-trained model: finding name → canonical "There is ..." prompt."""
    from radflash.synthetic.phantoms import FINDINGS
    from radflash.training.data import canonical_prompt

    return {name: canonical_prompt(name, None) for name in FINDINGS}


class _Towers(nn.Module):
    """The part of a training step that DDP must see: both towers and the shared LayerNorm.

    DDP synchronises gradients only for computations that go through the wrapped module's
    ``forward``; the loss (which needs the all-gathered features) is computed outside.
    """

    def __init__(self, model: RadZero) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.head_norm(self.model.image_tokens(pixels))
        text = self.model.text_features(input_ids, attention_mask)
        return tokens, text


class _CARZeroTowers(nn.Module):
    """CARZero's towers for DDP: image tokens [g; P] and prompt memories [t; W].

    The fusion decoder scores image × text pairs, so it runs outside, on the (gathered) features:
    its parameters still belong to the wrapped module, so DDP averages their gradients too.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.image_tokens(pixels), self.model.prompt_memory(input_ids, attention_mask)


def map_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts whose maps the map loss supervises: each finding's plain prompt and, with
    ``map_located``, every (finding, location) prompt the generator draws except the held-out ones."""
    from radflash.synthetic.phantoms import allowed_combos
    from radflash.training.data import canonical_prompt

    prompts = list(phantom_prompts().values())
    if cfg.map_located:
        held_out = {(str(f), str(loc)) for f, loc in cfg.data.exclude}
        prompts += [canonical_prompt(f, loc) for f, loc in allowed_combos()
                    if loc is not None and (f, str(loc)) not in held_out]
    return prompts


def _batch_loss(cfg: TrainConfig, model: nn.Module, towers: nn.Module, batch: Batch, *,
                distributed: bool = False, autocast: Any = None) -> torch.Tensor:
    """The family's training loss of one batch (``towers``: the DDP-wrapped or bare tower module).

    ``autocast`` (bf16 on CUDA) covers the towers; RadZero's cosine loss runs in float32 outside it,
    CARZero's fusion decoder inside it (a network, as costly as the ViT at the published size) with
    its cross-entropy in float32.
    """
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    if isinstance(model, RadZero):
        with autocast:
            tokens, text = towers(batch.pixels, batch.input_ids, batch.attention_mask)
        loss = contrastive_loss(model, tokens, text, batch, distributed=distributed,
                                mask_duplicates=cfg.mask_duplicate_negatives)
        if cfg.map_loss_weight:
            loss = loss + _map_term(cfg, model, tokens, text, batch)
        return loss
    with autocast:
        tokens, memory = towers(batch.pixels, batch.input_ids, batch.attention_mask)
        return carzero_pair_loss(model, tokens, memory, batch, distributed=distributed,  # type: ignore[arg-type]
                                 mask_duplicates=cfg.mask_duplicate_negatives)


def _map_term(cfg: TrainConfig, model: RadZero, tokens: torch.Tensor, text: torch.Tensor, batch: Batch) -> torch.Tensor:
    return cfg.map_loss_weight * map_loss(model, tokens, text, batch, balanced=cfg.map_balanced,
                                          pointing_weight=cfg.map_pointing_weight)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: LayerNorm gains, biases, LayerScale and log τ are not regularised."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("log_tau") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def freeze_backbone_(model: nn.Module) -> None:
    """Freeze the vision tower (RadZero's recipe); align layers (RadZero), fusion (CARZero), text
    tower, LN and τ stay trainable."""
    model.vision.requires_grad_(False)
    model.vision.eval()


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output: Path
    final_checkpoint: Path
    steps: int
    losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    exported: Path | None = None


def train(cfg: TrainConfig, *, resume: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run ``cfg``; ``resume`` = a checkpoint folder from ``output/checkpoints`` or "latest"."""
    distributed, rank, world, local_rank = world_info()
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, local_rank, distributed)
    output = Path(cfg.output)
    is_main = rank == 0

    # model + tokenizer
    resume_dir: Path | None = None
    if resume is not None:
        resume_dir = find_latest(output) if str(resume) == "latest" else Path(resume)
        if resume_dir is None:
            raise InputError(f"{output}: nothing to resume (no checkpoints/step_* with {STATE_FILE})")
        if not (resume_dir / STATE_FILE).is_file():
            raise InputError(f"{resume_dir}: not a training checkpoint (no {STATE_FILE})")
    if resume_dir is not None or cfg.model.init:
        where = str(resume_dir or cfg.model.init)
        ckpt = load_checkpoint(where)
        mcfg = ckpt.config
        cfg.check_family(mcfg.architecture, where)  # the YAML's peek cannot see single-file checkpoints
        tokenizer = (ckpt.tokenizer if resume_dir is not None or cfg.model.tokenizer == "checkpoint"
                     else build_tokenizer(cfg.model.tokenizer, mcfg))
        model = build(mcfg)
        check_state_dict(model, ckpt.state_dict, where)
        model.load_state_dict(ckpt.state_dict)
    else:
        mcfg = model_config(cfg.model)
        tokenizer = build_tokenizer(cfg.model.tokenizer, mcfg)
        model = random_model(mcfg, seed=cfg.seed)
    carzero = mcfg.architecture == "carzero"
    bind = getattr(model, "bind_vocabulary", None)  # CARZero: which ids continue a word, for THIS tokenizer
    if bind is not None:
        bind(tokenizer.vocab)
    model.to(device)
    model.train()
    if cfg.freeze_backbone:
        freeze_backbone_(model)
    towers: nn.Module = _CARZeroTowers(model) if carzero else _Towers(model)
    if distributed:
        towers = nn.parallel.DistributedDataParallel(
            towers, device_ids=[device.index] if device.type == "cuda" else None)

    # data
    global_bs = cfg.batch_size * world
    dataset, val_dataset = _datasets(cfg, global_bs, mcfg.grid if cfg.map_loss_weight else None)
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * len(dataset) / global_bs)  # type: ignore[operator]
    if carzero:  # one sentence per image and use, a pure function of (seed, use): see OneSentencePerUse
        dataset = OneSentencePerUse(dataset, cfg.seed)
        val_dataset = OneSentencePerUse(val_dataset, cfg.seed) if val_dataset is not None else None
    collate = Collator(tokenizer, Preprocessing(mcfg.image_size, mcfg.mean, mcfg.std, mcfg.letterbox),
                       map_prompts=map_prompts(cfg) if cfg.map_loss_weight else (), grid=mcfg.grid)

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    start = 0
    losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []
    if resume_dir is not None:
        meta = load_trainer_state(resume_dir / STATE_FILE, optimizer)
        start = int(meta["step"])
        losses = [tuple(x) for x in meta.get("losses", [])]  # type: ignore[misc]
        val_losses = [tuple(x) for x in meta.get("val_losses", [])]  # type: ignore[misc]
        if is_main:
            log.info("resumed from %s at step %d", resume_dir, start)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    schedule = {"lr": cfg.lr, "warmup": cfg.warmup_steps, "total": total, "min_ratio": cfg.min_lr_ratio}
    if is_main:  # loss.png is drawn at every checkpoint: without matplotlib, stop before training, not after
        from radflash.util.plotting import require_plotting

        require_plotting("the training loss curve (loss.png)")
    from radflash.util.progress import progress_bar

    bar = progress_bar(total, desc="train", unit="step", initial=start, enabled=progress and is_main)

    def save(step: int, final: bool = False) -> Path:
        folder = output / "checkpoints" / f"step_{step:06d}"
        # floating tensors in float32 (bf16 autocast never changes the weights' dtype); others (CARZero's
        # bool word-continuation table) as they are
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
                 for k, v in model.state_dict().items()}
        ck = Checkpoint(config=mcfg, state_dict=state, tokenizer=tokenizer, model_id=cfg.model_id,
                        prompts=_prompts(cfg), notice=cfg.notice)
        save_checkpoint(ck, folder)
        save_trainer_state(folder / STATE_FILE, optimizer=optimizer, step=step,
                           extra={"losses": losses, "val_losses": val_losses, "schedule": schedule,
                                  "config": cfg.to_dict(), "world_size": world})
        prune_checkpoints(output / "checkpoints", cfg.keep_checkpoints)
        plot_losses(losses, val_losses, output / "loss.png")
        return folder

    t0 = time.time()
    step = start
    steps: list[list[Any]] = [batch_indices(s, batch_size=cfg.batch_size, length=len(dataset), seed=cfg.seed,
                                            rank=rank, world_size=world) for s in range(start, total)]
    if carzero:  # items are (index, use): see OneSentencePerUse
        steps = [list(zip(idx, batch_uses(s, batch_size=cfg.batch_size, rank=rank, world_size=world)))
                 for s, idx in zip(range(start, total), steps)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=steps, collate_fn=collate, num_workers=cfg.data.workers,
        worker_init_fn=_worker_init if cfg.data.workers else None, prefetch_factor=4 if cfg.data.workers else None,
        multiprocessing_context="fork" if cfg.data.workers and os.name == "posix" else None,
    )
    for step, cpu_batch in zip(range(start, total), loader):
        batch = cpu_batch.to(device)
        lr = lr_at(step, **schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _batch_loss(cfg, model, towers, batch, distributed=distributed, autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        if not carzero:  # CARZero has no temperature
            with torch.no_grad():
                model.log_tau.clamp_(MIN_LOG_TAU, MAX_LOG_TAU)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower lr or check the data")
        losses.append((step + 1, value))
        if on_step is not None:
            on_step(step + 1, value)
        if bar is not None:
            shown = {"loss": f"{value:.3f}", "lr": f"{lr:.1e}"}
            if not carzero:
                shown["tau"] = f"{model.tau:.3f}"
            bar.update(1, **shown)
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < total and val_dataset is not None:
            val_losses.append((done, validation_loss(model, towers, val_dataset, collate, cfg, device)))
            if bar is not None:
                bar.write(f"step {done}: val loss {val_losses[-1][1]:.4f}")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total and is_main:
            save(done)
        if distributed:
            dist.barrier()
    if bar is not None:
        bar.close()
    if val_dataset is not None and total > start:
        val_losses.append((total, validation_loss(model, towers, val_dataset, collate, cfg, device)))
    result = TrainResult(output=output, final_checkpoint=output, steps=total, losses=losses, val_losses=val_losses)
    if is_main:
        log.info("trained %d steps in %.0f s", total - start, time.time() - t0)
        final = save(total, final=True)
        result.final_checkpoint = final
        if cfg.calibrate or cfg.export or cfg.data.exclude:
            ck = load_checkpoint(final)
            if cfg.data.exclude:  # recorded so that `radflash evaluate` tests them by default
                ck.calibration["held_out"] = [list(c) for c in cfg.data.exclude]
            if cfg.calibrate:
                ck.calibration.update(calibrate_map_thresholds(ck, cfg))
            save_checkpoint(ck, final)
            if cfg.export:
                result.exported = export_checkpoint(ck, cfg.export, dtype=cfg.export_dtype)
        (output / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if distributed:
        dist.barrier()
    return result


def _worker_init(worker_id: int) -> None:
    # Phantom drawing is numpy work: one torch thread per worker avoids oversubscribing the cores
    # the training step needs (measured: 2 threads per process on a busy 2-core box ran 3× slower).
    torch.set_num_threads(1)


def _prompts(cfg: TrainConfig) -> dict[str, str]:
    if cfg.prompts is not None:
        return dict(cfg.prompts)
    if cfg.data.source == "phantoms":
        return phantom_prompts()
    from radflash.findings import default_prompts

    return default_prompts()


def _datasets(cfg: TrainConfig, global_bs: int,
              grid: int | None = None) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    d = cfg.data
    if d.source == "phantoms":
        length = d.length or (cfg.steps or 1) * global_bs
        exclude = [tuple(c) for c in d.exclude]
        train_ds = PhantomDataset(seed=d.seed, length=length, size=d.size, exclude=exclude, augment=d.augment,
                                  pool=d.pool, mask_grid=grid, plain_sentence_prob=d.plain_sentence_prob)
        train_ds.prefill(d.pool_processes)
        val_ds = PhantomDataset(seed=d.val_seed, length=d.val_size, size=d.size, exclude=exclude, mask_grid=grid)
        return train_ds, val_ds
    ds = MimicStyleDataset(d.root, reports=d.reports, sentences=d.sentences)  # type: ignore[arg-type]
    return ds, None


@torch.no_grad()
def validation_loss(model: nn.Module, towers: nn.Module, dataset: torch.utils.data.Dataset, collate: Collator,
                    cfg: TrainConfig, device: torch.device) -> float:
    """Mean training loss on fixed validation batches (same batch size as training).

    CARZero's validation items are ``(index, index)``: each image keeps one fixed sentence.
    """
    was_training = model.training
    model.eval()
    values = []
    n = len(dataset)  # type: ignore[arg-type]
    keyed = isinstance(dataset, OneSentencePerUse)
    # the bare module: a DDP forward outside backward would wait for a gradient sync
    inner = towers.module if isinstance(towers, nn.parallel.DistributedDataParallel) else towers
    for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        keys = range(start, start + cfg.batch_size)
        batch = collate([dataset[(i, i) if keyed else i] for i in keys]).to(device)
        values.append(float(_batch_loss(cfg, model, inner, batch)))
    model.train(was_training)
    if cfg.freeze_backbone:
        model.vision.eval()
    return float(sum(values) / len(values)) if values else float("nan")
