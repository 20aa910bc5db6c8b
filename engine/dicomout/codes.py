"""Finding names → coded concepts (``codes.json``): standard codes for the presets, private otherwise.

A PACS or reporting system reads a finding by its code, not by our prompt text: SNOMED CT / DCM
codes from ``codes.json`` for the preset findings that have one, and radflash's private scheme
``99RADFLASH`` (DICOM's "99" prefix) for custom prompts and for presets without a code we are sure
of, with the finding's name as the meaning. The private value is derived from the name, so the
same prompt name gets the same code in every run and every object (SR and SEG alike).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from radflash.dicomout.text import lo

PRIVATE_SCHEME = "99RADFLASH"  # private coding scheme (DICOM PS3.16: "99" prefix) for radflash's own concepts
TABLE = Path(__file__).with_name("codes.json")


@dataclass(frozen=True)
class Coded:
    """One code: (value, scheme, meaning)."""

    value: str
    scheme: str
    meaning: str

    @property
    def standard(self) -> bool:
        return not self.scheme.startswith("99")

    def concept(self) -> Any:
        """As a highdicom ``CodedConcept``."""
        from highdicom.sr import CodedConcept

        return CodedConcept(self.value, self.scheme, self.meaning)


@dataclass(frozen=True)
class FindingCode:
    """A finding's code and, where the table gives one, its finding site."""

    name: str
    code: Coded
    site: Coded | None = None


@lru_cache(maxsize=1)
def table() -> dict[str, FindingCode]:
    """The parsed ``codes.json``: finding name → :class:`FindingCode` (standard codes only)."""
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    out = {}
    for name, entry in data["findings"].items():
        if entry.get("code") is None:
            continue
        site = entry.get("site")
        out[name] = FindingCode(name, Coded(*entry["code"]), Coded(*data[site]) if site else None)
    return out


def private_code(name: str) -> Coded:
    """radflash's private code for a finding or prompt name: stable (a digest of the name), short
    enough for SH (16 characters), the name as its meaning."""
    digest = hashlib.sha256(name.strip().lower().encode()).hexdigest()[:10]
    return Coded(f"RF{digest}", PRIVATE_SCHEME, lo(name) or "prompt")


def finding_code(name: str, prompt: str = "") -> FindingCode:
    """The code for finding ``name``: the table's standard code, else :func:`private_code`.

    A prompt given on the command line is its own name (``--prompt "There is pneumothorax"``): a
    ``prompt`` written from the findings template ("There is {finding}") is looked up by its finding.
    """
    from radflash.findings import PROMPT_TEMPLATE

    head, _, tail = PROMPT_TEMPLATE.partition("{finding}")
    for text in (name, prompt):
        key = " ".join(text.strip().lower().split())
        if key.startswith(head.lower()) and key.endswith(tail.lower()) and len(key) > len(head) + len(tail):
            key = key[len(head):len(key) - len(tail)]
        if key in table():
            return table()[key]
    return FindingCode(name, private_code(name))
