"""Listing an archive that caps C-FIND results: a real Orthanc with ``LimitFindResults`` 3.

Orthanc sends the first 3 matches, then status 0xFE00 instead of Success. The archive holds more
studies than that over many dates (drawn from the test seed), a busy day with more studies than
the cap (at several StudyTimes, one on the edge of the first cut, one without a StudyTime, and
more than the cap in one second), studies before 1900, in the future and without a StudyDate, and
a series with more instances than ``LimitFindInstances``. Every study must be listed exactly once
(except what the archive cannot give: that second beyond the cap, recorded in one line), where one
plain C-FIND sees 3. A real pynetdicom SCP stands in for what Orthanc cannot show: an archive that
caps silently (``find-limit``), refuses a C-FIND over its cap (dcm4chee-arc), does Empty Value
Matching, or ignores StudyDate.
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radflash.errors import InputError
from tests.conftest import seed_for
from tests.engine.orthanc import Orthanc, skip_reason
from tests.services import unavailable

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'radflash[dimse]')")

from radflash.io import dimse
from radflash.io.dimse import DimseError, DimseSource, parse_target
from radflash.io.dimse_find import DateRange, TimeRange, parse_range, parse_time, refused_over_cap

CAP = 3
PILE, PILE_TIME = CAP + 1, "073000"  # studies of the busy day in one second: 1 more than the cap
PILE_WINDOW = "073000-073000.999999"
EDGE_TIME = "115959.5"  # the last second of the first half of a day, with a fraction
BIG_SERIES = 4  # instances of one series: 1 more than LimitFindInstances


def _write(folder: Path, seed: int, study_date: str | None, instances: int = 1,
           study_time: str | None = None) -> tuple[list[Path], str]:
    """One study (one series, ``instances`` instances) dated ``study_date`` (None: no StudyDate),
    at ``study_time`` (None: no StudyTime)."""
    import pydicom
    from pydicom.uid import generate_uid

    from radflash.synthetic.dicom_archive import write_dicom

    first = write_dicom(np.random.default_rng(seed).random((32, 32)), folder / f"s{seed}-0.dcm", seed=seed)
    ds = pydicom.dcmread(first)
    if study_date is None:
        del ds.StudyDate
    else:
        ds.StudyDate = study_date
    if study_time is not None:
        ds.StudyTime = study_time
    paths = []
    for k in range(instances):
        if k:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=["radflash-test-capped", str(seed), str(k)])
        path = folder / f"s{seed}-{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc capping C-FIND at 3 matches (instances too), and what it holds: ``studies``
    (UID → StudyDate, "" for none), ``times`` (UID → StudyTime of the busy day's studies, "" for
    none), ``busy`` (the busy day), ``big`` (the 4-instance study)."""
    reason = skip_reason()
    if reason is not None:
        unavailable(reason)
    seed = seed_for("tests/engine/io/test_dimse_find.py::capped")
    rng = random.Random(seed)
    days = sorted(rng.sample(range((date(2025, 12, 31) - date(1995, 1, 1)).days), 12))
    dated = [f"{date(1995, 1, 1) + timedelta(days=d):%Y%m%d}" for d in days]
    busy = dated[rng.randrange(4, 10)]  # not the 4-instance study's day (plan[3] = dated[2])
    drawn = {f"{rng.randrange(24):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}.{rng.randrange(10)}"
             for _ in range(3)}
    spread = sorted({t for t in drawn if not t.startswith(PILE_TIME)} | {EDGE_TIME})
    # the undated study goes first, the busy day's untimed one (in dated) before its others: Orthanc
    # answers in storage order, so the capped first replies hold them
    plan = [(None, None), *[(d, None) for d in dated], *[(busy, t) for t in [*spread, *[PILE_TIME] * PILE]],
            ("18800101", None), ("20991231", None)]
    folder = tmp_path_factory.mktemp("capped-files")
    files, studies, times, big = [], {}, {}, ""
    for i, (study_date, study_time) in enumerate(plan):
        paths, uid = _write(folder, seed % 100_000 * 100 + i, study_date, BIG_SERIES if i == 3 else 1, study_time)
        files += paths
        studies[uid] = study_date or ""
        if study_date == busy:
            times[uid] = study_time or ""
        big = uid if i == 3 else big
    server = Orthanc(tmp_path_factory.mktemp("orthanc-capped"))
    config = json.loads(server.config_path.read_text())
    server.config_path.write_text(json.dumps({**config, "LimitFindResults": CAP, "LimitFindInstances": CAP}))
    server.start()
    try:
        assert len(server.upload(files)) == len(files)
        yield server, studies, times, busy, big
    finally:
        server.stop(kill=True)  # at once: nothing runs on it any more


