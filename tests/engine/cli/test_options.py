"""The shared option groups: one model_argument and one inference block, with the historical spellings kept."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from radflash.cli.options import BOTH_MODELS, inference_options, model_argument


def _echo_model(**decorator_kwargs: object) -> click.Command:
    """A toy command that prints what its model_argument resolved to."""
    @click.command()
    @model_argument(**decorator_kwargs)
    def command(model_path: str | None, **rest: object) -> None:
        """Echo the resolved model (and OUT, where taken)."""
        click.echo(f"model={model_path} " + " ".join(f"{k}={v}" for k, v in rest.items()))
    return command


def test_model_option_is_the_canonical_spelling(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(_echo_model(), ["--model", str(tmp_path)]).output.strip() == f"model={tmp_path}"
    assert runner.invoke(_echo_model(), []).output.strip() == "model=None"
    assert runner.invoke(_echo_model(), ["--model", str(tmp_path / "nope")]).exit_code == 2


def test_positional_model_still_works_and_both_is_a_usage_error(tmp_path: Path) -> None:
    runner = CliRunner()
    command = _echo_model(positional=True)
    assert runner.invoke(command, [str(tmp_path)]).output.strip() == f"model={tmp_path}"
    assert runner.invoke(command, ["--model", str(tmp_path)]).output.strip() == f"model={tmp_path}"
    both = runner.invoke(command, [str(tmp_path), "--model", str(tmp_path)])
    assert both.exit_code == 2 and BOTH_MODELS in both.output


def test_model_before_a_required_positional(tmp_path: Path) -> None:
    runner = CliRunner()
    command = _echo_model(positional=True, followed_by="out")
    assert runner.invoke(command, ["o"]).output.strip() == "model=None out=o"
    assert runner.invoke(command, [str(tmp_path), "o"]).output.strip() == f"model={tmp_path} out=o"
    assert runner.invoke(command, ["--model", str(tmp_path), "o"]).output.strip() == f"model={tmp_path} out=o"
    both = runner.invoke(command, [str(tmp_path), "o", "--model", str(tmp_path)])
    assert both.exit_code == 2 and BOTH_MODELS in both.output
    missing = runner.invoke(command, [str(tmp_path / "nope"), "o"])
    assert missing.exit_code == 2 and "no such checkpoint" in missing.output
    assert "expected [MODEL] OUT" in runner.invoke(command, ["a", "b", "c"]).output
    assert "[MODEL] OUT" in runner.invoke(command, ["--help"]).output


def test_presets_are_accepted_only_where_asked(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(_echo_model(presets=True), ["--model", "tiny"]).output.strip() == "model=tiny"
    bad = runner.invoke(_echo_model(presets=True), ["--model", "no-such-model"])
    assert bad.exit_code == 2 and "neither a checkpoint path nor a preset" in bad.output
    assert runner.invoke(_echo_model(), ["--model", "tiny"]).exit_code == 2
    with pytest.raises(TypeError):
        model_argument(presets=True, positional=True)


def test_score_and_segment_share_one_inference_block() -> None:
    from radflash.cli.score import score
    from radflash.cli.segment import segment

    def block(command: click.Command) -> dict[str, tuple[object, str | None]]:
        shared = {p.name: (p.default, getattr(p, "help", None)) for p in command.params}
        return {k: v for k, v in shared.items() if k in _shared_names()}

    score_block, segment_block = block(score), block(segment)
    assert set(score_block) == _shared_names()
    assert score_block.pop("batch_size")[0] == 16 and segment_block.pop("batch_size")[0] == 8
    assert score_block == segment_block


def _shared_names() -> set[str]:
    @click.command()
    @inference_options(batch_size=1)
    def probe(**kwargs: object) -> None:
        """Only here to list the block's parameters."""
    return {p.name for p in probe.params}
