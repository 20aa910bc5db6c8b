"""A DIMSE source: score what a PACS holds when it speaks only DICOM's own network protocol.

``dimse://AET@HOST:PORT?level=STUDY&StudyDate=20240101-20241231&ModalitiesInStudy=CR`` names a
C-FIND query on a DICOM Query/Retrieve SCP (Study Root). Options travel in the query string beside
the matching keys:

* ``level=STUDY|SERIES``: where the matching keys apply (default ``STUDY``; ``SERIES`` asks the
  archive for matching series across studies, for series keys such as ``Modality`` or
  ``BodyPartExamined``);
* ``retrieve=get|move``: C-GET on the query association (default), or C-MOVE to the engine's own
  temporary Storage SCP, for archives that only push;
* ``calling=AET``: radflash's AE title (default ``RADFLASH``), which is also the C-MOVE destination;
* ``move-port=N``: where that Storage SCP listens (needed for ``retrieve=move``; the archive must
  know ``calling`` at this host and port);
* ``find-limit=N``: the archive's cap on C-FIND results, where it does not say when it cuts a
  reply short (Orthanc does: status 0xFE00, always heeded): a study- or series-level reply with N
  matches or more is then taken as truncated (default: none; see below);
* any other ``Key=value`` is a DICOM matching key (a keyword from the data dictionary), sent as is.

:class:`DimseSource` lists with C-FIND at study, then series and instance level, one query per
study and series (a failure costs that study only, which is recorded; the next query starts
afresh), and retrieves each listed instance as the decoders ask for it.

Archives cap the matches one C-FIND returns (Orthanc's ``LimitFindResults``: the first N, then
status 0xFE00 instead of Success; dcm4chee-arc's ``QueryMaxNumberOfResults``: status 0xC000
"Request entity too large" and no matches). A truncated or refused study-level (or
``level=SERIES``) reply is not taken as the answer: the query is split by StudyDate into halves,
recursively, within the user's ``StudyDate=`` range or, without one, over every date, and a day
still over the cap by StudyTime down to one second, until each part's reply is complete
(:mod:`radflash.io.dimse_find`); studies come once each, streamed part by part in date then time
order (an untruncated reply keeps UID order). Studies with no StudyDate (without a user range) and,
on a day split by time, with no StudyTime are asked for once more by Empty Value Matching
(``StudyDate=""``, ``StudyTime=""``, PS3.4 C.2.2.2.7). A second that is still over the cap cannot
be split: what the archive returns for it is listed and one line naming the target, the day and
the window is recorded as a failure, and the run goes on; so is a study or series whose own
series- or instance-level reply was cut short (its listed part is kept).

The bytes kept are the data set as the archive sent it, in the transfer syntax it is stored in
(one presentation context per transfer syntax the installed decoders read, so the archive need
not convert), with a file meta header: what an export would hold, so the decode stage, the
selection rules, the size checks and the batches do not change and the scores equal the files'.
Nothing is written to disk; the in-flight instances (at most one per association) are the only
spool.

PACS etiquette: at most ``associations`` simultaneous associations (default 2), reused across
requests; an archive out of resources (status 0xA7xx) or refusing for now (a transient rejection)
is retried with exponential backoff; every network wait has a timeout (connection, ACSE, DIMSE,
network), so no run hangs on a silent peer. An archive that died (killed, host gone: its
connections closed) is noticed at once rather than after a timeout: an idle association is
reused only while its connection is open, a request's wait on one that dies ends within
:data:`WATCH_PERIOD`, and an idle one is released with a short ACSE timeout, or aborted when its
peer is gone.

Errors are one line naming the target (``dimse://AET@HOST:PORT``, no patient data): an instance
that cannot be had is recorded as failed and the run goes on; an archive that rejects the
association, aborts it or stops answering (:class:`DimseUnavailable`) ends the run, whose
committed parts a ``--resume`` then completes.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from radflash.errors import InputError
from radflash.io.dicomweb import shard_uid
from radflash.io.dimse_find import DateSplitter, Reply, refused_over_cap
from radflash.io.source import FailureLog, SourceItem, prefetched

log = logging.getLogger("radflash.dimse")

SCHEME = "dimse://"
DEFAULT_CALLING = "RADFLASH"
DEFAULT_PORT = 104  # the well-known DICOM port (PS3.8 Annex G)
LEVELS = ("STUDY", "SERIES")
RETRIEVE = ("get", "move")
OPTIONS = ("level", "retrieve", "calling", "move-port", "find-limit")

# Study Root Q/R models (PS3.4 C.6.2): the one every archive implements
FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_MODEL = "1.2.840.10008.5.1.4.1.2.2.2"
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"

# Transfer syntaxes offered for retrieval, in order of preference; only those an installed decoder
# reads are proposed (:func:`decodable_syntaxes`), so the archive sends the stored bytes or converts.
CANDIDATE_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still in archives)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
)
# SOP classes that never hold a radiograph, by prefix: structured reports (radflash's own results
# among them, once --store has written back), SEG and other derived objects, presentation states,
# encapsulated documents, waveforms. Listed as skipped without being retrieved.
NOT_IMAGES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.66.", "1.2.840.10008.5.1.4.1.1.11.",
              "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.5.1.4.1.1.481.")
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255

# Statuses (PS3.4 C.4, PS3.7 C): what each one means for a retry
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)
CANCEL = 0xFE00  # Orthanc ends a C-FIND it cut at LimitFindResults with this, not Success
MOVE_DESTINATION_UNKNOWN = 0xA801
WATCH_PERIOD = 0.2  # s between a waiting request's looks at whether its association died (_watch)
RELEASE_TIMEOUT = 5.0  # s an idle association's A-RELEASE waits for the reply (then it is aborted)
T = TypeVar("T")


class DimseError(InputError):
    """One thing the archive would not do (a failure status, a missing transfer syntax): one line."""


class DimseUnavailable(DimseError):
    """The archive cannot be used at all (unreachable, association rejected or aborted, C-MOVE
    destination unknown, out of resources after every retry): the run must stop, whereas a failure
    about one instance only fails that instance."""


class Busy(Exception):
    """An answer worth retrying after a pause: out of resources (0xA7xx), a transient rejection."""


class Broken(Exception):
    """The association died under a request (abort, timeout, connection lost): retry on a new one."""


def is_dimse(text: object) -> bool:
    """Whether an input names a DIMSE query rather than a file, a folder or a DICOMweb URL."""
    return isinstance(text, str) and text.lower().startswith(SCHEME)


def _check_aet(value: str, what: str) -> str:
    """An AE title as PS3.5 allows it (1–16 characters, no backslash or control characters)."""
    if not 0 < len(value.strip()) <= 16 or "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise InputError(f"{what} AE title must be 1–16 printable characters without a backslash: {value[:20]!r}")
    return value.strip()


@dataclass(frozen=True)
class Target:
    """A parsed ``dimse://AET@HOST:PORT?…`` URL: the archive, how to query it and how to retrieve."""

    called: str  # the archive's AE title
    host: str
    port: int
    filters: tuple[tuple[str, str], ...] = ()
    level: str = "STUDY"
    retrieve: str = "get"
    calling: str = DEFAULT_CALLING
    move_port: int | None = None
    find_limit: int | None = None  # the archive's cap on C-FIND matches, as the user declares it

    @property
    def base(self) -> str:
        """``dimse://AET@HOST:PORT``: names the archive in keys, messages and the manifest."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}{self.called}@{host}:{self.port}"

    @property
    def display(self) -> str:
        """The URL with every option spelled out (for the manifest and messages)."""
        options = [("level", self.level), *self.filters, ("retrieve", self.retrieve), ("calling", self.calling)]
        if self.move_port is not None:
            options.append(("move-port", str(self.move_port)))
        if self.find_limit is not None:
            options.append(("find-limit", str(self.find_limit)))
        return self.base + "?" + "&".join(f"{k}={v}" for k, v in options)

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def parse_target(text: str) -> Target:
    """``dimse://AET@HOST:PORT[?options and matching keys]`` → :class:`Target` (one-line errors)."""
    if not is_dimse(text):
        raise InputError(f"not a DIMSE URL (expected dimse://AET@HOST:PORT): {text[:60]!r}")
    parts = urlsplit(text)
    if parts.password is not None:
        raise InputError(f"dimse://{parts.hostname}: DIMSE has no passwords; give dimse://AET@HOST:PORT")
    if not parts.username:
        raise InputError(f"{text.split('?')[0]}: name the archive's AE title (dimse://AET@HOST:PORT)")
    if not parts.hostname:
        raise InputError("DIMSE URL has no host")
    if parts.path not in ("", "/"):
        raise InputError(f"{text.split('?')[0]}: a DIMSE URL has no path; put the query after '?'")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InputError(f"dimse://{parts.hostname}: the port must be a number from 1 to 65535") from None
    called = _check_aet(parts.username, "called")
    options: dict[str, str] = {}
    filters: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in seen:
            raise InputError(f"dimse://{called}@{parts.hostname}: {key} is given twice")
        seen.add(key)
        if key.lower() in OPTIONS:
            options[key.lower()] = value
        else:
            _check_keyword(key)
            filters.append((key, value))
    level = options.get("level", "STUDY").upper()
    if level not in LEVELS:
        raise InputError(f"level={options['level']!r}: choose STUDY or SERIES")
    retrieve = options.get("retrieve", "get").lower()
    if retrieve not in RETRIEVE:
        raise InputError(f"retrieve={options['retrieve']!r}: choose get (C-GET) or move (C-MOVE)")
    move_port = None
    if "move-port" in options:
        if not options["move-port"].isdigit() or not 0 < int(options["move-port"]) < 65536:
            raise InputError(f"move-port={options['move-port']!r}: give a port number from 1 to 65535")
        move_port = int(options["move-port"])
    if retrieve == "move" and move_port is None:
        raise InputError("retrieve=move needs &move-port=N: the port where the archive sends the instances")
    calling = _check_aet(options.get("calling", DEFAULT_CALLING), "calling")
    find_limit = None
    if "find-limit" in options:
        if not options["find-limit"].isdigit() or int(options["find-limit"]) < 1:
            raise InputError(f"find-limit={options['find-limit']!r}: give the archive's cap on C-FIND results "
                             f"(a number ≥ 1)")
        find_limit = int(options["find-limit"])
    return Target(called, parts.hostname, port, tuple(filters), level, retrieve, calling, move_port, find_limit)


