"""Finding lists and prompt files. Imports no torch, so listings stay instant."""

from __future__ import annotations

import json
from pathlib import Path

from radflash.errors import InputError

# CheXpert's 14 observations, the usual zero-shot benchmark label set.
CHEXPERT_14 = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged cardiomediastinum", "fracture",
    "lung lesion", "lung opacity", "no finding", "pleural effusion", "pleural other", "pneumonia",
    "pneumothorax", "support devices",
)
PROMPT_TEMPLATE = "There is {finding}"


def default_prompts(findings: tuple[str, ...] = CHEXPERT_14, template: str = PROMPT_TEMPLATE) -> dict[str, str]:
    return {f: template.format(finding=f) for f in findings}


def load_prompt_file(path: str | Path) -> dict[str, dict]:
    """Read name → prompt (and optional per-prompt threshold) from YAML, JSON or TXT.

    Accepted shapes: a mapping ``name: "prompt text"`` or ``name: {prompt: ..., threshold: 0.6}``;
    a list of prompt strings; TXT = one prompt per line, or ``name: prompt`` / ``name<TAB>prompt``
    ('#' starts a comment). Returns name → {"prompt": str, "threshold": float | None}.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read prompt file ({exc})") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = _parse_txt(text)
    except Exception as exc:  # yaml/json syntax errors come in many classes
        raise InputError(f"{path}: cannot parse prompt file ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    return normalise_prompts(data, path)


def _parse_txt(text: str) -> dict[str, str] | list[str]:
    entries: list[tuple[str | None, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        for sep in ("\t", ":"):
            if sep in line:
                name, prompt = (s.strip() for s in line.split(sep, 1))
                entries.append((name, prompt))
                break
        else:
            entries.append((None, line))
    if all(name is not None for name, _ in entries):
        return {name: prompt for name, prompt in entries}  # type: ignore[misc]
    return [prompt if name is None else f"{name}: {prompt}" for name, prompt in entries]


def normalise_prompts(data: object, path: Path) -> dict[str, dict]:
    """A prompt file's content (a list of prompts, or a mapping of names to prompts or to
    ``{prompt, threshold}`` entries) as ``{name: entry}``; ``path`` names the source in errors."""
    if isinstance(data, list):
        data = {str(p): p for p in data}
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a non-empty mapping of name → prompt or a list of prompts")
    out: dict[str, dict] = {}
    for name, value in data.items():
        threshold = None
        if isinstance(value, dict):
            unknown = set(value) - {"prompt", "threshold"}
            if unknown or "prompt" not in value:
                raise InputError(f"{path}: entry {name!r} needs 'prompt' (and optional 'threshold'), "
                                 f"got keys {sorted(value)}")
            threshold, value = value.get("threshold"), value["prompt"]
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}: entry {name!r} has no prompt text")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
                raise InputError(f"{path}: entry {name!r} has threshold {threshold!r}; expected a number in [0, 1]")
            threshold = float(threshold)
        out[str(name)] = {"prompt": value.strip(), "threshold": threshold}
    return out
