"""Prompts and mask thresholds of a segment run: every accepted form → validated :class:`PromptSpec` s.

Prompts come as text, a list, a mapping or a prompt file; each prompt's threshold is taken from
the first of: the prompt file, the ``thresholds`` argument, the map thresholds the trainer stored
in the checkpoint, 0.5. Kept apart from the verb so the rules can be tested without a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from radflash.errors import InputError
from radflash.io.safe_paths import NameAllocator
from radflash.segment.results import PromptSpec

DEFAULT_THRESHOLD = 0.5


# Key under a checkpoint's "calibration" holding per-prompt PIXEL-map thresholds (keyed by finding
# name or prompt text); the score calibration's image-level "threshold" table is a different thing.
MAP_THRESHOLDS = "map_thresholds"


def resolve_prompts(
    prompts: Sequence[str] | Mapping[str, Any] | str | Path,
    thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
    *,
    calibration: Mapping[str, Any] | None = None,
    default_prompts: Mapping[str, str] | None = None,
) -> tuple[PromptSpec, ...]:
    """Any accepted ``prompts``/``thresholds`` form → validated :class:`PromptSpec` s (non-empty)."""
    from radflash.findings import load_prompt_file, normalise_prompts

    if isinstance(prompts, Path) or (isinstance(prompts, str) and os.path.isfile(prompts)):
        entries = load_prompt_file(prompts)
    elif isinstance(prompts, str):
        entries = {prompts.strip(): {"prompt": prompts.strip(), "threshold": None}}
    elif isinstance(prompts, Mapping):
        entries = normalise_prompts(dict(prompts), Path("prompts"))
    elif isinstance(prompts, Sequence):
        texts = [p.strip() for p in prompts if isinstance(p, str)]
        if len(texts) != len(prompts) or not all(texts):
            raise InputError("prompts must be non-empty strings")
        entries = {p: {"prompt": p, "threshold": None} for p in dict.fromkeys(texts)}
    else:
        raise InputError(f"prompts must be a prompt file, a mapping or a list of prompts, got {type(prompts).__name__}")
    if not entries:
        raise InputError("no prompts given")

    names = list(entries)
    per_arg = _threshold_arg(thresholds, names)
    calib = _calibrated(calibration or {}, default_prompts or {})
    slugs = NameAllocator(fallback="prompt", max_len=64)
    specs = []
    for name in names:
        text, own = entries[name]["prompt"], entries[name]["threshold"]
        if own is not None:
            thr, src = float(own), "prompt-file"
        elif per_arg.get(name) is not None:
            thr, src = per_arg[name], "argument"
        elif name in calib or text in calib:
            thr, src = calib.get(name, calib.get(text)), "model"
        else:
            thr, src = DEFAULT_THRESHOLD, "default"
        specs.append(PromptSpec(name, text, float(thr), src, slugs.claim(name)))
    return tuple(specs)


def _threshold_arg(thresholds: Any, names: list[str]) -> dict[str, float | None]:
    def check(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise InputError(f"threshold {what}{value!r} must be a number in [0, 1]")
        return float(value)

    if thresholds is None:
        return {}
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        return dict.fromkeys(names, check(thresholds, ""))
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(map(str, thresholds)) - set(names))
        if unknown:
            raise InputError(f"thresholds given for unknown prompt(s) {', '.join(map(repr, unknown))}")
        return {str(k): check(v, f"for {k!r} ") for k, v in thresholds.items()}
    if isinstance(thresholds, Sequence) and not isinstance(thresholds, str):
        if len(thresholds) != len(names):
            raise InputError(f"{len(thresholds)} thresholds given for {len(names)} prompts")
        return {n: check(v, f"for {n!r} ") for n, v in zip(names, thresholds)}
    raise InputError(f"thresholds must be a number, a list or a mapping, got {type(thresholds).__name__}")


def _calibrated(calibration: Mapping[str, Any], default_prompts: Mapping[str, str]) -> dict[str, float]:
    """Per-prompt map thresholds stored in a checkpoint, keyed by finding name AND prompt text.

    The trainer stores them under :data:`MAP_THRESHOLDS` (name → threshold, chosen for Dice on
    validation phantoms).
    """
    table = calibration.get(MAP_THRESHOLDS)
    if not isinstance(table, Mapping):
        return {}
    out: dict[str, float] = {}
    for k, v in table.items():
        v = v.get("threshold") if isinstance(v, Mapping) else v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0:
            out[str(k)] = float(v)
            if str(k) in default_prompts:
                out.setdefault(default_prompts[str(k)], float(v))
    return out
