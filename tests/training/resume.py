"""Crash a training run mid-way, resume it, and check it ends exactly where an unbroken run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from radflash.checkpoints.format import load_checkpoint
from radflash.training.state import STATE_FILE
from radflash.training.trainer import train
from tests.tolerances import tolerance


class _Stop(Exception):
    pass


def assert_resume_is_exact(full: Any, cfg: Any, *, crash_after: int = 6, checkpoint: int = 4) -> None:
    """Run ``cfg`` (the same config as ``full``'s run, another output folder), stop it after step
    ``crash_after`` (past the step-``checkpoint`` checkpoint, before the end), resume from the latest
    checkpoint: the losses and final weights must equal the unbroken run's up to float32 rounding."""
    losses = [v for _, v in full.losses]

    def interrupt(step: int, loss: float) -> None:
        if step == crash_after:  # a crash mid-run
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, progress=False, on_step=interrupt)
    assert (Path(cfg.output) / "checkpoints" / f"step_{checkpoint:06d}" / STATE_FILE).is_file()
    resumed = train(cfg, resume="latest", progress=False)
    # the resumed run redoes the same float32 arithmetic: equal up to float32 rounding of the loss
    assert [v for _, v in resumed.losses] == tolerance(torch.float32, magnitude=max(losses)).approx(losses)

    a = load_checkpoint(full.final_checkpoint).state_dict
    b = load_checkpoint(resumed.final_checkpoint).state_dict
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            tolerance(a[k].dtype, magnitude=float(a[k].abs().max())).assert_close(b[k], a[k], msg=k)
        else:
            assert torch.equal(a[k], b[k]), k