def _held(server, level: str, uid: str, study_date: str = "") -> bool:
    """Whether Orthanc's capped reply at ``level`` (for ``study_date``, else every date) holds
    ``uid``. Orthanc has no Empty Value Matching (StudyDate="" and StudyTime="" find nothing), so
    an undated study (or a busy day's untimed one) is listed only then, with a line saying others
    may be missing; Orthanc's order is stable (not storage order)."""
    source = DimseSource(server.dimse())
    keys = {"SeriesInstanceUID": ""} if level == "SERIES" else {}
    identifier = dimse.query_identifier(level, StudyInstanceUID="", StudyDate=study_date, StudyTime="", **keys)
    first = source._find_capped("q", identifier).rows
    source.close()
    return uid in {str(r.StudyInstanceUID) for r in first}


def _expected(server, studies: dict[str, str], times: dict[str, str], busy: str, level: str) -> set[str]:
    """The studies a split listing of Orthanc can give, less the pile (only CAP of it come)."""
    undated = next(uid for uid, d in studies.items() if not d)
    untimed = next(uid for uid, t in times.items() if not t)
    lost = {uid for uid, t in times.items() if t == PILE_TIME}
    lost |= set() if _held(server, level, undated) else {undated}
    lost |= set() if _held(server, level, untimed, busy) else {untimed}
    return set(studies) - lost


def _listed(source: DimseSource) -> list[str]:
    """Study UIDs in listing order, one per listed series."""
    seen: list[str] = []
    for item in source.listing():
        if not seen or seen[-1] != item.ref.study:
            seen.append(item.ref.study)
    return seen


def test_a_plain_cfind_is_capped_and_says_so_by_status(capped) -> None:
    """What Orthanc does at its cap: 3 pending matches, then 0xFE00 (not Success)."""
    server, studies, _, _, _ = capped
    source = DimseSource(server.dimse())
    reply = source._find_capped("q", dimse.query_identifier("STUDY", StudyInstanceUID="", StudyDate=""))
    assert reply.truncated and reply.why.startswith("status 0xFE00") and len(reply.rows) == CAP < len(studies)
    with pytest.raises(DimseError, match=r"C-FIND failed \(status 0xFE00"):  # find(): never a silent partial list
        source._find("q", dimse.query_identifier("STUDY", StudyInstanceUID=""))
    source.close()


