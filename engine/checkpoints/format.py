"""radflash checkpoints: safetensors weights + JSON config + tokenizer.json, never pickle.

Two equivalent layouts:
- a folder with ``model.safetensors``, ``config.json`` and ``tokenizer.json``;
- one ``.safetensors`` file whose header metadata carries the config and tokenizer JSON (handy
  for shipping one artefact; safetensors metadata is plain strings, so nothing executes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as config_dataclass
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from radflash.errors import CheckpointError
from radflash.models.config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from radflash.tokenizer import PromptTokenizer
from radflash.util.schema import CONFIG as SCHEMA_CONFIG
from radflash.util.schema import Int, validate

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
_META_CONFIG, _META_TOKENIZER = "radflash.config", "radflash.tokenizer"


@config_dataclass(config=SCHEMA_CONFIG)
class CheckpointMeta:
    """The top level of a checkpoint's ``config.json`` (what :meth:`Checkpoint.meta` writes)."""

    format: str
    model: ModelConfig
    format_version: Annotated[Int, Field(ge=1, le=FORMAT_VERSION)] = FORMAT_VERSION
    model_id: str | None = None
    prompts: dict[str, str] | None = None
    calibration: dict[str, Any] | None = None
    notice: str = ""
    radflash_version: str = ""
    source: str = ""


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, already validated."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PromptTokenizer
    model_id: str = "unnamed"
    prompts: dict[str, str] = field(default_factory=dict)  # finding name → default prompt text
    calibration: dict[str, Any] = field(default_factory=dict)
    notice: str = ""
    source: str = ""
    sha256: str = ""

    def meta(self) -> dict[str, Any]:
        from radflash import __version__

        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "model": self.config.to_dict(),
            "prompts": self.prompts,
            "calibration": self.calibration,
            "notice": self.notice,
            "radflash_version": __version__,
        }
        if self.source:
            meta["source"] = self.source
        return meta


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write a folder (default) or, for a ``*.safetensors`` path, a single self-describing file."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.state_dict.items()}
    meta_json = json.dumps(ckpt.meta(), indent=2)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={_META_CONFIG: meta_json, _META_TOKENIZER: ckpt.tokenizer.to_str()})
        tmp.replace(path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / (WEIGHTS + ".tmp")))
    (path / (WEIGHTS + ".tmp")).replace(path / WEIGHTS)
    (path / CONFIG).write_text(meta_json + "\n")
    (path / TOKENIZER).write_text(ckpt.tokenizer.to_str())
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        weights = path / WEIGHTS
        for needed in (weights, path / CONFIG, path / TOKENIZER):
            if not needed.exists():
                others = sorted(p.name for p in path.iterdir())[:8]
                raise CheckpointError(f"{path}: missing {needed.name} (found: {', '.join(others) or 'nothing'})")
        meta = _parse_json((path / CONFIG).read_text(), path / CONFIG)
        tok_text, tok_source = (path / TOKENIZER).read_text(), str(path / TOKENIZER)
    else:
        weights = path
        header = _safetensors_metadata(path)
        if _META_CONFIG not in header or _META_TOKENIZER not in header:
            raise CheckpointError(
                f"{path}: a single-file checkpoint must carry its config and tokenizer in the "
                "safetensors metadata; point at the checkpoint folder instead"
            )
        meta = _parse_json(header[_META_CONFIG], path)
        tok_text, tok_source = header[_META_TOKENIZER], f"{path} (embedded tokenizer)"
    info = _validate_meta(meta, path / CONFIG if path.is_dir() else path)
    config = info.model
    tokenizer = PromptTokenizer.from_str(
        tok_text, pad_id=config.text.pad_id, max_length=config.text.max_length, source=tok_source,
        cleaning=config.text.cleaning,
    )
    # names and shapes from the header first: a config that does not describe these weights is
    # refused before any tensor is read or any model allocated
    check_header(weights, config)
    state_dict = _read_tensors(weights)
    return Checkpoint(
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        model_id=info.model_id if info.model_id is not None else path.stem,
        prompts=dict(info.prompts or {}),
        calibration=dict(info.calibration or {}),
        notice=info.notice,
        source=info.source,
        sha256=file_sha256(weights),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_json(text: str, where: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: config is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: config must be a JSON object")
    return data


def _validate_meta(meta: dict[str, Any], where: Path) -> CheckpointMeta:
    if meta.get("format") != FORMAT_NAME:
        hint = " (a Hugging Face RadZero folder? convert it with `radflash convert radzero`)" if (
            "architectures" in meta or "model_type" in meta) else ""
        raise CheckpointError(f"{where}: not a radflash checkpoint config (format={meta.get('format')!r}){hint}")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        # before the schema: a newer format may well have keys this version does not know
        raise CheckpointError(
            f"{where}: checkpoint format version {version} is newer than this radflash "
            f"supports ({FORMAT_VERSION}); upgrade radflash"
        )
    if "model" not in meta:
        raise CheckpointError(f"{where}: config has no 'model' section")
    return validate(CheckpointMeta, meta, str(where), error=CheckpointError)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc}); radflash never loads pickles") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc}); radflash never loads pickles") from None


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a model with ``config`` holds, without allocating it.

    The model is built on the meta device (no storage), so the table always matches the real
    module; the schema's size bounds keep even the largest allowed config quick to build.
    """
    return {k: tuple(v.shape) for k, v in build_on_meta(config).state_dict().items()}


def build_on_meta(config: ModelConfig) -> torch.nn.Module:
    """The module of the family ``config`` names, on the meta device: shapes and names, no storage.

    The schema's size bounds keep even the largest allowed config quick to build.
    """
    from radflash.models.registry import build

    with torch.device("meta"), _SkipInit():
        return build(config)


class _SkipInit(TorchFunctionMode):
    """Skip weight initialisation: on the meta device there are no values to set.

    The meta kernel of ``normal_`` (nn.Embedding's init) imports torch._dynamo: 1.6 s on the first
    load of a checkpoint in a process, against 0.03 s for the whole meta build without it.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init" or func in _INIT_METHODS:
            return args[0] if args else next(iter((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


_INIT_METHODS = (torch.Tensor.normal_, torch.Tensor.uniform_)


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a safetensors file, from its header alone (nothing is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc}); radflash never loads pickles") from None


def check_header(path: Path, config: ModelConfig) -> None:
    """Raise ONE error if the weights in ``path`` are not exactly those ``config`` describes."""
    _compare_shapes(weight_shapes(config), header_shapes(path), str(path))


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise ONE error naming every missing, unexpected and mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _compare_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, where)


def _compare_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k} {found[k]}≠{v}" for k, v in expected.items() if k in found and found[k] != v)
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file≠config)", misshaped)):
        if names:
            shown = ", ".join(names[:6]) + (f" … (+{len(names) - 6} more)" if len(names) > 6 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config; " + "; ".join(problems))
