"""Validated configuration: pydantic-backed dataclasses and one-line errors for bad values.

Checkpoint configs (``config.json``) and training configs (YAML) are user files: a missing key,
a typo, a string where a number belongs, a zero that later divides, or a size that allocates
gigabytes must stop the run at load time with ONE line naming the file, the key and what was
expected — never a ``TypeError``/``ZeroDivisionError`` traceback from deep inside the model.

The config classes stay dataclasses (``dataclasses.replace``/``asdict`` keep working) but are
pydantic dataclasses, so construction validates types and ranges declared next to each field.
Pydantic's lax mode is kept on purpose: PyYAML reads ``lr: 1e-4`` (no dot) as the string
``"1e-4"``, which lax mode turns into the float the user meant. Booleans are refused where a number
is expected (``layers: true`` is a mistake, not 1), and NaN/infinity are refused everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")

# Shared by every config dataclass: unknown keys are errors, NaN/inf never pass as numbers.
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)

_MAX_ERRORS = 4  # one line stays readable; the first few problems are enough to fix the file


def _no_bool(value: Any) -> Any:
    # bool is an int subclass, so lax mode would read `layers: true` as 1; that is never meant.
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {str(value).lower()})")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


def _unit_interval(value: Any) -> Any:
    value = _no_bool(value)
    if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1] (got {value!r})")
    return value


Fraction = Annotated[float, BeforeValidator(_unit_interval)]


def _triple(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"must be a list of 3 numbers, one per RGB channel (got {_show(value)})")
    return tuple(value)


RGB = Annotated[tuple[Float, Float, Float], BeforeValidator(_triple)]


def validate(kind: type[T], data: Any, where: str, *, error: type[Exception], prefix: Sequence[str] = ()) -> T:
    """Build ``kind`` from ``data`` or raise ``error`` with one line: ``where: key: reason (got value)``.

    ``prefix`` is the location of ``data`` inside the file (e.g. ``("model",)``) so that the key
    printed is the path a user searches for in the file.
    """
    if not isinstance(data, dict):
        loc = ".".join(prefix)
        raise error(f"{where}: {loc + ': ' if loc else ''}expected a mapping (got {_show(data)})")
    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as exc:
        raise error(describe(exc, where, kind, prefix=prefix)) from None


def describe(exc: ValidationError, where: str, root: type | None = None, *, prefix: Sequence[str] = ()) -> str:
    """One line for a pydantic ``ValidationError``: the first few problems joined with '; '."""
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:_MAX_ERRORS]:
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in (*prefix, *loc))
        reason = _reason(err, root, loc)
        parts.append(f"{key}: {reason}" if key else reason)
    if len(errors) > _MAX_ERRORS:
        parts.append(f"… (+{len(errors) - _MAX_ERRORS} more)")
    return f"{where}: " + "; ".join(parts)


_PLAIN = {
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string", "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping", "dataclass_type": "must be a mapping", "model_type": "must be a mapping",
    "list_type": "must be a list", "tuple_type": "must be a list",
}
_BOUNDS = {"greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "≤"), "less_than": ("lt", "<")}


def _reason(err: dict[str, Any], root: type | None, loc: tuple) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key" + _suggest(root, loc)
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error", err["msg"]))
        # cross-field checks already quote the values they compare
        return text if isinstance(value, dict) or "(got " in text else f"{text} (got {_show(value)})"
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return f"must be {sign} {ctx[name]} (got {_show(value)})"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')} (got {_show(value)})"
    return f"{_PLAIN.get(kind, err['msg'])} (got {_show(value)})"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _suggest(root: type | None, loc: tuple) -> str:
    """' (did you mean X?)' or ' (known: a, b)' for an unknown key, from the dataclass at ``loc``."""
    known = _known_keys(root, loc[:-1]) if root is not None else []
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"


def _known_keys(kind: Any, path: tuple) -> list[str]:
    for part in path:
        kind = _dataclass_in(kind)
        if kind is None or isinstance(part, int):
            return []
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return []
        kind = hints[part]
    kind = _dataclass_in(kind)
    return sorted(f.name for f in dataclasses.fields(kind)) if kind is not None else []


def _dataclass_in(kind: Any) -> type | None:
    """The dataclass inside ``kind`` (itself, or the non-None member of ``X | None``)."""
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for arg in typing.get_args(kind):
            found = _dataclass_in(arg)
            if found is not None:
                return found
    return None