def test_split_lists_every_study_once_and_records_the_busy_second(capped, caplog, monkeypatch) -> None:
    """The busy day is cut by StudyTime: each of its studies once, in time order (the one on the
    edge of the first cut too), its untimed study after them; only the pile's second is capped."""
    server, studies, times, busy, big = capped
    source = DimseSource(server.dimse())
    asked = _counting(monkeypatch)
    with caplog.at_level("WARNING", logger="radflash.dimse"):
        listed = _listed(source)
    monkeypatch.undo()
    # no query storm: ~22 halvings to the day, 17 to the pile's second, each with its sibling
    assert len(asked) < 120
    assert len(listed) == len(set(listed))  # each study once
    pile = {uid for uid, t in times.items() if t == PILE_TIME}
    assert set(listed) - pile == _expected(server, studies, times, busy, "STUDY") - pile  # far dates too
    assert len(set(listed) & pile) == CAP  # what Orthanc gives for that second
    # in date then time order (untimed last in their day, undated last), whatever the cap
    order = [(studies[uid] or "99999999", times.get(uid) or "999999") for uid in listed]
    assert order == sorted(order)
    failures = dict(source.failures)
    second = f"{source.target.base}?StudyDate={busy}&StudyTime={PILE_WINDOW}"
    assert f"capped by the archive (status 0xFE00; {CAP} studies listed): a single second" in failures[second]
    assert not [key for key in failures if key.endswith(f"?StudyDate={busy}")]  # the day itself was split
    assert any(key.endswith(f"/studies/{big}/series/" + key.rsplit("/", 1)[-1]) and "instance C-FIND capped" in why
               for key, why in failures.items())
    untimed = next(uid for uid, t in times.items() if not t)
    undated = next(uid for uid, d in studies.items() if not d)
    assert (f"{source.target.base}?StudyDate=" in failures) == _held(server, "STUDY", undated)
    untimed_key = f"{source.target.base}?StudyDate={busy}&StudyTime="
    assert (untimed_key in failures) == _held(server, "STUDY", untimed, busy)
    assert "without a StudyTime" in failures.get(untimed_key, "without a StudyTime")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"{source.target.base}: C-FIND for StudyDate={busy}&StudyTime={PILE_WINDOW} capped")
               for line in lines)
    assert all("\n" not in line and "PHANTOM" not in line and "PH0" not in line for line in lines)  # no patient data


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _counting(monkeypatch) -> list[str]:
    """The StudyDate of each study-level C-FIND the source sends (the archive is real)."""
    asked: list[str] = []
    real = DimseSource._find_capped

    def counting(self, what, identifier, limit=None):
        if identifier.QueryRetrieveLevel == "STUDY":
            asked.append(str(identifier.StudyDate))
        return real(self, what, identifier, limit)

    monkeypatch.setattr(DimseSource, "_find_capped", counting)
    return asked


def test_a_user_range_is_respected_and_split(capped, monkeypatch) -> None:
    server, studies, _, busy, _ = capped
    dated = sorted({d for d in studies.values() if "19000101" <= d <= "20251231"})
    before, after = [d for d in dated if d < busy], [d for d in dated if d > busy]
    lo, hi = ((before[0], f"{_day(busy) - timedelta(1):%Y%m%d}") if len(before) > CAP
              else (f"{_day(busy) + timedelta(1):%Y%m%d}", after[-1]))
    inside = {uid for uid, d in studies.items() if d and lo <= d <= hi}
    assert len(inside) > CAP
    asked = _counting(monkeypatch)
    source = DimseSource(server.dimse(f"StudyDate={lo}-{hi}"))
    listed = _listed(source)
    assert sorted(listed) == sorted(inside) and not [k for k, _ in source.failures if "?StudyDate=" in k]
    assert asked[0] == f"{lo}-{hi}" and len(asked) > 1  # split, never outside the range, no StudyDate=""
    for value in asked[1:]:
        part = parse_range(value)
        assert part is not None and _day(lo) <= part.lo and part.hi <= _day(hi)


def test_find_limit_splits_a_reply_the_archive_calls_complete(capped, monkeypatch) -> None:
    """An archive that caps silently: find-limit=N takes a reply of N matches as truncated."""
    server, studies, _, busy, _ = capped
    dated = sorted({d for d in studies.values() if d.startswith(("19", "20")) and d != busy and d != "20991231"})
    lo, hi = dated[0], dated[1]  # two studies: complete for Orthanc
    asked = _counting(monkeypatch)
    plain = _listed(DimseSource(server.dimse(f"StudyDate={lo}-{hi}")))
    assert len(plain) == 2 and len(asked) == 1
    asked.clear()
    limited = DimseSource(server.dimse(f"StudyDate={lo}-{hi}&find-limit=2"))
    assert sorted(_listed(limited)) == sorted(plain) and len(asked) > 1 and not limited.failures
    assert limited.describe()["find_limit"] == 2


