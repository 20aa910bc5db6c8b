"""``radflash score``: parse options, call :func:`radflash.archive.verb.score`, print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from radflash.cli.options import (
    checked_report_mode,
    inference_options,
    ray_options,
    ray_run_options,
    report_options,
)

PREVIEW_ROWS = 10


def _modalities(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(m.strip().upper() for m in value.split(",") if m.strip())
    if not items or not all(m.isalnum() for m in items):
        raise click.BadParameter(f"expected comma-separated DICOM modality codes such as CR,DX; got {value!r}")
    return items


DEMO_GALLERY_K = 4  # top images per finding in the demo run's report gallery


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path())  # str: Path() would fold a dicomweb+http:// URL's '//'
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output folder (results, status, manifest). Without it a preview is printed and nothing saved.")
@click.option("--findings", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Prompt file (YAML/JSON/TXT). Default: the 14 CheXpert findings, 'There is {finding}'.")
@inference_options(batch_size=16)
@click.option("--format", "fmt", type=click.Choice(("parquet", "csv")), default="parquet", show_default=True,
              help="Format of the consolidated results/status tables.")
@click.option("--include-phi", is_flag=True, help="Copy patient name and ID into the results.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUTPUT; committed files are skipped.")
@click.option("--num-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the archive into N deterministic shards...")
@click.option("--part-id", type=click.IntRange(min=0), default=0, show_default=True,
              help="...and score only shard K (0-based).")
@click.option("--include-lateral", is_flag=True, help="Also score lateral views (skipped by default).")
@click.option("--modalities", callback=_modalities, default=None,
              help="Comma-separated modalities to score (default: the selection rules' chest X-ray set).")
@click.option("--commit-every", type=click.IntRange(min=1), default=256, show_default=True,
              help="Files per committed part: the most work a crash can lose.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds one file may take to decode before it is recorded as failed.")
@click.option("--stall-after", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Stop the run, naming the stalled stage, when nothing finishes for S seconds "
                   "[default: 3 × --timeout, at least 60]; committed results are kept for --resume.")
@click.option("--store", "stow", is_flag=False, flag_value="same", default=None, metavar="[URL]",
              help="Store one DICOM SR per scored image with STOW-RS or C-STORE: on the PACS scored from, "
                   "or on dicomweb+http(s)://URL or dimse://AET@HOST:PORT.")
@click.option("--token-env", metavar="VAR", default=None,
              help="DICOMweb inputs: environment variable holding a bearer token (default: ~/.netrc).")
@click.option("--basic-auth-env", metavar="VAR", default=None,
              help="DICOMweb inputs: environment variable holding user:password for basic auth.")
@click.option("--fast-decode", is_flag=True,
              help="Decode JPEG 2000 and 8-bit JPEG films only at the coarsest resolution that still covers "
                   "the model input (several times faster on large films; other syntaxes decode in full). "
                   "Off by default: the default is the reference preprocessing. The manifest records the "
                   "probe batch's max |Δprob| against a full decode.")
@report_options
@ray_options
def score(inputs: tuple[str, ...], output: Path | None, model_path: str | None, findings: Path | None,
          device: str, batch_size: int, workers: int | None, backend: str | None, dtype: str | None, fmt: str,
          include_phi: bool,
          resume: bool, num_parts: int, part_id: int, include_lateral: bool, modalities: tuple[str, ...] | None,
          commit_every: int, timeout: float, stall_after: float | None, max_pixels: int | None, quiet: bool,
          token_env: str | None,
          basic_auth_env: str | None, stow: str | None, report_mode: str | None = None, report_maps: int | None = None,
          ray_address: str | None = None, ray_actors: int | None = None, ray_threads: int | None = None,
          fast_decode: bool = False) -> None:
    """Score every image in INPUTS (files or folders, searched recursively) for each finding.

    An input may instead be a DICOMweb study query on a PACS, e.g.
    'dicomweb+http://host:8042/dicom-web/studies?ModalitiesInStudy=CR', or a DIMSE query,
    'dimse://PACS@host:104?ModalitiesInStudy=CR' (C-FIND, then C-GET; scored on its own).

    With no INPUTS the small embedded demo archive (synthetic phantoms) is scored, and its report
    shows the map gallery (--report-maps 4) unless told otherwise. Writes OUTPUT/results.<fmt> (one
    row per scored image: path, UIDs, <finding>.logit and <finding>.prob), OUTPUT/status.<fmt>
    (every file once: scored/skipped/failed and why), OUTPUT/manifest.json and OUTPUT/report.html
    (see --report). OUTPUT is locked for the run (a second run into it stops with an error naming
    the first).
    """
    if part_id >= num_parts:
        raise click.UsageError(f"--part-id {part_id} must be smaller than --num-parts {num_parts}")
    if resume and output is None:
        raise click.UsageError("--resume needs -o/--output: the folder of the run to continue")
    from radflash.archive.verb import DEMO_ARCHIVE
    from radflash.archive.verb import score as score_fn
    from radflash.io.dicomweb import Auth, is_dicomweb
    from radflash.io.dimse import is_dimse

    report_mode = checked_report_mode(report_mode, report_maps, output)
    if not inputs and report_maps is None and report_mode in (None, "full") and output is not None:
        # the embedded demo archive holds synthetic phantoms, not patients: show its gallery by default
        report_maps = DEMO_GALLERY_K
    rules = _rules(include_lateral, modalities)
    auth = Auth(token_env=token_env, basic_env=basic_auth_env) if token_env or basic_auth_env else None
    if not inputs and not quiet:
        click.echo(f"No inputs given: scoring the embedded demo archive ({DEMO_ARCHIVE}).", err=True)
    from radflash.cli.report import start_gallery

    gallery = start_gallery("score", report_maps, output, resume=resume)
    run = score_fn(
        [i if is_dicomweb(i) or is_dimse(i) else Path(i) for i in inputs] or None, output, model=model_path,
        findings=findings, device=device, dtype=dtype,
        batch_size=batch_size, workers=workers, backend=backend, fmt=fmt, include_phi=include_phi,
        resume=resume, num_parts=num_parts, part_id=part_id, rules=rules, progress=not quiet,
        commit_every=commit_every, timeout=timeout, stall_after=stall_after, max_pixels=max_pixels, auth=auth,
        stow=stow,
        ray=ray_run_options(ray_address, ray_actors, ray_threads), observer=gallery, fast_decode=fast_decode,
    )
    if not quiet:
        _summary(run)
    if output is not None:
        from radflash.cli.report import finish_run_report

        finish_run_report(output, report_mode, gallery, include_phi=include_phi, quiet=quiet)


def _rules(include_lateral: bool, modalities: tuple[str, ...] | None):
    """SelectionRules from the flags; ``None`` keeps the library defaults."""
    if not include_lateral and modalities is None:
        return None
    from radflash.io.selection import SelectionRules

    kwargs: dict = {}
    if include_lateral:
        kwargs["include_lateral"] = True
    if modalities is not None:
        kwargs["modalities"] = modalities
    return SelectionRules(**kwargs)


def _summary(run) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Table(title="radflash score", show_header=False)
    counts.add_row("files", f"{run.discovered}" + (f" ({run.resumed} from the earlier run)" if run.resumed else ""))
    for key in ("scored", "skipped", "failed"):
        counts.add_row(key, str(getattr(run, key)))
    if run.images_per_s:
        counts.add_row("throughput", f"{run.images_per_s:.1f} files/s")
    counts.add_row("device / backend", f"{run.manifest['device']} / {run.manifest['backend']}")
    if run.manifest.get("backend_selection"):
        from radflash.backends.auto import summary

        counts.add_row("backend choice", summary(run.manifest["backend_selection"]))
    if run.output is not None:
        counts.add_row("results", str(run.results_path))
        counts.add_row("status", str(run.status_path))
        counts.add_row("manifest", str(run.manifest_path))
    console.print(counts)
    if run.output is None and run.results.num_rows:
        _preview(console, run)


def _preview(console, run) -> None:
    """Top findings of the first few images, for runs without -o (e.g. the demo)."""
    from rich.table import Table

    names = list(run.manifest["findings"])
    table = Table(title=f"top findings (first {min(PREVIEW_ROWS, run.results.num_rows)} of "
                        f"{run.results.num_rows}; pass -o OUT to save all)")
    table.add_column("file")
    table.add_column("top 3 (probability)")
    rows = run.results.slice(0, PREVIEW_ROWS).to_pylist()
    for row in rows:
        probs = sorted(((row[f"{n}.prob"], n) for n in names), reverse=True)[:3]
        table.add_row(Path(row["path"]).name, ", ".join(f"{n} {p:.2f}" for p, n in probs))
    console.print(table)
