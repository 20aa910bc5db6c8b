"""Native PyTorch modules of the supported models (lean, fusable, exportable)."""

from radflash.models.radzero import RadZero

__all__ = ["RadZero"]
