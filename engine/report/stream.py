"""Bounded-memory building blocks for reports over runs of any size.

A segment run's ``report.json`` lists every image and every failure, and each image has its own
``result.json``: reading them all into lists made the ``report.html`` step grow with the archive.
The report is now made in passes over those records, keeping only what it shows:

* :func:`scan_object` reads a JSON object from a file, handing the items of its large arrays to a
  callback one at a time instead of building the lists (``json.load`` would hold them all);
* :class:`Best` keeps a stream's ``limit`` best items (the table's rows, a gallery's tiles);
* :class:`Sample` keeps a stream's count, mean and maximum, and a uniform sample of its values
  for the median: exact while the stream fits in the sample, an estimate past it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 18  # characters read at a time; grows for an item larger than the buffer


class _Text:
    """A JSON text read in chunks: one value at a time with ``raw_decode``, the buffer refilled when
    a value runs past its end (a value is decoded again from its start then, so no item is cut)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.buf, self.pos, self.eof = fh, "", 0, False

    def _more(self) -> bool:
        """Read on (the buffer then starts at ``pos``); False, with nothing moved, at the end."""
        chunk = self.fh.read(max(_CHUNK, len(self.buf) - self.pos))  # doubles for a long value
        if not chunk:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next character that is not white space (without consuming it)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                raise ValueError("unexpected end of the file")

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at character {self.pos} of a chunk, found {self.buf[self.pos]!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise
            if end == len(self.buf) and not self.eof and self._more():
                continue  # a number that ends the buffer may go on in the next chunk
            self.pos = end
            return value


def scan_object(path: Path, arrays: Mapping[str, Callable[[Any], None]]) -> dict[str, Any]:
    """The JSON object in ``path`` without the arrays named in ``arrays``: each of their items is
    passed to its callback, in order, as it is read, so memory holds one item, not the array.

    Raises ``ValueError`` (``json.JSONDecodeError`` included) for a file that is not a JSON object,
    ``OSError`` for one that cannot be read.
    """
    found: dict[str, Any] = {}
    with open(path, encoding="utf-8") as fh:
        text = _Text(fh)
        if text.peek() != "{":
            raise ValueError("not a JSON object")
        text.expect("{")
        more = text.peek() != "}"
        while more:
            key = text.value()
            if not isinstance(key, str):
                raise ValueError("an object key that is not a string")
            text.expect(":")
            if key in arrays and text.peek() == "[":
                text.expect("[")
                item = text.peek() != "]"
                while item:
                    arrays[key](text.value())
                    item = text.peek() == ","
                    if item:
                        text.expect(",")
                text.expect("]")
            else:
                found[key] = text.value()
            more = text.peek() == ","
            if more:
                text.expect(",")
        text.expect("}")
    return found


class Best(Generic[T]):
    """The ``limit`` items with the smallest ``key`` among all added, in key order.

    Items are sorted and cut back to ``limit`` each time twice that many are held, so memory is
    bounded by ``2 × limit`` items; the sort is stable, so equal keys keep their arrival order
    (the same result as sorting the whole stream).
    """

    def __init__(self, limit: int, key: Callable[[T], Any]) -> None:
        self.limit, self.key = max(0, limit), key
        self.seen = 0
        self._items: list[T] = []

    def add(self, item: T) -> None:
        self.seen += 1
        self._items.append(item)
        if len(self._items) >= 2 * self.limit:
            self._cut()

    def _cut(self) -> None:
        self._items.sort(key=self.key)
        del self._items[self.limit:]

    def result(self) -> list[T]:
        self._cut()
        return list(self._items)


class Sample:
    """Count, mean and maximum of a stream of numbers, and a uniform sample of at most ``capacity``
    of them (reservoir sampling, seeded: the same stream always gives the same sample).

    While the stream fits (``exact``), the sample *is* the stream, in order, so the mean and median
    are numpy's over all values, as a report computed from a full list; past it the mean comes from
    a running sum and the median from the sample.
    """

    def __init__(self, capacity: int, *, seed: int = 0) -> None:
        self.capacity = capacity
        self.count = 0
        self.total = 0.0
        self.max = -np.inf
        self.kept: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        if len(self.kept) < self.capacity:
            self.kept.append(value)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.capacity:
                self.kept[slot] = value

    @property
    def exact(self) -> bool:
        return self.count <= self.capacity

    def mean(self) -> float:
        return float(np.mean(self.kept)) if self.exact else self.total / self.count

    def median(self) -> float:
        return float(np.median(self.kept))
