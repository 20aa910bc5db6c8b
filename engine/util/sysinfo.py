"""What machine a benchmark ran on: CPU, GPU, driver and library versions.

Versions come from package metadata, so optional libraries (triton, onnxruntime, tensorrt,
transformers) are reported without being imported; absent ones are ``None``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "triton", "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers", "numpy", "pydicom")


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` (``cpuinfo``: its text, read when None), keys
    lower-cased; empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the end of the first processor's block
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model(cpuinfo: str | None = None) -> str:
    return _model_name(cpuinfo_fields(cpuinfo))


def _model_name(fields: dict[str, str]) -> str:
    return fields.get("model name") or platform.processor() or platform.machine()


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The CPU model with its x86 family and model numbers, e.g. ``AMD EPYC (family 25 model 1)``.

    The model name alone does not tell CPU generations apart: a Zen 3 and a Zen 4 EPYC under a hypervisor
    both read ``AMD EPYC``, yet one lacks AVX-512 and runs bf16 ~50x slower. Benchmark results are filed
    per CPU kind, so they need the numbers too. ``cpuinfo`` is ``/proc/cpuinfo``'s text (read when None).
    """
    fields = cpuinfo_fields(cpuinfo)
    name = _model_name(fields)
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_slug() -> str:
    """:func:`cpu_kind` as a file-name part: ``amd-epyc-family-25-model-1``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", cpu_kind()).strip("-").lower()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new work (``MemAvailable``), or None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def machine_info(device: Any = None) -> dict[str, Any]:
    """A flat, JSON-ready description of this machine and the software stack."""
    import torch

    from radflash import __version__

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_kind(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "radflash": __version__,
        "versions": {name: package_version(name) for name in PACKAGES},
        "cuda_runtime": torch.version.cuda,
        "gpu": None,
        "gpu_memory_gib": None,
        "gpu_capability": None,
        "driver": None,
    }
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", driver=nvidia_driver())
    return info


def one_line(info: dict[str, Any]) -> str:
    """``"AMD EPYC … (2 cores) · no GPU · torch 2.13.0"`` for table titles and result files."""
    gpu = f"{info['gpu']} (driver {info['driver']})" if info.get("gpu") else "no GPU"
    return f"{info['cpu']} ({info['cpu_cores_usable']} cores) · {gpu} · torch {info['versions'].get('torch')}"
