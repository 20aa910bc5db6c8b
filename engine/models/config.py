"""Model architecture and checkpoint configuration.

Sizes live in frozen (pydantic) dataclasses so that a checkpoint's ``config.json`` is validated
field by field before anything is allocated: an unknown or missing field (a checkpoint from
another tool or version), a wrong type, a zero that would later divide (heads, patch), a size
that would allocate gigabytes, or a normalisation that turns every score into NaN is reported as
one :class:`CheckpointError` line naming the key, never silently accepted. Direct construction
(``VisionConfig(heads=0)``, ``dataclasses.replace``) runs the same checks.

Upper bounds are deliberately generous (several times the largest published ViT/BERT sizes);
they exist so that a corrupt or hostile ``layers: 1000000`` fails at once instead of building a
model until memory runs out. The weights file is checked against the config separately
(:func:`radflash.checkpoints.format.check_header`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from radflash.errors import CheckpointError
from radflash.models.registry import check_name as _known_family
from radflash.util.schema import CONFIG, RGB, Float, Int, validate

FORMAT_NAME = "radflash"
FORMAT_VERSION = 1

# ImageNet statistics, the DINOv2 preprocessor's defaults; real checkpoints carry their own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sane maxima: ViT-22B has 48 layers of width 6144; RadZero-base 12 layers of 768.
MAX_LAYERS = 256
MAX_WIDTH = 16384
MAX_MLP = 65536
MAX_VOCAB = 1 << 20
MAX_IMAGE = 8192
MAX_POSITIONS = 1 << 16

Layers = Annotated[Int, Field(ge=1, le=MAX_LAYERS)]
Width = Annotated[Int, Field(ge=1, le=MAX_WIDTH)]
Heads = Annotated[Int, Field(ge=1, le=MAX_WIDTH)]
MlpWidth = Annotated[Int, Field(ge=1, le=MAX_MLP)]
Eps = Annotated[Float, Field(gt=0, lt=1)]


@dataclass(frozen=True, config=CONFIG)
class VisionConfig:
    hidden: Width = 768
    layers: Layers = 12
    heads: Heads = 12
    mlp: MlpWidth = 3072
    patch: Annotated[Int, Field(ge=1, le=MAX_IMAGE)] = 14
    pos_grid: Annotated[Int, Field(ge=1, le=MAX_IMAGE)] = 16  # g0: side of the grid the positions were trained on
    in_chans: Literal[3] = 3  # preprocessing always feeds 3 equal channels
    eps: Eps = 1e-6
    # DINOv2 blocks scale each residual branch by a learned vector; MAE/timm ViTs (CARZero) do not
    layer_scale: bool = True

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        _divisible(self.hidden, self.heads)
        return self


@dataclass(frozen=True, config=CONFIG)
class TextConfig:
    # "mpnet": relative position buckets (RadZero); "bert": absolute positions + token types (CARZero)
    kind: Literal["mpnet", "bert"] = "mpnet"
    vocab: Annotated[Int, Field(ge=1, le=MAX_VOCAB)] = 30527
    hidden: Width = 768
    layers: Layers = 12
    heads: Heads = 12
    mlp: MlpWidth = 3072
    max_positions: Annotated[Int, Field(ge=3, le=MAX_POSITIONS)] = 514
    buckets: Annotated[Int, Field(ge=4, le=MAX_POSITIONS)] = 32  # ≥ 4: bucketing divides by buckets // 4
    max_distance: Annotated[Int, Field(ge=2, le=MAX_POSITIONS)] = 128
    eps: Eps = 1e-5
    pad_id: Annotated[Int, Field(ge=0)] = 1
    max_length: Annotated[Int, Field(ge=1)] = 512
    type_vocab: Annotated[Int, Field(ge=1, le=MAX_VOCAB)] = 2  # BERT token types (all prompts use type 0)
    # text cleaning applied before the tokenizer; part of the model ("carzero": see radflash.models.prompt_cleaning)
    cleaning: Literal["none", "carzero"] = "none"

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        _divisible(self.hidden, self.heads)
        if self.pad_id >= self.vocab:
            raise ValueError(f"pad_id {self.pad_id} must be < vocab {self.vocab}")
        if self.kind == "bert":
            if self.max_length > self.max_positions:  # BERT positions run from 0 to max_length - 1
                raise ValueError(f"max_length {self.max_length} must be ≤ max_positions {self.max_positions}")
            return self
        if self.max_length + self.pad_id + 1 > self.max_positions:
            # MPNet positions run from pad_id + 1 to pad_id + max_length: all must index the table
            raise ValueError(f"max_length {self.max_length} + pad_id {self.pad_id} + 1 must be ≤ "
                             f"max_positions {self.max_positions}")
        if self.max_distance <= self.buckets // 4:
            # the log-spaced buckets divide by log(max_distance / (buckets // 4))
            raise ValueError(f"max_distance {self.max_distance} must be > buckets // 4 = {self.buckets // 4}")
        return self


@dataclass(frozen=True, config=CONFIG)
class FusionConfig:
    """CARZero's cross-attention fusion: decoder layers without self-attention, then an MLP to one score."""

    layers: Layers = 4
    heads: Heads = 4
    ffn: MlpWidth = 1024
    eps: Eps = 1e-5
    mlp: tuple[MlpWidth, ...] = (1024, 512, 256)  # hidden widths of the scoring MLP (ReLU between)


