"""``radflash serve``: parse flags into :class:`radflash.serving.options.ServeOptions` (through
``ServeOptions.from_flat``, the same keyword spelling ``radflash.serve(...)`` takes) and run the node."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from radflash.cli.options import backend_option, device_option, dtype_option, max_pixels_option, model_argument, stack

if TYPE_CHECKING:
    from radflash.serving.options import ForwardOptions


@click.command()
@click.option("--state", "state", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="State folder: the journal (SQLite) and the spool of received instances.")
@stack(model_argument(), device_option, dtype_option, backend_option)
@click.option("--findings", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Prompt file (default: the 14 CheXpert findings).")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address the DICOM and HTTP ports listen on.")
@click.option("--dicom-port", type=click.IntRange(0, 65535), default=11112, show_default=True,
              help="C-STORE SCP port (0: none).")
@click.option("--ae-title", default="RADFLASH", show_default=True, help="The node's AE title (called AE).")
@click.option("--allow-ae", "allow_ae", multiple=True, metavar="AET[@HOST]",
              help="A caller allowed to send (repeatable). Default: any AE title from loopback only.")
@click.option("--max-associations", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="STOW-RS, /v1/score, /health, /ready, /metrics (0: none).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Bearer token for HTTP (required when --bind is not loopback).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--forward", "forward", multiple=True, metavar="URL",
              help="Where results go (repeatable): dicomweb+http(s)://HOST/dicom-web (STOW-RS) or "
                   "dimse://AET@HOST:PORT (C-STORE).")
@click.option("--forward-retries", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--forward-backoff", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds before the first retry; doubles each time (at most 60 s).")
@click.option("--group", type=click.Choice(("instance", "series", "study")), default="instance", show_default=True)
@click.option("--quiet-period", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds without a new instance of a group before it is released.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=50.0, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Instances accepted and not yet scored; beyond it C-STORE 0xA700 / HTTP 503.")
@click.option("--min-free-mb", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Disk watermark under --state: below it intake answers out of resources.")
@click.option("--max-instance-mb", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--max-body-mb", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--segment", "segment", multiple=True, metavar="PROMPT",
              help="Also a DICOM SEG per scored instance, one segment per prompt (repeatable), to every --forward "
                   "target with the SR.")
@click.option("--overlay", type=click.Choice(("sc",)), default=None,
              help="sc: also an overlay Secondary Capture of the --segment masks (not for diagnosis).")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Decode processes.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds one instance may take to decode.")
@max_pixels_option
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds SIGTERM gives in-flight work before the node exits.")
@click.option("--status", "show_status", is_flag=True, help="Print the journal's counts and dead letters, then exit.")
@click.option("--retry-dead", is_flag=True, help="Resend every dead-lettered result to its target, then exit.")
def serve(state: Path, model_path: str | None, device: str, dtype: str | None, backend: str | None,
          findings: str | None, bind: str, dicom_port: int, ae_title: str, allow_ae: tuple[str, ...],
          max_associations: int, http_port: int,
          token_file: Path | None, tls_cert: Path | None, tls_key: Path | None, forward: tuple[str, ...],
          forward_retries: int, forward_backoff: float, group: str, quiet_period: float, max_batch: int,
          max_queue_delay_ms: float, max_queue: int, min_free_mb: int, max_instance_mb: int, max_body_mb: int,
          segment: tuple[str, ...], overlay: str | None, workers: int, timeout: float, max_pixels: int | None,
          grace: float, show_status: bool, retry_dead: bool) -> None:
    """Receive studies (C-STORE, STOW-RS), score them in batches and forward SRs (and with --segment
    SEGs) to the hospital."""
    from radflash.serving import serve as run
    from radflash.serving.options import ForwardOptions, ServeOptions

    if show_status or retry_dead:
        forward_options = ForwardOptions(targets=tuple(forward), retries=forward_retries, backoff=forward_backoff)
        _status(state, forward_options, retry=retry_dead)
        return
    options = ServeOptions.from_flat(
        state, model=model_path, device=device, dtype=dtype, backend=backend, findings=findings, bind=bind,
        dicom_port=dicom_port, ae_title=ae_title, allow_ae=allow_ae, max_associations=max_associations,
        http_port=http_port, token_file=token_file, tls_cert=tls_cert, tls_key=tls_key, forward=forward,
        forward_retries=forward_retries, forward_backoff=forward_backoff, group=group, quiet_period=quiet_period,
        max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue, min_free_mb=min_free_mb,
        max_instance_mb=max_instance_mb, max_body_mb=max_body_mb, segment=segment, overlay=overlay,
        workers=workers, timeout=timeout, max_pixels=max_pixels, grace=grace)
    import logging

    logging.getLogger("radflash.serving").setLevel(min(logging.INFO, logging.getLogger().level or logging.INFO))
    run(options)
    # Drained, stopped and the journal closed: what is left is the interpreter's teardown, whose final
    # garbage collections over the model's and libraries' objects took 0.4 of a SIGTERM's 0.6 s here.
    # Frozen objects are skipped by them (nothing of the node's state depends on a finaliser any more).
    import gc

    gc.freeze()


def _status(state: Path, forward: ForwardOptions, *, retry: bool) -> None:
    import json
    import time

    from radflash.serving.forward import resend_dead
    from radflash.serving.journal import Journal

    if not (state / "journal.sqlite").exists():
        raise click.ClickException(f"{state}: no serve journal here")
    journal = Journal(state, lock=False)
    try:
        if retry:
            outcome = resend_dead(journal, forward)
            click.echo(f"resent {outcome['resent']} dead letter(s); {outcome['still_dead']} still failing")
        counts = journal.counts()
        click.echo(json.dumps(counts))
        for sop, target, attempts, error in journal.dead():
            click.echo(f"dead\t{sop}\t{target}\t{attempts} attempts\t{error}")
        for at, source, caller, sop, reason in journal.rejections():
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at))
            click.echo(f"rejected\t{when}\t{source}\t{caller}\t{sop or '-'}\t{reason}")
    finally:
        journal.close()
