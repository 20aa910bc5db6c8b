"""Shared test set-up: the Triton interpreter where there is no GPU, and replayable per-test seeds.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is decorated, so it is set here,
before the first radflash import, and only when CUDA is absent: the Triton kernels then run on
CPU through the interpreter (slow: tests use small shapes). On a GPU machine the kernels are
compiled for real, which is what the GPU tests are there to check. CUDA is asked of torch, never
of radflash, because importing radflash would import (and decorate) the kernels too early.

Seeds: ``RADFLASH_TEST_SEED=<base>`` (default 0) picks the suite's seed family; each test's seed is
``zlib.crc32(f"{base}:{nodeid}")``, stable across processes and machines (``hash()`` is salted per
process, so its seeds could never be replayed). A failing test's report prints the command that
replays it exactly; running the suite under several bases hunts for seed-dependent flakiness.
"""

from __future__ import annotations

import atexit
import os
import random
import shlex
import shutil
import sys
import tempfile
import zlib
from collections.abc import Generator
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RADFLASH_NO_DEMO_NOTICE", "1")

# `python -m pytest` puts the checkout first on sys.path, where its folders would shadow installed
# packages of the same name (transformers imports the PyPI `kernels`): importing radflash drops it
# (radflash._detach_checkout), and pytest itself runs in importlib mode (pyproject.toml), which
# never adds it. Light: `import radflash` loads no kernel (so TRITON_INTERPRET above is in time).
import radflash  # noqa: F401


def _expose_test_package() -> None:
    """Make ``tests`` (and nothing else of the checkout) importable here and in child processes.

    Spawned decode workers, Ray workers and CLI subprocesses unpickle test helpers by module name
    (``tests.engine.archive.ray_hooks``), so they need ``tests`` on their path, but putting the
    checkout root there would bring back the shadowing above. A private folder that holds only a
    link named ``tests`` gives exactly that; it goes first on sys.path and on ``PYTHONPATH``.
    """
    folder = tempfile.mkdtemp(prefix="radflash-test-path-")
    os.symlink(os.path.dirname(os.path.abspath(__file__)), os.path.join(folder, "tests"))
    atexit.register(shutil.rmtree, folder, True)
    sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


_expose_test_package()

SEED_ENV = "RADFLASH_TEST_SEED"


def base_seed() -> int:
    """The suite's seed family from ``RADFLASH_TEST_SEED`` (default 0); a bad value stops the run."""
    raw = os.environ.get(SEED_ENV, "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={raw!r}: must be an integer") from None


def seed_for(nodeid: str, base: int | None = None) -> int:
    """The seed of one test: a stable 32-bit hash of the base seed and the test id."""
    return zlib.crc32(f"{base_seed() if base is None else base}:{nodeid}".encode())


def pytest_report_header(config: pytest.Config) -> str:
    return (f"radflash: {SEED_ENV}={base_seed()} (per-test seed = crc32('<base>:<test id>')); "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '<unset>')}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (needs TRITON_INTERPRET)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where CUDA is present the interpreter is off (kernels compile for the GPU), so the CPU-tensor
    kernel tests cannot run; the GPU tests exercise the same kernels there."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set only without CUDA)")
    for item in items:
        if item.get_closest_marker("interpreter") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest) -> None:
    """Fresh but replayable randomness per test: Python, numpy and torch seeded from the test id."""
    seed = seed_for(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


def replay_command(nodeid: str, base: int) -> str:
    """The shell command that reruns one test with exactly the same seeds."""
    return f"{SEED_ENV}={base} python -m pytest {shlex.quote(nodeid)}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, Any]:
    """Every failure (setup, call or teardown) ends with the command that replays it exactly."""
    report = yield
    if report.failed:
        base = base_seed()
        report.sections.append((
            "radflash seed",
            f"seed {seed_for(item.nodeid, base)} ({SEED_ENV}={base}); replay with:\n"
            f"  {replay_command(item.nodeid, base)}",
        ))
    return report
