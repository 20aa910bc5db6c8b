"""Listing an archive that caps C-FIND results: a real Orthanc with ``LimitFindResults`` 3.

Orthanc sends the first 3 matches, then status 0xFE00 instead of Success. The archive holds more
studies than that over many dates (drawn from the test seed), a day with more studies than the
cap, studies before 1900, in the future and without a StudyDate, and a series with more instances
than ``LimitFindInstances``. Every study must be listed exactly once (except what the archive
cannot give: the busy day beyond the cap, recorded in one line), where one plain C-FIND sees 3.
A real pynetdicom SCP stands in for what Orthanc cannot show: an archive that caps silently
(``find-limit``), does Empty Value Matching, or ignores StudyDate.
"""

from __future__ import annotations

import json
import random
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from radflash.errors import InputError
from tests.conftest import seed_for
from tests.engine.orthanc import Orthanc, skip_reason
from tests.services import unavailable

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'radflash[dimse]')")

from radflash.io import dimse
from radflash.io.dimse import DimseError, DimseSource, parse_target
from radflash.io.dimse_find import DateRange, parse_range

CAP = 3
BUSY = 5  # studies on the busy day: 2 more than the archive returns for it
BIG_SERIES = 4  # instances of one series: 1 more than LimitFindInstances


def _write(folder: Path, seed: int, study_date: str | None, instances: int = 1) -> tuple[list[Path], str]:
    """One study (one series, ``instances`` instances) dated ``study_date`` (None: no StudyDate)."""
    import pydicom
    from pydicom.uid import generate_uid

    from radflash.synthetic.dicom_archive import write_dicom

    first = write_dicom(np.random.default_rng(seed).random((32, 32)), folder / f"s{seed}-0.dcm", seed=seed)
    ds = pydicom.dcmread(first)
    if study_date is None:
        del ds.StudyDate
    else:
        ds.StudyDate = study_date
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
    (UID → StudyDate, "" for none), ``busy`` (the busy day), ``big`` (the 4-instance study)."""
    reason = skip_reason()
    if reason is not None:
        unavailable(reason)
    seed = seed_for("tests/engine/io/test_dimse_find.py::capped")
    rng = random.Random(seed)
    days = sorted(rng.sample(range((date(2025, 12, 31) - date(1995, 1, 1)).days), 12))
    dated = [f"{date(1995, 1, 1) + timedelta(days=d):%Y%m%d}" for d in days]
    busy = dated[rng.randrange(4, 10)]  # not the 4-instance study's day (plan[3] = dated[2])
    # the undated study goes first: Orthanc answers in storage order, so the capped first reply holds it
    plan = [None, *dated, *[busy] * (BUSY - 1), "18800101", "20991231"]
    folder = tmp_path_factory.mktemp("capped-files")
    files, studies, big = [], {}, ""
    for i, study_date in enumerate(plan):
        paths, uid = _write(folder, seed % 100_000 * 100 + i, study_date, BIG_SERIES if i == 3 else 1)
        files += paths
        studies[uid] = study_date or ""
        big = uid if i == 3 else big
    server = Orthanc(tmp_path_factory.mktemp("orthanc-capped"))
    config = json.loads(server.config_path.read_text())
    server.config_path.write_text(json.dumps({**config, "LimitFindResults": CAP, "LimitFindInstances": CAP}))
    server.start()
    try:
        assert len(server.upload(files)) == len(files)
        yield server, studies, busy, big
    finally:
        server.stop(kill=True)  # at once: nothing runs on it any more


def _undated_held(server, studies: dict[str, str], level: str) -> tuple[str, bool]:
    """The undated study, and whether the capped first reply at ``level`` holds it. Orthanc has
    no Empty Value Matching (StudyDate="" finds nothing), so it is listed only then, with a line
    saying others may be missing; Orthanc's order is stable (not storage order)."""
    undated = next(uid for uid, d in studies.items() if not d)
    source = DimseSource(server.dimse())
    keys = {"SeriesInstanceUID": ""} if level == "SERIES" else {}
    first = source._find_capped("q", dimse.query_identifier(level, StudyInstanceUID="", StudyDate="", **keys)).rows
    source.close()
    return undated, undated in {str(r.StudyInstanceUID) for r in first}


def _listed(source: DimseSource) -> list[str]:
    """Study UIDs in listing order, one per listed series."""
    seen: list[str] = []
    for item in source.listing():
        if not seen or seen[-1] != item.ref.study:
            seen.append(item.ref.study)
    return seen


def test_a_plain_cfind_is_capped_and_says_so_by_status(capped) -> None:
    """What Orthanc does at its cap: 3 pending matches, then 0xFE00 (not Success)."""
    server, studies, _, _ = capped
    source = DimseSource(server.dimse())
    reply = source._find_capped("q", dimse.query_identifier("STUDY", StudyInstanceUID="", StudyDate=""))
    assert reply.truncated and reply.why.startswith("status 0xFE00") and len(reply.rows) == CAP < len(studies)
    with pytest.raises(DimseError, match=r"C-FIND failed \(status 0xFE00"):  # find(): never a silent partial list
        source._find("q", dimse.query_identifier("STUDY", StudyInstanceUID=""))
    source.close()


