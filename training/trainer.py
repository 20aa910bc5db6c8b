"""Contrastive training of RadZero models (multi-positive NCE over minimal sentences).

One YAML file describes a run (:class:`TrainConfig`); :func:`train` runs it on one device or, under
``torchrun``, on several (DDP). The recipe follows the RadZero paper: AdamW, linear warm-up then
cosine decay, gradient clipping, bf16 autocast on CUDA, optionally a frozen vision tower.

Checkpoints are written in the engine's own format (``save_checkpoint``), so a training output is
directly usable by ``radflash.load``; the optimiser/RNG state needed by ``--resume`` sits beside it
in ``trainer_state.safetensors`` (tensors) whose metadata holds the small scalars as JSON: no
pickle anywhere, like the rest of radflash.

Resumption is exact: data order is a pure function of the step (:func:`data.batch_indices`), the
learning rate a pure function of the step (:func:`lr_at`), and the optimiser state is restored
bit for bit, so N/2 steps + resume + N/2 steps reproduces an uninterrupted N-step run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass as config_dataclass
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from radflash.checkpoint import Checkpoint, check_state_dict, load_checkpoint, save_checkpoint
from radflash.config import MAX_IMAGE, PRESETS, ModelConfig, preset
from radflash.errors import InputError
from radflash.factory import randomize_, wordpiece_tokenizer
from radflash.models import RadZero
from radflash.preprocess import Preprocessing
from radflash.schema import CONFIG as SCHEMA_CONFIG
from radflash.schema import Float, Fraction, Int, validate
from radflash.tokenizer import PromptTokenizer
from radflash.training.data import Batch, Collator, MimicStyleDataset, PhantomDataset, batch_indices

log = logging.getLogger("radflash.training")

STATE_FILE = "trainer_state.safetensors"
_META_KEY = "radflash.trainer"
MIN_LOG_TAU, MAX_LOG_TAU = math.log(0.01), 0.0  # CLIP-style clamp: τ in [0.01, 1]


# ---- configuration ------------------------------------------------------------------------------
# Pydantic dataclasses: types and ranges are checked when a YAML file is read (see radflash.schema),
# so a bad value stops `radflash train` with one line naming the key, not a TypeError mid-run.
# Lax mode on purpose: PyYAML reads `lr: 1e-4` as the string "1e-4", accepted as the float 1e-4.
Count = Annotated[Int, Field(ge=1)]
NonNegInt = Annotated[Int, Field(ge=0)]
NonNeg = Annotated[Float, Field(ge=0)]


def _known_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"must be one of {', '.join(PRESETS)} (got {name!r})")
    return name


@config_dataclass(config=SCHEMA_CONFIG)
class ModelSection:
    preset: Annotated[str, AfterValidator(_known_preset)] = "tiny"
    init: str | None = None  # start from this radflash checkpoint instead of random weights
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's VisionConfig
    text: dict[str, Any] = field(default_factory=dict)
    image_size: Int | None = None
    align_layers: Int | None = None
    tokenizer: Literal["phantom", "basic", "checkpoint"] = "phantom"  # checkpoint: the init checkpoint's own


@config_dataclass(config=SCHEMA_CONFIG)
class DataSection:
    source: Literal["phantoms", "mimic"] = "phantoms"
    seed: NonNegInt = 0  # training images
    size: Annotated[Int, Field(ge=32, le=MAX_IMAGE)] = 224  # phantom side in pixels
    length: Count | None = None  # phantoms: distinct images (default: steps × global batch, all fresh)
    exclude: list[list[str]] = field(default_factory=list)  # held-out (finding, location) combos
    augment: bool = True
    root: str | None = None  # mimic: image folder
    reports: str | None = None  # mimic: CSV with image + report columns
    sentences: str | None = None  # mimic: JSON {image_path: [sentences]}
    val_seed: NonNegInt = 1  # phantoms: validation images (never the training seed)
    val_size: Count = 64  # validation images for the eval loss
    workers: NonNegInt = 0  # DataLoader worker processes drawing phantoms in parallel with the step
    pool: Count | None = None  # phantoms: draw this many once (cached), re-used with fresh augmentation
    pool_processes: Count = 1  # processes drawing the pool before the first step
    plain_sentence_prob: Fraction = 0.0  # phantoms: add "There is X" beside "There is X of the L" this often


@config_dataclass(config=SCHEMA_CONFIG)
class TrainConfig:
    """A training run; every field has a YAML key of the same name (sections: model, data)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    seed: NonNegInt = 0
    steps: Count | None = None
    epochs: Annotated[Float, Field(gt=0)] | None = None  # alternative to steps (needs a finite dataset)
    batch_size: Count = 32  # per process
    lr: Annotated[Float, Field(gt=0)] = 1e-4
    weight_decay: NonNeg = 0.05
    warmup_steps: NonNegInt = 50
    min_lr_ratio: Fraction = 0.0
    grad_clip: NonNeg = 1.0  # 0: no clipping
    # Exclude false negatives: image j is not a negative of sentence k when j owns an identical
    # sentence. Off = the paper's loss. On phantoms ~70% of sentences are shared negations ("There
    # is no pneumothorax"), which then push apart images that the sentence describes equally well.
    mask_duplicate_negatives: bool = False
    # Phantoms only, off by default (not in the paper): weight of a BCE between the finding prompts'
    # patch maps sigmoid(s) and the phantom masks pooled to the patch grid. A from-scratch ViT
    # otherwise parks global information in background "register" patches, so the maps peak outside
    # the body even when classification works (pointing game 0.0 at step 150 of the demo run).
    map_loss_weight: NonNeg = 0.0
    # Which maps that loss supervises and how: ``map_located`` adds every trained (finding, location)
    # prompt (held-out combos never), whose target is empty wherever the finding is elsewhere: it
    # teaches WHERE words point. ``map_balanced`` weighs a map's covered patches as much as the rest
    # (a nodule covers 1 of 144 patches; unweighted, "nothing anywhere" is a near-optimal answer).
    # ``map_pointing_weight`` adds a cross-entropy pulling the softmax over patches (the VL-CABS
    # attention) into the finding: the arg-max is what grounding reports.
    map_located: bool = False
    map_balanced: bool = False
    map_pointing_weight: NonNeg = 0.0
    freeze_backbone: bool = False
    eval_every: NonNegInt = 0  # 0: only at the end
    checkpoint_every: NonNegInt = 0  # 0: only at the end
    keep_checkpoints: Count = 2
    output: str = "runs/train"
    export: str | None = None  # also write the final checkpoint here (e.g. engine/assets/demo)
    # float16 halves a shipped asset (the demo must stay < 10 MB)
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    model_id: str = "radflash-trained"
    notice: str = ""
    prompts: dict[str, str] | None = None  # default prompts stored in the checkpoint (None: phantom set)
    calibrate: bool = False  # choose per-prompt segmentation thresholds on phantom validation images
    calibrate_n: Count = 96
    threads: Count | None = None
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Validate a run description; every problem is one :class:`InputError` line naming the key."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping at the top level")
        # an empty `model:` or `data:` line in YAML is null: the defaults, as if it were absent
        data = {k: v for k, v in data.items() if not (k in ("model", "data") and v is None)}
        cfg = validate(cls, data, source, error=InputError)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: training config not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text file") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str) -> None:
        """Checks that involve several keys (types and ranges are the schema's)."""
        if (self.steps is None) == (self.epochs is None):
            raise InputError(f"{source}: give exactly one of steps or epochs")
        if self.data.source == "phantoms" and self.data.val_seed == self.data.seed:
            raise InputError(f"{source}: data.val_seed must differ from data.seed (held-out validation)")
        if self.data.source == "mimic" and not self.data.root:
            raise InputError(f"{source}: data.root is required for data.source: mimic")
        if self.data.source != "phantoms" and (self.map_loss_weight or self.data.plain_sentence_prob):
            # masks and located sentences exist for phantoms only: on other data every target would be empty
            raise InputError(f"{source}: map_loss_weight and data.plain_sentence_prob need data.source: phantoms")
        if (self.map_located or self.map_balanced or self.map_pointing_weight) and not self.map_loss_weight:
            raise InputError(f"{source}: map_located/map_balanced/map_pointing_weight act through the map loss: "
                             "set map_loss_weight > 0")
        for combo in self.data.exclude:
            if len(combo) != 2:
                raise InputError(f"{source}: data.exclude entries must be [finding, location], got {combo!r}")
        if self.model.tokenizer == "checkpoint" and not self.model.init:
            raise InputError(f"{source}: model.tokenizer: checkpoint needs model.init")
        sec = self.model
        if sec.init:
            overrides = [k for k in ("vision", "text", "image_size", "align_layers") if getattr(sec, k)]
            if overrides:
                # the init checkpoint fixes the architecture: silently ignoring these would mislead
                raise InputError(f"{source}: model.{', model.'.join(overrides)} cannot be combined with "
                                 "model.init (its checkpoint fixes the architecture)")
        else:
            model_config(sec, source=source)  # the overridden preset must be a valid model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building blocks ----------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_ratio × lr``.

    A pure function of the step (no scheduler object), so resuming needs only the step number.
    """
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def model_config(sec: ModelSection, *, source: str = "config") -> ModelConfig:
    """The preset with the section's overrides applied (e.g. fewer vision layers for a test).

    Validated like a checkpoint's config (sizes, divisibility, bounds), with errors naming
    ``model.<key>`` in ``source``.
    """
    base = preset(sec.preset).to_dict()
    data: dict[str, Any] = {**base, "vision": {**base["vision"], **sec.vision}, "text": {**base["text"], **sec.text}}
    if sec.image_size is not None:
        data["image_size"] = sec.image_size
    if sec.align_layers is not None:
        data["align_layers"] = sec.align_layers
    return validate(ModelConfig, data, source, error=InputError, prefix=("model",))


def build_tokenizer(kind: str, cfg: ModelConfig) -> PromptTokenizer:
    if kind == "phantom":
        from radflash.training.vocab import build_tokenizer as phantom_tokenizer

        tok = phantom_tokenizer()
    else:
        tok = wordpiece_tokenizer(vocab_size=None)
    if tok.get_vocab_size() > cfg.text.vocab:
        raise InputError(f"tokenizer has {tok.get_vocab_size()} tokens but the model vocabulary is {cfg.text.vocab}")
    return PromptTokenizer(tok, pad_id=cfg.text.pad_id, max_length=cfg.text.max_length)


def phantom_prompts() -> dict[str, str]:
    """Default prompts of a phantom-trained model: finding name → canonical "There is ..." prompt."""
    from radflash.training.data import canonical_prompt
    from radflash.training.phantoms import FINDINGS

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


def _gather(x: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (sizes may differ); gradients flow back.

    torch.distributed.nn's all_gather sums the incoming gradients over ranks in backward, so every
    rank's local features receive the gradient of the GLOBAL loss (negatives from all ranks).
    """
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    pad = max(sizes_i) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    if grad:
        parts = all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)])


