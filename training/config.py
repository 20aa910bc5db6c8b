"""The training configuration: one YAML file per run, read into :class:`TrainConfig`.

Pydantic dataclasses: types and ranges are checked when a YAML file is read (see
:mod:`radflash.util.schema`), so a bad value stops ``radflash train`` with one line naming the key,
not a TypeError mid-run. Lax mode on purpose: PyYAML reads ``lr: 1e-4`` as the string "1e-4",
accepted as the float 1e-4. Apart from the trainer so the command line can validate a file (and
tests can build configs) without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass as config_dataclass

from radflash.errors import InputError
from radflash.models.config import MAX_IMAGE, PRESETS, ModelConfig, preset
from radflash.util.schema import CONFIG as SCHEMA_CONFIG
from radflash.util.schema import Float, Fraction, Int, validate

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
    # phantom/basic: built for the model's text tower (MPNet-style for RadZero, BERT-style for CARZero);
    # checkpoint: the init checkpoint's own
    tokenizer: Literal["phantom", "basic", "checkpoint"] = "phantom"


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
    # sentence (CARZero: when j's own text is identical). Off = the paper's loss. On phantoms ~70%
    # of sentences are shared negations ("There is no pneumothorax"), which then push apart images
    # that the sentence describes equally well.
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
            architecture = init_architecture(sec.init)
        else:
            architecture = model_config(sec, source=source).architecture  # must be a valid model
        if architecture is not None:
            self.check_family(architecture, source)

    def check_family(self, architecture: str, source: str) -> None:
        """Refuse options the model family cannot honour, one line naming the first such key.

        CARZero scores a pair with its fusion decoder: it has no per-patch similarity maps (so no
        map loss and no segmentation thresholds), no temperature and no align layers. The trainer
        calls this again once an init or resumed checkpoint has told it the family.
        """
        if architecture != "carzero":
            return
        reasons = {
            "map_loss_weight": "they have no similarity maps",
            "calibrate": "segmentation thresholds need similarity maps",
            "model.align_layers": "CARZero has no align layers",
        }
        given = {"map_loss_weight": bool(self.map_loss_weight), "calibrate": self.calibrate,
                 "model.align_layers": bool(self.model.align_layers)}
        for key, reason in reasons.items():
            if given[key]:
                raise InputError(f"{source}: {key}: not supported for carzero models ({reason})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def init_architecture(path: str) -> str | None:
    """The family (``model.architecture``) an init checkpoint FOLDER's ``config.json`` names.

    A cheap peek so that options the family refuses fail while the YAML file is being read; None
    when the folder or its config cannot be read here (a single-file checkpoint, a typo): the
    trainer checks again after loading the checkpoint, and reports a missing one there.
    """
    try:
        meta = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        return str(meta["model"].get("architecture", "radzero"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None


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
