"""Model architecture and checkpoint configuration.

Sizes live in frozen dataclasses so that a checkpoint's ``config.json`` can be validated field by
field: an unknown or missing field is a user error (a checkpoint from another tool or version),
reported by name rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from radflash.errors import CheckpointError

FORMAT_NAME = "radflash"
FORMAT_VERSION = 1

# ImageNet statistics, the DINOv2 preprocessor's defaults; real checkpoints carry their own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    patch: int = 14
    pos_grid: int = 16  # g0: side of the grid the position embeddings were trained on
    in_chans: int = 3
    eps: float = 1e-6


@dataclass(frozen=True)
class TextConfig:
    vocab: int = 30527
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_positions: int = 514
    buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-5
    pad_id: int = 1
    max_length: int = 512


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    align_layers: int = 2
    head_eps: float = 1e-5
    image_size: int = 518
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    architecture: str = "radzero"

    def __post_init__(self) -> None:
        if self.vision.hidden != self.text.hidden:
            raise CheckpointError(
                f"vision width {self.vision.hidden} != text width {self.text.hidden}: "
                "the shared LayerNorm needs equal widths"
            )
        if self.image_size % self.vision.patch:
            raise CheckpointError(f"image_size {self.image_size} is not a multiple of patch {self.vision.patch}")

    @property
    def grid(self) -> int:
        return self.image_size // self.vision.patch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        data = dict(data)
        vision = strict_dataclass(VisionConfig, data.pop("vision", {}), f"{source}: model.vision")
        text = strict_dataclass(TextConfig, data.pop("text", {}), f"{source}: model.text")
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return strict_dataclass(cls, {**data, "vision": vision, "text": text}, f"{source}: model")


def strict_dataclass(kind: type, data: Any, where: str, *, error: type[Exception] = CheckpointError,
                     label: str = "config field") -> Any:
    """Build dataclass ``kind`` from a mapping, naming unknown or wrong fields in one ``error`` line.

    Shared by checkpoint configs and training configs: a typo in either must not be ignored.
    """
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"{where}: unknown {label}(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    try:
        return kind(**data)
    except TypeError as exc:
        raise error(f"{where}: {exc}") from None


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
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}") from None
