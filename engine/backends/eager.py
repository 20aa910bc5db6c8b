"""Plain PyTorch: the reference every other backend is tested against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radflash.api import RadFlashModel


class EagerBackend:
    name = "eager"

    def __init__(self, model: RadFlashModel) -> None:
        self.module = model.module

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.image_tokens(pixels)
