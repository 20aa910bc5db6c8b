"""A DICOMweb source: score what a PACS holds without exporting it to disk first.

``dicomweb+http://host:8042/dicom-web/studies?StudyDate=20260101-20260131&ModalitiesInStudy=CR``
names a QIDO-RS study query on a DICOMweb server (``dicomweb+https://`` too; no query = every
study). :class:`DicomWebSource` lists the matching studies' instances page by page
(``limit``/``offset``) and retrieves each with WADO-RS in the transfer syntax it is stored in, so
the decode stage sees the same bytes it would read from an exported file and the scores are
identical. Items are keyed by the instance URL (without credentials): the ``path`` column of the
status and results tables, and what ``--resume`` matches.

Listing and retrieval are separate steps (:meth:`DicomWebSource.listing`, then
:meth:`DicomWebSource.retrieve`) so a run lists cheaply, drops what an earlier run committed, and
fetches only what is left, one instance at a time as the decoders ask for it: nothing is
retrieved twice and the bytes never pile up in memory (or on disk: no PHI copies).

HTTP goes through dicomweb-client (a maintained multipart implementation) on a ``requests``
session that carries the credentials (:func:`auth_from_env`; ``~/.netrc`` is honoured by
``requests`` itself). Credentials are never part of a key, a description or an error message.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from radflash.errors import InputError
from radflash.io.source import FailureLog, SourceItem, prefetched

log = logging.getLogger("radflash.dicomweb")

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
PAGE_SIZE = 500  # QIDO results per request: Orthanc and most archives cap pages near 1,000
RETRIEVE_AS = (("application/dicom", "*"),)  # the stored transfer syntax: the exact bytes an export holds

T = TypeVar("T")


class DicomWebError(InputError):
    """A DICOMweb server that cannot be used (unreachable, refuses, not DICOMweb): one line, no secrets."""


class ServerUnavailable(DicomWebError):
    """No answer at all (connection refused or timed out after every retry): the run must stop,
    whereas an HTTP error about one instance only fails that instance."""


def is_dicomweb(text: object) -> bool:
    """Whether an input names a DICOMweb query rather than a file or folder."""
    return isinstance(text, str) and text.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class Target:
    """A parsed ``dicomweb+http(s)://`` URL: the service root and the QIDO study filters."""

    base: str  # http(s)://host:port/prefix, no credentials, no trailing slash
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def display(self) -> str:
        """The URL as the user gave it, minus credentials (for the manifest and messages)."""
        query = "&".join(f"{k}={v}" for k, v in self.filters)
        return f"dicomweb+{self.base}/studies" + (f"?{query}" if query else "")


def parse_target(text: str) -> Target:
    """``dicomweb+http://host/dicom-web[/studies][?filters]`` → :class:`Target`.

    Credentials in the URL are refused rather than used: a URL ends up in shell history, process
    lists and logs, so they belong in an environment variable or ``~/.netrc``.
    """
    if not is_dicomweb(text):
        raise InputError(f"not a DICOMweb URL (expected dicomweb+http:// or dicomweb+https://): {text[:60]!r}")
    parts = urlsplit(text[len("dicomweb+"):])
    if parts.username or parts.password:
        raise InputError(f"{parts.scheme}://{parts.hostname}: credentials in a DICOMweb URL are not accepted; "
                         f"use --token-env/--basic-auth-env or a ~/.netrc entry")
    if not parts.hostname:
        raise InputError("DICOMweb URL has no host")
    path = parts.path.rstrip("/")
    if path.endswith("/studies"):
        path = path[: -len("/studies")]
    elif "/studies/" in path:
        raise InputError(f"{parts.scheme}://{parts.netloc}{path}: give a study query (…/studies?filters), "
                         f"not a resource path")
    base = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return Target(base, tuple(parse_qsl(parts.query, keep_blank_values=True)))


