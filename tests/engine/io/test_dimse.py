"""The DIMSE source and C-STORE store against a real Orthanc's DICOM port (tests/engine/orthanc.py).

Orthanc holds the demo archive plus the real CR radiograph from pydicom-data (RG1: uncompressed,
JPEG 2000 lossless and lossy, and an RLE copy made here); a local folder holds the same files.
``score dimse://…`` must give the rows and probabilities of the folder, by C-GET and by C-MOVE;
``--store dimse://`` must leave one SR per image and store none on a re-run; resume after
``kill -9``, shards, and the failures (nothing matched, wrong AE title, refused association,
archive stopping mid-retrieve, missing transfer syntax, failure statuses, out of resources) end
with their one-line messages.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from radflash.archive.sinks import read_manifest, read_table
from radflash.archive.verb import score
from radflash.errors import InputError
from tests.engine.crash import kill9_after_second_part
from tests.engine.orthanc import ARCHIVE_FILES, free_port, start_or_skip

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'radflash[dimse]')")

from radflash.io import dimse
from radflash.io.dimse import DimseError, DimseSource, DimseUnavailable, parse_target

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
LOSSLESS = {EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"}
MOVE_AET = "RADFLASH"


# ---- data: the demo archive + RG1 in four encodings ---------------------------------------------
def _rg1_files(folder: Path) -> list[Path]:
    """RG1 uncompressed, JPEG 2000 lossless and lossy (pydicom-data, each its own SOP UID), and an
    RLE copy of the uncompressed one under a derived SOP UID; skipped where pydicom-data is absent."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import RLELossless, generate_uid

    out = []
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"pydicom-data's {name} is not installed")
        out.append(Path(shutil.copy(path, folder / name)))
    ds = pydicom.dcmread(out[0])
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["radflash-test-rle", ds.SOPInstanceUID])
    ds.save_as(folder / "RG1_RLE.dcm", enforce_file_format=True)
    return [*out, folder / "RG1_RLE.dcm"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("corpus")
    files = [Path(shutil.copy(p, folder / f"{i:02d}-{p.name}")) for i, p in enumerate(ARCHIVE_FILES)]
    return files + _rg1_files(folder)


def _start(root: Path, corpus: list[Path], **dicom: object):
    server = start_or_skip(root, **dicom)
    server.stored = server.upload(corpus)  # type: ignore[attr-defined]
    server.move_port = free_port()  # type: ignore[attr-defined]
    server.add_modality("radflash", MOVE_AET, server.move_port)  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]):
    """Orthanc holding the corpus, with the engine's C-MOVE destination registered."""
    server = _start(tmp_path_factory.mktemp("orthanc-dimse"), corpus)
    yield server
    server.stop(kill=True)  # teardown: nothing left to close cleanly


@pytest.fixture()
def fresh_pacs(tmp_path: Path, corpus: list[Path]):
    """A PACS of its own: storing SRs changes what a query lists, so the shared one stays clean."""
    server = _start(tmp_path / "pacs", corpus)
    yield server
    server.stop(kill=True)  # teardown: nothing left to close cleanly


@pytest.fixture(scope="module")
def stored_folder(pacs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files Orthanc accepted (it refuses the broken ones), as a local folder."""
    folder = tmp_path_factory.mktemp("stored")
    for path in pacs.stored:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def from_files(stored_folder: Path):
    """The folder scored unbatched: two sources batch different neighbours together, and a CPU
    matmul's last bit depends on the batch, so only unbatched runs are compared value for value."""
    return score(stored_folder, None, workers=1, progress=False, batch_size=1)


def _rows(run) -> dict[str, dict[str, float]]:
    return {r["sop_instance_uid"]: {k: v for k, v in r.items() if k.endswith((".prob", ".logit"))}
            for r in run.results.to_pylist()}


def _same_rows(run, reference) -> None:
    got, want = _rows(run), _rows(reference)
    assert set(got) == set(want) and len(want) >= 20  # the demo films and the four RG1 encodings
    for sop, values in want.items():
        for col, value in values.items():
            assert got[sop][col] == pytest.approx(value, abs=1e-5), (sop, col)
    assert run.scored == reference.scored and run.skipped == reference.skipped


def _statuses(run) -> dict[str, str]:
    return {r["path"].rsplit("/", 1)[-1]: r["status"] for r in run.status.to_pylist()}


# ---- parsing -------------------------------------------------------------------------------------
def test_parse_target_options_and_one_line_errors() -> None:
    t = parse_target("dimse://PACS@pacs.example.org:11112?StudyDate=20240101-20241231&ModalitiesInStudy=CR"
                     "&retrieve=move&calling=RF1&move-port=4006")
    assert (t.called, t.host, t.port, t.level, t.retrieve, t.calling, t.move_port) == (
        "PACS", "pacs.example.org", 11112, "STUDY", "move", "RF1", 4006)
    assert dict(t.filters) == {"StudyDate": "20240101-20241231", "ModalitiesInStudy": "CR"}
    assert t.base == "dimse://PACS@pacs.example.org:11112" and parse_target(t.display) == t
    assert parse_target("dimse://PACS@h").port == 104 and parse_target("dimse://PACS@h?level=series").level == "SERIES"
    for url, message in [("dimse://pacs:104", "AE title"), ("dimse://A:secret@h:104", "no passwords"),
                         ("dimse://A@h:104?level=IMAGE", "STUDY or SERIES"), ("dimse://A@h:104?retrieve=wado", "C-GET"),
                         ("dimse://A@h:104?retrieve=move", "move-port"), ("dimse://A@h:104?Modalty=CR", "not a DICOM"),
                         ("dimse://ABCDEFGHIJKLMNOPQ@h:104", "1–16"), ("dimse://A@h:104/studies", "no path")]:
        with pytest.raises(InputError, match=message) as err:
            parse_target(url)
        assert "secret" not in str(err.value)


# ---- same rows as the folder ----------------------------------------------------------------------
def test_cget_scores_equal_the_folder(pacs, from_files) -> None:
    run = score(pacs.dimse(), None, workers=1, progress=False, batch_size=1)
    assert run.counts["discovered"] == len(pacs.stored)
    _same_rows(run, from_files)
    path = run.results.column("path")[0].as_py()
    assert path.startswith(f"dimse://ORTHANC@127.0.0.1:{pacs.dicom_port}/studies/") and "/instances/" in path
    assert run.manifest["source"]["kind"] == "dimse" and run.manifest["source"]["retrieve"] == "get"
    for col in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        assert run.results.column(col).null_count == 0


def test_cmove_scores_equal_the_folder(pacs, from_files) -> None:
    run = score(pacs.dimse(f"retrieve=move&move-port={pacs.move_port}"), None, workers=1, progress=False,
                batch_size=1)
    _same_rows(run, from_files)
    assert run.manifest["source"]["retrieve"] == "move"


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_instances_arrive_in_their_stored_transfer_syntax(pacs, corpus, retrieve: str) -> None:
    """The RG1 encodings (JPEG 2000 lossless and lossy, RLE) come as stored: the same pixel bytes."""
    import pydicom

    query = "ModalitiesInStudy=CR" + (f"&retrieve=move&move-port={pacs.move_port}" if retrieve == "move" else "")
    source = DimseSource(pacs.dimse(query))
    rg1 = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in corpus if p.name.startswith("RG1")}
    items = [i for i in source.listing() if i.ref.sop in rg1]
    assert len(items) == 4
    for item in source.retrieve(items):
        got = pydicom.dcmread(io.BytesIO(item.data))
        want = pydicom.dcmread(rg1[item.key.rsplit("/", 1)[-1]])
        assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID
        assert got.PixelData == want.PixelData
    assert not source.failures


def test_query_keys_and_levels_select_like_the_folder(pacs, corpus) -> None:
    import pydicom

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.stored]
    cr = {h.SOPInstanceUID for h in headers if h.Modality == "CR"}
    by_study = {i.ref.sop for i in DimseSource(pacs.dimse("ModalitiesInStudy=CR")).listing()}
    by_series = {i.ref.sop for i in DimseSource(pacs.dimse("level=SERIES&Modality=CR")).listing()}
    assert by_study == by_series == cr and 0 < len(cr) < len(headers)


# ---- results back by C-STORE -------------------------------------------------------------------------
def _srs(server) -> list[str]:
    """SOP UIDs of the SRs Orthanc holds (its REST index)."""
    found = server.request("POST", "/tools/find", json.dumps({"Level": "Instance", "Query": {"Modality": "SR"},
                                                              "Expand": True}).encode(), "application/json")
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in found)  # type: ignore[union-attr]