def contrastive_loss(model: RadZero, tokens: torch.Tensor, text: torch.Tensor, batch: Batch,
                     *, distributed: bool = False, mask_duplicates: bool = False) -> torch.Tensor:
    """Multi-positive NCE on ℓ = cosine(LN tokens, LN sentence features), arranged sentences × images.

    ℓ is computed once per UNIQUE sentence text and then indexed per sentence instance.
    """
    from radflash.training.losses import multi_positive_nce

    text_index, owner, hashes = batch.text_index, batch.owner, batch.text_hash
    if mask_duplicates and hashes is None:
        raise ValueError("mask_duplicates needs batch.text_hash")
    if distributed:
        world, rank = dist.get_world_size(), dist.get_rank()
        b_local = torch.tensor([tokens.shape[0], text.shape[0]], device=tokens.device)
        counts = [torch.zeros_like(b_local) for _ in range(world)]
        dist.all_gather(counts, b_local)
        img_off = sum(int(c[0]) for c in counts[:rank])
        txt_off = sum(int(c[1]) for c in counts[:rank])
        tokens, text = _gather(tokens), _gather(text)
        text_index = _gather(text_index + txt_off, grad=False)
        owner = _gather(owner + img_off, grad=False)
        if mask_duplicates:
            hashes = _gather(hashes, grad=False)
    cos = model.cosine(tokens.float(), text.float())  # (B, U)
    cos = cos[:, text_index].T  # (K, B)
    if mask_duplicates:
        h = hashes[text_index]  # (K,)
        owns = torch.nn.functional.one_hot(owner, cos.shape[1]).to(cos.dtype)  # (K, B)
        dup = ((h[:, None] == h[None, :]).to(cos.dtype) @ owns) > 0  # image j owns a copy of k's text
        dup[torch.arange(len(owner), device=cos.device), owner] = False
        # A finite "minus infinity": exp(-1e4/τ) is 0 in both NCE terms, and unlike -inf its gradient
        # with respect to τ is 0 · finite = 0, not 0 · inf = NaN.
        cos = cos.masked_fill(dup, -1e4)
    return multi_positive_nce(cos, owner, model.log_tau.exp())


