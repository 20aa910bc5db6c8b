"""Reports → minimal semantic sentences, and the canonical prompt text for (finding, location).

RadZero trains on short sentences of one form, one finding each:

    "There is <finding>[ of the <location>]"       (present)
    "There may be <finding>[ of the <location>]"   (hedged)
    "There is no <finding>[ of the <location>]"    (absent)

and prompts at inference time must use the SAME form, or zero-shot scores compare text the
model never saw. :func:`prompt_for` is therefore the one place that spells a sentence, and both
the extractor and every prompt list call it.

Canonical locations: ``"<side> <zone> lung"`` with side ∈ {left, right, bilateral} and zone ∈
{upper, middle, lower}, either part optional ("left lung", "right upper lung", "bilateral lower
lungs", "lower lungs"). Lobes, apices, bases, "retrocardiac" and "lingula" map onto zones. Pleural
effusions keep only the side (fluid is pleural, not in a lung zone) and cardiomegaly none.

The rule-based extractor (:func:`extract_sentences`) is built for phantom reports and the common
MIMIC-CXR phrasings; choices made:

- Comparisons with prior studies keep the finding's state (issue #17): "stable, mild cardiomegaly",
  "redemonstration of ... which is unchanged", "the effusion has increased" all state a finding that
  is there now, so only the comparison words are stripped. Resolution and removal ("has resolved",
  "interval resolution of", "no longer seen") are negations; "nearly resolved" is still present.
  A sentence about change without a finding ("Unchanged from prior.") yields nothing.
- Negation and uncertainty follow the CheXpert labeler's order (pre-negation uncertainty, then
  negation, then post-negation uncertainty) within a clause scope; "clear of", "free of", "neither
  ... nor" negate, and "no X to suggest Y" negates Y too.
- General statements about the method ("CT is more sensitive ...", "fractures may not be
  demonstrated"), hypothetical mentions ("evaluate for pneumonia") and the indication/history/
  technique/comparison sections state no finding of this study and yield nothing.
- Side words with a preposition after the finding count ("atelectasis on the left"), as does a
  trailing "bilaterally"; a finding given both "right and left" is bilateral.
- Normal statements map to negatives of what they rule out: "Lungs are clear" → "There is no
  consolidation"; "Heart size is normal"/"normal cardiomediastinal silhouette" → "There is no
  cardiomegaly"; "No acute cardiopulmonary process" stays as "There is no acute cardiopulmonary
  abnormality" (no finding name fits a whole normal study).
- Severity words are dropped ("moderate", "small"): one sentence = one finding (+ location).
- "X may represent Y": X is present and Y possible (the opacity is seen; its cause is a guess).

An optional :class:`LLMExtractor` asks any OpenAI-compatible server instead (RadZero used an LLM),
validates the JSON it returns and emits the same sentence form.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from radflash.errors import RadflashError

CERTAINTIES = ("present", "possible", "absent")


class ExtractionError(RadflashError):
    """An LLM extractor could not be reached or answered something that is not the expected JSON."""


# ---- the canonical sentence form -----------------------------------------------------------------
def prompt_for(finding: str, location: str | None = None, certainty: str = "present") -> str:
    """The canonical sentence for a finding, e.g. ``("pleural effusion", "right lung")`` →
    "There is pleural effusion of the right lung"."""
    if certainty not in CERTAINTIES:
        raise ValueError(f"certainty must be one of {CERTAINTIES}, got {certainty!r}")
    head = {"present": "There is", "possible": "There may be", "absent": "There is no"}[certainty]
    finding = " ".join(finding.lower().split())
    if location and location != "None":
        return f"{head} {finding} of the {location}"
    return f"{head} {finding}"


@dataclass(frozen=True)
class Mention:
    """One extracted statement: a finding, how certain the report is, and where."""

    finding: str
    certainty: str
    location: str | None = None

    def sentence(self) -> str:
        return prompt_for(self.finding, self.location, self.certainty)


def canonical_location(side: str | None, zone: str | None, finding: str | None = None) -> str | None:
    """Spell a (side, zone) pair the one canonical way; the finding decides which parts matter."""
    if finding == "cardiomegaly":
        return None
    if finding == "pleural effusion":
        zone = None
    if side is None and zone is None:
        return None
    if side == "bilateral":
        return f"bilateral {zone} lungs" if zone else "bilateral lungs"
    if side is None:
        return f"{zone} lungs"
    return f"{side} {zone} lung" if zone else f"{side} lung"


# ---- vocabulary ----------------------------------------------------------------------------------
# Longest phrases first; each regex maps to a canonical finding name.
_FINDING_PATTERNS: list[tuple[str, str]] = [
    (r"enlarged cardiomediastinal silhouette|widened mediastinum|mediastinal widening", "enlarged cardiomediastinum"),
    (r"(?:enlarged|enlargement of the) (?:heart|cardiac silhouette)|cardiac enlargement|cardiomegaly",
     "cardiomegaly"),
    (r"(?:heart|heart size|cardiac silhouette)(?: size)? (?:(?:is|are|may be|appears?|remains?) )?(?:not )?"
     r"(?:mildly |moderately |markedly |severely |borderline |slightly )?"
     r"(?:enlarged|increased)", "cardiomegaly"),
    (r"(?:the )?mediastinum (?:is |appears |remains )?(?:widened|enlarged)", "enlarged cardiomediastinum"),
    # "pericardial effusion" is not pleural; the lookbehinds keep it out
    (r"pleural effusions?|pleural fluid(?: collections?)?|(?<!pericardial )(?<!joint )effusions?", "pleural effusion"),
    (r"hydropneumothorax|pneumothora(?:x|ces)", "pneumothorax"),
    (r"pulmonary nodules?|nodular (?:opacit(?:y|ies)|densit(?:y|ies))|nodules?", "lung nodule"),
    # "masslike opacification" names a mass, not an opacity: the compound is consumed whole
    (r"mass[- ]?like (?:opacit(?:y|ies)|opacification|consolidation|densit(?:y|ies)|lesion)|"
     r"(?:lung |pulmonary )?mass(?:es)?", "lung mass"),
    (r"consolidations?|consolidative opacit(?:y|ies)|airspace consolidation", "consolidation"),
    (r"atelectas(?:is|es)|atelectatic changes?|collapse", "atelectasis"),
    (r"pulmonary edema|interstitial edema|edema|edematous|(?:vascular|venous) (?:congestion|prominence|engorgement)|"
     r"cephalization|kerley b lines|fluid overload", "edema"),
    (r"pneumonias?|infectious process|infection|aspiration", "pneumonia"),
    (r"fractures?|fractured", "fracture"),
    (r"lesions?", "lung lesion"),
    (r"(?:airspace |parenchymal |patchy |linear |rounded |hazy )?(?:opacit(?:y|ies)|opacification)|"
     r"airspace disease|infiltrates?|infiltration|(?:increased )?densit(?:y|ies)", "lung opacity"),
    (r"pleural thickening|pleural plaques?", "pleural other"),
    (r"(?:endotracheal|enteric|nasogastric|orogastric|chest|feeding|tracheostomy|et) tubes?|tracheostomy|"
     r"central (?:venous )?(?:line|catheter)|picc(?: line)?|pacemaker|(?:support )?devices?|catheters?|"
     r"sternotomy wires", "support devices"),
    # hyperinflation alone is not emphysema (CheXpert does not map it either): a normal young adult
    # can be hyperinflated, and mapping it made clear reports look abnormal
    (r"emphysema|emphysematous(?: changes?| lungs?)?", "emphysema"),
]
_FINDING_RE = re.compile(r"\b(?:" + "|".join(f"(?P<f{i}>{p})" for i, (p, _) in enumerate(_FINDING_PATTERNS)) + r")\b")

# Whole-clause normal statements → negatives (checked before findings; the span is then consumed).
_NORMAL_PATTERNS: list[tuple[str, tuple[str, ...]]] = [
    (r"no acute (?:cardiopulmonary|intrathoracic|cardiothoracic) (?:process|abnormality|disease|findings?)",
     ("acute cardiopulmonary abnormality",)),
    # "clear of X" is a negation cue for X (CheXpert's pre-negation list), not a normal statement
    (r"(?:the )?(?:lungs|lung fields) (?:are |remain )?(?:well[- ]expanded and |otherwise |grossly )?clear(?! of)|"
     r"clear lungs", ("consolidation",)),
    (r"heart size(?:,| and) [a-z ,]*?(?:is|are) (?:normal|unremarkable|within normal limits)|"
     r"(?:the )?(?:heart|cardiac silhouette) (?:is |appears )?normal in size", ("cardiomegaly",)),
    (r"(?:the )?(?:cardiomediastinal|cardiac|heart|mediastinal)(?: and hilar)? (?:silhouette|size|contours?)"
     r"(?: is| are)? (?:normal|unremarkable|within normal limits|top[- ]normal)|"
     r"normal (?:cardiomediastinal silhouette|heart size|cardiac silhouette)", ("cardiomegaly",)),
    (r"(?:the )?(?:osseous|bony) structures (?:are )?(?:intact|unremarkable)|"
     r"no acute (?:osseous|bony) abnormalit(?:y|ies)",
     ("fracture",)),
    (r"(?:the )?pleural (?:spaces|surfaces) are (?:clear|normal)", ("pleural effusion", "pneumothorax")),
]
_NORMAL_RE = [(re.compile(r"\b" + p + r"\b"), names) for p, names in _NORMAL_PATTERNS]

# Negation and uncertainty follow the CheXpert labeler's three passes: pre-negation uncertainty
# ("cannot exclude X", "X is not excluded") wins over negation, negation over post-negation
# uncertainty ("possible X"). Scope is the clause (see _TERMINATORS), as NegBio's dependency
# scope mostly is for the list-like sentences of chest X-ray reports.
_NEG_PRE = re.compile(r"\b(?:no|without|negative for|free of|clear of|absence of|no evidence of|no signs? of|"
                      r"there is no|there are no|neither|nor|(?:interval )?(?:resolution|removal) of|"
                      r"rather than)\b")
_NEG_POST = re.compile(r"\b(?:(?:is|are) not (?:seen|identified|present|visualized|appreciated|evident|enlarged)|"
                       r"(?:is|are) absent|(?:has|have) (?:been )?(?:removed|resolved)|"
                       r"(?:is|are) no longer (?:seen|visualized|present|identified|evident|visible)|"
                       r"(?<!nearly )(?<!partially )(?<!almost )resolved)\b")
# Hypothetical mentions (NegEx's "evaluate for"): the finding is a question, not a statement.
_HYPOTHETICAL = re.compile(r"\b(?:evaluat(?:e|ion)|assess(?:ment)?|eval) for\b|\bto (?:evaluate|assess|exclude)\b")
_HEDGE_PRE = re.compile(r"\b(?:cannot rule out|can not rule out|may (?:represent|reflect|be|indicate)|"
                        r"could (?:represent|reflect|be)|possibl[ey]|borderline|equivocal|suggesting|"
                        r"probabl[ey]|likely|suggestive of|suggests?|concerning for|suspicious for|"
                        r"worrisome for|question of|questionable|cannot exclude|can not exclude|"
                        r"differential (?:diagnosis )?includes|versus|vs\.?|presumed|suspected|"
                        r"compatible with|consistent with)\b")
_HEDGE_POST = re.compile(r"\b(?:(?:cannot|can not|can't) be (?:entirely |completely )?(?:excluded|ruled out)|"
                         r"(?:is|are) not (?:entirely )?excluded|^ ?(?:versus|vs\.?)|"
                         r"(?:is|are) (?:possible|suspected|questioned)|may be present|not (?:entirely )?excluded)\b")
_TERMINATORS = re.compile(r"\b(?:but|however|although|though|except|aside from|apart from|whereas|which|while|"
                          r"there (?:is|are))\b|;")
# "No consolidation to suggest pneumonia": the hedge sits inside the negated phrase, so Y is negated too
_NEGATED_HEDGES = re.compile(r"(?:concerning|suspicious|worrisome) for|suggests?|suggestive of|suggesting")
_CERTAIN_AFTER_HEDGE = ("consistent with", "compatible with")  # radiologists use these as near-certain

# Comparison and temporal phrases keep the finding's state: a stable, unchanged, increased or
# improving finding is still there, so only the comparison words go. Resolution and removal are
# negations (_NEG_PRE/_NEG_POST); "no change in X" must not negate X, so it is stripped first.
_GENERAL = re.compile(
    # general statements about the method, not about this patient (issue #17): no finding is stated
    r"\b(?:may not be (?:demonstrated|visible|apparent|seen|detected|evident|identified)|"
    r"(?:more |less |in)sensitive|(?:could|can|may) be obtained|recommend(?:ed|s)?|consider (?:a |chest )?ct|"
    r"if (?:clinically indicated|there is (?:clinical )?concern)|(?:difficult|hard) to (?:detect|see|assess)|"
    r"(?:evaluation|assessment) (?:for|of) [a-z ]+ (?:is |was )?limited|correlat(?:e|ion))\b")
_COMPARISON_STRIP = [
    re.compile(r"^(?:as )?compared (?:to|with) (?:the )?(?:prior|previous|earlier)[^,]*,\s*"),
    re.compile(r"^(?:in comparison (?:to|with)|since) (?:the )?(?:prior|previous)[^,]*,\s*"),
    re.compile(r"\bno (?:significant |substantial )?(?:interval )?change in (?:the )?(?:appearance of (?:the )?)?"),
    re.compile(r"\b(?:slight |mild )?interval (?:increase|decrease|improvement|worsening|development|progression|"
               r"change) (?:in|of) (?:the )?(?:size of (?:the )?)?"),
    re.compile(r"\b(?:stable|unchanged|persistent|persisting|again seen|similar|known|previously seen|"
               r"redemonstrated|new|newly|slightly|minimally)\s+"),
    re.compile(r",?\s*(?:unchanged|stable|similar)(?: (?:in size|in appearance))?"
               r"(?: (?:from|since|compared (?:to|with))(?: the)? (?:prior|previous)[\w ]*)?\s*$"),
    re.compile(r",?\s*(?:as|when) compared (?:to|with)(?: the)? (?:prior|previous)[\w ]*$"),
]

_SIDE_WORDS = {"left": "left", "right": "right", "bilateral": "bilateral", "both": "bilateral",
               "bibasilar": "bilateral", "bibasal": "bilateral", "biapical": "bilateral", "bilaterally": "bilateral"}
_ZONE_WORDS = {"upper": "upper", "apical": "upper", "apex": "upper", "apices": "upper", "middle": "middle",
               "mid": "middle", "lingula": "middle", "lingular": "middle", "lower": "lower", "basilar": "lower",
               "basal": "lower", "base": "lower", "bases": "lower", "retrocardiac": "lower",
               "bibasilar": "lower", "bibasal": "lower", "biapical": "upper", "infrahilar": "lower"}
_FILLER = {"lung", "lungs", "lobe", "lobes", "zone", "zones", "field", "fields", "hemithorax", "the", "of", "pulmonary",
           "costophrenic", "angle", "angles", "sided", "-sided", "lobar", "side", "perihilar", "hilum", "hilar"}
_LOC_WORD = re.compile(r"[a-z]+")
_PREPOSITION_BEFORE = re.compile(r"\b(?:in|at|of|on|to|within|involving|along|over|projecting over|overlying|"
                                 r"throughout|near|adjacent to|seen on|noted on|present on|"
                                 r"in the region of|at the level of)\s+(?:the\s+)?$")


def _locations_in(text: str, start: int, end: int) -> list[tuple[int, int, str | None, str | None]]:
    """Runs of location words in ``text[start:end]`` as (start, end, side, zone)."""
    out: list[tuple[int, int, str | None, str | None]] = []
    run: list[tuple[int, int, str]] = []

    def close() -> None:
        words = [w for _, _, w in run]
        side = next((_SIDE_WORDS[w] for w in words if w in _SIDE_WORDS), None)
        zone = next((_ZONE_WORDS[w] for w in words if w in _ZONE_WORDS), None)
        if "lingula" in words or "lingular" in words:
            side = side or "left"
        if "retrocardiac" in words:
            side = side or "left"
        if zone == "middle" and side is None:
            side = "right"  # the middle lobe is the right lung's
        while run and run[-1][2] in _FILLER and run[-1][2] not in ("lung", "lungs", "lobe", "lobes", "hemithorax"):
            run.pop()
        if side or zone:
            out.append((run[0][0], run[-1][1], side, zone))

    for m in _LOC_WORD.finditer(text, start, end):
        w = m.group()
        if w in _SIDE_WORDS or w in _ZONE_WORDS or (run and w in _FILLER) or (w == "the" and not run):
            if w == "the" and not run:
                continue
            run.append((m.start(), m.end(), w))
            continue
        if run:
            close()
            run = []
    if run:
        close()
    return out


# ---- the rule-based extractor --------------------------------------------------------------------
_HEADER = re.compile(r"\b(?:findings|impression|conclusion|history|indication|technique|comparison|"
                     r"examination|exam|reason for (?:exam|examination|study)|clinical (?:history|information))\s*:",
                     re.IGNORECASE)


# The reason for the exam is a question, not a finding ("INDICATION: rule out pneumonia").
_SKIP_SECTION = re.compile(r"\b(?:history|indication|reason for (?:exam|examination|study)|clinical (?:history|"
                           r"information)|technique|comparison)\s*:", re.IGNORECASE)


def split_sentences(report: str) -> list[str]:
    """Sentences of a report; decimals ("1.2 cm") and section headers do not split. The text of
    history/indication/technique/comparison sections is left out: it states no finding of this study."""
    text = report.replace("\n", " ")
    kept: list[str] = []
    opened_at: int | None = None  # where the header of the current section starts
    pos = 0
    for m in _HEADER.finditer(text):
        if opened_at is None or not _SKIP_SECTION.match(text, opened_at):
            kept.append(text[pos:m.start()])
        opened_at, pos = m.start(), m.end()
    if opened_at is None or not _SKIP_SECTION.match(text, opened_at):
        kept.append(text[pos:])
    text = ". ".join(kept)
    parts = re.split(r"(?<=[.!?])\s+|(?<=[a-z])\.(?=[A-Z])|\.$", text)
    return [p.strip(" .") for p in parts if p and p.strip(" .")]


def extract_mentions(report: str) -> list[Mention]:
    """Every (finding, certainty, location) statement of a report, comparisons dropped, in order."""
    out: list[Mention] = []
    for sentence in split_sentences(report):
        for piece in _bounded(sentence.lower()):
            out += _sentence_mentions(piece)
    seen: set[Mention] = set()
    unique = []
    for m in out:
        if m not in seen:
            seen.add(m)
            unique.append(m)
    return unique


_MAX_SENTENCE = 600  # real report sentences are < 300 characters


def _bounded(sentence: str) -> list[str]:
    """A run-on "sentence" (no punctuation for kilobytes) cut at spaces into pieces of at most
    ``_MAX_SENTENCE`` characters: scope and location rules scan a clause several times, so one
    100 KB clause would take tens of seconds, and no real clause is that long."""
    if len(sentence) <= _MAX_SENTENCE:
        return [sentence]
    pieces, start = [], 0
    while start < len(sentence):
        end = min(start + _MAX_SENTENCE, len(sentence))
        if end < len(sentence):
            cut = sentence.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        pieces.append(sentence[start:end])
        start = end
    return pieces


def extract_sentences(report: str) -> list[str]:
    """Minimal sentences of a report in the canonical form (see the module docstring)."""
    return [m.sentence() for m in extract_mentions(report)]


def _strip_comparison(s: str) -> str | None:
    for pattern in _COMPARISON_STRIP:
        s = pattern.sub("", s).strip(" ,")
    if not s or _GENERAL.search(s):
        return None
    return s


def _sentence_mentions(s: str) -> list[Mention]:
    s = re.sub(r"\s+", " ", s).strip(" .")
    s = _strip_comparison(s)
    if s is None:
        return []
    mentions: list[tuple[int, Mention]] = []
    consumed: list[tuple[int, int]] = []
    for pattern, names in _NORMAL_RE:
        for m in pattern.finditer(s):
            consumed.append(m.span())
            mentions += [(m.start(), Mention(n, "absent")) for n in names]
    # findings outside the normal statements
    found: list[tuple[int, int, str]] = []
    for m in _FINDING_RE.finditer(s):
        if any(a <= m.start() < b for a, b in consumed):
            continue
        name = next(_FINDING_PATTERNS[int(k[1:])][1] for k, v in m.groupdict().items() if v is not None)
        found.append((m.start(), m.end(), name))
    if not found:
        return [m for _, m in sorted(mentions, key=lambda t: t[0])]
    certainty = [_certainty(s, found, i) for i in range(len(found))]
    keep = [i for i, c in enumerate(certainty) if c is not None]
    found = [found[i] for i in keep]
    certain = [str(certainty[i]) for i in keep]
    locations = _assign_locations(s, found, certain)
    for i, (start, _, name) in enumerate(found):
        locs = _merge_sides(locations[i]) or [(None, None)]
        for side, zone in locs:
            mentions.append((start, Mention(name, certain[i], canonical_location(side, zone, name))))
    return [m for _, m in sorted(mentions, key=lambda t: t[0])]


def _merge_sides(locs: list[tuple[str | None, str | None]]) -> list[tuple[str | None, str | None]]:
    """"Right and left pleural effusions" is one bilateral finding, not two one-sided ones."""
    sides = {side for side, _ in locs}
    if {"left", "right"} <= sides:
        zones = {zone for _, zone in locs}
        return [("bilateral", zones.pop() if len(zones) == 1 else None)]
    return locs


def _scope_start(s: str, pos: int) -> int:
    """Start of the clause containing ``pos``: negation and hedges do not cross 'but', ';' etc."""
    last = 0
    for m in _TERMINATORS.finditer(s, 0, pos):
        last = m.end()
    return last


def _scope_end(s: str, pos: int) -> int:
    m = _TERMINATORS.search(s, pos)
    return m.start() if m else len(s)


def _certainty(s: str, found: list[tuple[int, int, str]], i: int) -> str | None:
    """present / possible / absent for ``found[i]``, or None for a hypothetical mention."""
    start, end, _ = found[i]
    lo, hi = _scope_start(s, start), _scope_end(s, end)
    before = s[lo:end]  # the span too: "heart size may be enlarged" hedges inside the match
    if _HYPOTHETICAL.search(s, lo, start):
        return None
    if re.search(r"\bnot\b", s[start:end]):  # "heart is not enlarged" is one finding pattern
        return "absent"
    neg = _NEG_PRE.search(before)
    hedge = None
    for m in _HEDGE_PRE.finditer(before):
        hedge = m
    if neg and hedge is not None and neg.start() < hedge.start() and _NEGATED_HEDGES.fullmatch(hedge.group()) \
            and not re.search(r"\b(?:is|are|was|were|may|which)\b", s[neg.end():hedge.start()]):
        return "absent"  # "no consolidation to suggest pneumonia" (CheXpert negates Y here too)
    if neg and (hedge is None or neg.start() > hedge.start()):
        return "absent"
    if hedge is not None:
        return "present" if hedge.group() in _CERTAIN_AFTER_HEDGE else "possible"
    # post-triggers apply to the findings of their own clause ("X and Y are not seen")
    nxt = found[i + 1][0] if i + 1 < len(found) else hi
    own_verb = re.search(r"\b(?:is|are|has|have|may|can|cannot)\b", s[end:nxt])
    tail = s[end:nxt] if own_verb and nxt < hi else s[end:hi]
    if _NEG_POST.search(tail):
        return "absent"
    if _HEDGE_POST.search(tail) or re.match(r"\s*(?:versus|vs\.?)\s", s[end:hi]):
        return "possible"
    return "present"


def _assign_locations(s: str, found: list[tuple[int, int, str]],
                      certainty: list[str]) -> list[list[tuple[str | None, str | None]]]:
    """Location words before a finding describe it ("left lower lobe atelectasis"); words after it
    only with a preposition ("opacity in the left lower lobe"). A finding a hedge introduces
    ("... may represent atelectasis") shares the location of what it explains."""
    locs = _locations_in(s, 0, len(s))
    out: list[list[tuple[str | None, str | None]]] = [[] for _ in found]
    used: set[int] = set()
    for li, (ls, le, side, zone) in enumerate(locs):
        after_idx = next((i for i, f in enumerate(found) if f[0] >= le), None)
        before_idx = next((i for i in range(len(found) - 1, -1, -1) if found[i][1] <= ls), None)
        target = None
        if before_idx is not None and _PREPOSITION_BEFORE.search(s[found[before_idx][1]:ls]):
            target = before_idx
        elif after_idx is not None and re.fullmatch(r"[\w\s-]*", s[le:found[after_idx][0]]) and \
                len(s[le:found[after_idx][0]].split()) <= 3:
            target = after_idx
        if target is not None:
            out[target].append((side, zone))
            used.add(li)
    # hedged explanation inherits the location of the finding it explains
    for i in range(1, len(found)):
        if not out[i] and certainty[i] == "possible" and out[i - 1]:
            between = s[found[i - 1][1]:found[i][0]]
            if _HEDGE_PRE.search(between) and not _TERMINATORS.search(between):
                out[i] = list(out[i - 1])
    # one location in the whole sentence: it is where the (non-negated) findings are
    # ("blunting of the right costophrenic angle due to a pleural effusion")
    distinct = {(side, zone) for _, _, side, zone in locs}
    if len(distinct) == 1:
        for i in range(len(found)):
            if not out[i] and certainty[i] != "absent":
                out[i] = list(distinct)
    return out


# ---- optional LLM extractor ----------------------------------------------------------------------
_LLM_SYSTEM = (
    "You extract findings from chest X-ray reports. Reply with JSON only: a list of objects "
    '{"finding": str, "certainty": "present"|"possible"|"absent", "location": str or null}, one '
    "finding per object. Skip statements that only compare with prior studies. Use short lower-case "
    'finding names (e.g. "pleural effusion") and locations like "right lower lung".'
)


class LLMExtractor:
    """Sentence extraction by an OpenAI-compatible chat server (``/v1/chat/completions``).

    Off by default: the rule-based extractor needs no network. The reply is parsed with
    ``json.loads`` only and validated item by item, so a chatty or malicious reply yields an
    :class:`ExtractionError`, never executed code or silently wrong labels.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url = self.url + ("/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key, self.timeout = model, api_key, float(timeout)

    def mentions(self, report: str) -> list[Mention]:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "system", "content": _LLM_SYSTEM},
                                        {"role": "user", "content": report}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ExtractionError(f"{self.url}: request failed ({exc})") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ExtractionError(f"{self.url}: not an OpenAI chat completion response") from None
        return parse_llm_reply(content)

    def __call__(self, report: str) -> list[str]:
        return [m.sentence() for m in self.mentions(report)]


def parse_llm_reply(content: object) -> list[Mention]:
    """Validate an LLM's JSON reply (a list, or ``{"findings": [...]}``; ``json`` code fences allowed)."""
    if not isinstance(content, str):
        raise ExtractionError("LLM reply content is not text")
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ExtractionError(f"LLM reply is not valid JSON ({exc}): {text[:80]!r}") from None
    if isinstance(data, dict) and isinstance(data.get("findings"), list):
        data = data["findings"]
    if not isinstance(data, list):
        raise ExtractionError(f"LLM reply must be a JSON list of findings, got {type(data).__name__}")
    out = []
    for k, item in enumerate(data):
        if not isinstance(item, dict):
            raise ExtractionError(f"LLM reply item {k} is not an object")
        finding, certainty, location = item.get("finding"), item.get("certainty"), item.get("location")
        if not isinstance(finding, str) or not finding.strip():
            raise ExtractionError(f"LLM reply item {k}: 'finding' must be a non-empty string")
        if certainty not in CERTAINTIES:
            raise ExtractionError(f"LLM reply item {k}: 'certainty' must be one of {CERTAINTIES}, got {certainty!r}")
        if location is not None and not isinstance(location, str):
            raise ExtractionError(f"LLM reply item {k}: 'location' must be a string or null")
        name = finding.strip().lower()
        canon = _FINDING_RE.fullmatch(name)
        if canon:
            name = next(_FINDING_PATTERNS[int(g[1:])][1] for g, v in canon.groupdict().items() if v is not None)
        out.append(Mention(name, certainty, normalise_location(location, name)))
    return out


def normalise_location(text: str | None, finding: str | None = None) -> str | None:
    """Free-text location ("right lower lobe", "left apex") → canonical form; unknown text is kept lower-cased."""
    if not text or not text.strip():
        return None
    low = " ".join(text.lower().split())
    locs = _locations_in(low, 0, len(low))
    if not locs:
        return low
    _, _, side, zone = locs[0]
    return canonical_location(side, zone, finding)


def sentences_for(mentions: Iterable[Mention]) -> list[str]:
    return [m.sentence() for m in mentions]