def test_series_level_is_split_too(capped) -> None:
    server, studies, times, busy, _ = capped
    source = DimseSource(server.dimse("level=SERIES"))
    pairs = [(i.ref.study, i.ref.series) for i in source.listing()]
    series = list(dict.fromkeys(pairs))
    assert len({s for s, _ in series}) == len(series)  # one series per study, each listed once
    pile = {uid for uid, t in times.items() if t == PILE_TIME}
    assert {s for s, _ in series} - pile == _expected(server, studies, times, busy, "SERIES") - pile
    assert len({s for s, _ in series} & pile) == CAP
    assert any(key.endswith(f"?StudyDate={busy}&StudyTime={PILE_WINDOW}") and "series listed" in why
               for key, why in source.failures)


def test_score_carries_on_past_the_busy_day(capped, tmp_path: Path) -> None:
    """The run goes on; the busy day's pile is one failed row naming the target, the day and the second."""
    from click.testing import CliRunner

    from radflash.cli import cli

    server, studies, times, busy, _ = capped
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["score", server.dimse(), "-o", str(out), "--workers", "1", "-q"])
    assert result.exit_code == 0, result.output
    from radflash.archive.sinks import read_manifest, read_table

    status = read_table(next(out.glob("status.*"))).to_pylist()
    second = [r for r in status if r["path"].endswith(f"?StudyDate={busy}&StudyTime={PILE_WINDOW}")]
    assert len(second) == 1 and second[0]["status"] == "failed" and "single second" in second[0]["reason"]
    listed = len(_expected(server, studies, times, busy, "STUDY")) + CAP  # CAP of the pile
    assert read_manifest(out)["counts"]["discovered"] == listed + CAP - 1  # + the capped series' others


def test_find_limit_option_and_date_ranges() -> None:
    t = parse_target("dimse://PACS@h:104?find-limit=1000&StudyDate=20240101-")
    assert t.find_limit == 1000 and parse_target(t.display) == t and "find-limit=1000" in t.display
    for bad in ("0", "x", "-3"):
        with pytest.raises(InputError, match="find-limit"):
            parse_target(f"dimse://PACS@h:104?find-limit={bad}")
    today = date(2026, 12, 7)
    assert parse_range(None) == DateRange() and parse_range("20240101") == DateRange(date(2024, 1, 1), date(2024, 1, 1))
    assert parse_range("-20241231").text() == "-20241231" and parse_range("20240101-").text() == "20240101-"
    assert parse_range("20241231-20240101") is None and parse_range("2024*") is None
    first, rest = DateRange().halves(today)  # before 1900 first, then up to today, then the future
    assert first.text() == "-18991231" and rest.halves(today)[0].text() == f"19000101-{today:%Y%m%d}"
    lo, hi = DateRange(date(2024, 1, 1), date(2024, 1, 4)).halves(today)
    assert (lo.text(), hi.text()) == ("20240101-20240102", "20240103-20240104") and hi.halves(today)[1].single_day


def _seconds(tm: str) -> float:
    """A TM value as seconds since midnight (the fake compares times as times, not as text)."""
    return int(tm[:2]) * 3600 + int(tm[2:4] or 0) * 60 + float(tm[4:] or 0)


def _matches(value: str, stored: str, order) -> bool:
    """Universal, Empty Value, single value or Range Matching of ``value`` against ``stored``."""
    if not value:
        return True
    if value == '""':
        return not stored
    lo, dash, hi = value.partition("-")
    if not stored:
        return False
    if not dash:
        return order(stored) == order(lo)
    return (not lo or order(lo) <= order(stored)) and (not hi or order(stored) <= order(hi))


