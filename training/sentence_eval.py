"""Scoring the report → sentence extractor against a hand-labelled development set.

The development set (``tests/training/data/sentences_{tune,heldout}.txt``) is written in the style
of real chest X-ray reports, one item per line: ``category | text | labels``. A label is
``<code><certainty>[<side>]`` — e.g. ``eff+L`` (left pleural effusion, present), ``pna?`` (possible
pneumonia), ``ptx-`` (no pneumothorax). The compact form keeps 500 lines reviewable by eye, which
matters more for a labelled set than machine-friendliness.

Matching is per item on (finding, certainty); side is then compared on the matched pairs only, so
a wrong side costs side agreement, not recall. Mentions outside the finding vocabulary ("acute
cardiopulmonary abnormality") are not scored: no label names them.

``python -m radflash.training.sentence_eval`` prints the README tables.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from radflash.errors import InputError
from radflash.training.sentences import Mention, extract_mentions

CODES = {
    "eff": "pleural effusion", "ptx": "pneumothorax", "cmg": "cardiomegaly", "ecm": "enlarged cardiomediastinum",
    "nod": "lung nodule", "mass": "lung mass", "cons": "consolidation", "atel": "atelectasis", "edema": "edema",
    "pna": "pneumonia", "fx": "fracture", "les": "lung lesion", "opac": "lung opacity", "plo": "pleural other",
    "dev": "support devices", "emph": "emphysema",
}
FINDINGS = frozenset(CODES.values())
_CERTAINTY = {"+": "present", "?": "possible", "-": "absent"}
_SIDE = {"L": "left", "R": "right", "B": "bilateral", "": None}
CATEGORIES = ("neg", "unc", "cmp", "syn", "loc", "gen", "normal", "pos")

# Targets from issue #17, checked on the held-out part.
TARGETS = {"recall": 0.90, "negated_as_present": 0.01, "normal_with_present": 0.03, "side_agreement": 0.85}

Label = tuple[str, str, str | None]  # (finding, certainty, side)


@dataclass(frozen=True)
class DevItem:
    category: str
    text: str
    labels: tuple[Label, ...]


def _parse_label(token: str, where: str) -> Label:
    for sym, certainty in _CERTAINTY.items():
        code, sep, side = token.partition(sym)
        if sep:
            if code not in CODES or side not in _SIDE:
                break
            return CODES[code], certainty, _SIDE[side]
    raise InputError(f"{where}: bad label {token!r}")


def load_devset(path: str | Path) -> list[DevItem]:
    """Items of one development-set file; a malformed line is an error (labels must never be guessed)."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or parts[0] not in CATEGORIES or not parts[1]:
            raise InputError(f"{path}:{n}: expected 'category | text | labels'")
        labels = tuple(_parse_label(t.strip(), f"{path}:{n}") for t in parts[2].split(",") if t.strip())
        items.append(DevItem(parts[0], parts[1], labels))
    return items


def side_of(location: str | None) -> str | None:
    """The side part of a canonical location ("left lower lung" → "left")."""
    first = (location or "").split(" ", 1)[0]
    return first if first in ("left", "right", "bilateral") else None


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


@dataclass
class Report:
    """Every number the README states, plus the misses for debugging."""

    overall: Counts = field(default_factory=Counts)
    by_finding: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    by_category: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    absent_labels: int = 0
    absent_as_present: int = 0
    normal_items: int = 0
    normal_with_present: int = 0
    side_pairs: int = 0
    side_agree: int = 0
    errors: list[tuple[str, list[Label], list[Label]]] = field(default_factory=list)

    @property
    def negated_as_present(self) -> float:
        return self.absent_as_present / self.absent_labels if self.absent_labels else 0.0

    @property
    def normal_present_rate(self) -> float:
        return self.normal_with_present / self.normal_items if self.normal_items else 0.0

    @property
    def side_agreement(self) -> float:
        return self.side_agree / self.side_pairs if self.side_pairs else 1.0

    def targets(self) -> dict[str, tuple[float, bool]]:
        """Each target → (measured value, met)."""
        return {
            "recall": (self.overall.recall, self.overall.recall >= TARGETS["recall"]),
            "negated_as_present": (self.negated_as_present, self.negated_as_present <= TARGETS["negated_as_present"]),
            "normal_with_present": (self.normal_present_rate,
                                    self.normal_present_rate <= TARGETS["normal_with_present"]),
            "side_agreement": (self.side_agreement, self.side_agreement >= TARGETS["side_agreement"]),
        }


