"""The DICOMweb source against a real Orthanc (tests/engine/orthanc.py): same numbers as files."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from radflash.archive.verb import DEMO_ARCHIVE, score
from radflash.errors import InputError
from radflash.io.dicomweb import Auth, DicomWebError, DicomWebSource, parse_target
from tests.engine.orthanc import ARCHIVE_FILES, PASSWORD, USER, start_or_skip

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install 'radflash[dicomweb]')")
# tests that need the server skip in start_or_skip, naming the missing Debian package


@pytest.fixture(scope="session")
def from_files():
    """Scores of the same files read from disk. Batch size 1 on both sides: the two sources batch
    different neighbours together (the PACS refuses the broken files), and a CPU matmul's last bit
    depends on the batch (1.5e-8 measured), so only unbatched runs can be compared bit for bit."""
    return score(DEMO_ARCHIVE, None, workers=1, progress=False, batch_size=1)


def _probs(run) -> dict[str, dict[str, float]]:
    return {r["sop_instance_uid"]: {k: v for k, v in r.items() if k.endswith((".prob", ".logit"))}
            for r in run.results.to_pylist()}


def test_parse_target_refuses_credentials_without_echoing_them() -> None:
    with pytest.raises(InputError) as err:
        parse_target("dicomweb+http://bob:hunter2@pacs:8042/dicom-web/studies")
    assert "hunter2" not in str(err.value)
    t = parse_target("dicomweb+https://pacs/dicom-web/studies?StudyDate=20260101-20260131&ModalitiesInStudy=CR")
    assert t.base == "https://pacs/dicom-web"
    assert dict(t.filters) == {"StudyDate": "20260101-20260131", "ModalitiesInStudy": "CR"}


def test_scores_over_dicomweb_equal_scores_from_files(orthanc, from_files) -> None:
    run = score(orthanc.dicomweb + "/studies", None, workers=1, progress=False, batch_size=1)
    assert run.counts["discovered"] == len(orthanc.stored)
    assert _probs(run) == _probs(from_files)  # bit-identical: same bytes, same decode
    assert run.scored == from_files.scored and run.skipped == from_files.skipped
    path = run.results.column("path")[0].as_py()
    assert path.startswith(f"{orthanc.url}/dicom-web/studies/") and "/instances/" in path
    for col in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        assert run.results.column(col).null_count == 0


def test_qido_filter_and_paging(orthanc) -> None:
    everything = list(DicomWebSource(orthanc.dicomweb, page_size=3).listing())  # 22 instances, pages of 3
    assert len(everything) == len(orthanc.stored)
    assert len({i.key for i in everything}) == len(everything)
    ct = list(DicomWebSource(orthanc.dicomweb + "/studies?ModalitiesInStudy=CT", page_size=3).listing())
    assert 0 < len(ct) < len(everything)


def test_shards_partition_by_uid(orthanc) -> None:
    keys = [{i.key for i in DicomWebSource(orthanc.dicomweb, num_parts=3, part_id=k).listing()} for k in range(3)]
    assert sum(len(k) for k in keys) == len(orthanc.stored) and not (keys[0] & keys[1] or keys[1] & keys[2])


def test_output_and_resume_retrieve_nothing_twice(orthanc, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = score(orthanc.dicomweb, out, workers=1, progress=False)
    assert first.manifest["source"]["kind"] == "dicomweb"
    again = score(orthanc.dicomweb, out, workers=1, progress=False, resume=True)
    assert again.resumed == first.discovered and again.manifest["counts"]["processed_this_run"] == 0
    assert again.results.equals(first.results)


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    from radflash.io.dicomweb import Policy
    from tests.engine.orthanc import free_port

    src = DicomWebSource(f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", policy=Policy(retries=1, backoff=0.01))
    with pytest.raises(DicomWebError, match="unreachable"):
        list(src.listing())


def test_auth_wrong_and_right(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_or_skip(tmp_path_factory.mktemp("orthanc-auth"), auth=True)
    try:
        server.upload(ARCHIVE_FILES[:6])
        monkeypatch.setenv("PACS_CRED", f"{USER}:wrong-{PASSWORD}")
        with pytest.raises(DicomWebError, match="401") as err:
            list(DicomWebSource(server.dicomweb, auth=Auth(basic_env="PACS_CRED")).listing())
        assert PASSWORD not in str(err.value)
        monkeypatch.setenv("PACS_CRED", f"{USER}:{PASSWORD}")
        run = score(server.dicomweb, tmp_path_factory.mktemp("auth-out") / "o", workers=1, progress=False,
                    auth=Auth(basic_env="PACS_CRED"))
        assert run.discovered > 0
        manifest = run.manifest_path.read_text()
        assert PASSWORD not in manifest and "PACS_CRED" in manifest
        assert not any(PASSWORD in (r or "") for r in run.status.column("reason").to_pylist())
        assert pc.sum(pc.equal(run.status["status"], "failed")).as_py() in (0, None)
    finally:
        server.stop(kill=True)  # teardown: nothing left to close cleanly


def _srs(server) -> list[dict]:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(server.url + "/dicom-web").search_for_instances(search_filters={"Modality": "SR"})


def _sr_for(server, row: dict):
    """The SR stored for the scored image ``row`` (the one in its study), retrieved over WADO-RS."""
    from dicomweb_client.api import DICOMwebClient

    c = DICOMwebClient(server.url + "/dicom-web")
    return next(c.retrieve_instance(s["0020000D"]["Value"][0], s["0020000E"]["Value"][0], s["00080018"]["Value"][0])
                for s in _srs(server) if s["0020000D"]["Value"][0] == row["study_instance_uid"])


def _sr_probs(sr) -> list[float]:
    """The probability of every finding of a radflash SR (a TID 1500 report), in order."""
    from radflash.dicomout.sr import read_findings

    return [f["probability"] for f in read_findings(sr).values()]


def test_store_writes_one_sr_per_scored_image_once(fresh_orthanc, tmp_path: Path) -> None:
    import pydicom

    run = score(fresh_orthanc.dicomweb, tmp_path / "a", workers=1, progress=False, stow="same")
    srs = _srs(fresh_orthanc)
    assert len(srs) == run.scored
    # a second, fresh run (new output folder) and a resume store nothing new
    score(fresh_orthanc.dicomweb + "/studies?ModalitiesInStudy=CR", tmp_path / "b", workers=1, progress=False,
          stow="same")
    score(fresh_orthanc.dicomweb, tmp_path / "a", workers=1, progress=False, stow="same", resume=True)
    assert sorted(r["00080018"]["Value"][0] for r in _srs(fresh_orthanc)) == \
        sorted(r["00080018"]["Value"][0] for r in srs)

    row = run.results.to_pylist()[0]
    sr = _sr_for(fresh_orthanc, row)
    assert isinstance(sr, pydicom.Dataset) and sr.Modality == "SR"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in evidence] == [row["sop_instance_uid"]]
    names = list(run.manifest["findings"])
    assert _sr_probs(sr) == pytest.approx([row[f"{n}.prob"] for n in names], rel=1e-6)
    # the model is named in Contributing Equipment, with a Device UID from its weights' hash (#27)
    from radflash.dicomout.equipment import device_uid

    devices = [i.DeviceUID for i in sr.ContributingEquipmentSequence if i.Manufacturer == "radflash"]
    assert devices == [device_uid(run.manifest["model"]["sha256"])]


def test_server_down_mid_run_then_resume_completes(fresh_orthanc, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from radflash.archive import stow
    from radflash.io.dicomweb import Policy

    fetch, calls = DicomWebSource.fetch, []

    def fetch_then_die(self, item):
        calls.append(item.key)
        self.policy = Policy(retries=1, backoff=0.01)  # the real policy waits ~8 s before giving up
        if len(calls) == 9:
            fresh_orthanc.stop(kill=True)  # gone at once (a clean stop waits 2-4 s for its listeners)
        return fetch(self, item)

    monkeypatch.setattr(DicomWebSource, "fetch", fetch_then_die)
    # the SR sink may be the first to meet the dead server: it gives up as quickly as the source
    monkeypatch.setattr(stow, "Policy", functools.partial(Policy, retries=1, backoff=0.01))
    out = tmp_path / "out"
    with pytest.raises(DicomWebError, match="unreachable"):
        score(fresh_orthanc.dicomweb, out, workers=1, progress=False, batch_size=2, commit_every=2, stow="same")
    monkeypatch.setattr(DicomWebSource, "fetch", fetch)
    monkeypatch.setattr(stow, "Policy", Policy)
    fresh_orthanc.start()
    run = score(fresh_orthanc.dicomweb, out, workers=1, progress=False, batch_size=2, commit_every=2,
                stow="same", resume=True)
    assert 0 < run.resumed < run.discovered
    paths = run.status.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(fresh_orthanc.stored)
    assert len(_srs(fresh_orthanc)) == run.scored  # every scored image has exactly one SR


def test_cli_refusal_is_one_line_without_secrets(tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from radflash.cli import cli

    server = start_or_skip(tmp_path_factory.mktemp("orthanc-cli"), auth=True)
    try:
        monkeypatch.setenv("PACS_TOKEN", "not-the-token-xyz")
        result = CliRunner().invoke(cli, ["score", server.dicomweb + "/studies?ModalitiesInStudy=CR",
                                           "-o", str(tmp_path_factory.mktemp("cli") / "o"), "--token-env",
                                           "PACS_TOKEN", "--quiet"])
        assert result.exit_code == 1, result.output
        assert "401" in result.output and "Traceback" not in result.output
        assert "not-the-token-xyz" not in result.output
    finally:
        server.stop(kill=True)  # teardown: nothing left to close cleanly


def test_instance_that_cannot_be_retrieved_is_failed_and_the_run_goes_on(orthanc, monkeypatch) -> None:
    from radflash.io.dicomweb import DicomWebItem, InstanceRef

    listing = DicomWebSource.listing

    def with_a_ghost(self):
        items = list(listing(self))
        ref = InstanceRef(items[0].ref.study, items[0].ref.series, "1.2.3.4.5.6.7.8.9")  # listed, then deleted
        yield DicomWebItem(self.url_of(ref), data=b"", ref=ref)
        yield from items

    monkeypatch.setattr(DicomWebSource, "listing", with_a_ghost)
    run = score(orthanc.dicomweb, None, workers=1, progress=False)
    failed = [r for r in run.status.to_pylist() if r["status"] == "failed"]
    assert [r["path"].rsplit("/", 1)[-1] for r in failed] == ["1.2.3.4.5.6.7.8.9"]
    assert failed[0]["reason"].startswith("retrieve failed: 404")
    assert run.scored == 16


GHOST_REASON = "retrieve failed: 404 Not Found (is this the DICOMweb root?)"  # what a failed row has always said


def _with_ghosts(monkeypatch: pytest.MonkeyPatch, ghosts: int, *, keep: int | None = None) -> list[DicomWebSource]:
    """List ``ghosts`` instances that are gone by retrieval time (404) among the first ``keep`` real ones;
    returns the sources the run made, so a test can look at them afterwards."""
    from radflash.io.dicomweb import DicomWebItem, InstanceRef

    listing, made = DicomWebSource.listing, []

    def with_ghosts(self):
        made.append(self)
        items = list(listing(self))[:keep]
        for g, item in enumerate(items[:ghosts]):
            ref = InstanceRef(item.ref.study, item.ref.series, f"1.2.3.4.5.6.7.8.{g + 1}")  # listed, then deleted
            yield DicomWebItem(self.url_of(ref), data=b"", ref=ref)
            yield item
        yield from items[ghosts:]

    monkeypatch.setattr(DicomWebSource, "listing", with_ghosts)
    return made


def test_failed_retrievals_are_failed_rows_from_a_log_on_disk(orthanc, monkeypatch, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from radflash.io.source import FailureLog

    made = _with_ghosts(monkeypatch, 3)
    out = tmp_path / "out"
    run = score(orthanc.dicomweb, out, workers=1, progress=False, commit_every=2)
    # committed a part at a time like every other row, never as one list of the whole log
    parts = [pq.read_table(p).column("status").to_pylist() for p in sorted((out / "parts").glob("part-*.parquet"))]
    assert parts[-2:] == [["failed"] * 2, ["failed"]] and sum(part.count("failed") for part in parts) == 3
    failed = sorted((r["path"], r["reason"]) for r in run.status.to_pylist() if r["status"] == "failed")
    ghosts = sorted(i.key for i in made[0].listing() if i.ref.sop.startswith("1.2.3.4.5.6.7.8."))
    assert failed == [(key, GHOST_REASON) for key in ghosts] and run.failed == 3 and run.scored == 16
    log = made[0].failures  # what the source kept: a log read back from its file, in retrieval order
    assert isinstance(log, FailureLog) and len(log) == 3 and sorted(log) == failed


def test_segment_reports_failed_retrievals_as_before(orthanc, monkeypatch, tiny_model: Path, tmp_path: Path) -> None:
    import json

    from radflash.report import write_report
    from radflash.segment.verb import segment

    made = _with_ghosts(monkeypatch, 1, keep=1)
    run = segment(orthanc.dicomweb, tmp_path / "out", prompts=["left lung"], model=str(tiny_model), workers=1,
                  batch_size=1, progress=False)
    ghost = next(iter(made[0].listing())).key
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    write_report(tmp_path / "out")
    failed = [f for f in report["failures"] if f["status"] == "failed"]  # (the real instance may be skipped)
    assert failed == [{"source": ghost, "status": "failed", "reason": GHOST_REASON}] and report["counts"]["failed"] == 1
    assert [f.source for f in run.failures if f.status == "failed"] == [ghost]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "retrieve failed: # Not Found (is this the DICOMweb root?)" in html  # its reason group


def test_failure_log_reads_back_in_order_and_holds_nothing_per_failure() -> None:
    import tracemalloc

    from radflash.io.source import FailureLog

    source = DicomWebSource("dicomweb+http://127.0.0.1:1/dicom-web")  # no request is made
    assert isinstance(source.failures, FailureLog) and not source.failures and list(source.failures) == []
    awkward = [("a/b?c=1", "retrieve failed: 404"), ("k\udcff", "two\nlines “quoted”")]
    for failure in awkward:
        source.failures.append(failure)
    reader = iter(source.failures)
    assert next(reader) == awkward[0]
    source.failures.append(("late", "appended while being read"))  # the reader sees it too
    assert [awkward[0], *reader] == [*awkward, ("late", "appended while being read")]

    def peak(n: int) -> int:
        log = FailureLog()
        tracemalloc.start()
        for i in range(n):
            log.append((f"http://pacs/dicom-web/studies/1/series/2/instances/{i}", f"retrieve failed: HTTP {i}"))
        assert sum(1 for _ in log) == len(log) == n
        held = [v for v in vars(log).values() if isinstance(v, (list, dict, set, tuple))]
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert held == []  # no container per failure: the pairs are in the file
        return used

    small, large = peak(5_000), peak(20_000)
    assert large < small + 256 * 1024, (small, large)  # 4× the failures, not 4× the memory


def test_bearer_token_is_sent_and_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    session = requests.Session()
    Auth(token_env="PACS_TOKEN").apply(session)
    prepared = session.prepare_request(requests.Request("GET", "http://127.0.0.1:1/dicom-web/studies"))
    assert prepared.headers["Authorization"] == "Bearer tok-123"
    assert "tok-123" not in repr(Auth(token_env="PACS_TOKEN").describe())
    monkeypatch.delenv("PACS_TOKEN")
    with pytest.raises(InputError, match="PACS_TOKEN"):
        Auth(token_env="PACS_TOKEN").apply(requests.Session())


@pytest.mark.parametrize(("failures", "status", "calls", "error"), [
    (2, 503, 3, None),  # a PACS restarting: retried with backoff, then answers
    (9, 503, 3, "HTTP 503"),  # still down after every retry: one line naming the status
    (1, 404, 1, "404 Not Found"),  # a refusal is never retried
])
def test_5xx_is_retried_with_backoff_and_4xx_is_not(failures: int, status: int, calls: int, error: str | None) -> None:
    """Against a real loopback HTTP server that fails ``failures`` times before answering 200."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from radflash.io.dicomweb import DicomWebError, Policy, call_with_retries

    seen: list[str] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(status if len(seen) <= failures else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web/studies"
    try:
        fetch = lambda: requests.get(url, timeout=5).raise_for_status()
        policy = Policy(timeout=5, retries=2, backoff=0.01)
        if error is None:
            call_with_retries(url, fetch, policy)
        else:
            with pytest.raises(DicomWebError, match=error):
                call_with_retries(url, fetch, policy)
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == calls


def test_partially_refused_stow_is_a_failure() -> None:
    """A 202 whose FailedSOPSequence lists objects must not count as stored (its rows would be
    committed while the objects never reached the PACS)."""
    from pydicom.dataset import Dataset

    from radflash.archive.stow import Stower
    from radflash.io.dicomweb import DicomWebError

    reply, refused = Dataset(), Dataset()
    refused.ReferencedSOPInstanceUID = "1.2.3.4"
    reply.FailedSOPSequence = [refused]
    stower = Stower("dicomweb+http://127.0.0.1:9/dicom-web")
    stower.client = type("Client", (), {"store_instances": lambda self, datasets: reply})()
    with pytest.raises(DicomWebError, match="refused 1 of 2 object"):
        stower.store([Dataset(), Dataset()])
    assert stower.stored == 0
    stower.client = type("Client", (), {"store_instances": lambda self, datasets: Dataset()})()
    stower.store([Dataset(), Dataset()])
    assert stower.stored == 2


def test_carzero_over_dicomweb_equals_files_and_stores_its_sr(fresh_orthanc, tmp_path: Path) -> None:
    """The second family through the PACS path: same S as from files, one SR per image with S's sigmoid."""
    from radflash.checkpoints.factory import random_checkpoint
    from radflash.checkpoints.format import save_checkpoint

    model = save_checkpoint(random_checkpoint("carzero-tiny", seed=4, model_id="cz"), tmp_path / "cz")
    files = score(DEMO_ARCHIVE, None, model=model, workers=1, progress=False, batch_size=1)
    run = score(fresh_orthanc.dicomweb, tmp_path / "out", model=model, workers=1, progress=False, batch_size=1,
                stow="same")
    assert run.scored == files.scored > 0
    assert _probs(run) == _probs(files)  # bit-identical: same bytes, same decode, unbatched
    assert len(_srs(fresh_orthanc)) == run.scored
    row = run.results.to_pylist()[0]
    names = list(run.manifest["findings"])
    assert _sr_probs(_sr_for(fresh_orthanc, row)) == pytest.approx([row[f"{n}.prob"] for n in names], rel=1e-6)
