"""GPU tests: the compiled Triton kernels, the model, CUDA graphs and the score pipeline on CUDA.

Every module here is marked ``gpu`` and skips without CUDA (``python -m pytest -m gpu tests/gpu``;
``benchmarks/gpu_check.sh`` runs them with the GPU benchmarks). On a GPU machine the root conftest
leaves ``TRITON_INTERPRET`` unset, so the kernels are compiled for real; the fixture below fails
(rather than skips) a GPU test run under the interpreter, which would otherwise check nothing new.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from radflash.kernels import _dispatch as dispatch


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The GPU under test (the current CUDA device, with its index, as kernels launch per device)."""
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Real Triton compilation and "auto" dispatch, whatever the caller's environment says."""
    assert not dispatch.interpreting(), "TRITON_INTERPRET is set: GPU tests must run the compiled kernels"
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with dispatch.set_kernel_backend(None):
        yield