def map_loss(model: RadZero, tokens: torch.Tensor, text: torch.Tensor, batch: Batch, *,
             balanced: bool = False, pointing_weight: float = 0.0) -> torch.Tensor:
    """BCE between the prompt maps sigmoid(s) (patch tokens, CLS dropped, as ``similarity_maps``) and
    the fraction of each patch covered by the prompt's finding (0 everywhere where it is false).

    ``balanced``: within a map that has a target, the covered patches weigh as much in total as the
    uncovered ones. ``pointing_weight``: plus that weight × the cross-entropy between softmax(s) over
    the patches and the target normalised to a distribution, on maps that have a target.
    """
    if batch.map_rows is None or batch.map_targets is None:
        raise ValueError("map_loss needs a batch collated with map_prompts")
    v = torch.nn.functional.normalize(tokens[:, 1:].float(), dim=-1)
    t = torch.nn.functional.normalize(text[batch.map_rows].float(), dim=-1)
    s = torch.einsum("bnd,fd->bfn", v, t) / model.log_tau.exp()  # (B, F, N)
    target = batch.map_targets.flatten(2).to(s.dtype)
    covered = target.sum(-1, keepdim=True)  # (B, F, 1)
    if balanced:
        # an empty map's weight is irrelevant: it only ever multiplies a zero target
        pos_weight = ((target.shape[-1] - covered) / covered.clamp(min=1e-6)).clamp(1.0, 1e3)
        loss = -(pos_weight * target * torch.nn.functional.logsigmoid(s)
                 + (1 - target) * torch.nn.functional.logsigmoid(-s)).mean()
    else:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, target)
    if pointing_weight:
        has = covered[..., 0] > 0  # (B, F)
        if has.any():
            q = target[has] / covered[has]
            loss = loss - pointing_weight * (q * torch.log_softmax(s[has], dim=-1)).sum(-1).mean()
    return loss