@dataclass(frozen=True)
class Auth:
    """How to authenticate: a bearer token or ``user:password`` basic auth, read from the environment.

    Only the variable's *name* is ever stored or shown (manifest, logs); ``repr`` hides the value.
    With neither, ``requests`` falls back to a ``~/.netrc`` entry for the host.
    """

    token_env: str | None = None
    basic_env: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"token_env": self.token_env, "basic_auth_env": self.basic_env,
                "netrc": None if (self.token_env or self.basic_env) else "if present"}

    def apply(self, session: Any) -> None:
        if self.token_env:
            token = os.environ.get(self.token_env)
            if not token:
                raise InputError(f"environment variable {self.token_env} (bearer token) is not set")
            header = f"Bearer {token.strip()}"

            def bearer(request: Any) -> Any:  # as session.auth, so a ~/.netrc entry cannot override it
                request.headers["Authorization"] = header
                return request

            session.auth = bearer
        if self.basic_env:
            value = os.environ.get(self.basic_env)
            if not value or ":" not in value:
                raise InputError(f"environment variable {self.basic_env} must hold user:password")
            user, password = value.split(":", 1)
            session.auth = (user, password)


@dataclass(frozen=True)
class Policy:
    """Timeouts and retries: 5xx answers and connection errors are retried with exponential backoff
    (a PACS under load or restarting), 4xx never (retrying a refusal only hammers the server)."""

    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5  # s before the first retry; doubles each time


def client(base: str, *, auth: Auth | None = None, policy: Policy | None = None) -> Any:
    """A dicomweb-client ``DICOMwebClient`` for ``base`` on a session carrying ``auth``."""
    from radflash.util.optional import require

    require("dicomweb_client", extra="dicomweb", purpose="DICOMweb inputs and --store")
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    (auth or Auth()).apply(session)
    c = DICOMwebClient(base, session=session, timeout=(policy or Policy()).timeout)
    c.set_http_retry_params(retry=False)  # one retry policy, ours (call_with_retries)
    return c


