"""The one registry of benchmark shapes: every benchmark script takes its shapes from here.

Head: B=64 images of 518² (37×37 patches + CLS = 1370 tokens) or 1036² (74×74 + 1 = 5477), width
768, bf16, with the 14 default findings, a few hundred anatomy/finding phrases, and an open
vocabulary of 2048 prompts. Maps: 14 prompts at a 2048² output from both grids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShape:
    b: int
    t: int
    n: int
    d: int
    dtype: str = "bfloat16"
    fused_ln: bool = True  # the model fuses the shared LayerNorm into the head
    return_maps: bool = False

    @property
    def name(self) -> str:
        maps = "+maps" if self.return_maps else ""
        return f"vlcabs B{self.b} T{self.t} N{self.n} D{self.d} {self.dtype}{maps}"


@dataclass(frozen=True)
class MapShape:
    b: int
    t: int
    grid: tuple[int, int]
    size: tuple[int, int]
    output: str = "prob"  # "prob" | "mask" | "none"
    sim_dtype: str = "bfloat16"  # vlcabs returns maps in the tokens' dtype
    prob_dtype: str = "float16"

    @property
    def name(self) -> str:
        (h, w), (hh, ww) = self.grid, self.size
        return f"maps B{self.b} T{self.t} {h}x{w}->{hh}x{ww} {self.output}"


HEAD_SHAPES: tuple[HeadShape, ...] = (
    *(HeadShape(b=64, t=t, n=n, d=768) for n in (1370, 5477) for t in (14, 256, 2048)),
    # With maps: segmentation runs keep s for the pixel maps (adds B·T·(N-1) writes).
    *(HeadShape(b=64, t=14, n=n, d=768, return_maps=True) for n in (1370, 5477)),
)

MAP_SHAPES: tuple[MapShape, ...] = tuple(
    # "both" (segment writing maps and masks) against "prob" + "mask", its two-pass alternative
    MapShape(b=1, t=14, grid=g, size=(2048, 2048), output=out) for g in ((74, 74), (37, 37))
    for out in ("prob", "mask", "both")
)
