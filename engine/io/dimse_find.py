"""Listing past an archive's cap on C-FIND results: split the query by StudyDate.

Archives cap what one C-FIND returns. Orthanc's ``LimitFindResults`` (study and series level; its
``LimitFindInstances`` for the instance level) sends the first N matches as pending responses,
then ends the C-FIND with status 0xFE00 ("Cancel: matching terminated due to Cancel request")
instead of Success: a partial list that looks complete to a client that only collects the pending
answers. Other archives have a cap of their own (some say so by status, some not at all), so a user
can also declare it (``find-limit=N``): a reply with N matches or more is then taken as truncated.

:class:`DateSplitter` lists what a study- or series-level query matches, each study (or series)
once, streamed range by range:

* one C-FIND with the user's own keys; complete, its matches come in UID order (as always);
* truncated, the StudyDate range (the user's ``StudyDate=``, else every date) is cut in halves,
  recursively, lowest dates first, until each range's reply is complete; each range's matches come
  in (StudyDate, UID) order, so the whole listing is in date order whatever the cap;
* a single day still over the cap cannot be cut further: its reply (as many as the archive gives)
  is listed, and one line naming the target and the day is recorded (``warn``); the run goes on;
* without a user range, studies with no StudyDate match no range: they are asked for once with
  Empty Value Matching (PS3.4 C.2.2.2.7, ``StudyDate=""``), and the undated matches of the first,
  truncated reply are kept too. An archive without Empty Value Matching (Orthanc answers nothing)
  can hide undated studies beyond its cap; when the first reply shows there are some and the
  Empty Value Matching query finds none, that is recorded in one line.

An archive that answers a range with matches outside it does not match StudyDate (at that
level): splitting stops there, in one recorded line, rather than querying every day.

The first cuts fall on 1899-12-31 and today, so the ranges before 1900 and after today (typing
errors) cost one small query each, and the halving works on the dates archives hold.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

EARLIEST, LATEST = date(1, 1, 1), date(9999, 12, 31)  # what DA can spell
CUTS = (date(1899, 12, 31),)  # cut here first (then today): dates before 1900 are rare, and typos
EMPTY_VALUE = '""'  # PS3.4 C.2.2.2.7 Empty Value Matching: the attribute is empty or absent


@dataclass(frozen=True)
class Reply:
    """One C-FIND's matches, and whether the archive may have left some out (``why``: how we know)."""

    rows: list[Any]
    truncated: bool = False
    why: str = ""