def call_with_retries(what: str, fn: Callable[[], T], policy: Policy) -> T:
    """``fn()``, retried on 5xx/connection errors; a failure becomes a one-line :class:`DicomWebError`.

    Messages name ``what`` (a URL without credentials) and the HTTP status, never a header.
    """
    import requests

    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            if code is None or code < 500 or attempt == policy.retries:
                raise DicomWebError(f"{what}: {_http_reason(code)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if attempt == policy.retries:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "unreachable"
                raise ServerUnavailable(f"{what}: server {kind} after {policy.retries + 1} attempts") from None
        log.info("%s: retrying in %.1f s", what, delay)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _http_reason(code: int | None) -> str:
    reasons = {401: "401 Unauthorized (no or wrong credentials)", 403: "403 Forbidden (the account may not read this)",
               404: "404 Not Found (is this the DICOMweb root?)"}
    return reasons.get(code or 0, f"HTTP {code}")


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class DicomWebItem(SourceItem):
    """A listed instance not yet retrieved: ``data`` stays empty until :meth:`DicomWebSource.retrieve`."""

    ref: InstanceRef | None = None


def _uid(row: dict, tag: str) -> str | None:
    value = row.get(tag, {}).get("Value")
    return str(value[0]) if value else None


def shard_uid(uid: str, num_parts: int) -> int:
    """The shard of a SOPInstanceUID: a stable hash, so nodes agree without coordination."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") % num_parts


class DicomWebSource:
    """The instances of the studies a QIDO-RS query matches, retrieved with WADO-RS.

    A two-phase :class:`~radflash.io.source.Source`: :meth:`listing` (QIDO-RS only), then
    :meth:`retrieve` of what is still to do, with ``failures`` for instances that could not be had.

    Order is stable: studies in the server's order, instances within a study by series and SOP
    UID. ``num_parts``/``part_id`` keep the instances whose SOPInstanceUID hashes to this shard.
    """

    def __init__(self, url: str, *, auth: Auth | None = None, policy: Policy | None = None,
                 num_parts: int = 1, part_id: int = 0, page_size: int = PAGE_SIZE) -> None:
        self.target = parse_target(url)
        self.auth = auth or Auth()
        self.policy = policy or Policy()
        self.num_parts, self.part_id, self.page_size = num_parts, part_id, page_size
        self._client: Any = None
        # (key, reason) of instances that could not be retrieved: spilled to a temporary file as they
        # come, so a PACS that lost half its instances costs no memory per instance
        self.failures = FailureLog()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client(self.target.base, auth=self.auth, policy=self.policy)
        return self._client

    def url_of(self, ref: InstanceRef) -> str:
        return f"{self.target.base}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"

    def _pages(self, what: str, search: Callable[..., list[dict]], **kwargs: Any) -> Iterator[dict]:
        offset = 0
        while True:
            page = call_with_retries(what, lambda at=offset: search(limit=self.page_size, offset=at, **kwargs),
                                     self.policy)
            yield from page
            if len(page) < self.page_size:
                return
            offset += len(page)

    def listing(self) -> Iterator[DicomWebItem]:
        """Every matching instance of this shard, listed but not retrieved (QIDO-RS only)."""
        filters = dict(self.target.filters)
        where = self.target.display
        for study_row in self._pages(where, self.client.search_for_studies, search_filters=filters):
            study = _uid(study_row, STUDY)
            if study is None:
                continue
            refs = []
            for row in self._pages(f"{self.target.base}/studies/{study}/instances",
                                   self.client.search_for_instances, study_instance_uid=study):
                series, sop = _uid(row, SERIES), _uid(row, SOP)
                if series and sop and (self.num_parts == 1 or shard_uid(sop, self.num_parts) == self.part_id):
                    refs.append(InstanceRef(study, series, sop))
            for ref in sorted(set(refs), key=lambda r: (r.series, r.sop)):
                yield DicomWebItem(self.url_of(ref), data=b"", ref=ref)

    def fetch(self, item: DicomWebItem) -> bytes:
        """One instance's bytes in its stored transfer syntax (raises :class:`DicomWebError`)."""
        import pydicom

        ref = item.ref
        assert ref is not None
        ds = call_with_retries(item.key, lambda: self.client.retrieve_instance(
            ref.study, ref.series, ref.sop, media_types=RETRIEVE_AS), self.policy)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=False)  # as received: same syntax, same pixel bytes
        return buf.getvalue()

    def retrieve(self, items: Iterable[SourceItem]) -> Retrieval:
        """``items`` (from :meth:`listing`, a list or a stream) with their bytes fetched lazily, in order."""
        return Retrieval(self, items)

    def __iter__(self) -> Iterator[SourceItem]:
        yield from self.retrieve(list(self.listing()))

    def describe(self) -> dict[str, Any]:
        return {"kind": "dicomweb", "inputs": [self.target.display], "base": self.target.base,
                "filters": dict(self.target.filters), "auth": self.auth.describe(),
                "num_parts": self.num_parts, "part_id": self.part_id}


@dataclass
class Retrieval:
    """A sized, lazily-fetched sequence of items: ``len`` for progress bars, bytes only on iteration.

    ``prefetch`` retrievals are in flight at once (threads: the wait is network latency, not CPU),
    in order, so a PACS's per-request latency overlaps decoding without holding more than
    ``prefetch`` instances in memory.

    An instance that fails on its own (a 404 after listing, a part that is not DICOM) is recorded
    in ``source.failures`` (a :class:`~radflash.io.source.FailureLog`: on disk, not in memory) and
    left out, so the run carries on; a server that is gone
    (:class:`ServerUnavailable`) ends the run, whose committed parts a ``--resume`` then completes.
    """

    source: DicomWebSource
    items: Iterable[SourceItem]  # a list (then ``len`` works) or a stream, iterated once
    prefetch: int = 4

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]  # only for a listed (sized) sequence

    def __iter__(self) -> Iterator[SourceItem]:
        return prefetched(self.items, self.source.fetch, ahead=self.prefetch, failures=self.source.failures,
                          wanted=lambda item: isinstance(item, DicomWebItem) and item.ref is not None,
                          fatal=ServerUnavailable, name="radflash-wado")