def _check_keyword(key: str) -> None:
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(key) is None:
        raise InputError(f"{key}: not a DICOM keyword (matching keys are spelled as in PS3.6, e.g. StudyDate)")


@dataclass(frozen=True)
class Policy:
    """Timeouts, retries and the association bound: a PACS serves many clients, so radflash keeps
    few associations, waits on nothing forever and backs off when it is told to."""

    connect_timeout: float = 10.0  # TCP connection
    acse_timeout: float = 30.0  # association negotiation and release
    dimse_timeout: float = 60.0  # each DIMSE response (a large instance over a slow link included)
    network_timeout: float = 60.0  # a silent connection is closed
    retries: int = 4
    backoff: float = 0.5  # s before the first retry; doubles each time
    associations: int = 2  # simultaneous associations to the archive


def decodable_syntaxes() -> tuple[str, ...]:
    """The candidate transfer syntaxes some installed decoder reads (JPEG-LS only with its extra...)."""
    from radflash.io.selection import decoder_reason

    return tuple(ts for ts in CANDIDATE_SYNTAXES if decoder_reason(ts) is None)


def quiet_pynetdicom() -> None:
    """pynetdicom logs every rejection and abort as multi-line ERRORs; radflash reports each in one
    line itself. Only a logger nobody configured is quietened."""
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


