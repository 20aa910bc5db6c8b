"""What the trainer needs from ``torchrun``: this process's rank and world, its device, and a gather.

Kept in one place so that a single-process run never touches ``torch.distributed`` (only
:func:`world_info` reads the environment, and it says whether the other two are needed).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def gather_from_ranks(x: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
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


def world_info() -> tuple[bool, int, int, int]:
    """``(distributed, rank, world, local_rank)`` from torchrun's environment; one process: ``(False, 0, 1, 0)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, 1, 0
    return True, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; under DDP each process takes (and selects) its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev
