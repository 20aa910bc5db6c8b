"""``radflash serve``'s options: flags → a few typed groups, validated once, at the boundary.

The groups follow the node's stages (intake → schedule → model → forward), so each stage gets only
its own group; :class:`ServeOptions` composes them and is what :class:`radflash.serving.node.Node`
takes. ``asdict(options)`` is what the node records in ``STATE/node.json`` (no token: only the
token file's path).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radflash.archive.options import ModelSpec  # the model group score and segment use too
from radflash.errors import InputError

__all__ = ["AllowedCaller", "ForwardOptions", "IntakeOptions", "ModelSpec", "ScheduleOptions", "ServeOptions"]

GROUPS = ("instance", "series", "study")
PRIORITIES = {"high": 0, "medium": 1, "low": 2}  # rank: lower is served first
DIMSE_PRIORITY = {1: 0, 0: 1, 2: 2}  # C-STORE Priority (PS3.7 9.1.1.1: 0 MEDIUM, 1 HIGH, 2 LOW) → rank


@dataclass(frozen=True)
class AllowedCaller:
    """One ``--allow-ae AET[@HOST]`` entry: a calling AE title, optionally pinned to a host."""

    aet: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        aet, _, host = text.partition("@")
        aet = aet.strip()
        if not 0 < len(aet) <= 16 or "\\" in aet or any(ord(c) < 32 or ord(c) > 126 for c in aet):
            raise InputError(f"--allow-ae {text!r}: the AE title must be 1–16 printable characters")
        return cls(aet, host.strip() or None)

    def admits(self, aet: str, host: str) -> bool:
        return aet.strip() == self.aet and (self.host is None or self.host == host)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class IntakeOptions:
    """Where and from whom the node accepts instances (C-STORE SCP and STOW-RS)."""

    bind: str = "127.0.0.1"
    dicom_port: int | None = 11112  # None: no C-STORE SCP
    ae_title: str = "RADFLASH"
    allow_ae: tuple[AllowedCaller, ...] = ()  # empty: any AE title, loopback callers only
    http_port: int | None = 8080  # None: no HTTP (no STOW-RS, /v1/score, /metrics)
    token_file: Path | None = None  # bearer token for HTTP; required off loopback
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_associations: int = 8
    max_instance_bytes: int = 1 << 30  # one C-STORE data set or one STOW part
    max_body_bytes: int = 2 << 30  # one HTTP request body
    min_free_bytes: int = 1 << 30  # disk watermark under STATE: below it, intake answers "out of resources"

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            text = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"--token-file {self.token_file}: cannot read ({exc.strerror or exc})") from None
        if len(text) < 16:
            raise InputError(f"--token-file {self.token_file}: the token must be at least 16 characters")
        return text


@dataclass(frozen=True)
class ScheduleOptions:
    """Grouping and the queue policy in front of the model."""

    group: str = "instance"
    quiet_period: float = 0.0  # s without a new instance of a group before it is released
    max_batch: int = 8
    max_queue_delay_ms: float = 50.0  # a partial batch waits at most this long for more
    max_queue: int = 1000  # instances accepted but not yet scored; more → out of resources


@dataclass(frozen=True)
class ForwardOptions:
    """Where results go and how hard the node tries."""

    targets: tuple[str, ...] = ()  # dicomweb+http(s)://…/dicom-web (STOW-RS) or dimse://AET@HOST:PORT
    retries: int = 5  # attempts after the first; then the dead-letter table
    backoff: float = 1.0  # s before the first retry; doubles each time
    max_backoff: float = 60.0
    timeout: float = 30.0  # s per request


@dataclass(frozen=True)
class ServeOptions:
    """Everything a node needs, in the groups above; :meth:`from_flat` builds it from the CLI's
    keyword spelling. Checked once when made (one-line :class:`InputError` s)."""

    state: Path
    model: ModelSpec = field(default_factory=ModelSpec)
    findings: str | None = None  # a prompt file; None: the default findings
    intake: IntakeOptions = field(default_factory=IntakeOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    segment: tuple[str, ...] = ()  # prompts: each scored instance also gets a DICOM SEG, one segment per prompt
    overlay: str | None = None  # "sc": and an overlay Secondary Capture of those masks (needs segment)
    workers: int = 1  # decode processes (0: in the inference thread, no crash isolation)
    decode_timeout: float = 120.0  # s per instance before its decoder is killed
    max_pixels: int | None = None  # the header's pixel budget (default: the loader's)
    grace: float = 30.0  # s SIGTERM gives in-flight work to finish and be forwarded

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        s, i, f = self.schedule, self.intake, self.forward
        if s.group not in GROUPS:
            raise InputError(f"--group {s.group!r}: choose instance, series or study")
        if s.quiet_period < 0 or s.max_queue_delay_ms < 0:
            raise InputError("--quiet-period and --max-queue-delay-ms must be ≥ 0")
        if s.max_batch < 1 or s.max_queue < 1:
            raise InputError("--max-batch and --max-queue must be ≥ 1")
        if (i.tls_cert is None) != (i.tls_key is None):
            raise InputError("--tls-cert and --tls-key go together")
        if not is_loopback(i.bind) and i.http_port is not None and i.token_file is None:
            raise InputError(f"--bind {i.bind} is not loopback: HTTP then needs --token-file")
        if i.dicom_port is None and i.http_port is None:
            raise InputError("nothing to listen on: give --dicom-port or --http-port")
        if f.retries < 0 or f.backoff < 0:
            raise InputError("forward retries and backoff must be ≥ 0")
        for url in f.targets:
            forward_kind(url)
        if self.overlay not in (None, "sc"):
            raise InputError(f"--overlay {self.overlay!r}: choose sc (a DICOM Secondary Capture)")
        if self.overlay is not None and not self.segment:
            raise InputError("--overlay sc draws the --segment masks: give at least one --segment PROMPT")
        if any(not p.strip() for p in self.segment):
            raise InputError("--segment takes a non-empty prompt")

    @classmethod
    def from_flat(cls, state: str | Path, *, model: Any = None, device: str = "auto",
                  dtype: str | None = None, backend: str | None = None, findings: str | None = None,
                  bind: str = "127.0.0.1", dicom_port: int | None = 11112, ae_title: str = "RADFLASH",
                  allow_ae: Sequence[str | AllowedCaller] = (), max_associations: int = 8,
                  http_port: int | None = 8080, token_file: str | Path | None = None,
                  tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  forward: Sequence[str] | str = (), forward_retries: int = 5, forward_backoff: float = 1.0,
                  forward_timeout: float = 30.0, group: str = "instance", quiet_period: float = 0.0,
                  max_batch: int = 8, max_queue_delay_ms: float = 50.0, max_queue: int = 1000,
                  min_free_mb: int = 1024, max_instance_mb: int = 1024, max_body_mb: int = 2048,
                  segment: Sequence[str] | str = (), overlay: str | None = None, workers: int = 1,
                  timeout: float = 120.0, max_pixels: int | None = None, grace: float = 30.0) -> ServeOptions:
        """The groups from ``radflash serve``'s flags, spelled as keywords (the CLI and
        ``radflash.serve(state=..., forward=[...])`` both come through here, so the two cannot
        drift apart). Sizes are in MB as on the command line; a port of 0 or None: not listened on."""
        def path(p: str | Path | None) -> Path | None:
            return None if p is None else Path(p)

        return cls(
            state=Path(state),
            model=ModelSpec(model, device=device, dtype=dtype, backend=backend),
            findings=None if findings is None else str(findings),
            intake=IntakeOptions(bind=bind, dicom_port=dicom_port or None, ae_title=ae_title,
                                 allow_ae=tuple(a if isinstance(a, AllowedCaller) else AllowedCaller.parse(a)
                                                for a in allow_ae),
                                 http_port=http_port or None, token_file=path(token_file), tls_cert=path(tls_cert),
                                 tls_key=path(tls_key), max_associations=max_associations,
                                 max_instance_bytes=max_instance_mb << 20, max_body_bytes=max_body_mb << 20,
                                 min_free_bytes=min_free_mb << 20),
            schedule=ScheduleOptions(group=group, quiet_period=quiet_period, max_batch=max_batch,
                                     max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue),
            forward=ForwardOptions(targets=(forward,) if isinstance(forward, str) else tuple(forward),
                                   retries=forward_retries, backoff=forward_backoff, timeout=forward_timeout),
            segment=(segment,) if isinstance(segment, str) else tuple(segment), overlay=overlay, workers=workers,
            decode_timeout=timeout, max_pixels=max_pixels, grace=grace)


def forward_kind(url: str) -> str:
    """``stow`` or ``dimse`` for a ``--forward`` URL (one-line error otherwise)."""
    low = url.lower()
    if low.startswith("dimse://"):
        from radflash.io.dimse import parse_target

        parse_target(url)
        return "dimse"
    if low.startswith(("dicomweb+http://", "dicomweb+https://")):
        from radflash.io.dicomweb import parse_target

        parse_target(url)
        return "stow"
    raise InputError(f"--forward {url[:60]!r}: give dicomweb+http(s)://HOST/dicom-web or dimse://AET@HOST:PORT")