@dataclass(frozen=True)
class DateRange:
    """A closed range of days; :data:`EARLIEST`/:data:`LATEST` stand for an open end."""

    lo: date = EARLIEST
    hi: date = LATEST

    @property
    def single_day(self) -> bool:
        return self.lo >= self.hi

    def text(self) -> str:
        """The DA range matching value (``YYYYMMDD-YYYYMMDD``, an open end left out)."""
        lo = "" if self.lo == EARLIEST else f"{self.lo:%Y%m%d}"
        hi = "" if self.hi == LATEST else f"{self.hi:%Y%m%d}"
        return lo if self.single_day else f"{lo}-{hi}"

    def __contains__(self, day: date) -> bool:
        return self.lo <= day <= self.hi

    def halves(self, today: date) -> tuple[DateRange, DateRange]:
        """Two ranges that cover this one (not a single day): cut at 1899-12-31 or today when
        they fall inside, else in the middle."""
        for cut in (*CUTS, today):
            if self.lo <= cut < self.hi:
                break
        else:
            cut = self.lo + timedelta(days=(self.hi - self.lo).days // 2)
        return DateRange(self.lo, cut), DateRange(cut + timedelta(days=1), self.hi)


def parse_day(text: str) -> date | None:
    """A DA value (``YYYYMMDD``; the old ``YYYY.MM.DD`` too), or None when it is not one."""
    digits = text.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def parse_range(text: str | None) -> DateRange | None:
    """A StudyDate matching value as a range (``D``, ``D-``, ``-D``, ``D1-D2``; none: every date),
    or None when it cannot be split (a list, a typo)."""
    if text is None or not text.strip():
        return DateRange()
    lo_text, dash, hi_text = text.strip().partition("-")
    lo = parse_day(lo_text) if lo_text else EARLIEST
    hi = (parse_day(hi_text) if hi_text else LATEST) if dash else lo
    if lo is None or hi is None or lo > hi:
        return None
    return DateRange(lo, hi)


@dataclass
class DateSplitter:
    """The keys (a study UID, or a (study, series) pair) a query matches, each once, lazily.

    ``query(value)`` runs the C-FIND with StudyDate matching ``value`` (None: the user's own keys
    as given) and returns a :class:`Reply`; its errors pass through. ``key(row)`` is a match's key
    (None: a match without UIDs, left out); ``day(row)`` its StudyDate text. ``warn(key, line)``
    records a listing the archive capped for good: one line naming ``where`` and the day.
    """

    query: Callable[[str | None], Reply]
    key: Callable[[Any], Hashable | None]
    day: Callable[[Any], str]
    where: str
    warn: Callable[[str, str], None]
    user_date: str | None = None
    noun: str = "studies"
    today: date = field(default_factory=date.today)
    seen: set[Hashable] = field(default_factory=set)
    ignored: bool = False  # the archive answered a range with matches outside it: splitting is moot

    def __iter__(self) -> Iterator[Hashable]:
        """The user's query, then (when it was capped) its date ranges and the undated matches."""
        root = self.query(None)
        if not root.truncated:
            yield from self._fresh(root.rows, by_date=False)
            return
        whole = parse_range(self.user_date)
        if whole is None:
            self._capped(f"StudyDate={self.user_date}", root, "a StudyDate that cannot be split into ranges")
            yield from self._fresh(root.rows, by_date=True)
            return
        if whole.single_day:
            self._capped(f"StudyDate={whole.text()}", root, "a single day")
            yield from self._fresh(root.rows, by_date=True)
            return
        for half in whole.halves(self.today):
            yield from self._walk(half)
        if not self.ignored and (self.user_date is None or not self.user_date.strip()):
            yield from self._undated(root)

    def _walk(self, span: DateRange) -> Iterator[Hashable]:
        """The keys of ``span``, lowest dates first: its reply, or its halves' when it was capped."""
        if self.ignored:
            return
        reply = self.query(span.text())
        if not reply.truncated:
            yield from self._fresh(reply.rows, by_date=True)
            return
        days = [parse_day(self.day(row)) for row in reply.rows]
        if any(d is not None and d not in span for d in days):  # the archive ignored the range: stop here
            self.ignored = True
            self._capped(f"StudyDate={span.text()}", reply, "the archive does not match StudyDate ranges")
        elif all(d is None for d in days):  # undated matches fill every reply: halving cannot help
            self._capped(f"StudyDate={span.text()}", reply, "a range whose matches have no StudyDate")
        elif span.single_day:
            self._capped(f"StudyDate={span.text()}", reply, "a single day")
        else:
            for half in span.halves(self.today):
                yield from self._walk(half)
            return
        yield from self._fresh(reply.rows, by_date=True)

    def _undated(self, root: Reply) -> Iterator[Hashable]:
        """Matches without a StudyDate (no range matches them): asked once by Empty Value
        Matching, plus those the capped first reply happened to hold."""
        from radflash.io.dimse import DimseError, DimseUnavailable

        first = [row for row in root.rows if not self.day(row).strip()]
        why = ""
        try:
            reply = self.query(EMPTY_VALUE)
        except DimseUnavailable:
            raise
        except DimseError as exc:  # an archive without Empty Value Matching may refuse the value
            reply, why = Reply([]), f'it refused StudyDate="" ({str(exc).split(": ", 1)[-1]})'
        if any(self.day(row).strip() for row in reply.rows):  # dated matches: not Empty Value Matching
            reply, why = Reply([]), 'it answered StudyDate="" with dated matches'
        undated = [row for row in reply.rows if not self.day(row).strip()]
        if reply.truncated:
            self._capped('StudyDate=""', reply, f"{self.noun} without a StudyDate")
        elif first and not undated:  # Orthanc: no Empty Value Matching, an empty reply
            why = why or 'it found none for StudyDate=""'
            self.warn(f"{self.where}?StudyDate=", f"{self.where}: the capped reply held {len(first)} {self.noun} "
                      f"without a StudyDate, but {why} (no Empty Value Matching): others may not be listed")
        yield from self._fresh(first + undated, by_date=False)

    def _capped(self, what: str, reply: Reply, because: str) -> None:
        self.warn(f"{self.where}?{what}", f"{self.where}: C-FIND for {what} capped by the archive ({reply.why}; "
                  f"{len(reply.rows)} {self.noun} listed): {because}, not split further; any more are not listed")

    def _fresh(self, rows: list[Any], *, by_date: bool) -> Iterator[Hashable]:
        """The keys of ``rows`` not listed before, in (StudyDate, key) or key order."""
        keyed = {}
        for row in rows:
            k = self.key(row)
            if k is not None and k not in self.seen:
                keyed[k] = (parse_day(self.day(row)) or LATEST, k) if by_date else k
        for k in sorted(keyed, key=keyed.__getitem__):
            self.seen.add(k)
            yield k