def _divisible(hidden: int, heads: int) -> None:
    if hidden % heads:
        raise ValueError(f"hidden {hidden} must be divisible by heads {heads}")


def _positive_std(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if not all(v > 0 for v in value):
        raise ValueError(f"every value must be > 0, images are divided by it (got {list(value)})")
    return value


@dataclass(frozen=True, config=CONFIG)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    align_layers: Annotated[Int, Field(ge=0, le=MAX_LAYERS)] = 2
    head_eps: Eps = 1e-5
    image_size: Annotated[Int, Field(ge=1, le=MAX_IMAGE)] = 518
    mean: RGB = IMAGENET_MEAN
    std: Annotated[RGB, AfterValidator(_positive_std)] = IMAGENET_STD
    # the model family (radflash.models.registry): which module is built from this config
    architecture: Annotated[str, AfterValidator(_known_family)] = "radzero"
    # CARZero only: the fusion decoder, and the letterbox side (resize the longer side to it, pad
    # to a square, centre-crop image_size); None = resize straight to image_size (RadZero)
    fusion: FusionConfig | None = None
    letterbox: Annotated[Int, Field(ge=1, le=MAX_IMAGE)] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.letterbox is not None and self.letterbox < self.image_size:
            raise ValueError(f"letterbox {self.letterbox} must be ≥ image_size {self.image_size} (centre crop)")
        if self.architecture == "carzero":
            if self.fusion is None:
                raise ValueError("a carzero model needs a 'fusion' section")
            if self.text.kind != "bert":
                raise ValueError("a carzero model needs text.kind 'bert'")
            _divisible(self.vision.hidden, self.fusion.heads)
        if self.vision.hidden != self.text.hidden:
            raise ValueError(f"vision.hidden {self.vision.hidden} must equal text.hidden {self.text.hidden}: "
                             "the shared LayerNorm needs equal widths")
        if self.image_size % self.vision.patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of vision.patch {self.vision.patch}")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.vision.patch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Validate the ``model`` section of a checkpoint config; errors name ``model.<key>``."""
        return validate(cls, data, source, error=CheckpointError, prefix=("model",))


def strict_dataclass(kind: type, data: Any, where: str, *, error: type[Exception] = CheckpointError,
                     label: str = "config field") -> Any:
    """Build config dataclass ``kind`` from a mapping or raise ``error`` with one line.

    Kept for callers of the earlier builder; the checks are now pydantic's (see
    :mod:`radflash.util.schema`). ``label`` is unused: errors say "unknown key".
    """
    return validate(kind, data, where, error=error)


PRESETS: dict[str, ModelConfig] = {
    # The published RadZero sizes (DINOv2 ViT-B/14 + 2 align layers, MPNet-base).
    "base": ModelConfig(),
    # Small enough to train on a laptop CPU in minutes; the embedded demo model uses it.
    "tiny": ModelConfig(
        vision=VisionConfig(hidden=192, layers=4, heads=3, mlp=768, pos_grid=16),
        text=TextConfig(vocab=2048, hidden=192, layers=3, heads=3, mlp=768, max_positions=130, max_length=128),
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    ),
    # The published CARZero sizes (MAE ViT-B/16 at 224, BERT-base, 4-layer fusion decoder).
    "carzero": ModelConfig(
        vision=VisionConfig(patch=16, pos_grid=14, layer_scale=False),
        text=TextConfig(kind="bert", vocab=28996, eps=1e-12, pad_id=0, max_positions=512, max_length=97,
                        cleaning="carzero"),
        align_layers=0,
        image_size=224,
        letterbox=256,
        mean=(0.4978,) * 3,
        std=(0.2449,) * 3,
        architecture="carzero",
        fusion=FusionConfig(),
    ),
    # CARZero's structure at test sizes (odd widths on purpose: 4 fusion heads of 12).
    "carzero-tiny": ModelConfig(
        vision=VisionConfig(hidden=48, layers=2, heads=3, mlp=96, patch=16, pos_grid=4, layer_scale=False),
        text=TextConfig(kind="bert", vocab=2048, hidden=48, layers=2, heads=3, mlp=96, eps=1e-12, pad_id=0,
                        max_positions=128, max_length=97, cleaning="carzero"),
        align_layers=0,
        image_size=64,
        letterbox=72,
        mean=(0.4978,) * 3,
        std=(0.2449,) * 3,
        architecture="carzero",
        fusion=FusionConfig(layers=2, heads=4, ffn=64, mlp=(40, 24, 16)),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}") from None
