"""Shared test set-up.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so it is set here,
before the first radflash import, whenever no GPU is present: the Triton kernels then run on
CPU through the interpreter (slow: tests use small shapes).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RADFLASH_NO_DEMO_NOTICE", "1")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest) -> None:
    """Fresh but reproducible randomness per test: the seed is derived from the test's id."""
    seed = abs(hash(request.node.nodeid)) % (2**31) if os.environ.get("RADFLASH_FIXED_SEEDS") else (
        random.SystemRandom().randrange(2**31)
    )
    random.seed(seed)
    np.random.seed(seed % (2**32 - 1))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call" and call.excinfo is not None:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            item.add_report_section("call", "seed", f"torch/numpy seed was {seeds[0]}")
