"""Listing past an archive's cap on C-FIND results: split the query by StudyDate, then StudyTime.

Archives cap what one C-FIND returns, in one of three ways:

* Orthanc's ``LimitFindResults`` (study and series level; its ``LimitFindInstances`` for the
  instance level) sends the first N matches as pending responses, then ends the C-FIND with status
  0xFE00 ("Cancel: matching terminated due to Cancel request") instead of Success: a partial list
  that looks complete to a client that only collects the pending answers;
* dcm4chee-arc's ``QueryMaxNumberOfResults`` refuses the whole C-FIND, before any match, with
  status 0xC000 and the comment "Request entity too large" (see :func:`refused_over_cap`);
* others cap silently, so a user can declare the cap (``find-limit=N``): a reply with N matches or
  more is then taken as truncated.

All three are one :class:`Reply` with ``truncated`` set (a refusal with no rows), and
:class:`DateSplitter` lists what a study- or series-level query matches, each study (or series)
once, streamed window by window:

* one C-FIND with the user's own keys; complete, its matches come in UID order (as always);
* truncated, the StudyDate range (the user's ``StudyDate=``, else every date) is cut in halves,
  recursively, lowest dates first, until each range's reply is complete;
* a single day still over the cap is cut by StudyTime (range matching, ``HHMMSS-HHMMSS.999999``)
  into halves of the day, earliest first, down to one second (:class:`TimeRange` says why);
  its studies without a StudyTime match no time range, so they are asked for once more by Empty
  Value Matching (``StudyTime=""``), as undated studies are below;
* a second still over the cap cannot be cut further: its reply (as many as the archive gives,
  none when it refused) is listed, and one line naming the target, the day and the window is
  recorded (``warn``); the run goes on;
* without a user range, studies with no StudyDate match no range: they are asked for once with
  Empty Value Matching (PS3.4 C.2.2.2.7, ``StudyDate=""``), and the undated matches of the first,
  truncated reply are kept too. An archive without Empty Value Matching (Orthanc answers nothing)
  can hide undated (or, on a busy day, untimed) studies beyond its cap; when a capped reply shows
  there are some and the Empty Value Matching query finds none, or the archive refuses ``""`` (or
  answers it with matches that have a value), that is recorded in one line.

Each window's matches come in (StudyDate, StudyTime, UID) order, those without a time last in
their day, so the whole listing is in date then time order whatever the cap.

An archive that answers a window with matches outside it does not match StudyDate (or StudyTime)
at that level: splitting stops there, in one recorded line, rather than querying every day (or
second). A refusal carries no matches, so it cannot show that; dcm4chee-arc, whose refusal this is,
matches both attributes as ranges (dcm4chee-arc-light,
dcm4chee-arc-query-util/src/main/java/org/dcm4chee/arc/query/util/QueryBuilder.java,
``dateRange``), never an empty value against one, and has no Empty Value Matching: a busy day's
untimed studies cannot be listed there. The recorded line says so where it refuses
``StudyTime=""`` (what it answers instead was not checked against a running dcm4chee-arc).

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
DAY_SECONDS = 86_400
# dcm4chee-arc-light refuses a C-FIND over its QueryMaxNumberOfResults instead of cutting it short:
# dcm4chee-arc-query-scp/src/main/java/org/dcm4chee/arc/query/scp/ArchiveQueryTask.java (initQuery,
# since 2017, dcm4chee-arc-light #828) throws DicomServiceException(Status.UnableToProcess,
# "Request entity too large") when the cap is set, the query names no unique key (no
# StudyInstanceUID, PatientID, ...) and its match count exceeds the cap; dcm4che's BasicQueryTask
# (dcm4che/dcm4che, dcm4che-net/.../net/service/BasicQueryTask.java) sends that as the only
# C-FIND-RSP, and DicomServiceException puts the message in ErrorComment (0000,0902). 0xC000 alone
# is any failure ("Unable to process"), so only that comment makes it "over the cap: split".
OVER_CAP_STATUS, OVER_CAP_COMMENT = 0xC000, "request entity too large"


def refused_over_cap(code: int, comment: str) -> bool:
    """Whether a C-FIND's final status is dcm4chee-arc's refusal of a query over its cap."""
    return code == OVER_CAP_STATUS and comment.strip().lower().startswith(OVER_CAP_COMMENT)


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


@dataclass(frozen=True)
class TimeRange:
    """Whole seconds ``lo``..``hi`` of a day, each with its fractions.

    The upper end is sent as ``HHMMSS.999999``: archives that compare TM values as text (Orthanc)
    would otherwise find a stored 083015.5 in neither 080000-083015 nor 083016-235959. One second
    is the smallest window: it is the finest that every archive stores (many keep no fractions),
    studies that share one (a default 000000) cannot be told apart by any window, and halving a day
    down to it costs 17 levels, 6 more than stopping at a minute.
    """

    lo: int = 0
    hi: int = DAY_SECONDS - 1

    @property
    def single_second(self) -> bool:
        return self.lo >= self.hi

    def text(self) -> str:
        """The TM range matching value."""
        return f"{_hhmmss(self.lo)}-{_hhmmss(self.hi)}.999999"

    def __contains__(self, seconds: float) -> bool:
        return self.lo <= seconds < self.hi + 1

    def halves(self) -> tuple[TimeRange, TimeRange]:
        mid = (self.lo + self.hi) // 2
        return TimeRange(self.lo, mid), TimeRange(mid + 1, self.hi)


def _hhmmss(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


@dataclass(frozen=True)
class Window:
    """What one split C-FIND asks for: a range of days, or one day and a range of its seconds
    (``times`` None: any time, studies without a StudyTime included)."""

    days: DateRange
    times: TimeRange | None = None

    def text(self) -> str:
        text = f"StudyDate={self.days.text()}"
        return text if self.times is None else f"{text}&StudyTime={self.times.text()}"


def parse_day(text: str) -> date | None:
    """A DA value (``YYYYMMDD``; the old ``YYYY.MM.DD`` too), or None when it is not one."""
    digits = text.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def parse_time(text: str) -> float | None:
    """A TM value (``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.FFFFFF``; the old ``HH:MM:SS`` too) in
    seconds since midnight, or None when it is not one."""
    whole, _, fraction = text.strip().replace(":", "").partition(".")
    if len(whole) not in (2, 4, 6) or not whole.isdigit() or (fraction and not fraction.isdigit()):
        return None
    hours, minutes, seconds = int(whole[:2]), int(whole[2:4] or 0), int(whole[4:] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    # a leap second (60) stays in the day's last second, where the archive stores it
    return min(hours * 3600 + minutes * 60 + seconds + float(f"0.{fraction or 0}"), DAY_SECONDS - 1e-6)


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

    ``query(study_date, study_time)`` runs the C-FIND with StudyDate and StudyTime matching these
    values (None: the user's own, as given) and returns a :class:`Reply`; its errors pass through.
    ``key(row)`` is a match's key (None: a match without UIDs, left out); ``day(row)`` and
    ``time(row)`` its StudyDate and StudyTime text. ``warn(key, line)`` records a listing the
    archive capped for good: one line naming ``where`` and the window.
    """

    query: Callable[[str | None, str | None], Reply]
    key: Callable[[Any], Hashable | None]
    day: Callable[[Any], str]
    where: str
    warn: Callable[[str, str], None]
    user_date: str | None = None
    user_time: str | None = None  # a user's StudyTime is kept as given: a busy day is then not cut by time
    noun: str = "studies"
    today: date = field(default_factory=date.today)
    time: Callable[[Any], str] = lambda row: ""
    seen: set[Hashable] = field(default_factory=set)
    ignored: bool = False  # the archive answered a range with matches outside it: splitting is moot
    times_ignored: bool = False  # the same for a StudyTime range: busy days are not cut by time

    def __iter__(self) -> Iterator[Hashable]:
        """The user's query, then (when it was capped) its windows and the undated matches."""
        root = self.query(None, None)
        if not root.truncated:
            yield from self._fresh(root.rows, by_date=False)
            return
        whole = parse_range(self.user_date)
        if whole is None:
            self._capped(f"StudyDate={self.user_date}", root, "a StudyDate that cannot be split into ranges")
            yield from self._fresh(root.rows, by_date=True)
            return
        if whole.single_day:  # the user's own day: on to its StudyTime windows
            yield from self._split(Window(whole), root)
            return
        for half in whole.halves(self.today):
            yield from self._walk(Window(half))
        if not self.ignored and (self.user_date is None or not self.user_date.strip()):
            yield from self._empty(root)

    def _walk(self, window: Window) -> Iterator[Hashable]:
        """The keys of ``window``, earliest first: its reply, or its parts' when it was capped."""
        if self.ignored or (window.times is not None and self.times_ignored):
            return
        reply = self.query(window.days.text(), None if window.times is None else window.times.text())
        if not reply.truncated:
            yield from self._fresh(reply.rows, by_date=True)
            return
        yield from self._split(window, reply)

    def _split(self, window: Window, reply: Reply) -> Iterator[Hashable]:
        """The keys of a capped ``window``: its halves' (dates, then a day's seconds and its
        untimed studies), or ``reply``'s and one recorded line when it cannot be cut further."""
        why = self._unsplittable(window, reply)
        if why:
            self._capped(window.text(), reply, why)
            yield from self._fresh(reply.rows, by_date=True)
        elif not window.days.single_day:
            for half in window.days.halves(self.today):
                yield from self._walk(Window(half))
        else:
            for half in (window.times or TimeRange()).halves():
                yield from self._walk(Window(window.days, half))
            if window.times is None and not self.times_ignored:
                yield from self._empty(reply, window.days)

    def _unsplittable(self, window: Window, reply: Reply) -> str:
        """Why halving ``window`` cannot help ("": it can). Matches outside it mean the archive
        does not match that attribute as a range, which ends all splitting by it."""
        if window.times is None:
            attr, inside, found = "StudyDate", window.days, [parse_day(self.day(row)) for row in reply.rows]
        else:
            attr, inside, found = "StudyTime", window.times, [parse_time(self.time(row)) for row in reply.rows]
        if any(v is not None and v not in inside for v in found):
            if window.times is None:
                self.ignored = True
            else:
                self.times_ignored = True
            return f"the archive does not match {attr} ranges"
        if found and all(v is None for v in found):  # they would fill every part (a refusal shows no rows)
            return f"a range whose matches have no {attr}"
        if not window.days.single_day:
            return ""
        if self.times_ignored:
            return "a single day, and the archive does not match StudyTime ranges"
        if self.user_time is not None and self.user_time.strip():
            return "a single day, within the query's own StudyTime"
        return "a single second" if window.times is not None and window.times.single_second else ""

    def _empty(self, capped: Reply, day: DateRange | None = None) -> Iterator[Hashable]:
        """Matches without a StudyDate (or, on ``day``, without a StudyTime): no range matches
        them, so they are asked for once by Empty Value Matching, plus those the ``capped`` reply
        happened to hold."""
        from radflash.io.dimse import DimseError, DimseUnavailable

        value = self.day if day is None else self.time
        attr, what = ("StudyDate", "StudyDate=") if day is None else ("StudyTime", f"StudyDate={day.text()}&StudyTime=")
        first = [row for row in capped.rows if not value(row).strip()]
        why = ""
        try:
            reply = self.query(EMPTY_VALUE, None) if day is None else self.query(day.text(), EMPTY_VALUE)
        except DimseUnavailable:
            raise
        except DimseError as exc:  # an archive without Empty Value Matching may refuse the value
            reply, why = Reply([]), f'it refused {attr}="" ({str(exc).split(": ", 1)[-1]})'
        if any(value(row).strip() for row in reply.rows):  # matches with a value: not Empty Value Matching
            reply, why = Reply([]), f'it answered {attr}="" with matches that have one'
        empty = [row for row in reply.rows if not value(row).strip()]
        on = "" if day is None else f" for StudyDate={day.text()}"
        if reply.truncated:
            self._capped(f'{what}""', reply, f"{self.noun} without a {attr}")
        elif first and not empty:  # Orthanc: no Empty Value Matching, an empty reply
            why = why or f'it found none for {attr}=""'
            self.warn(f"{self.where}?{what}", f"{self.where}: the capped reply{on} held {len(first)} {self.noun} "
                      f"without a {attr}, but {why} (no Empty Value Matching): others may not be listed")
        elif why:  # no Empty Value Matching, and a capped reply that shows none (a refusal shows nothing)
            self.warn(f"{self.where}?{what}", f"{self.where}: the reply{on} was capped and {why} (no Empty Value "
                      f"Matching): {self.noun} without a {attr}, if any, are not listed")
        yield from self._fresh(first + empty, by_date=True)

    def _capped(self, what: str, reply: Reply, because: str) -> None:
        self.warn(f"{self.where}?{what}", f"{self.where}: C-FIND for {what} capped by the archive ({reply.why}; "
                  f"{len(reply.rows)} {self.noun} listed): {because}, not split further; any more are not listed")

    def _fresh(self, rows: list[Any], *, by_date: bool) -> Iterator[Hashable]:
        """The keys of ``rows`` not listed before, in (StudyDate, StudyTime, key) or key order
        (no date or time: after those with one)."""
        keyed = {}
        for row in rows:
            k = self.key(row)
            if k is not None and k not in self.seen:
                seconds = parse_time(self.time(row))
                keyed[k] = ((parse_day(self.day(row)) or LATEST, DAY_SECONDS if seconds is None else seconds, k)
                            if by_date else k)
        for k in sorted(keyed, key=keyed.__getitem__):
            self.seen.add(k)
            yield k
