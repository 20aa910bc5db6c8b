"""``radflash sentences``: parse options, call radflash.training.sentence_table."""

from __future__ import annotations

from pathlib import Path

import click

from radflash.cli.options import quiet_option


@click.command()
@click.argument("reports", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output Parquet (a .summary.csv and, with an image column, a .sentences.json land beside it).")
@click.option("--column", default=None, help="Report column (default: report, text, findings or impression).")
@click.option("--image-column", default=None, help="Image column (default: path, image_path or dicom_id, if any).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Image folder: resolves a dicom_id column to files for the training JSON.")
@click.option("--llm", "llm_url", default=None, metavar="URL",
              help="OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) instead of the rules.")
@click.option("--llm-model", default="default", show_default=True, help="Model name sent to the --llm server.")
@click.option("--llm-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True)
@quiet_option
def sentences(reports: Path, output: Path, column: str | None, image_column: str | None, images: Path | None,
              llm_url: str | None, llm_model: str, llm_timeout: float, quiet: bool) -> None:
    """Turn a table of REPORTS (CSV, Parquet or JSONL) into training sentences.

    One output row per report: its sentences, its mentions (finding, certainty, location) and an
    error column (rows that fail are recorded, not fatal). The .sentences.json is what
    `radflash train` reads as data.sentences. The API key for --llm comes from RADFLASH_LLM_API_KEY.
    """
    import os

    from radflash.training.sentence_table import (
        IMAGE_COLUMNS,
        REPORT_COLUMNS,
        extract_table,
        pick_column,
        read_table,
        write_outputs,
    )
    from radflash.util.progress import progress_bar

    table = read_table(reports)
    report_col = pick_column(table, column, REPORT_COLUMNS, "report", reports)
    if report_col is None:
        raise click.BadParameter(f"{reports}: no report column among {', '.join(table.column_names)}; "
                                 "name it with --column", param_hint="REPORTS")
    image_col = pick_column(table, image_column, IMAGE_COLUMNS, "image", reports)
    extractor = None
    if llm_url:
        from radflash.training.sentences import LLMExtractor

        extractor = LLMExtractor(llm_url, llm_model, api_key=os.environ.get("RADFLASH_LLM_API_KEY"),
                                 timeout=llm_timeout).mentions
    bar = progress_bar(table.num_rows, desc="sentences", enabled=not quiet, unit="report")
    try:
        kwargs = {"extractor": extractor} if extractor is not None else {}
        result = extract_table(table, report_column=report_col, image_column=image_col,
                               on_row=bar.update if bar is not None else None, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    written = write_outputs(result, output, images_root=images)
    if not quiet:
        click.echo(f"{'finding':<28} {'present':>8} {'possible':>8} {'absent':>8}")
        for finding, present, possible, absent in result.summary_rows():
            click.echo(f"{finding:<28} {present:>8} {possible:>8} {absent:>8}")
    click.echo(f"{table.num_rows} reports, {result.errors} failed → " + ", ".join(str(p) for p in written))
