"""``radflash report``: (re)build the self-contained ``report.html`` of a score or segment output folder.

Also the shared last step of ``score`` and ``segment`` (:func:`finish_run_report`): save the
gallery the run gathered and write the report, where a failure is a warning and never undoes a
run whose results are already complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from radflash.cli.options import quiet_option
from radflash.errors import RadflashError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--report", "mode", type=click.Choice(("summary", "full")), default=None,
              help="summary: counts, histograms and the image table, no images of patients; full: also the "
                   "gallery the run kept (--report-maps). Default: full when the folder has a gallery.")
@click.option("--include-phi", is_flag=True,
              help="Show patient names and IDs, where the run recorded them (score --include-phi).")
@click.option("--html", "target", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the report to this file instead of OUTPUT/report.html.")
@quiet_option
def report(output: Path, mode: str | None, include_phi: bool, target: Path | None, quiet: bool) -> None:
    """Rebuild OUTPUT/report.html from a score or segment output folder.

    For a folder continued with --resume, a run that died (its committed parts are shown), or a
    run made on another machine. With the default options the file is identical to the one the
    run wrote. Nothing is read from the archive or the network.
    """
    from radflash.report import write_report

    path = write_report(output, mode=mode, include_phi=include_phi, path=target)
    if not quiet:
        click.echo(f"report: {path}")


def start_gallery(kind: str, maps: int | None, output: Path | None, *, resume: bool = False) -> Any:
    """The observer that keeps the report's gallery during the run (None without ``--report-maps``)."""
    if maps is None or output is None:
        return None
    from radflash.report.gallery import ScoreGallery, SegmentGallery

    if kind == "segment":
        gallery: Any = SegmentGallery(maps)
    else:
        gallery = ScoreGallery.resume(output, maps) if resume else ScoreGallery(maps)
    return gallery  # under --ray the score gallery runs in the actors (DistributedObserver)


def finish_run_report(output: Path, mode: str | None, gallery: Any, *, include_phi: bool = False,
                      quiet: bool = False) -> Path | None:
    """After a run: save its gallery, write OUTPUT/report.html (unless ``none``); a failure only warns."""
    try:
        from radflash.report import write_report

        if gallery is not None and mode != "none":
            gallery.save(output)
        path = write_report(output, mode=mode, include_phi=include_phi)
    except (RadflashError, OSError) as exc:
        click.echo(f"Warning: report.html not written ({str(exc).splitlines()[0]}); the run's results are "
                   f"complete: rebuild it with radflash report {output}", err=True)
        return None
    if path is not None and not quiet:
        click.echo(f"report: {path}")
    return path