def status_text(status: Any) -> str:
    code = int(status.Status)
    text = f"status 0x{code:04X}"
    comment = str(status.get("ErrorComment", "") or "").strip()
    failed = status.get("NumberOfFailedSuboperations")
    if failed:
        text += f", {int(failed)} failed sub-operation{'s' if int(failed) != 1 else ''}"
    return text + (f" ({comment[:80]})" if comment else "")


def is_busy(code: int) -> bool:
    return code & 0xFF00 == 0xA700  # Refused: out of resources (PS3.4 C.4.2.1.4, C.4.3.1.4...)


class Connector:
    """Opens associations to one archive with every timeout set, and turns a refusal into one line.

    A permanent rejection (wrong called AE title, a calling AE title the archive does not know) is
    final; a transient one (the archive is at its association limit) and a connection that cannot
    be made are retried with backoff by :meth:`call`.
    """

    def __init__(self, target: Target, policy: Policy) -> None:
        from radflash.util.optional import require

        require("pynetdicom", extra="dimse", purpose="dimse:// inputs and --store dimse://")
        quiet_pynetdicom()
        self.target, self.policy = target, policy

    def ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.target.calling)
        ae.connection_timeout = self.policy.connect_timeout
        ae.acse_timeout = self.policy.acse_timeout
        ae.dimse_timeout = self.policy.dimse_timeout
        ae.network_timeout = self.policy.network_timeout
        ae.maximum_pdu_size = 0  # no limit on what the archive sends per PDU
        return ae

    def open(self, contexts: list[Any], *, ext_neg: list[Any] | None = None,
             handlers: list[Any] | None = None) -> Any:
        """An established association proposing ``contexts`` (raises :class:`DimseUnavailable`,
        or :class:`Busy` for a refusal worth retrying)."""
        from pynetdicom import evt

        answers: list[Any] = []
        ae = self.ae()
        assoc = ae.associate(self.target.host, self.target.port, contexts=contexts, ae_title=self.target.called,
                             ext_neg=ext_neg, evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(e.primitive)),
                                                            (evt.EVT_CONN_OPEN, _no_delay), *(handlers or [])])
        if assoc.is_established:
            _watch(assoc)
            return assoc
        where = self.target.base
        if assoc.is_rejected:
            reply = next((p for p in reversed(answers) if getattr(p, "result", None) in (1, 2)), None)
            why = f"{reply.reason_str}" if reply is not None else "no reason given"
            if reply is not None and reply.result == 2:
                raise Busy(f"{where}: association rejected for now ({why})")
            hint = ""
            if reply is not None and reply.reason_str.lower().startswith("called ae"):
                hint = f"; is {self.target.called} the archive's AE title?"
            elif reply is not None and reply.reason_str.lower().startswith("calling ae"):
                hint = f"; the archive must know AE {self.target.calling} (calling=)"
            elif reply is not None and "no reason" in reply.reason_str.lower():
                hint = f"; the archive may not know AE {self.target.calling} (calling=)"
            raise DimseUnavailable(f"{where}: association rejected ({why}{hint})")
        if assoc.is_aborted:
            if not assoc.accepted_contexts and any(getattr(p, "result", None) == 0 for p in answers):
                raise DimseUnavailable(f"{where}: the archive accepted none of the proposed presentation "
                                       f"contexts (SOP classes / transfer syntaxes)")
            if answers:
                raise Broken(f"{where}: association aborted while negotiating")
        # no A-ASSOCIATE answer at all: the connection was refused or timed out
        raise Broken(f"{where}: unreachable (no association within {self.policy.connect_timeout:g} s)")

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with exponential backoff on :class:`Busy` and :class:`Broken`; a last
        failure becomes :class:`DimseUnavailable` naming ``what``."""
        delay = self.policy.backoff
        for attempt in range(self.policy.retries + 1):
            try:
                return fn()
            except (Busy, Broken) as exc:
                if attempt == self.policy.retries:
                    reason = str(exc).split(": ", 1)[-1]
                    raise DimseUnavailable(f"{what}: {reason} after {attempt + 1} attempts") from None
                log.info("%s: %s; retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


def _no_delay(event: Any) -> None:
    """TCP_NODELAY: a DIMSE message is a command PDU then a data set PDU, and Nagle's algorithm
    holds the second until the first is acknowledged (a delayed ACK: 40 ms per C-FIND measured)."""
    import socket
    from contextlib import suppress

    with suppress(AttributeError, OSError):  # not a TCP socket (or already closed): only slower
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def find(assoc: Any, identifier: Any, what: str) -> list[Any]:
    """Every match of one C-FIND on ``assoc`` (raises :class:`DimseError` for a failure status or a
    reply the archive cut short, :class:`Busy` for 0xA7xx, :class:`Broken` when the association dies)."""
    reply = find_matches(assoc, identifier, what)
    if reply.truncated:
        raise DimseError(f"{what}: C-FIND failed ({reply.why})")
    return reply.rows


def find_matches(assoc: Any, identifier: Any, what: str) -> Reply:
    """The matches of one C-FIND on ``assoc``, ``truncated`` when the archive ended it with Cancel
    (0xFE00: Orthanc at its ``LimitFindResults``, after the first N matches) or refused it as over
    its cap (dcm4chee-arc: :func:`~radflash.io.dimse_find.refused_over_cap`); raises as :func:`find`."""
    rows, cut = [], None
    for status, match in assoc.send_c_find(identifier, FIND_MODEL):
        if "Status" not in status:
            raise Broken(f"{what}: association aborted or timed out during C-FIND")
        code = int(status.Status)
        if code in PENDING:
            if match is not None:
                rows.append(match)
        elif code == CANCEL or refused_over_cap(code, str(status.get("ErrorComment", "") or "")):
            cut = status_text(status)
        elif is_busy(code):
            raise Busy(f"{what}: C-FIND {status_text(status)} (out of resources)")
        elif code != SUCCESS:
            raise DimseError(f"{what}: C-FIND failed ({status_text(status)})")
    return Reply(rows, cut is not None, cut or "")


def query_identifier(level: str, **keys: str) -> Any:
    """A query identifier; empty values are universal matching (return the key)."""
    from pydicom import Dataset, config
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        # as typed, unchecked: a DA range "20240101-20241231" or Empty Value Matching's "" stays text
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    return ds


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str
    sop_class: str = ""


@dataclass(frozen=True)
class DimseItem(SourceItem):
    """A listed instance not yet retrieved: ``data`` stays empty until :meth:`DimseSource.retrieve`."""

    ref: InstanceRef | None = None


class Link:
    """One pooled association, what it was opened for, and what C-GET's C-STORE sub-operations
    delivered on it (one request in flight per association, so one slot is enough)."""

    def __init__(self, key: object) -> None:
        self.key = key
        self.assoc: Any = None
        self.received: dict[str, bytes] = {}
        self.unexpected = 0

    def on_store(self, event: Any) -> int:
        """C-STORE sub-operation of our C-GET: keep the data set as sent (meta + stored syntax)."""
        sop = str(event.request.AffectedSOPInstanceUID)
        self.received[sop] = event.encoded_dataset(include_meta=True)
        return SUCCESS


class Pool:
    """At most ``policy.associations`` associations to the archive, open or in use, reused across
    requests when they were opened for the same purpose (``key``: C-FIND, C-MOVE, C-GET of one SOP
    class); an association that failed is dropped, never reused."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.limit = connector.policy.associations
        self.slots = threading.BoundedSemaphore(self.limit)
        self.lock = threading.Lock()
        self.idle: deque[Link] = deque()
        self.busy = 0  # associations in use (a slot each)

    def run(self, what: str, key: object, contexts: Callable[[], tuple[list[Any], list[Any]]],
            request: Callable[[Link], T]) -> T:
        """``request(link)`` on an association opened for ``key``, with :meth:`Connector.call`'s retries."""
        def attempt() -> T:
            link = self._acquire(key, contexts)
            ok = False
            try:
                result = request(link)
                ok = True
                return result
            except DimseError as exc:  # a failure status: the association itself is fine
                ok = not isinstance(exc, DimseUnavailable)
                raise
            finally:
                self._release(link, ok)

        return self.connector.call(what, attempt)

    def _acquire(self, key: object, contexts: Callable[[], tuple[list[Any], list[Any]]]) -> Link:
        # bounded wait: every holder's request is itself bounded by the policy's timeouts
        self.slots.acquire()
        try:
            with self.lock:
                self.busy += 1
                # an idle association whose archive died (killed, restarted) is dropped, not reused:
                # a request on it would wait out the DIMSE timeout (see _alive)
                dead = [link for link in self.idle if not _alive(link.assoc)]
                for link in dead:
                    self.idle.remove(link)
                reuse = next((link for link in self.idle if link.key == key), None)
                if reuse is not None:
                    self.idle.remove(reuse)
                # open ones (busy + idle) stay within the bound: close idle ones opened for another use
                victims = []
                while reuse is None and self.idle and self.busy + len(self.idle) > self.limit:
                    victims.append(self.idle.popleft())
            for link in dead:
                _abort(link.assoc)
            if reuse is not None:
                return reuse
            for victim in victims:
                _close(victim.assoc)
            link = Link(key)
            cxs, roles = contexts()
            link.assoc = self.connector.open(cxs, ext_neg=roles or None, handlers=self._handlers(link, roles))
            return link
        except BaseException:
            with self.lock:
                self.busy -= 1
            self.slots.release()
            raise

    @staticmethod
    def _handlers(link: Link, roles: list[Any]) -> list[Any]:
        from pynetdicom import evt

        return [(evt.EVT_C_STORE, link.on_store)] if roles else []

    def _release(self, link: Link, ok: bool) -> None:
        link.received.clear()
        keep = ok and link.assoc is not None and _alive(link.assoc)
        if not keep and link.assoc is not None:
            _abort(link.assoc)  # never reuse an association a request failed on
        with self.lock:
            self.busy -= 1
            if keep:
                self.idle.append(link)
        self.slots.release()

    def close(self) -> None:
        """Release every idle association (they are reopened on demand)."""
        with self.lock:
            links, self.idle = list(self.idle), deque()
        for link in links:
            _close(link.assoc)


