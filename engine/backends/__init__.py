"""Image-encoder backends: one protocol, picked by name, imported lazily.

The encoder (ViT + align layers) is ≥95% of the work, so it is the part that gets compiled;
everything else (text, head, maps) is shared by all backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from radflash.errors import InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel


class EncoderBackend(Protocol):
    name: str

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, 1 + N, D) tokens."""


class EagerBackend:
    name = "eager"

    def __init__(self, model: RadFlashModel) -> None:
        self.module = model.module

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.image_tokens(pixels)


BACKENDS = ("eager",)


def make_backend(name: str, model: RadFlashModel) -> EncoderBackend:
    if name == "eager":
        return EagerBackend(model)
    raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
