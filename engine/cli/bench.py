"""``radflash bench``: parse options, call :func:`radflash.bench.harness.bench`, print/save the report.

``bench`` is a click group that runs that benchmark when called without a subcommand (every
``radflash bench --…`` invocation works as before); ``radflash bench serve`` loads a local serving
node (:mod:`radflash.cli.bench_serve`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from radflash.cli.bench_serve import bench_serve
from radflash.cli.options import device_option, kernels_option, model_argument

BENCH_BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt", "openvino", "auto", "all")
BENCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    items = [v.strip() for v in value.split(",")]
    try:
        sizes = tuple(int(v) for v in items)
    except ValueError:
        sizes = ()
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"expected comma-separated integers ≥ 1 such as 1,8,32; got {value!r}")
    return sizes


@click.group(invoke_without_command=True)
@model_argument(presets=True)
@device_option
@click.option("--backend", "backends", type=click.Choice(BENCH_BACKENDS), multiple=True, default=("eager",),
              show_default=True, help="Image-encoder backend; repeat the flag for several, or 'all'.")
@click.option("--dtype", "dtypes", type=click.Choice(BENCH_DTYPES), multiple=True, default=(),
              help="Encoder precision to time each backend in; repeat for several (default: the model's: float32 "
                   "on CPU). Each row reports images/s and the fraction of the GEMM rate measured in its precision.")
@click.option("--openvino-standalone/--no-openvino-standalone", default=None,
              help="Also time the exported graph compiled by OpenVINO with its own defaults (encoder only) as the "
                   "peer. Default: on CPU when openvino is installed.")
@kernels_option
@click.option("--batch-sizes", default="1,8", show_default=True, callback=_batch_sizes,
              help="Comma-separated batch sizes.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Input side in pixels (multiple of the patch size); default: the model's own.")
@click.option("--prompts", type=click.IntRange(min=1), default=14, show_default=True, help="Number of text prompts.")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed iterations per backend and batch size.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed warm-up iterations before them.")
@click.option("--archive-files", type=click.IntRange(min=0), default=16, show_default=True,
              help="Files in the synthetic DICOM archive (decode and score stages; 0 = in-memory images).")
@click.option("--films", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Also time each stage in core-seconds per image on N real-size films per syntax (explicit LE, "
                   "RLE, JPEG 2000; full and --fast-decode) and report the pipeline limit cores ÷ Σ.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads for the run (use 1 on a machine shared with other jobs).")
@click.option("--no-reference", is_flag=True, help="Skip the transformers reference path (no ratios).")
@click.option("--reference-loop", type=click.Choice(("image", "pair")), default="image", show_default=True,
              help="CARZero: the reference's fusion loop, the released per-image loop or one call per image "
                   "and prompt (recomputing every prompt's keys/values each time).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report (every sample) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: latency vs batch size per backend, and the stage breakdown.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the table (with machine, versions, config, date) to a markdown results file.")
@click.pass_context
def bench(ctx: click.Context, model_path: str | None, device: str, backends: tuple[str, ...],
          batch_sizes: tuple[int, ...], image_size: int | None, prompts: int, iterations: int, warmup: int,
          archive_files: int,
          threads: int | None, no_reference: bool, reference_loop: str, json_path: Path | None,
          plot_path: Path | None, markdown_path: Path | None, dtypes: tuple[str, ...] = (),
          openvino_standalone: bool | None = None, films: int = 0) -> None:
    """Time decode, preprocessing, encoder, head, maps (for families that have them) and the score path beside the
    reference of the model's family (RadZero or CARZero). `radflash bench serve --help`: a serving node under load."""
    if ctx.invoked_subcommand is not None:  # `bench serve …`: the group's own benchmark does not run
        return
    from rich.console import Console

    from radflash.bench.harness import bench as run_bench
    from radflash.bench.report import render_table, summary_lines, to_markdown

    if plot_path is not None:  # fail before the benchmark runs, not after
        from radflash.util.plotting import require_plotting

        require_plotting("--plot")
    report = run_bench(model=model_path, device=device, backends=backends, batch_sizes=batch_sizes,
                       image_size=image_size, prompts=prompts, iterations=iterations, warmup=warmup,
                       include_reference=not no_reference, archive_files=archive_files,
                       threads=threads, reference_loop=reference_loop, dtypes=dtypes or (None,),
                       openvino_standalone=openvino_standalone, films=films)
    console = Console(width=None if sys.stdout.isatty() else 160)
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    console.print(render_table(report))
    if "stage_costs" in report.config:
        from radflash.bench.pipeline_limit import stage_cost_lines

        for line in stage_cost_lines(report.config["stage_costs"]):
            console.print(line, highlight=False, markup=False)
    if json_path is not None:
        report.to_json(json_path)
        console.print(f"JSON written to {json_path}", highlight=False, markup=False)
    if plot_path is not None:
        from radflash.bench.plots import plot_report

        plot_report(report, plot_path)
        console.print(f"plot written to {plot_path}", highlight=False, markup=False)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        with markdown_path.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if markdown_path.stat().st_size else "") + to_markdown(report))
        console.print(f"table appended to {markdown_path}", highlight=False, markup=False)


bench.add_command(bench_serve, "serve")
