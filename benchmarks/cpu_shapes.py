"""CPU section of the benchmark shapes, and the encoder sizes of ``bench_encoder_gpu.py``.

Kernel shape types come from the one registry, ``shapes.py`` (its instances are GPU-sized: B=64,
bf16); the instances here are sized for a 2-core CPU and float32 (bf16 matmuls are slow on CPU),
so that ``python -m pytest benchmarks --benchmark-enable`` finishes in about a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

from shapes import HeadShape, MapShape


@dataclass(frozen=True)
class PreprocessShape:
    b: int
    h: int  # decoded image size
    w: int
    s: int  # model input side

    @property
    def name(self) -> str:
        return f"preprocess B{self.b} {self.h}x{self.w}->{self.s}"


@dataclass(frozen=True)
class DecodeShape:
    size: int
    encoding: str  # label
    bits: int = 12
    photometric: str = "MONOCHROME2"
    jpeg2000: bool = False

    @property
    def name(self) -> str:
        return f"decode {self.size}x{self.size} {self.encoding}"


@dataclass(frozen=True)
class EncoderShape:
    preset: str
    image_size: int
    batches: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"encoder {self.preset}@{self.image_size}"


# RadZero at 518²: 1370 tokens of width 768; T = 14 CheXpert findings or 256 open-vocabulary phrases.
HEAD_CPU: tuple[HeadShape, ...] = (
    HeadShape(b=1, t=14, n=1370, d=768, dtype="float32"),
    HeadShape(b=8, t=14, n=1370, d=768, dtype="float32"),
    HeadShape(b=1, t=256, n=1370, d=768, dtype="float32"),
    HeadShape(b=8, t=14, n=1370, d=768, dtype="float32", return_maps=True),
)

# 37×37 patch grid to the decoded image size (a typical chest film is 2–3k px a side; 1024² keeps
# the map within memory on a small CPU box).
MAPS_CPU: tuple[MapShape, ...] = (
    MapShape(b=1, t=14, grid=(37, 37), size=(1024, 1024), output="prob", sim_dtype="float32"),
    MapShape(b=1, t=14, grid=(37, 37), size=(1024, 1024), output="mask", sim_dtype="float32"),
    MapShape(b=1, t=14, grid=(37, 37), size=(1024, 1024), output="both", sim_dtype="float32"),  # vs prob + mask
    MapShape(b=8, t=14, grid=(37, 37), size=(512, 512), output="prob", sim_dtype="float32"),
)

PREPROCESS_CPU: tuple[PreprocessShape, ...] = (
    PreprocessShape(b=1, h=2048, w=2048, s=518),
    PreprocessShape(b=8, h=1024, w=1024, s=518),
    PreprocessShape(b=8, h=301, w=301, s=224),
)

DECODE_CPU: tuple[DecodeShape, ...] = (
    DecodeShape(size=1024, encoding="12-bit"),
    DecodeShape(size=1024, encoding="16-bit MONOCHROME1", bits=16, photometric="MONOCHROME1"),
    DecodeShape(size=1024, encoding="12-bit JPEG 2000", jpeg2000=True),
)

# bench_encoder_gpu.py: the published size at its native resolution, batch 1..64.
ENCODER_GPU: tuple[EncoderShape, ...] = (EncoderShape("base", 518, (1, 2, 4, 8, 16, 32, 64)),)
