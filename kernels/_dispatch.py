"""Which implementation a kernel launcher runs: Triton on CUDA tensors, the torch reference otherwise.

Triton is an optional dependency: this module is the only place that imports it, so a missing
install only matters when Triton is asked for. The Triton interpreter (``TRITON_INTERPRET=1``)
runs the kernels on CPU tensors, which tests use; it is orders of magnitude too slow for real
work, so "auto" never picks it.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # the kernel modules still import; their @jit functions are never launched
    triton = None
    tl = types.SimpleNamespace(constexpr=object)
    HAS_TRITON = False

    def jit(fn):  # type: ignore[no-redef]
        return fn


BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RADFLASH_KERNELS"
INSTALL_HINT = "pip install triton (or pip install 'radflash[triton]')"

_override: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def kernel_backend() -> str:
    """The requested backend: :func:`set_kernel_backend` wins over ``$RADFLASH_KERNELS``, then "auto"."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


class set_kernel_backend(contextlib.AbstractContextManager):
    """Select the kernel backend process-wide; as a context manager, restore the previous choice on exit.

    The CLI calls it once (``--kernels``); tests use ``with set_kernel_backend("triton"):`` so a
    forced backend never leaks into other tests.
    """

    def __init__(self, name: str | None) -> None:
        global _override
        self._previous = _override
        _override = None if name is None else _check(name.strip().lower())

    def __exit__(self, *exc: object) -> None:
        global _override
        _override = self._previous


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide for one call. "auto": Triton iff it is installed and every tensor is on CUDA."""
    name = kernel_backend()
    if name == "torch":
        return False
    if name == "auto":
        return HAS_TRITON and all(t.is_cuda for t in tensors)
    if not HAS_TRITON:
        raise RuntimeError(f"kernel backend 'triton' was requested but triton is not installed: {INSTALL_HINT}")
    if not all(t.is_cuda for t in tensors) and not interpreting():
        raise RuntimeError(
            "kernel backend 'triton' was requested for CPU tensors: move them to a CUDA device, "
            "or set TRITON_INTERPRET=1 before importing radflash (tests only, very slow)"
        )
    return True


@contextlib.contextmanager
def device_of(t: torch.Tensor) -> Iterator[None]:
    """Launch on the tensor's GPU, never on the current default one (multi-GPU hosts)."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield
