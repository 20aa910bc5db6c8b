"""``radflash train`` and ``radflash evaluate``: parse options, call radflash.training."""

from __future__ import annotations

import json
from pathlib import Path

import click

from radflash.cli.options import batch_size_option, device_option, model_argument, quiet_option


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue a run: a checkpoints/step_* folder, or no value for the latest one in the output.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Override the config's output dir.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the config's number of steps.")
@quiet_option
def train(config: Path, resume: str | None, output: Path | None, steps: int | None, quiet: bool) -> None:
    """Train a model from the YAML CONFIG (single process, or one per GPU under torchrun).

    Checkpoints land in <output>/checkpoints/step_*/ in radflash's own format (load them with
    radflash.load); <output>/loss.png shows the loss curve.
    """
    from radflash.training.config import TrainConfig
    from radflash.training.trainer import train as run_training

    cfg = TrainConfig.from_yaml(config)
    if output is not None:
        cfg.output = str(output)
    if steps is not None:
        cfg.steps, cfg.epochs = steps, None
    result = run_training(cfg, resume=resume, progress=not quiet)
    if not quiet:
        last = result.losses[-1][1] if result.losses else float("nan")
        click.echo(f"final loss {last:.4f}; checkpoint {result.final_checkpoint}")
        if result.exported:
            click.echo(f"exported {result.exported}")


@click.command()
@model_argument()
@click.option("--data", type=click.Choice(["phantoms"]), default="phantoms", show_default=True,
              help="Labelled evaluation data (synthetic phantoms with masks).")
@click.option("--seed", type=int, default=1000, show_default=True, help="Test images' seed.")
@click.option("--n", "n", type=click.IntRange(min=2), default=200, show_default=True, help="Test images.")
@click.option("--val-seed", type=int, default=2000, show_default=True,
              help="Validation images' seed (segmentation thresholds are chosen there, never on the test set).")
@click.option("--val-n", type=click.IntRange(min=2), default=100, show_default=True, help="Validation images.")
@click.option("--size", type=click.IntRange(min=32), default=224, show_default=True, help="Phantom side in pixels.")
@click.option("--threshold", type=click.Choice(["validation", "checkpoint", "fixed"]), default="validation",
              show_default=True, help="Segmentation threshold: chosen on validation images, the checkpoint's "
              "calibration, or --fixed-threshold.")
@click.option("--fixed-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--held-out", "held_out", multiple=True, metavar="FINDING:LOCATION",
              help="Combination unseen in training, for the zero-shot test (repeatable; default: the "
              "checkpoint's recorded ones).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for metrics.json and roc.png.")
@batch_size_option(16)
@device_option
@quiet_option
def evaluate(model_path: str | None, data: str, seed: int, n: int, val_seed: int, val_n: int, size: int,
             threshold: str, fixed_threshold: float, held_out: tuple[str, ...], out: Path | None,
             batch_size: int, device: str, quiet: bool) -> None:
    """Zero-shot metrics of a model on held-out phantoms: AUROC/AUPRC, pointing game, Dice, specificity."""
    from radflash.training.evaluate import evaluate_phantoms

    combos = []
    for item in held_out:
        if ":" not in item:
            raise click.BadParameter(f"{item!r}: expected FINDING:LOCATION", param_hint="--held-out")
        finding, location = (s.strip() for s in item.split(":", 1))
        combos.append((finding, location))
    if out is not None:  # roc.png: fail before evaluating, not after
        from radflash.util.plotting import require_plotting

        require_plotting("roc.png (--out)")
    report = evaluate_phantoms(
        model_path, seed=seed, n=n, val_seed=val_seed, val_n=val_n, size=size, threshold=threshold,
        fixed_threshold=fixed_threshold, held_out=combos or None, batch_size=batch_size, device=device,
        out=out, progress=not quiet,
    )
    if quiet:
        return
    click.echo(f"{'finding':28s} {'AUROC':>6s} {'AUPRC':>6s} {'point':>6s} {'thr':>5s} {'Dice':>6s} {'spec':>6s}")
    for name, m in report.findings.items():
        click.echo(f"{name:28s} {m.auroc:6.3f} {m.auprc:6.3f} {m.pointing_game:6.3f} {m.threshold:5.2f} "
                   f"{m.dice:6.3f} {m.specificity:6.3f}")
    click.echo(f"macro AUROC {report.macro_auroc:.3f}  AUPRC {report.macro_auprc:.3f}  "
               f"pointing {report.pointing_game:.3f}  Dice {report.mean_dice:.3f}")
    for combo, m in report.held_out.items():
        click.echo(f"held out {combo}: " + json.dumps({k: round(v, 3) for k, v in m.items()}))
    if out is not None:
        click.echo(f"wrote {out / 'metrics.json'} and {out / 'roc.png'}")