def test_split_lists_every_study_once_and_records_the_busy_day(capped, caplog) -> None:
    server, studies, busy, big = capped
    source = DimseSource(server.dimse())
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="radflash.dimse"):
        listed = _listed(source)
    assert len(listed) == len(set(listed))  # each study once
    on_busy = {uid for uid, d in studies.items() if d == busy}
    undated, held = _undated_held(server, studies, "STUDY")
    assert set(listed) - on_busy == set(studies) - on_busy - (set() if held else {undated})  # far dates too
    assert len(set(listed) & on_busy) == CAP  # what Orthanc gives for the day
    # in date order (undated last), whatever the cap
    dates = [studies[uid] or "99999999" for uid in listed]
    assert dates == sorted(dates)
    failures = dict(source.failures)
    day_key = f"{source.target.base}?StudyDate={busy}"
    assert f"capped by the archive (status 0xFE00; {CAP} studies listed): a single day" in failures[day_key]
    assert any(key.endswith(f"/studies/{big}/series/" + key.rsplit("/", 1)[-1]) and "instance C-FIND capped" in why
               for key, why in failures.items())
    assert any("no Empty Value Matching" in why for why in failures.values()) == held
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"{source.target.base}: C-FIND for StudyDate={busy} capped") for line in lines)
    assert all("\n" not in line and "PHANTOM" not in line and "PH0" not in line for line in lines)  # no patient data
    assert time.monotonic() - started < 10


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
    server, studies, busy, _ = capped
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
    server, studies, busy, _ = capped
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
    server, studies, busy, _ = capped
    source = DimseSource(server.dimse("level=SERIES"))
    pairs = [(i.ref.study, i.ref.series) for i in source.listing()]
    series = list(dict.fromkeys(pairs))
    assert len({s for s, _ in series}) == len(series)  # one series per study, each listed once
    on_busy = {uid for uid, d in studies.items() if d == busy}
    undated, held = _undated_held(server, studies, "SERIES")
    assert {s for s, _ in series} - on_busy == set(studies) - on_busy - (set() if held else {undated})
    assert any(key.endswith(f"?StudyDate={busy}") and "series listed" in why for key, why in source.failures)


def test_score_carries_on_past_the_busy_day(capped, tmp_path: Path) -> None:
    """The run goes on; the busy day is one failed row naming the target and the day."""
    from click.testing import CliRunner

    from radflash.cli import cli

    server, studies, busy, _ = capped
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["score", server.dimse(), "-o", str(out), "--workers", "1", "-q"])
    assert result.exit_code == 0, result.output
    from radflash.archive.sinks import read_manifest, read_table

    status = read_table(next(out.glob("status.*"))).to_pylist()
    day = [r for r in status if r["path"].endswith(f"?StudyDate={busy}")]
    assert len(day) == 1 and day[0]["status"] == "failed" and "single day" in day[0]["reason"]
    _, held = _undated_held(server, studies, "STUDY")
    listed = len(studies) - (BUSY - CAP) - (not held)
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


def _silent_cap_scp(dates: dict[str, str], *, ranges: bool = True):
    """A real pynetdicom C-FIND SCP on loopback that caps at CAP matches silently (Success), and
    does Range and Empty Value Matching on StudyDate (or ignores StudyDate): what Orthanc cannot show."""
    from pydicom import Dataset
    from pynetdicom import AE, evt

    from tests.engine.orthanc import free_port

    def matches(value: str, day: str) -> bool:
        if value == '""':
            return not day
        lo, dash, hi = value.partition("-")
        return not value or (bool(day) and (lo or "0") <= day <= ((hi or "99999999") if dash else lo))

    def on_find(event):
        wanted = str(event.identifier.get("StudyDate", "") or "") if ranges else ""
        for uid in [u for u, day in sorted(dates.items()) if matches(wanted, day)][:CAP]:
            match = Dataset()
            match.QueryRetrieveLevel, match.StudyInstanceUID, match.StudyDate = "STUDY", uid, dates[uid]
            yield 0xFF00, match

    ae = AE("SILENT")
    ae.add_supported_context(dimse.FIND_MODEL)
    port = free_port()
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]), port


def test_find_limit_lists_past_a_silent_cap_with_empty_value_matching() -> None:
    rng = random.Random(seed_for("tests/engine/io/test_dimse_find.py::silent"))
    days = rng.sample(range(9000), 14)  # distinct: no day over the cap
    dates = {f"1.2.3.{i}": f"{date(2000, 1, 1) + timedelta(d):%Y%m%d}" for i, d in enumerate(days)}
    dates |= {"1.2.4.1": "", "1.2.4.2": ""}  # no StudyDate: only Empty Value Matching finds them
    server, port = _silent_cap_scp(dates)
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
    server, port = _silent_cap_scp(dates, ranges=False)
    try:
        asked: list[str] = []
        source = DimseSource(f"dimse://SILENT@127.0.0.1:{port}?find-limit={CAP}")
        real = source._find_capped
        source._find_capped = lambda what, ident, limit=None: asked.append(str(ident.StudyDate)) or real(
            what, ident, limit)
        listed = list(source._matches("STUDY"))
        source.close()
        assert len(listed) == CAP and len(asked) <= 3  # the first, capped, reply; then one range gives it away
        assert len(source.failures) == 1 and "does not match StudyDate ranges" in source.failures[0][1]
    finally:
        server.shutdown()