def _capping_scp(dates: dict[str, str], times: dict[str, str] | None = None, *, ranges: bool = True,
                 match_time: bool = True, evm: bool = True, refuse: bool = False,
                 fail: tuple[int, str] | None = None):
    """A real pynetdicom C-FIND SCP on loopback holding studies (UID → StudyDate, "" for none; and
    StudyTime in ``times``): what Orthanc cannot show. Over CAP matches it sends the first CAP and
    Success (a silent cap), or, with ``refuse``, what dcm4chee-arc sends over its
    QueryMaxNumberOfResults: no match and status 0xC000 "Request entity too large" (only when the
    count exceeds the cap). ``fail`` (status, comment) answers every C-FIND with that failure.
    It does Range and Empty Value Matching on StudyDate and StudyTime, or ignores both
    (``ranges=False``) or StudyTime (``match_time=False``), or fails a ``""`` (``evm=False``)."""
    from pydicom import Dataset
    from pynetdicom import AE, evt

    from tests.engine.orthanc import free_port

    times = times or {}

    def status(code: int, comment: str) -> Dataset:
        ds = Dataset()
        ds.Status = code
        if comment:
            ds.ErrorComment = comment
        return ds

    def on_find(event):
        if fail is not None:
            yield status(*fail), None
            return
        ident = event.identifier
        day = str(ident.get("StudyDate", "") or "") if ranges else ""
        tm = str(ident.get("StudyTime", "") or "") if ranges and match_time else ""
        if not evm and '""' in (day, tm):
            yield status(0xC000, "Invalid matching value"), None
            return
        found = [u for u in sorted(dates) if _matches(day, dates[u], str) and _matches(tm, times.get(u, ""), _seconds)]
        if refuse and len(found) > CAP:
            yield status(0xC000, "Request entity too large"), None
            return
        for uid in found[:CAP]:
            match = Dataset()
            match.QueryRetrieveLevel, match.StudyInstanceUID = "STUDY", uid
            match.StudyDate, match.StudyTime = dates[uid], times.get(uid, "")
            yield 0xFF00, match

    ae = AE("CAPPING")
    ae.add_supported_context(dimse.FIND_MODEL)
    port = free_port()
    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_CONN_OPEN, dimse._no_delay)]  # no 40 ms delayed ACKs
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers), port


def _list_capped(dates: dict[str, str], times: dict[str, str], query: str = "", **scp: Any
                 ) -> tuple[list[str], DimseSource, int]:
    """The study-level listing of a :func:`_capping_scp` archive (``scp`` its options) through
    ``dimse://CAPPING@127.0.0.1:PORT`` + ``query``: the UIDs listed, the closed source and the port."""
    server, port = _capping_scp(dates, times, **scp)
    try:
        source = DimseSource(f"dimse://CAPPING@127.0.0.1:{port}{query}")
        listed = list(source._matches("STUDY"))
        source.close()
    finally:
        server.shutdown()
    return listed, source, port


def test_find_limit_lists_past_a_silent_cap_with_empty_value_matching() -> None:
    rng = random.Random(seed_for("tests/engine/io/test_dimse_find.py::silent"))
    days = rng.sample(range(9000), 14)  # distinct: no day over the cap
    dates = {f"1.2.3.{i}": f"{date(2000, 1, 1) + timedelta(d):%Y%m%d}" for i, d in enumerate(days)}
    dates |= {"1.2.4.1": "", "1.2.4.2": ""}  # no StudyDate: only Empty Value Matching finds them
    server, port = _capping_scp(dates)
    try:
        plain = DimseSource(f"dimse://SILENT@127.0.0.1:{port}")
        assert len(list(plain._matches("STUDY"))) == CAP and not plain.failures  # the loss a silent cap hides
        plain.close()
        source = DimseSource(f"dimse://SILENT@127.0.0.1:{port}?find-limit={CAP}")
        listed = list(source._matches("STUDY"))
        source.close()
        assert sorted(listed) == sorted(dates) and not source.failures
        assert listed[-2:] == ["1.2.4.1", "1.2.4.2"]  # by date, the undated last
        assert [dates[u] for u in listed[:-2]] == sorted(dates[u] for u in listed[:-2])
    finally:
        server.shutdown()


def test_an_archive_ignoring_study_date_is_one_line_not_a_query_storm() -> None:
    dates = {f"1.2.3.{i}": f"{2000 + i}0101" for i in range(8)}
    server, port = _capping_scp(dates, ranges=False)
    try:
        asked: list[str] = []
        source = DimseSource(f"dimse://SILENT@127.0.0.1:{port}?find-limit={CAP}")
        real = source._find_capped
        source._find_capped = lambda what, ident, limit=None: asked.append(str(ident.StudyDate)) or real(
            what, ident, limit)
        listed = list(source._matches("STUDY"))
        source.close()
        assert len(listed) == CAP and len(asked) <= 3  # the first, capped, reply; then one range gives it away
        assert len(source.failures) == 1 and "does not match StudyDate ranges" in next(iter(source.failures))[1]
    finally:
        server.shutdown()


