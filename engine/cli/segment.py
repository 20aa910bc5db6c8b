"""``radflash segment``: maps, masks and grounding for any prompts (parsing only; logic in radflash.segment.verb)."""

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
from radflash.errors import RadflashError

FORMAT_NAMES = ("png", "npz", "dicom-seg", "dicom-sr", "nifti")


def _formats(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--format png,npz --format dicom-seg`` → ("png", "npz", "dicom-seg"); bad names are usage errors."""
    out: list[str] = []
    for item in value:
        for part in item.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in FORMAT_NAMES:
                raise click.BadParameter(f"{part!r} is not one of {', '.join(FORMAT_NAMES)}")
            if part not in out:
                out.append(part)
    return tuple(out) or ("png", "npz")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path())  # str: Path() folds a dicomweb+http:// '//'
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (one sub-folder per image, plus report.json).")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT",
              help='A prompt, e.g. "There is pneumothorax" or "left lung" (repeatable).')
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="YAML/JSON/TXT prompt file (name → prompt, optional per-prompt threshold).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="Mask threshold on the probability map for prompts without their own (default: the "
                   "model's calibrated map threshold, else 0.5).")
@click.option("--format", "formats", multiple=True, callback=_formats, metavar="LIST",
              help="Outputs: png, npz, dicom-seg, dicom-sr (a TID 1500 report referencing the SEG), nifti "
                   "(comma list or repeated; default png,npz).")
@click.option("--preview", is_flag=True, help="Also write overlay PNGs at the source size.")
@click.option("--overlay", type=click.Choice(["sc"]), default=None,
              help="Also write the overlay as a DICOM Secondary Capture (overlay-sc.dcm) in the source's study, "
                   "for PACS viewers without SEG/SR display (DICOM sources; stored with --store).")
@click.option("--store", is_flag=False, flag_value="same", default=None, metavar="[URL]",
              help="Store each DICOM SEG (implies --format dicom-seg) with STOW-RS or C-STORE: on the PACS "
                   "segmented from, or on dicomweb+http(s)://URL or dimse://AET@HOST:PORT. SEGs the server holds "
                   "are not sent again.")
@click.option("--token-env", metavar="VAR", default=None,
              help="DICOMweb: environment variable holding a bearer token (default: ~/.netrc).")
@click.option("--basic-auth-env", metavar="VAR", default=None,
              help="DICOMweb: environment variable holding user:password for basic auth.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds one file may take to decode before it is recorded as failed.")
@click.option("--stall-after", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Stop the run, naming the stalled stage, when nothing finishes for S seconds "
                   "[default: 3 × --timeout, at least 60].")
@inference_options(batch_size=8)
@report_options
@ray_options
def segment(inputs: tuple[str, ...], outdir: Path, prompt_texts: tuple[str, ...], prompt_file: Path | None,
            threshold: float | None, formats: tuple[str, ...], preview: bool, overlay: str | None, store: str | None,
            token_env: str | None, basic_auth_env: str | None, timeout: float, stall_after: float | None,
            model_path: str | None,
            device: str, backend: str | None, batch_size: int, workers: int | None, max_pixels: int | None,
            quiet: bool, dtype: str | None = None, report_mode: str | None = None, report_maps: int | None = None,
            ray_address: str | None = None, ray_actors: int | None = None, ray_threads: int | None = None) -> None:
    """Segment and ground prompts in DICOM/PNG/JPEG INPUTS (files or folders).

    For each image and prompt, at the image's original size: a float16 probability map (npz), a
    binary mask (png / dicom-seg / nifti) and grounding (peak point, box of the largest region,
    peak probability) in one JSON per image; OUTDIR/report.html summarises the run (see --report).

    An input may instead be a DICOMweb study query on a PACS, e.g.
    'dicomweb+http://host:8042/dicom-web/studies?ModalitiesInStudy=CR', or a DIMSE query,
    'dimse://PACS@host:104?ModalitiesInStudy=CR' (segmented on its own).
    """
    if not prompt_texts and prompt_file is None:
        raise click.UsageError("give at least one --prompt TEXT or a --prompts FILE")
    ray = ray_run_options(ray_address, ray_actors, ray_threads)
    report_mode = checked_report_mode(report_mode, report_maps, outdir)
    try:
        from radflash.cli.report import finish_run_report, start_gallery
        from radflash.findings import load_prompt_file
        from radflash.io.dicomweb import Auth, is_dicomweb
        from radflash.io.dimse import is_dimse
        from radflash.segment.summary import summary_table
        from radflash.segment.verb import segment as run_segment

        prompts: dict[str, dict] = dict(load_prompt_file(prompt_file)) if prompt_file is not None else {}
        for text in prompt_texts:
            text = text.strip()
            if not text:
                raise click.BadParameter("empty prompt", param_hint="--prompt")
            prompts.setdefault(text, {"prompt": text, "threshold": None})
        auth = Auth(token_env=token_env, basic_env=basic_auth_env) if token_env or basic_auth_env else None
        sources = [i if is_dicomweb(i) or is_dimse(i) else Path(i) for i in inputs]
        gallery = start_gallery("segment", report_maps, outdir)
        run = run_segment(sources, outdir, prompts=prompts, thresholds=threshold, model=model_path,
                          device=device, dtype=dtype, backend=backend, batch_size=batch_size, formats=formats,
                          preview=preview, overlay=overlay, workers=workers, progress=not quiet, max_pixels=max_pixels,
                          ray=ray, auth=auth, store=store, observer=gallery, timeout=timeout,
                          stall_after=stall_after)
    except RadflashError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    if not quiet:
        from rich.console import Console

        Console().print(summary_table(run))
    finish_run_report(outdir, report_mode, gallery, quiet=quiet)
    if not run.images:
        raise click.ClickException(f"no image could be segmented ({len(run.failures)} failed or skipped; "
                                   f"see {run.report_path})")
