"""The hand-labelled development set: its shape, the issue #17 targets on the held-out part, the five
failure kinds the issue names, and robustness (fuzzed, empty and 100 KB inputs)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from radflash.training.sentence_eval import CATEGORIES, CODES, TARGETS, load_devset, score
from radflash.training.sentences import extract_mentions, extract_sentences

DEVSET_DIR = Path(__file__).resolve().parent / "data"  # the set lives with the tests, not the package
TUNE = load_devset(DEVSET_DIR / "sentences_tune.txt")
HELDOUT = load_devset(DEVSET_DIR / "sentences_heldout.txt")


def test_devset_shape() -> None:
    assert len(TUNE) + len(HELDOUT) >= 400 and len(HELDOUT) >= 100
    for part in (TUNE, HELDOUT):
        assert {i.category for i in part} == set(CATEGORIES)
    labelled = {label[0] for i in TUNE + HELDOUT for label in i.labels}
    assert labelled == set(CODES.values())
    assert not {i.text for i in TUNE} & {i.text for i in HELDOUT}, "held-out text must not be tuned on"


@pytest.mark.parametrize("part", ["heldout", "tune"])
def test_targets(part: str) -> None:
    rep = score(HELDOUT if part == "heldout" else TUNE)
    assert rep.overall.recall >= TARGETS["recall"], rep.errors
    assert rep.negated_as_present <= TARGETS["negated_as_present"], rep.errors
    assert rep.normal_present_rate <= TARGETS["normal_with_present"], rep.errors
    assert rep.side_agreement >= TARGETS["side_agreement"], rep.errors


# ---- the five failure kinds of issue #17 ---------------------------------------------------------
def test_clear_of_is_a_negation() -> None:
    assert extract_sentences("The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.") == [
        "There is no lung opacity", "There is no pneumothorax", "There is no pleural effusion"]


@pytest.mark.parametrize(("report", "expected"), [
    ("There is stable, mild cardiomegaly.", ["There is cardiomegaly"]),
    ("Redemonstration of moderate left pneumothorax which is unchanged.", ["There is pneumothorax of the left lung"]),
    ("No significant change in the small right pleural effusion.", ["There is pleural effusion of the right lung"]),
    ("Interval resolution of the right pleural effusion.", ["There is no pleural effusion of the right lung"]),
])
def test_comparisons_keep_the_state(report: str, expected: list[str]) -> None:
    assert extract_sentences(report) == expected


@pytest.mark.parametrize(("report", "expected"), [
    ("Emphysematous changes.", ["There is emphysema"]),
    ("Masslike opacification in the right hilum.", ["There is lung mass of the right lung"]),
    ("Right lower lobe infiltrate.", ["There is lung opacity of the right lower lung"]),
    ("Mild pulmonary vascular congestion.", ["There is edema"]),
    ("There is pulmonary vascular prominence.", ["There is edema"]),
])
def test_adjective_forms_and_synonyms(report: str, expected: list[str]) -> None:
    assert extract_sentences(report) == expected


@pytest.mark.parametrize(("report", "expected"), [
    ("Atelectasis on the left.", ["There is atelectasis of the left lung"]),
    ("Pleural effusions are present bilaterally.", ["There is pleural effusion of the bilateral lungs"]),
    ("Small right and left pleural effusions.", ["There is pleural effusion of the bilateral lungs"]),
])
def test_location_prepositions(report: str, expected: list[str]) -> None:
    assert extract_sentences(report) == expected


@pytest.mark.parametrize("report", [
    "Nondisplaced fractures may not be demonstrated.",
    "CT is more sensitive in detecting small nodules.",
    "INDICATION: Cough, rule out pneumonia.",
    "Evaluate for pneumothorax.",
])
def test_general_statements_are_not_findings(report: str) -> None:
    assert extract_sentences(report) == []


def test_hyperinflation_alone_is_not_emphysema() -> None:
    assert not [m for m in extract_mentions("Lungs are hyperinflated but clear.") if m.certainty == "present"]


# ---- robustness and speed ------------------------------------------------------------------------
def test_fuzz_never_raises() -> None:
    rng = random.Random(0)
    words = [i.text for i in TUNE]
    for _ in range(300):
        kind = rng.randrange(3)
        if kind == 0:
            text = "".join(chr(rng.randrange(0x10FFFF)) for _ in range(rng.randrange(200)))
            text = text.encode("utf-8", "replace").decode("utf-8", "replace")
        elif kind == 1:
            text = "".join(rng.choice(" .,;:()-\n\t\u00a0\u200bXx") for _ in range(rng.randrange(200)))
        else:  # real-style fragments cut at random points and shuffled
            text = " ".join(rng.choice(words)[: rng.randrange(1, 80)] for _ in range(rng.randrange(1, 8)))
        assert isinstance(extract_sentences(text), list)
    assert extract_sentences("") == [] and extract_sentences("   \n ") == []


def test_100kb_report_is_fast() -> None:
    big = " ".join(i.text for i in TUNE)
    big = (big * (100_000 // len(big) + 1))[:100_000]
    no_punctuation = ("left lower lobe opacity stable unchanged compared to prior " * 2000)[:100_000]
    for text in (big, no_punctuation):
        t0 = time.perf_counter()
        extract_mentions(text)
        assert time.perf_counter() - t0 < 10.0


def test_speed_per_report() -> None:
    reports = [i.text for i in TUNE + HELDOUT if i.category == "normal"] * 5
    t0 = time.perf_counter()
    for r in reports:
        extract_mentions(r)
    per_report = (time.perf_counter() - t0) / len(reports)
    assert per_report < 0.005, f"{per_report * 1e3:.2f} ms per report"
