"""One module per released checkpoint layout (``radzero``, ``carzero``), and what they share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radflash.errors import CheckpointError


def read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A released folder's JSON side file as a dict: ``{}`` when absent (or not an object), one
    :class:`CheckpointError` line when it is required and missing, unreadable or not JSON."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing (copy it from the released model folder)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
