"""Device and dtype resolution shared by the API and every CLI command.

An explicitly requested device must exist: ``cuda:7`` on a CPU machine (or on one with two GPUs)
is an error, since silently running a job meant for a GPU on the CPU turns minutes into days
without anyone noticing. Only ``auto`` chooses, and it says so when it falls back.
"""

from __future__ import annotations

import logging

import torch

from radflash.errors import InputError

log = logging.getLogger("radflash.devices")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → first CUDA device if any, else CPU; an explicit device that is absent is an error.

    ``auto`` on a CUDA build of torch that finds no GPU (driver missing, all devices hidden) logs a
    warning before using the CPU; on a CPU-only build the CPU is simply the device there is.

    Raises:
        InputError: unknown device string, or ``cuda``/``cuda:N`` that this machine does not have.
    """
    text = str(device).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda is not None:
            log.warning("no CUDA device available to this CUDA build of torch; --device auto runs on the CPU")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device found"
            raise InputError(f"device {device!r} requested but CUDA is not available ({build}); "
                             f"use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if isinstance(device, torch.device):  # other device types (mps, xpu...) are the caller's choice
        return device
    raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``auto`` → float32 on CPU (bf16 matmuls are slow there), bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None