def _busy_archive(seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Ten days with one study each, and a busy day: studies at distinct seconds (28 over the day,
    8 in one minute; some with a fraction), one more in the first one's second (2: fewer than the
    cap) and two without a StudyTime. Dates and times by UID."""
    rng = random.Random(seed)
    days = [f"{date(2000, 1, 1) + timedelta(d):%Y%m%d}" for d in rng.sample(range(9000), 11)]
    busy = days.pop()
    dates = {f"1.2.6.{i}": day for i, day in enumerate(days)}
    times = {uid: f"{rng.randrange(24):02d}0000" for uid in dates}
    seconds = rng.sample(range(86_400), 28) + [36_000 + s for s in rng.sample(range(60), 8)]  # 10:00:xx
    seconds = list(dict.fromkeys(seconds))
    stamps = [f"{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}" + rng.choice(["", ".5", ".123456"]) for s in seconds]
    stamps.append(stamps[0][:6] + ".25")  # a second with two studies
    for i, stamp in enumerate([*stamps, "", ""]):
        dates[f"1.2.7.{i}"] = busy
        times[f"1.2.7.{i}"] = stamp
    return dates, times


def _in_order(dates: dict[str, str], times: dict[str, str]) -> list[str]:
    """The UIDs by date, then time (untimed last in their day), then UID."""
    return sorted(dates, key=lambda u: (dates[u] or "99999999", _seconds(times[u]) if times.get(u) else 1e9, u))


@pytest.mark.parametrize("archive", ["silent cap", "refusal"])
def test_a_busy_day_is_split_by_study_time(archive: str) -> None:
    """Far more studies on one day than the cap: cut into StudyTime windows, each study listed
    once, in date then time order, the untimed ones (Empty Value Matching) last in their day; a
    refusal over the cap (dcm4chee-arc) splits as a truncated reply does."""
    dates, times = _busy_archive(seed_for("tests/engine/io/test_dimse_find.py::busy"))
    refuse = archive == "refusal"
    server, port = _capping_scp(dates, times, refuse=refuse)
    try:
        asked: list[str] = []
        source = DimseSource(f"dimse://CAPPING@127.0.0.1:{port}" + ("" if refuse else f"?find-limit={CAP}"))
        real = source._find_capped
        source._find_capped = lambda what, ident, limit=None: asked.append(str(ident.StudyTime)) or real(
            what, ident, limit)
        listed = list(source._matches("STUDY"))
        source.close()
        assert listed == _in_order(dates, times) and not source.failures
        assert '""' in asked and len(asked) < 400  # the untimed asked for once; no query storm
    finally:
        server.shutdown()


def test_a_refused_second_is_one_failed_row_naming_the_day_and_window() -> None:
    """More studies in one second than the cap: dcm4chee-arc refuses even that window, so it is
    one failed row naming the day and the second; the rest of the day is listed."""
    dates = {f"1.2.8.{i}": "20240105" for i in range(CAP + 4)} | {"1.2.9.1": "20240104", "1.2.9.2": "20240106"}
    times = {uid: PILE_TIME for uid in dates} | {"1.2.8.0": "235959.9", "1.2.8.1": "", "1.2.8.2": "000000"}
    listed, source, port = _list_capped(dates, times, refuse=True)
    assert listed == ["1.2.9.1", "1.2.8.2", "1.2.8.0", "1.2.8.1", "1.2.9.2"]  # the pile's second: none
    assert len(source.failures) == 1
    key, why = next(iter(source.failures))
    assert key == f"dimse://CAPPING@127.0.0.1:{port}?StudyDate=20240105&StudyTime={PILE_WINDOW}"
    assert "(status 0xC000 (Request entity too large); 0 studies listed): a single second" in why


@pytest.mark.parametrize("fail", [(0xC000, "Unable to process"), (0xC000, ""), (0xA900, "Request entity too large")])
def test_a_genuine_failure_still_fails(fail: tuple[int, str]) -> None:
    """Only 0xC000 with dcm4chee-arc's comment means "over the cap"; any other failure is one."""
    server, port = _capping_scp({"1.2.3.1": "20240101"}, fail=fail)
    try:
        source = DimseSource(f"dimse://CAPPING@127.0.0.1:{port}")
        with pytest.raises(DimseError, match=rf"C-FIND failed \(status 0x{fail[0]:04X}"):
            list(source._matches("STUDY"))
        source.close()
    finally:
        server.shutdown()