def _dead(assoc: Any) -> bool:
    """Whether pynetdicom knows ``assoc`` is over (released, aborted, its connection closed)."""
    return not assoc.is_established or assoc.is_aborted or assoc.is_released or not assoc.dul.is_alive()


def _closed_by_peer(assoc: Any) -> bool:
    """Whether the peer closed (or reset) the connection under ``assoc``, whether or not pynetdicom
    has noticed yet: readable with nothing to read is end of file."""
    import select
    import socket
    import ssl

    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) or not hasattr(socket, "MSG_DONTWAIT"):  # no peek through TLS,
        return False  # nor one that cannot block (Windows): pynetdicom's own notice only
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):  # pynetdicom's reader took the bytes first
        return False
    except (OSError, ValueError):  # reset, or closed on our side
        return True


def _alive(assoc: Any) -> bool:
    """Whether an idle association can carry a request.

    ``is_established`` alone is not enough: when the archive dies (SIGKILL, a crash; the kernel
    closes its connections), pynetdicom's reader thread sees the connection close and wakes any
    request waiting on the association, but its reactor thread, which runs while the association
    is idle, takes that wake-up off the queue and only then clears ``is_established``. A request
    started in between (or one started on a connection whose close pynetdicom has not read yet)
    then waits its whole DIMSE timeout for a reply that cannot come. So the reader thread must
    still run and the socket must still be open.
    """
    try:
        return not _dead(assoc) and not _closed_by_peer(assoc)
    except Exception:  # no DUL or socket left: not usable
        return False