def _predicted(mentions: Iterable[Mention]) -> list[Label]:
    return [(m.finding, m.certainty, side_of(m.location)) for m in mentions if m.finding in FINDINGS]


def score(items: Iterable[DevItem], extract: Callable[[str], list[Mention]] = extract_mentions) -> Report:
    """Match each item's predictions to its labels; see the module docstring for the rules."""
    rep = Report()
    for item in items:
        pred = _predicted(extract(item.text))
        left = list(pred)
        gold_missed: list[Label] = []
        for label in item.labels:
            finding, certainty, side = label
            same = [p for p in left if p[0] == finding and p[1] == certainty]
            if same:
                hit = next((p for p in same if p[2] == side), same[0])
                left.remove(hit)
                for c in (rep.overall, rep.by_finding[finding], rep.by_category[item.category]):
                    c.tp += 1
                if side is not None:
                    rep.side_pairs += 1
                    rep.side_agree += hit[2] == side
            else:
                gold_missed.append(label)
                for c in (rep.overall, rep.by_finding[finding], rep.by_category[item.category]):
                    c.fn += 1
            if certainty == "absent":
                rep.absent_labels += 1
                rep.absent_as_present += any(p[0] == finding and p[1] == "present" for p in pred)
        for p in left:
            for c in (rep.overall, rep.by_finding[p[0]], rep.by_category[item.category]):
                c.fp += 1
        if item.category == "normal":
            rep.normal_items += 1
            rep.normal_with_present += any(p[1] == "present" for p in pred)
        if gold_missed or left:
            rep.errors.append((item.text, gold_missed, left))
    return rep


def markdown(rep: Report, title: str) -> str:
    """The per-finding and per-category tables, and the targets, as README markdown."""
    lines = [f"**{title}** — precision / recall (n = labelled mentions)", "",
             "| finding | precision | recall | n |", "|---|---|---|---|"]
    for name in sorted(rep.by_finding):
        c = rep.by_finding[name]
        lines.append(f"| {name} | {c.precision:.2f} | {c.recall:.2f} | {c.tp + c.fn} |")
    lines += ["", "| category | precision | recall | n |", "|---|---|---|---|"]
    for name in CATEGORIES:
        if name in rep.by_category:
            c = rep.by_category[name]
            lines.append(f"| {name} | {c.precision:.2f} | {c.recall:.2f} | {c.tp + c.fn} |")
    o = rep.overall
    lines += ["", f"| all | {o.precision:.2f} | {o.recall:.2f} | {o.tp + o.fn} |", "",
              "| target | measured | goal | met |", "|---|---|---|---|"]
    goals = {"recall": "≥ 0.90", "negated_as_present": "≤ 0.01", "normal_with_present": "≤ 0.03",
             "side_agreement": "≥ 0.85"}
    for name, (value, met) in rep.targets().items():
        lines.append(f"| {name} | {value:.3f} | {goals[name]} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


# In a source checkout (the dev set is test data and is not installed with the package).
DEVSET_DIR = Path(__file__).resolve().parent.parent / "tests" / "training" / "data"


def main(argv: list[str] | None = None) -> int:
    """Print the tables for each file given (default: the tuning and held-out parts); ``-v`` lists misses."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args
    paths = [Path(a) for a in args if a != "-v"] or [DEVSET_DIR / "sentences_tune.txt",
                                                     DEVSET_DIR / "sentences_heldout.txt"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.stderr.write(f"dev set not found: {', '.join(missing)} (run from a source checkout or give the files)\n")
        return 2
    for path in paths:
        rep = score(load_devset(path))
        sys.stdout.write(markdown(rep, path.name) + "\n\n")
        if verbose:
            for text, missed, extra in rep.errors:
                sys.stdout.write(f"- {text}\n    missed {missed}\n    extra  {extra}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