def test_store_leaves_one_sr_per_image_and_a_rerun_stores_none(fresh_pacs, tmp_path: Path) -> None:
    import pydicom

    run = score(fresh_pacs.dimse(), tmp_path / "a", workers=1, progress=False, stow="same")
    srs = _srs(fresh_pacs)
    assert len(srs) == run.scored > 0
    # a fresh run (new output folder) and a resume store nothing new
    again = score(fresh_pacs.dimse("ModalitiesInStudy=CR"), tmp_path / "b", workers=1, progress=False, stow="same")
    score(fresh_pacs.dimse(), tmp_path / "a", workers=1, progress=False, stow="same", resume=True)
    assert _srs(fresh_pacs) == srs and again.scored > 0
    # the SR (its UID derived from the image's and the model's) joins the image's study and references it
    from radflash.archive.stow import sr_uids

    row = run.results.to_pylist()[0]
    _, sop = sr_uids(row["sop_instance_uid"], row["study_instance_uid"], run.manifest["model"]["sha256"])
    assert sop in srs
    orthanc_id = fresh_pacs.request("POST", "/tools/lookup", sop.encode(), "text/plain")[0]["ID"]
    sr = pydicom.dcmread(io.BytesIO(fresh_pacs.request("GET", f"/instances/{orthanc_id}/file")))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == row["study_instance_uid"]
    assert row["sop_instance_uid"] in str(sr)  # the image is referenced


