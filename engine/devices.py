"""Device, dtype and precision resolution shared by the API and every CLI command.

An explicitly requested device must exist: ``cuda:7`` on a CPU machine (or on one with two GPUs)
is an error, since silently running a job meant for a GPU on the CPU turns minutes into days
without anyone noticing. Only ``auto`` chooses, and it says so when it falls back.

A requested ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``, ``int8``) decides two things:

- the *storage* dtype of the model's module (:func:`resolve_dtype`): on CUDA the requested float
  type (``auto``/none: bfloat16); on the CPU always float32, so the text tower, the heads, softmax,
  norms and map upsampling keep float32 accumulation whatever the encoder runs in;
- the *encoder precision* (:func:`resolve_precision`: ``fp32``/``bf16``/``fp16``/``int8``, or ``auto``
  on the CPU: chosen by measurement in :mod:`radflash.backends.auto`), which the image-encoder backend
  runs in. The encoder is ≥95% of the work, so that is where lower precision pays.

Which precisions a CPU runs natively comes from its flags (:func:`native_precisions`): bf16 needs
AMX-BF16 or AVX512-BF16 (without them torch and OpenVINO emulate it, ~50× slower on an AVX2-only
EPYC), fp16 needs AMX-FP16 or AVX512-FP16; float32 and int8 always run (int8 through VNNI where
present, else through AVX2 widening multiplies).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache

import torch

from radflash.errors import InputError
from radflash.util.sysinfo import cpuinfo_fields

log = logging.getLogger("radflash.devices")


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


# Encoder precisions, by their short names (ONNX/TensorRT/OpenVINO spell them so), and what users may type.
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8")
_PRECISION_NAMES = {
    "float32": "fp32", "fp32": "fp32", "f32": "fp32",
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "fp16", "fp16": "fp16", "half": "fp16", "f16": "fp16",
    "int8": "int8", "i8": "int8",
}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """The encoder precision asked for: ``fp32``/``bf16``/``fp16``/``int8``, or ``auto`` (CPU: measured).

    ``None`` keeps the historical defaults without any measurement: float32 on the CPU, bfloat16 on
    CUDA. ``auto`` on CUDA is bfloat16 (a fixed rule: every CUDA GPU since Ampere runs it natively).
    """
    if isinstance(dtype, torch.dtype):
        for name, dt in PRECISION_DTYPES.items():
            if dt == dtype:
                return name
        raise InputError(f"unsupported dtype {dtype}: use float32, bfloat16, float16 or int8")
    if dtype is None:
        return "bf16" if device.type == "cuda" else "fp32"
    text = str(dtype).strip().lower()
    if text == "auto":
        return "bf16" if device.type == "cuda" else "auto"
    try:
        return _PRECISION_NAMES[text]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_CHOICES)}") from None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The module's storage dtype for a requested ``dtype`` (see the module docstring).

    A ``torch.dtype`` is taken as it is (the caller wants the whole module in it). A name on the
    CPU gives float32 storage: lower precision is the encoder backend's business there. On CUDA a
    float name is the storage dtype; ``auto``/``None`` and ``int8`` (whose encoder is a TensorRT or
    ONNX Runtime graph) store bfloat16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    precision = resolve_precision(dtype, device)
    if device.type != "cuda":
        return torch.float32
    return PRECISION_DTYPES.get(precision, torch.bfloat16)


# ---- what this CPU runs natively -------------------------------------------------------------------
_NATIVE_FLAGS = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "fp16": ("amx_fp16", "avx512_fp16"),
    "int8_fast": ("amx_int8", "avx512_vnni", "avx_vnni"),
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: nothing is assumed)."""
    fields = cpuinfo_fields()
    return frozenset((fields.get("flags") or fields.get("features") or "").split())


def native_precisions(flags: Iterable[str] | None = None) -> tuple[str, ...]:
    """The encoder precisions this CPU runs natively, fastest kinds last: fp32 and int8 always,
    bf16 with AMX-BF16/AVX512-BF16, fp16 with AMX-FP16/AVX512-FP16."""
    have = cpu_flags() if flags is None else frozenset(flags)
    out = ["fp32", "int8"]
    out += [p for p in ("bf16", "fp16") if have & set(_NATIVE_FLAGS[p])]
    return tuple(out)


def fast_int8(flags: Iterable[str] | None = None) -> bool:
    """Whether int8 dot products are single instructions here (VNNI or AMX-INT8)."""
    have = cpu_flags() if flags is None else frozenset(flags)
    return bool(have & set(_NATIVE_FLAGS["int8_fast"]))
