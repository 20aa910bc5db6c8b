"""A decoder that misbehaves for files named for it, importable by Ray workers and the decode
processes they spawn (tests/conftest.py puts a path exposing only ``tests`` on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

ATTEMPTS = "exit_attempts.log"  # written beside the input folder (not in it: it would be discovered)


def misbehaving_loader(path: Path, rules):
    """``raise_*`` raises, ``exit_*`` kills its process (as a segfaulting native decoder would),
    ``hang_*`` never returns; anything else loads normally. Each ``exit_*`` attempt is logged."""
    name = Path(path).name
    if name.startswith("raise_"):
        raise RuntimeError(f"decoder bug on {name}")
    if name.startswith("exit_"):
        with open(Path(path).parent.parent / ATTEMPTS, "a") as fh:
            fh.write(f"{name} {os.getpid()}\n")
        os._exit(3)
    if name.startswith("hang_"):
        time.sleep(600)
    from radflash.io.imageio import try_load

    return try_load(path, rules)


class SlowObserver:
    """A :class:`radflash.archive.pipeline.DistributedObserver` whose copies in the inference actors
    take ``seconds`` per batch: a cluster that has stopped delivering, for the stall watchdog."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, model, prompts, items, tokens, records) -> None:
        time.sleep(self.seconds)

    def for_worker(self) -> SlowObserver:
        return SlowObserver(self.seconds)

    def take_delta(self) -> None:
        return None

    def merge_delta(self, delta) -> None:
        pass