def _watch(assoc: Any, period: float = WATCH_PERIOD) -> None:
    """Make ``assoc``'s blocking waits (a DIMSE response, an A-RELEASE reply) notice its death.

    pynetdicom waits on a queue for the whole DIMSE (or ACSE) timeout and counts on the reader
    thread's wake-up when the connection closes; its reactor thread may take that wake-up first
    (see :func:`_alive`), or the request may start just after. Each wait here is cut into
    ``period`` s slices, and ends as pynetdicom's own wake-up would (no message: aborted) once the
    association is over, so a request on a dead archive fails at once (:class:`Broken`, retried on
    a new association) and the timeouts still bound a live but silent one.
    """
    import queue

    from pynetdicom import evt
    from pynetdicom.pdu_primitives import A_P_ABORT

    def wait(q: queue.Queue, timeout: float | None, gone: Any) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = period if deadline is None else min(period, deadline - time.monotonic())
            try:
                return q.get(block=True, timeout=max(left, 0.0))
            except queue.Empty:
                pass
            if _dead(assoc):
                try:  # what the reader thread queued before it stopped comes first
                    return q.get(block=False)
                except queue.Empty:
                    return gone
            if deadline is not None and time.monotonic() >= deadline:
                raise queue.Empty

    dimse, dul = assoc.dimse, assoc.dul
    plain_get_msg, plain_receive_pdu = dimse.get_msg, dul.receive_pdu

    def get_msg(block: bool = False) -> Any:
        if not block:
            return plain_get_msg(block=False)
        try:
            return wait(dimse.msg_queue, dimse.dimse_timeout, (None, None))
        except queue.Empty:
            return None, None

    def receive_pdu(wait_: bool = False, timeout: float | None = None) -> Any:
        if not wait_:
            return plain_receive_pdu(wait=False)
        try:
            primitive = wait(dul.to_user_queue, timeout, None)
        except queue.Empty:
            return None
        if primitive is None:
            primitive = A_P_ABORT()  # as the reader thread reports a closed connection
        evt.trigger(assoc, evt.EVT_ACSE_RECV, {"primitive": primitive})  # as pynetdicom's own call does
        return primitive

    dimse.get_msg = get_msg
    dul.receive_pdu = lambda wait=False, timeout=None: receive_pdu(wait, timeout)


def _close(assoc: Any) -> None:
    """Release an idle association; abort it when its archive is gone (a release would wait for a
    reply that cannot come). The release waits :data:`RELEASE_TIMEOUT` s at most, then aborts."""
    try:
        if not _alive(assoc):
            _abort(assoc)
            return
        if assoc.acse_timeout is None or assoc.acse_timeout > RELEASE_TIMEOUT:
            assoc.acse_timeout = RELEASE_TIMEOUT
        assoc.release()
    except Exception:  # a peer that went away while idle: nothing left to release
        _abort(assoc)


def _abort(assoc: Any) -> None:
    from contextlib import suppress

    with suppress(Exception):  # already gone: aborting is best effort
        if assoc.is_established:
            assoc.abort()