def test_an_archive_ignoring_study_time_is_one_line_per_day() -> None:
    dates = {f"1.2.3.{i}": "20240105" for i in range(8)} | {"1.2.4.1": "20240106"}
    times = {uid: f"{23 - i:02d}0000" for i, uid in enumerate(dates)}  # the first matches: all after noon
    listed, source, _ = _list_capped(dates, times, f"?find-limit={CAP}", match_time=False)
    assert len(listed) == CAP + 1  # what the first window gave, and the other day
    assert len(source.failures) == 1 and "does not match StudyTime ranges" in next(iter(source.failures))[1]
    assert "&StudyTime=000000-115959.999999" in next(iter(source.failures))[0]


def test_time_windows_and_the_refusal_signature() -> None:
    assert parse_time("073000") == parse_time("0730") == 27_000 and parse_time("07") == 25_200
    assert parse_time("07:30:00.5") == 27_000.5 and parse_time(EDGE_TIME) == 43_199.5
    for bad in ("", "7", "0730000", "250000", "076000", "0730a0", "073000.x"):
        assert parse_time(bad) is None
    first, second = TimeRange().halves()
    assert (first.text(), second.text()) == ("000000-115959.999999", "120000-235959.999999")
    assert parse_time(EDGE_TIME) in first and parse_time(EDGE_TIME) not in second
    assert TimeRange(27_000, 27_000).single_second and TimeRange(27_000, 27_000).text() == PILE_WINDOW
    assert refused_over_cap(0xC000, "Request entity too large") and refused_over_cap(0xC000, "request entity too large")
    assert not refused_over_cap(0xC000, "") and not refused_over_cap(0xC000, "Unable to process")
    assert not refused_over_cap(0xA700, "Request entity too large")


def test_a_refusing_archive_without_empty_value_matching_says_what_it_cannot_list() -> None:
    """dcm4chee-arc has no Empty Value Matching and no time range matches an empty StudyTime, and
    its refusal of the busy day shows none of that day's studies: an untimed one cannot be listed by
    any C-FIND without a unique key, so a failed row says that any such are not listed."""
    dates = {f"1.2.8.{i}": "20240105" for i in range(CAP + 2)} | {"1.2.9.1": "20240106"}
    times = {uid: f"{10 + i:02d}0000" for i, uid in enumerate(dates)} | {"1.2.8.0": ""}
    listed, source, port = _list_capped(dates, times, refuse=True, evm=False)
    assert listed == [uid for uid in _in_order(dates, times) if uid != "1.2.8.0"]
    failures = dict(source.failures)
    base = f"dimse://CAPPING@127.0.0.1:{port}"
    assert set(failures) == {f"{base}?StudyDate=20240105&StudyTime=", f"{base}?StudyDate="}
    assert "studies without a StudyTime, if any, are not listed" in failures[f"{base}?StudyDate=20240105&StudyTime="]
    assert 'refused StudyTime=""' in failures[f"{base}?StudyDate=20240105&StudyTime="]
    assert "studies without a StudyDate, if any, are not listed" in failures[f"{base}?StudyDate="]


def test_a_users_study_time_is_kept_and_not_split() -> None:
    dates = {f"1.2.8.{i}": "20240105" for i in range(CAP + 2)}
    times = {uid: f"{10 + i:02d}0000" for i, uid in enumerate(dates)}
    listed, source, _ = _list_capped(dates, times, f"?StudyDate=20240105&StudyTime=000000-235959&find-limit={CAP}")
    assert len(listed) == CAP and len(source.failures) == 1
    assert "a single day, within the query's own StudyTime" in next(iter(source.failures))[1]