def map_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts whose maps the map loss supervises: each finding's plain prompt and, with
    ``map_located``, every (finding, location) prompt the generator draws except the held-out ones."""
    from radflash.training.data import canonical_prompt
    from radflash.training.phantoms import allowed_combos

    prompts = list(phantom_prompts().values())
    if cfg.map_located:
        held_out = {(str(f), str(loc)) for f, loc in cfg.data.exclude}
        prompts += [canonical_prompt(f, loc) for f, loc in allowed_combos()
                    if loc is not None and (f, str(loc)) not in held_out]
    return prompts


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


def freeze_backbone_(model: RadZero) -> None:
    """Freeze the vision tower (RadZero's recipe); align layers, text tower, LN and τ stay trainable."""
    model.vision.requires_grad_(False)
    model.vision.eval()


# ---- trainer state (no pickle) ------------------------------------------------------------------
def save_trainer_state(path: Path, *, optimizer: torch.optim.Optimizer, step: int,
                       extra: dict[str, Any]) -> None:
    """Optimiser tensors + RNG states in safetensors; param groups and scalars as JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, **extra}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})[_META_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def find_latest(output: Path) -> Path | None:
    ckpts = sorted((output / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [p for p in ckpts if (p / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output: Path
    final_checkpoint: Path
    steps: int
    losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    exported: Path | None = None


def _dist_info() -> tuple[bool, int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, 1, 0
    return True, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def train(cfg: TrainConfig, *, resume: str | Path | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run ``cfg``; ``resume`` = a checkpoint folder from ``output/checkpoints`` or "latest"."""
    distributed, rank, world, local_rank = _dist_info()
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.device, local_rank, distributed)
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
        ckpt = load_checkpoint(resume_dir or cfg.model.init)  # type: ignore[arg-type]
        mcfg = ckpt.config
        tokenizer = (ckpt.tokenizer if resume_dir is not None or cfg.model.tokenizer == "checkpoint"
                     else build_tokenizer(cfg.model.tokenizer, mcfg))
        model = RadZero(mcfg)
        check_state_dict(model, ckpt.state_dict, str(resume_dir or cfg.model.init))
        model.load_state_dict(ckpt.state_dict)
    else:
        mcfg = model_config(cfg.model)
        tokenizer = build_tokenizer(cfg.model.tokenizer, mcfg)
        model = randomize_(RadZero(mcfg), seed=cfg.seed)
    model.to(device)
    model.train()
    if cfg.freeze_backbone:
        freeze_backbone_(model)
    towers: nn.Module = _Towers(model)
    if distributed:
        towers = nn.parallel.DistributedDataParallel(
            towers, device_ids=[device.index] if device.type == "cuda" else None)

    # data
    global_bs = cfg.batch_size * world
    dataset, val_dataset = _datasets(cfg, global_bs, mcfg.grid if cfg.map_loss_weight else None)
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * len(dataset) / global_bs)  # type: ignore[operator]
    collate = Collator(tokenizer, Preprocessing(mcfg.image_size, mcfg.mean, mcfg.std),
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
        from radflash.plotting import require_plotting

        require_plotting("the training loss curve (loss.png)")
    from radflash.progress import progress_bar

    bar = progress_bar(total, desc="train", unit="step", initial=start, enabled=progress and is_main)

    def save(step: int, final: bool = False) -> Path:
        folder = output / "checkpoints" / f"step_{step:06d}"
        ck = Checkpoint(config=mcfg, state_dict={k: v.detach().float().cpu() for k, v in model.state_dict().items()},
                        tokenizer=tokenizer, model_id=cfg.model_id, prompts=_prompts(cfg), notice=cfg.notice)
        save_checkpoint(ck, folder)
        save_trainer_state(folder / STATE_FILE, optimizer=optimizer, step=step,
                           extra={"losses": losses, "val_losses": val_losses, "schedule": schedule,
                                  "config": cfg.to_dict(), "world_size": world})
        _prune(output / "checkpoints", cfg.keep_checkpoints)
        plot_losses(losses, val_losses, output / "loss.png")
        return folder

    t0 = time.time()
    step = start
    steps = [batch_indices(s, batch_size=cfg.batch_size, length=len(dataset), seed=cfg.seed, rank=rank,
                           world_size=world) for s in range(start, total)]
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
        with autocast:
            tokens, text = towers(batch.pixels, batch.input_ids, batch.attention_mask)
        loss = contrastive_loss(model, tokens, text, batch, distributed=distributed,
                                mask_duplicates=cfg.mask_duplicate_negatives)
        if cfg.map_loss_weight:
            loss = loss + _map_term(cfg, model, tokens, text, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.log_tau.clamp_(MIN_LOG_TAU, MAX_LOG_TAU)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower lr or check the data")
        losses.append((step + 1, value))
        if on_step is not None:
            on_step(step + 1, value)
        if bar is not None:
            bar.update(1, loss=f"{value:.3f}", tau=f"{model.tau:.3f}", lr=f"{lr:.1e}")
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
                ck.calibration.update(_calibrate(ck, cfg))
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


def export_checkpoint(ck: Checkpoint, path: str | Path, *, dtype: str = "float32") -> Path:
    """Save ``ck`` with its floating tensors cast to ``dtype`` (the engine casts back on load)."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"export_dtype must be float32, float16 or bfloat16, got {dtype!r}")
    target = getattr(torch, dtype)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in ck.state_dict.items()}
    return save_checkpoint(dataclasses.replace(ck, state_dict=state), path)


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
def validation_loss(model: RadZero, towers: nn.Module, dataset: torch.utils.data.Dataset, collate: Collator,
                    cfg: TrainConfig, device: torch.device) -> float:
    """Mean contrastive loss on fixed validation batches (same batch size as training)."""
    was_training = model.training
    model.eval()
    values = []
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        batch = collate([dataset[i] for i in range(start, start + cfg.batch_size)]).to(device)
        # the bare module: a DDP forward outside backward would wait for a gradient sync
        inner = towers.module if isinstance(towers, nn.parallel.DistributedDataParallel) else towers
        tokens, text = inner(batch.pixels, batch.input_ids, batch.attention_mask)
        value = contrastive_loss(model, tokens, text, batch, mask_duplicates=cfg.mask_duplicate_negatives)
        if cfg.map_loss_weight:
            value = value + _map_term(cfg, model, tokens, text, batch)
        values.append(float(value))
    model.train(was_training)
    if cfg.freeze_backbone:
        model.vision.eval()
    return float(sum(values) / len(values)) if values else float("nan")


def _calibrate(ck: Checkpoint, cfg: TrainConfig) -> dict[str, Any]:
    """Per-prompt segmentation thresholds chosen on phantom VALIDATION images (not the test seed)."""
    from radflash.api import RadFlashModel
    from radflash.training.evaluate import choose_thresholds

    model = RadFlashModel(ck, device="cpu")
    val = PhantomDataset(seed=cfg.data.val_seed, length=cfg.calibrate_n, size=cfg.data.size)
    thresholds = choose_thresholds(model, val, prompts=ck.prompts)
    return {
        "map_thresholds": thresholds,
        "map_thresholds_chosen_on": f"phantoms seed={cfg.data.val_seed} n={cfg.calibrate_n}",
        "map_thresholds_metric": "mean Dice on positive validation images",
    }


def _prune(folder: Path, keep: int) -> None:
    import shutil

    ckpts = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def plot_losses(losses: list[tuple[int, float]], val_losses: list[tuple[int, float]], path: Path) -> Path | None:
    """Loss curve PNG (raw + moving average, validation points); Agg backend, no display needed."""
    if not losses:
        return None
    import numpy as np

    from radflash.plotting import pyplot, save_figure

    plt = pyplot()

    steps = np.array([s for s, _ in losses])
    vals = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, vals, color="0.75", lw=0.8, label="train (per step)")
    win = max(1, len(vals) // 50)
    if win > 1:
        smooth = np.convolve(vals, np.ones(win) / win, mode="valid")
        ax.plot(steps[win - 1:], smooth, color="C0", label=f"train ({win}-step mean)")
    if val_losses:
        ax.plot([s for s, _ in val_losses], [v for _, v in val_losses], "o-", color="C3", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (multi-positive NCE + weighted map BCE)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=100)
