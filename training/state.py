"""What a training run keeps on disk: resumable trainer state, checkpoint folders, exported checkpoints.

The optimiser and RNG state needed by ``--resume`` is stored in safetensors (tensors) with the
small scalars as JSON metadata, so nothing here uses pickle, like the rest of radflash.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from radflash.checkpoints.format import Checkpoint, save_checkpoint
from radflash.errors import InputError

STATE_FILE = "trainer_state.safetensors"


_META_KEY = "radflash.trainer"


def save_trainer_state(path: Path, *, optimizer: torch.optim.Optimizer, step: int,
                       extra: dict[str, Any]) -> None:
    """Optimiser tensors + RNG states in safetensors; param groups and scalars as JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, **extra}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {})[_META_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def find_latest(output: Path) -> Path | None:
    ckpts = sorted((output / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [p for p in ckpts if (p / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


def export_checkpoint(ck: Checkpoint, path: str | Path, *, dtype: str = "float32") -> Path:
    """Save ``ck`` with its floating tensors cast to ``dtype`` (the engine casts back on load)."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"export_dtype must be float32, float16 or bfloat16, got {dtype!r}")
    target = getattr(torch, dtype)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in ck.state_dict.items()}
    return save_checkpoint(dataclasses.replace(ck, state_dict=state), path)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` latest ``step_*`` checkpoint folders under ``folder``."""
    import shutil

    ckpts = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