class MoveReceiver:
    """The engine's temporary Storage SCP, destination of its own C-MOVEs.

    Accepts only instances a C-MOVE of this run asked for (others are refused with 0x0124, so
    nobody can push data into a run) and keeps each until its fetch takes it: the spool is the
    instances in flight, bounded by the associations in use. It listens on loopback when the
    archive is on loopback, else on every interface (the archive connects back to us).
    """

    def __init__(self, target: Target, policy: Policy, connector: Connector) -> None:
        self.target, self.policy, self.connector = target, policy, connector
        self.server: Any = None
        self.cond = threading.Condition()
        self.expected: set[str] = set()
        self.arrived: dict[str, bytes] = {}
        self.refused = 0

    def start(self) -> None:
        with self.cond:
            if self.server is not None:
                return
            from pynetdicom import build_context, evt
            from pynetdicom.presentation import AllStoragePresentationContexts

            ae = self.connector.ae()
            syntaxes = list(decodable_syntaxes())
            ae.supported_contexts = [build_context(cx.abstract_syntax, syntaxes)
                                     for cx in AllStoragePresentationContexts]
            ae.maximum_associations = max(2, self.policy.associations * 2)
            bind = "127.0.0.1" if self.target.loopback else "0.0.0.0"
            try:
                self.server = ae.start_server((bind, self.target.move_port), block=False,
                                              evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
            except OSError as exc:
                raise DimseUnavailable(f"{self.target.base}: cannot listen on port {self.target.move_port} for "
                                       f"C-MOVE ({exc.strerror or exc})") from None

    def _on_store(self, event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        with self.cond:
            if sop not in self.expected:
                self.refused += 1
                return 0x0124  # Refused: not authorised (nobody asked for it)
            self.arrived[sop] = event.encoded_dataset(include_meta=True)
            self.cond.notify_all()
        return SUCCESS

    def expect(self, sop: str) -> None:
        with self.cond:
            self.expected.add(sop)

    def take(self, sop: str, wait: float) -> bytes | None:
        """The instance once it has arrived (within ``wait`` s: some archives finish the C-MOVE
        before their last C-STORE does), and forget it."""
        with self.cond:
            self.cond.wait_for(lambda: sop in self.arrived, timeout=wait)
            self.expected.discard(sop)
            return self.arrived.pop(sop, None)

    def stop(self) -> None:
        with self.cond:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()


class DimseSource:
    """The instances of the studies (or series) a C-FIND query matches, retrieved by C-GET or C-MOVE.

    A two-phase :class:`~radflash.io.source.Source` like :class:`radflash.io.dicomweb.DicomWebSource`:
    :meth:`listing` (C-FIND only), then :meth:`retrieve` of what is still to do, with ``failures``
    for studies that could not be listed and instances that could not be had.

    Order is stable: studies by Study Instance UID (by StudyDate, StudyTime, then UID, where a capped reply
    was split: :mod:`radflash.io.dimse_find`), series and instances by UID within them (a C-FIND
    has no order of its own). ``num_parts``/``part_id`` keep the studies whose
    StudyInstanceUID hashes to this shard (the stable hash of :func:`radflash.io.dicomweb.shard_uid`,
    so nodes agree without coordination): a study is never split between shards, and a shard sends
    the series and instance C-FINDs of its own studies only.
    """

    def __init__(self, url: str, *, policy: Policy | None = None, num_parts: int = 1, part_id: int = 0,
                 transfer_syntaxes: Sequence[str] | None = None) -> None:
        self.target = parse_target(url)
        self.policy = policy or Policy()
        if self.policy.associations < 1:
            raise InputError(f"associations must be ≥ 1, got {self.policy.associations}")
        self.num_parts, self.part_id = num_parts, part_id
        self._syntaxes = tuple(transfer_syntaxes) if transfer_syntaxes is not None else None
        self.failures = FailureLog()  # (key, reason): studies not listed, instances not had; on disk, not in memory
        self._pool: Pool | None = None
        self._receiver: MoveReceiver | None = None
        self.headers: OrderedDict[str, Any] = OrderedDict()  # SOP UID → header of a retrieved instance
        self.header_cache = 1024
        self.moved = 0  # instances a C-MOVE delivered (none yet: a failure hints at the destination)

    # ---- plumbing -------------------------------------------------------------------------------
    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(Connector(self.target, self.policy))
        return self._pool

    @property
    def syntaxes(self) -> tuple[str, ...]:
        """Transfer syntaxes proposed for retrieval (default: every one an installed decoder reads)."""
        return self._syntaxes if self._syntaxes is not None else decodable_syntaxes()

    def key_of(self, ref: InstanceRef) -> str:
        return f"{self.target.base}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"

    def _find(self, what: str, identifier: Any) -> list[Any]:
        from pynetdicom import build_context

        return self.pool.run(what, "find", lambda: ([build_context(FIND_MODEL)], []),
                             lambda link: find(link.assoc, identifier, what))

    def _find_capped(self, what: str, identifier: Any, limit: int | None = None) -> Reply:
        """One C-FIND's matches, ``truncated`` when the archive cut it short (status) or it reached
        ``limit`` (the user's ``find-limit``)."""
        from pynetdicom import build_context

        reply = self.pool.run(what, "find", lambda: ([build_context(FIND_MODEL)], []),
                              lambda link: find_matches(link.assoc, identifier, what))
        if not reply.truncated and limit is not None and len(reply.rows) >= limit:
            return Reply(reply.rows, True, f"find-limit={limit} reached")
        return reply

    def _record(self, key: str, line: str) -> None:
        """A listing the archive cut short for good: one warning line, and a failure for the run's table."""
        log.warning("%s", line)
        self.failures.append((key, line.split(": ", 1)[-1]))

    # ---- listing --------------------------------------------------------------------------------
    def _matches(self, level: str) -> DateSplitter:
        """The study UIDs (``STUDY``) or (study, series) pairs (``SERIES``) the query matches, each
        once, split by StudyDate and StudyTime where the archive caps the reply
        (:mod:`radflash.io.dimse_find`)."""
        t = self.target
        filters = dict(t.filters)
        user_date, user_time = filters.pop("StudyDate", None), filters.pop("StudyTime", None)
        unique = {"StudyInstanceUID": ""} if level == "STUDY" else {"StudyInstanceUID": "", "SeriesInstanceUID": ""}

        def query(study_date: str | None, study_time: str | None) -> Reply:
            # StudyDate and StudyTime are always asked for (return keys at least): a split orders and checks by them
            keys = {**unique, **filters, "StudyDate": (user_date if study_date is None else study_date) or "",
                    "StudyTime": (user_time if study_time is None else study_time) or ""}
            what = t.display if study_date is None else f"{t.base}?StudyDate={study_date}"
            what += "" if study_time is None else f"&StudyTime={study_time}"
            return self._find_capped(what, query_identifier(level, **keys), t.find_limit)

        def key(row: Any) -> Any:
            study = str(row.get("StudyInstanceUID", "") or "")
            if level == "STUDY":
                return study or None
            series = str(row.get("SeriesInstanceUID", "") or "")
            return (study, series) if study and series else None

        return DateSplitter(query, key, lambda row: str(row.get("StudyDate", "") or ""), t.base, self._record,
                            user_date=user_date, user_time=user_time, noun="studies" if level == "STUDY" else "series",
                            time=lambda row: str(row.get("StudyTime", "") or ""))

    def _series(self) -> Iterator[tuple[str, str]]:
        """(study, series) pairs matching the query: in UID order, or by date where split."""
        t = self.target
        if t.level == "SERIES":
            listed = 0
            for study, series in self._matches("SERIES"):
                listed += 1
                if self._mine(study):
                    yield study, series
            if not listed and not self.failures:  # a capped query that listed none recorded why
                raise DimseError(f"{t.display}: C-FIND matched no series")
            return
        listed = 0
        for study in self._matches("STUDY"):
            listed += 1
            if self._mine(study):
                yield from self._study_series(study)
        if not listed and not self.failures:  # a capped query that listed none recorded why
            raise DimseError(f"{t.display}: C-FIND matched no studies")

    def _study_series(self, study: str) -> list[tuple[str, str]]:
        """The series of one study, in UID order (a failure is recorded; a capped reply keeps its part)."""
        where = f"{self.target.base}/studies/{study}"
        try:
            reply = self._find_capped(where, query_identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=""),
                                      self.target.find_limit)
        except DimseUnavailable:
            raise
        except DimseError as exc:  # this study fails; the next query starts afresh
            self.failures.append((where, f"query failed: {str(exc).split(': ', 1)[-1]}"))
            return []
        pairs = sorted({(study, str(r.get("SeriesInstanceUID", ""))) for r in reply.rows} - {(study, "")})
        if reply.truncated:
            self._record(where, f"{where}: series C-FIND capped by the archive ({reply.why}; {len(pairs)} series "
                                f"listed): any more of this study are not listed")
        return pairs

    def _mine(self, study: str) -> bool:
        """Whether ``study`` belongs to this shard."""
        return self.num_parts == 1 or shard_uid(study, self.num_parts) == self.part_id

    def listing(self) -> Iterator[DimseItem]:
        """Every matching instance of this shard, listed but not retrieved (C-FIND only), study by
        study: a failed study or series is recorded in ``failures`` and the listing goes on.
        Its association is released when the listing ends (an archive waits on open ones)."""
        try:
            yield from self._listing()
        finally:
            if self._pool is not None:
                self._pool.close()

    def _listing(self) -> Iterator[DimseItem]:
        for study, series in self._series():
            where = f"{self.target.base}/studies/{study}/series/{series}"
            try:
                reply = self._find_capped(where, query_identifier("IMAGE", StudyInstanceUID=study,
                                                                  SeriesInstanceUID=series, SOPInstanceUID="",
                                                                  SOPClassUID=""))
            except DimseUnavailable:
                raise
            except DimseError as exc:
                self.failures.append((where, f"query failed: {str(exc).split(': ', 1)[-1]}"))
                continue
            refs = {InstanceRef(study, series, str(r.get("SOPInstanceUID", "")), str(r.get("SOPClassUID", "")))
                    for r in reply.rows}
            if reply.truncated:  # Orthanc's LimitFindInstances: what it listed is scored, the cut is recorded
                self._record(where, f"{where}: instance C-FIND capped by the archive ({reply.why}; {len(refs)} "
                                    f"instances listed): any more of this series are not listed")
            for ref in sorted(refs, key=lambda r: r.sop):
                if ref.sop:
                    if ref.sop_class.startswith(NOT_IMAGES):  # accounted for, never retrieved
                        yield DimseItem(self.key_of(ref), skip=f"not an image (SOP class {ref.sop_class})", ref=ref)
                    else:
                        yield DimseItem(self.key_of(ref), data=b"", ref=ref)

    # ---- retrieval ------------------------------------------------------------------------------
    def fetch(self, item: DimseItem) -> bytes:
        """One instance as the archive sent it (file meta + data set in the transfer syntax it
        arrived in); raises :class:`DimseError` (this instance) or :class:`DimseUnavailable` (all)."""
        ref = item.ref
        assert ref is not None
        data = self._get(item.key, ref) if self.target.retrieve == "get" else self._move(item.key, ref)
        self._keep_header(ref.sop, data)
        return data

    def _identifier(self, ref: InstanceRef) -> Any:
        return query_identifier("IMAGE", StudyInstanceUID=ref.study, SeriesInstanceUID=ref.series,
                                SOPInstanceUID=ref.sop)

    def _get_contexts(self, sop_class: str) -> tuple[list[Any], list[Any]]:
        """The C-GET model plus storage contexts for ``sop_class``: one per transfer syntax, so the
        archive can send each instance as stored; one context with them all if the list is long."""
        from pynetdicom import build_context, build_role

        syntaxes = list(self.syntaxes)
        contexts = [build_context(GET_MODEL)]
        if len(syntaxes) + 1 <= MAX_CONTEXTS:
            contexts += [build_context(sop_class, [ts]) for ts in syntaxes]
        else:
            contexts.append(build_context(sop_class, syntaxes))
        return contexts, [build_role(sop_class, scp_role=True)]

    def _get(self, what: str, ref: InstanceRef) -> bytes:
        sop_class = ref.sop_class or "1.2.840.10008.5.1.4.1.1.1"  # an archive that does not return it: CR

        def request(link: Link) -> bytes:
            final = None
            for status, _ in link.assoc.send_c_get(self._identifier(ref), GET_MODEL):
                if "Status" not in status:
                    raise Broken(f"{what}: association aborted or timed out during C-GET")
                final = status
            data = link.received.pop(ref.sop, None)
            if data is not None:
                return data
            return self._nothing_came("C-GET", what, final)

        return self.pool.run(what, ("get", sop_class), lambda: self._get_contexts(sop_class), request)

    def _move(self, what: str, ref: InstanceRef) -> bytes:
        from pynetdicom import build_context

        receiver = self.receiver
        receiver.start()
        receiver.expect(ref.sop)

        def request(link: Link) -> bytes:
            final = None
            for status, _ in link.assoc.send_c_move(self._identifier(ref), self.target.calling, MOVE_MODEL):
                if "Status" not in status:
                    raise Broken(f"{what}: association aborted or timed out during C-MOVE")
                final = status
            code = int(final.Status) if final is not None else None
            if code == MOVE_DESTINATION_UNKNOWN:
                raise DimseUnavailable(
                    f"{self.target.base}: the archive does not know the C-MOVE destination {self.target.calling}; "
                    f"register AE {self.target.calling} at this host, port {self.target.move_port}")
            wait = self.policy.dimse_timeout if code == SUCCESS else 0.5
            data = receiver.take(ref.sop, wait)
            if data is not None:
                self.moved += 1
                return data
            receiver.expect(ref.sop)  # a retry may still bring it
            try:
                return self._nothing_came("C-MOVE", what, final)
            except DimseError as exc:
                if type(exc) is not DimseError or self.moved:
                    raise
                # nothing ever arrived: the usual cause is a destination the archive does not know
                # (Orthanc answers 0xC000, not 0xA801), so the line says where it must send
                raise DimseError(f"{exc}; does the archive know AE {self.target.calling} at this host, port "
                                 f"{self.target.move_port} (its C-MOVE destination)?") from None

        try:
            return self.pool.run(what, "move", lambda: ([build_context(MOVE_MODEL)], []), request)
        finally:
            receiver.take(ref.sop, 0)

    def _nothing_came(self, verb: str, what: str, final: Any) -> bytes:
        if final is None:
            raise Broken(f"{what}: {verb} ended without a status")
        code = int(final.Status)
        if is_busy(code):
            raise Busy(f"{what}: {verb} {status_text(final)} (out of resources)")
        if code == SUCCESS or code & 0xF000 == 0xB000 or int(final.get("NumberOfFailedSuboperations", 0) or 0):
            # the archive found the instance but could not send it to us: in practice a stored
            # transfer syntax it cannot convert into one we proposed
            raise DimseError(f"{what}: the archive sent nothing ({verb} {status_text(final)}): is it stored in a "
                             f"transfer syntax it cannot convert to one radflash decodes?")
        raise DimseError(f"{what}: {verb} failed ({status_text(final)})")

    @property
    def receiver(self) -> MoveReceiver:
        if self._receiver is None:
            self._receiver = MoveReceiver(self.target, self.policy, self.pool.connector)
        return self._receiver

    def close(self) -> None:
        """Release the associations and stop the C-MOVE receiver (both restart on demand)."""
        if self._pool is not None:
            self._pool.close()
        if self._receiver is not None:
            self._receiver.stop()

    def retrieve(self, items: Iterable[SourceItem]) -> DimseRetrieval:
        """``items`` (from :meth:`listing`, a list or a stream) with their bytes fetched lazily, in order."""
        return DimseRetrieval(self, items, prefetch=self.policy.associations)

    def __iter__(self) -> Iterator[SourceItem]:
        yield from self.retrieve(list(self.listing()))

    def describe(self) -> dict[str, Any]:
        t = self.target
        return {"kind": "dimse", "inputs": [t.display], "base": t.base, "level": t.level,
                "filters": dict(t.filters), "retrieve": t.retrieve, "calling": t.calling, "move_port": t.move_port,
                "find_limit": t.find_limit,
                "associations": self.policy.associations, "num_parts": self.num_parts, "part_id": self.part_id}

    # ---- headers (for --store: the result joins the source image's study) -----------------------
    def _keep_header(self, sop: str, data: bytes) -> None:
        import pydicom

        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception:  # not parseable: the decode stage fails it with the reason
            return
        self.headers[sop] = header
        while len(self.headers) > self.header_cache:
            self.headers.popitem(last=False)

    def header(self, study: str, series: str, sop: str, sop_class: str = "") -> Any:
        """One retrieved instance's header (no pixels): kept from its retrieval, else fetched again."""
        import pydicom

        header = self.headers.pop(sop, None)
        if header is not None:
            return header
        ref = InstanceRef(study, series, sop, sop_class)
        try:
            data = self.fetch(DimseItem(self.key_of(ref), data=b"", ref=ref))
        finally:
            self.pool.close()  # a rare path (an evicted header): leave no idle association behind it
        self.headers.pop(sop, None)
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)

    def header_of(self, record: Any) -> Any:
        """The header of a scored record's source image (a :class:`radflash.archive.sinks.FileRecord`)."""
        return self.header(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid,
                           getattr(record, "sop_class_uid", "") or "")


@dataclass
class DimseRetrieval:
    """A sized, lazily-fetched sequence of items, as :class:`radflash.io.dicomweb.Retrieval`:
    ``prefetch`` retrievals in flight (one per association), in order, so at most that many
    instances are held in memory at once.

    An instance that fails on its own is recorded in ``source.failures`` and left out; an archive
    that is gone (:class:`DimseUnavailable`) ends the run. The associations are released when the
    items run out (or the run stops).
    """

    source: DimseSource
    items: Iterable[SourceItem]
    prefetch: int = 2

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]  # only for a listed (sized) sequence

    def __iter__(self) -> Iterator[SourceItem]:
        # a listed non-image is accounted for from the listing (score): never retrieved, not passed on
        items = (item for item in self.items if not (item.skip is not None and isinstance(item, DimseItem)))
        try:
            yield from prefetched(items, self.source.fetch, ahead=self.prefetch, failures=self.source.failures,
                                  wanted=lambda item: isinstance(item, DimseItem) and item.ref is not None,
                                  fatal=DimseUnavailable, name="radflash-dimse")
        finally:
            self.source.close()  # the associations are released when the items run out (or the run stops)