def test_store_dimse_from_files_on_the_cli(fresh_pacs, stored_folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radflash.cli import cli

    args = ["score", str(stored_folder), "-o", str(tmp_path / "o"), "--workers", "1", "-q",
            "--store", fresh_pacs.dimse()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(_srs(fresh_pacs)) == read_manifest(tmp_path / "o")["counts"]["scored"]


# ---- resume and shards --------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_kill9_finishes_without_rescoring(pacs, from_files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "radflash", "score", pacs.dimse(), "-o", str(out), "--workers", "1",
           "--batch-size", "1", "--commit-every", "2", "-q"]
    kill9_after_second_part(cmd, out)
    run = score(pacs.dimse(), out, resume=True, workers=1, batch_size=1, progress=False)
    assert run.resumed >= 2 and run.manifest["counts"]["processed_this_run"] == run.discovered - run.resumed
    paths = run.status.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(pacs.stored)
    _same_rows(run, from_files)


def test_two_shards_equal_one_run_and_keep_studies_whole(pacs, from_files) -> None:
    from radflash.io.dicomweb import shard_uid

    shards = [score(pacs.dimse(), None, workers=1, progress=False, batch_size=1, num_parts=2, part_id=k)
              for k in range(2)]
    keys = [set(s.status.column("path").to_pylist()) for s in shards]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == len(pacs.stored) and all(keys)
    rows = {**_rows(shards[0]), **_rows(shards[1])}
    assert rows.keys() == _rows(from_files).keys()
    for sop, values in _rows(from_files).items():
        assert rows[sop] == pytest.approx(values, abs=1e-5)
    for k, shard in enumerate(keys):  # by a stable hash of the StudyInstanceUID: no study is split
        studies = {key.split("/studies/", 1)[1].split("/", 1)[0] for key in shard}
        assert studies and all(shard_uid(study, 2) == k for study in studies)


# ---- failures: one line each, no partial row ----------------------------------------------------
def _cli_error(url: str, out: Path) -> str:
    from click.testing import CliRunner

    from radflash.cli import cli

    result = CliRunner().invoke(cli, ["score", url, "-o", str(out), "--workers", "1", "-q"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not list(out.glob("parts/*.parquet"))  # no partial row
    return result.output


def test_query_matching_nothing(pacs, tmp_path: Path) -> None:
    message = _cli_error(pacs.dimse("ModalitiesInStudy=XA"), tmp_path / "o")
    assert "C-FIND matched no studies" in message and f":{pacs.dicom_port}" in message


def test_wrong_called_ae_title_and_refused_association(tmp_path: Path, corpus, monkeypatch) -> None:
    monkeypatch.setattr(dimse, "Policy", functools.partial(dimse.Policy, retries=1, backoff=0.01))
    strict = start_or_skip(tmp_path / "strict", check_called_aet=True, allow_unknown=False,
                           modalities={"known": ("KNOWN", "127.0.0.1", 1)})
    try:
        message = _cli_error(strict.dimse(aet="NOTORTHANC") + "?calling=KNOWN", tmp_path / "a")
        assert "association rejected" in message and "NOTORTHANC" in message and "AE title" in message
        message = _cli_error(strict.dimse(), tmp_path / "b")  # calling RADFLASH: not registered there
        assert "association rejected" in message and "RADFLASH" in message
        assert strict.upload(corpus[-2:])  # RG1
        assert list(DimseSource(strict.dimse("calling=KNOWN")).listing())  # the registered AE title may
    finally:
        strict.stop(kill=True)  # teardown: nothing left to close cleanly


def test_archive_that_stops_mid_retrieve_then_resume_completes(fresh_pacs, tmp_path: Path, monkeypatch) -> None:
    from radflash.archive import dimse_store

    quick = functools.partial(dimse.Policy, retries=1, backoff=0.01, connect_timeout=2)
    monkeypatch.setattr(dimse, "Policy", quick)
    # the SR store may be the first to meet the dead archive: it gives up as quickly (not after ~8 s of backoff)
    monkeypatch.setattr(dimse_store, "Policy", quick)
    fetch, calls = DimseSource.fetch, []

    def fetch_then_die(self, item):
        calls.append(item.key)
        if len(calls) == 9:  # the archive dies with associations open (a clean stop waits ~20 s for them)
            fresh_pacs.proc.kill()
            fresh_pacs.proc.wait()
            fresh_pacs.proc = None
        return fetch(self, item)

    monkeypatch.setattr(DimseSource, "fetch", fetch_then_die)
    out = tmp_path / "out"
    # the next request to the dead archive ends the run: a retrieval, or the C-STORE of a batch's SRs
    with pytest.raises(DimseUnavailable, match=r"^dimse://ORTHANC@127\.0\.0\.1:\d+[/ ].*(aborted|unreachable)"):
        score(fresh_pacs.dimse(), out, workers=1, progress=False, batch_size=2, commit_every=2, stow="same")
    committed = read_table(out / "parts" / "part-00000.parquet") if (out / "parts").is_dir() else None
    parts = sorted((out / "parts").glob("part-*.parquet"))
    rows = [r for p in parts for r in read_table(p).to_pylist()]
    assert committed is not None and rows and len(rows) < len(fresh_pacs.stored)
    assert all(r["status"] != "scored" or r["sop_instance_uid"] for r in rows)  # no partial row
    monkeypatch.setattr(DimseSource, "fetch", fetch)
    fresh_pacs.start()
    run = score(fresh_pacs.dimse(), out, workers=1, progress=False, batch_size=2, commit_every=2, stow="same",
                resume=True)
    assert 0 < run.resumed < run.discovered
    paths = run.status.column("path").to_pylist()
    assert len(paths) == len(set(paths))
    # the SRs the first run stored are listed now, as skipped non-images, never retrieved
    images = [r for r in run.status.to_pylist() if not (r["reason"] or "").startswith("not an image")]
    assert len(images) == len(fresh_pacs.stored) and len(paths) - len(images) <= run.scored
    assert len(_srs(fresh_pacs)) == run.scored  # every scored image has exactly one SR


def test_missing_transfer_syntax_fails_those_instances_and_the_run_goes_on(pacs) -> None:
    """Proposing only uncompressed syntaxes: Orthanc cannot convert JPEG 2000 (no codec here), so
    those instances fail with the reason; the others are scored."""
    import pydicom

    source = DimseSource(pacs.dimse(), transfer_syntaxes=[EXPLICIT, IMPLICIT])
    run = score(source, None, workers=1, progress=False)
    failed = {r["path"]: r["reason"] for r in run.status.to_pylist() if r["status"] == "failed"}
    j2k = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.stored
           if str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID).startswith(
               "1.2.840.10008.1.2.4.9")}
    assert j2k and {k.rsplit("/", 1)[-1] for k in failed} <= j2k
    assert any("transfer syntax" in why for why in failed.values()), failed
    assert run.scored > 0 and run.counts["discovered"] == len(pacs.stored)


def test_cfind_failure_status_and_unknown_move_destination(pacs) -> None:
    from pynetdicom import build_context

    source = DimseSource(pacs.dimse())
    bad = dimse.query_identifier("STUDY", StudyInstanceUID="")
    bad.QueryRetrieveLevel = "NONSENSE"
    with pytest.raises(DimseError, match=r"C-FIND failed \(status 0x[0-9A-F]{4}"):
        source.pool.run("q", "find", lambda: ([build_context(dimse.FIND_MODEL)], []),
                        lambda link: dimse.find(link.assoc, bad, "q"))
    source.close()
    nobody = DimseSource(pacs.dimse(f"retrieve=move&calling=NOBODY&move-port={free_port()}"))
    items = list(nobody.listing())[:2]
    assert not list(nobody.retrieve(items))  # each fails with the reason; the run would go on
    reasons = [why for _, why in nobody.failures]
    assert len(reasons) == 2 and all("C-MOVE failed (status 0x" in why for why in reasons)
    assert "does the archive know AE NOBODY" in reasons[0]


# ---- PACS etiquette ---------------------------------------------------------------------------------
def test_associations_stay_within_the_bound(pacs, monkeypatch) -> None:
    opened: list = []
    peak = []
    real_open = dimse.Connector.open

    def counting_open(self, *args, **kwargs):
        assoc = real_open(self, *args, **kwargs)
        opened.append(assoc)
        peak.append(sum(a.is_established for a in opened))
        return assoc

    monkeypatch.setattr(dimse.Connector, "open", counting_open)
    source = DimseSource(pacs.dimse())
    got = list(source.retrieve(list(source.listing())))
    assert len(got) == len(pacs.stored) and max(peak) <= 2
    assert len(opened) < len(got)  # reused across requests, not one association per instance
    assert not any(a.is_established for a in opened)  # all released when the items ran out


def _killed_pacs_clients(tmp_path: Path, corpus: list[Path]):
    """A PACS of its own (it gets killed) holding RG1, and a source and a store whose pools each hold
    an idle association to it, as between two requests of a run."""
    from radflash.archive.dimse_store import DimseStore

    server = start_or_skip(tmp_path / "pacs")
    assert server.upload(corpus[-2:])
    policy = dimse.Policy(retries=1, backoff=0.01, connect_timeout=2)  # the DIMSE timeout stays 60 s
    source, store = DimseSource(server.dimse(), policy=policy), DimseStore(server.dimse(), policy=policy)
    assert source._find(source.target.base, _all_studies()) and not store.exists("1.2.3", "1.2.3.4")
    assert len(source.pool.idle) == len(store.pool.idle) == 1
    return server, source, store


def _all_studies() -> object:  # a C-FIND identifier matching every study
    return dimse.query_identifier("STUDY", StudyInstanceUID="")


def test_pacs_killed_under_an_idle_association_is_noticed_at_once(tmp_path: Path, corpus) -> None:
    """SIGKILL (no A-RELEASE, no A-ABORT: the kernel closes the connections) while the pools hold
    idle associations: the next request fails in one line naming the archive, not after the 60 s
    DIMSE timeout; once the archive is back the next one succeeds; closing after a kill is quick."""
    server, source, store = _killed_pacs_clients(tmp_path, corpus)
    try:
        server.stop(kill=True)
        started = time.monotonic()
        with pytest.raises(DimseUnavailable) as down:
            source._find(source.target.base, _all_studies())
        message = str(down.value)
        assert message.startswith(source.target.base + ": ") and "\n" not in message
        assert "unreachable" in message or "aborted" in message
        with pytest.raises(DimseUnavailable, match=r"^dimse://ORTHANC@127\.0\.0\.1:\d+/studies/1\.2\.3: "):
            store.exists("1.2.3", "1.2.3.4")
        assert time.monotonic() - started < 20  # a hang guard: the DIMSE timeout is 60 s

        server.start()  # back, same port: a new association each
        started = time.monotonic()
        assert source._find(source.target.base, _all_studies()) and not store.exists("1.2.3", "1.2.3.4")
        assert time.monotonic() - started < 20
        server.stop(kill=True)  # and again, now closing: a release would wait for a reply
        started = time.monotonic()
        source.close()
        store.close()
        assert time.monotonic() - started < 20 and not source.pool.idle and not store.pool.idle
    finally:
        server.stop(kill=True)  # teardown: nothing left to close cleanly


def test_dead_association_still_marked_established_is_not_waited_on(tmp_path: Path, corpus) -> None:
    """The race behind the 60 s wait, pinned: the archive is killed while its association is idle;
    pynetdicom's reader thread sees the connection close, queues its wake-up and stops, and the
    association's reactor thread takes the wake-up off the queue, but has not yet cleared
    ``is_established``. Reused as it was (``is_established`` only), the next request waited out
    the whole DIMSE timeout; now it is not reused, and a request on it ends at once."""
    server, source, store = _killed_pacs_clients(tmp_path, corpus)
    try:
        assoc = source.pool.idle[0].assoc
        assoc._reactor_checkpoint.clear()  # hold the reactor where it would be mid-turn
        deadline = time.monotonic() + 10
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop(kill=True)
        while assoc.dul.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not assoc.dul.is_alive(), "pynetdicom did not see the connection close"
        while not assoc.dimse.msg_queue.empty():  # the reactor's turn: the wake-ups are gone
            assoc.dimse.msg_queue.get_nowait()
        while not assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.get_nowait()
        assert assoc.is_established

        started = time.monotonic()
        with pytest.raises(dimse.Broken, match="association aborted or timed out during C-FIND"):
            dimse.find(assoc, _all_studies(), "q")  # a request already on it: woken, not left waiting
        with pytest.raises(DimseUnavailable, match=r"unreachable .* after 2 attempts$"):
            source._find(source.target.base, _all_studies())  # the pool does not hand it out again
        source.close()
        store.close()
        assert time.monotonic() - started < 20  # a hang guard: the DIMSE timeout is 60 s
    finally:
        assoc._reactor_checkpoint.set()
        server.stop(kill=True)  # teardown: nothing left to close cleanly


def test_out_of_resources_is_retried_with_backoff() -> None:
    """A real pynetdicom C-FIND SCP on loopback that answers 0xA700 twice, then matches."""
    from pydicom import Dataset
    from pynetdicom import AE, evt

    from tests.engine.orthanc import free_port

    answers: list[float] = []

    def on_find(event):
        answers.append(time.monotonic())
        if len(answers) <= 2:
            yield 0xA700, None
            return
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3"
        yield 0xFF00, match

    ae = AE("BUSYPACS")
    ae.add_supported_context(dimse.FIND_MODEL)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        source = DimseSource(f"dimse://BUSYPACS@127.0.0.1:{port}", policy=dimse.Policy(backoff=0.05, retries=3))
        rows = source._find("q", dimse.query_identifier("STUDY", StudyInstanceUID=""))
        assert [str(r.StudyInstanceUID) for r in rows] == ["1.2.3"] and len(answers) == 3
        assert answers[2] - answers[1] >= 0.09  # the second pause doubled the first
        with pytest.raises(DimseUnavailable, match="out of resources"):
            answers.clear()
            DimseSource(f"dimse://BUSYPACS@127.0.0.1:{port}",
                        policy=dimse.Policy(backoff=0.01, retries=1))._find("q", dimse.query_identifier(
                            "STUDY", StudyInstanceUID=""))
    finally:
        server.shutdown()


# ---- segment, and Ray -------------------------------------------------------------------------------
def test_segment_over_dimse_stores_its_segs_once(fresh_pacs, tmp_path: Path) -> None:
    from radflash.segment.verb import segment

    url = fresh_pacs.dimse("ModalitiesInStudy=DX")
    first = segment(url, tmp_path / "a", prompts=["left lung"], workers=1, progress=False, store="same")
    assert first.images and first.report["store"]["url"].startswith("dimse://ORTHANC@")
    segs = fresh_pacs.request("POST", "/tools/find", json.dumps({"Level": "Instance", "Query": {
        "Modality": "SEG"}}).encode(), "application/json")
    assert len(segs) == first.report["store"]["stored"] == len(first.images)  # type: ignore[arg-type]
    again = segment(url, tmp_path / "b", prompts=["left lung"], workers=1, progress=False, store="same")
    assert again.report["store"]["stored"] == 0 and again.report["store"]["already_on_server"] == len(segs)


@pytest.mark.slow
def test_ray_shards_a_dimse_query_like_a_local_run(pacs, tmp_path: Path) -> None:
    import os

    ray = pytest.importorskip("ray")
    from radflash.archive.ray_executor import RayOptions

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = score(pacs.dimse(), tmp_path / "ray", batch_size=1, progress=False, ray=RayOptions(),
                    num_parts=2, part_id=1)
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE", None)
    local = score(pacs.dimse(), None, workers=1, batch_size=1, progress=False, num_parts=2, part_id=1)
    assert sorted(run.status.column("path").to_pylist()) == sorted(local.status.column("path").to_pylist())
    for sop, values in _rows(local).items():
        assert _rows(run)[sop] == pytest.approx(values, abs=1e-5)


def test_threads_are_not_left_behind(pacs) -> None:
    """A finished retrieval releases its associations and stops the C-MOVE receiver."""
    before = threading.active_count()
    source = DimseSource(pacs.dimse(f"ModalitiesInStudy=MR&retrieve=move&move-port={pacs.move_port}"))
    assert len(list(source)) >= 1
    time.sleep(0.5)
    assert threading.active_count() <= before + 1
