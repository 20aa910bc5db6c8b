"""The training-config schema: YAML as users write it, and one-line errors naming the file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from radflash.errors import InputError
from radflash.models.config import MAX_LAYERS
from radflash.training import config as train_config
from radflash.training import trainer
from radflash.training.config import TrainConfig, model_config

DEMO_YAML = Path(__file__).resolve().parents[2] / "training" / "configs" / "demo.yaml"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _yaml(tmp_path, text)
    with pytest.raises(InputError) as info:
        TrainConfig.from_yaml(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def test_exponent_without_a_dot_is_a_float(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `1e-4` as a string; the schema's lax mode reads the float meant."""
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # why the schema has to care
    cfg = TrainConfig.from_yaml(_yaml(tmp_path, "steps: 3\nlr: 1e-4\nweight_decay: 5E-2\ngrad_clip: '2'\n"))
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.05 and cfg.grad_clip == 2.0


def test_demo_config_is_valid_and_round_trips() -> None:
    cfg = TrainConfig.from_yaml(DEMO_YAML)
    assert cfg.steps == 4500 and cfg.lr == 5e-4 and model_config(cfg.model).vision.layers == 3
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(("text", "expected"), [
    # the cases, reached through the model overrides
    ("model: {vision: {heads: 0}}", "model.vision.heads: must be ≥ 1 (got 0)"),
    ("model: {vision: {patch: 0}}", "model.vision.patch: must be ≥ 1 (got 0)"),
    ("model: {vision: {layers: 1000000}}", f"model.vision.layers: must be ≤ {MAX_LAYERS} (got 1000000)"),
    ("model: {text: {heads: 5}}", "model.text: hidden 192 must be divisible by heads 5"),
    ("model: {image_size: 100}", "model: image_size 100 must be a multiple of vision.patch 14"),
    ("model: {vision: {registers: 4}}", "model.vision.registers: unknown key (known: eps, heads, hidden, "),
    # types and ranges of the run itself
    ("lr: 0", "lr: must be > 0 (got 0)"),
    ("lr: -1e-4", "lr: must be > 0 (got '-1e-4')"),
    ("lr: fast", "lr: must be a number (got 'fast')"),
    ("lr: .nan", "lr: must be a finite number (got nan)"),
    ("weight_decay: -0.1", "weight_decay: must be ≥ 0 (got -0.1)"),
    ("batch_size: 0", "batch_size: must be ≥ 1 (got 0)"),
    ("batch_size: 2.5", "batch_size: must be an integer (got 2.5)"),
    ("batch_size: true", "batch_size: must be a number (got true)"),
    ("min_lr_ratio: 2", "min_lr_ratio: must be in [0, 1] (got 2)"),
    ("threads: 0", "threads: must be ≥ 1 (got 0)"),
    ("export_dtype: int8", "export_dtype: must be 'float32', 'float16' or 'bfloat16' (got 'int8')"),
    ("output: [a, b]", "output: must be a string (got ['a', 'b'])"),
    ("model: {preset: huge}", "model.preset: must be one of base, tiny, carzero, carzero-tiny (got 'huge')"),
    ("model: {tokenizer: bpe}", "model.tokenizer: must be 'phantom', 'basic' or 'checkpoint' (got 'bpe')"),
    ("data: {source: dicom}", "data.source: must be 'phantoms' or 'mimic' (got 'dicom')"),
    ("data: {size: 8}", "data.size: must be ≥ 32 (got 8)"),
    ("data: {exclude: [nodule]}", "data.exclude.0: must be a list (got 'nodule')"),
    ("data: []", "data: must be a mapping (got [])"),
    ("warmup: 10", "warmup: unknown key (did you mean warmup_steps?)"),
    ("learning_rate: 1e-4", "learning_rate: unknown key (known: batch_size, calibrate, "),
    ("data: {sorce: mimic}", "data.sorce: unknown key (did you mean source?)"),
])
def test_bad_values_name_the_file_key_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, "steps: 2\n" + text + "\n")


def test_steps_written_as_an_exponent_is_refused_not_truncated(tmp_path: Path) -> None:
    assert "steps: must be an integer (got '1e3')" in _error(tmp_path, "steps: 1e3\n")


def test_several_problems_on_one_line(tmp_path: Path) -> None:
    msg = _error(tmp_path, "steps: 0\nbatch_size: 0\n")
    assert "steps: must be ≥ 1 (got 0); batch_size: must be ≥ 1 (got 0)" in msg


def test_cross_key_rules_still_apply(tmp_path: Path) -> None:
    assert "give exactly one of steps or epochs" in _error(tmp_path, "steps: 2\nepochs: 1\n")
    msg = _error(tmp_path, "steps: 2\nmodel: {tokenizer: checkpoint}\n")
    assert "model.tokenizer: checkpoint needs model.init" in msg
    msg = _error(tmp_path, "steps: 2\nmodel: {init: ckpt, image_size: 56, vision: {layers: 1}}\n")
    assert "model.vision, model.image_size cannot be combined with model.init" in msg


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    cfg = TrainConfig.from_yaml(_yaml(tmp_path, "steps: 2\nmodel:\ndata:\n"))
    assert cfg.model == train_config.ModelSection() and cfg.data == train_config.DataSection()


@pytest.mark.parametrize("text", ["- steps: 2\n", "steps: [unclosed\n"])
def test_not_a_mapping_or_not_yaml(tmp_path: Path, text: str) -> None:
    msg = _error(tmp_path, text)
    assert "expected a mapping" in msg or "invalid YAML" in msg


def test_model_overrides_build_the_validated_config() -> None:
    sec = train_config.ModelSection(image_size=56, align_layers=1, vision={"layers": "1"}, text={"layers": 2})
    cfg = model_config(sec)
    base = model_config(train_config.ModelSection())
    assert cfg == dataclasses.replace(base, image_size=56, align_layers=1,
                                      vision=dataclasses.replace(base.vision, layers=1),
                                      text=dataclasses.replace(base.text, layers=2))


def test_cli_train_bad_yaml_is_one_line_without_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.cli import cli

    ran: list[TrainConfig] = []
    monkeypatch.setattr(trainer, "train", lambda cfg, **kw: ran.append(cfg))  # never reached on errors
    path = _yaml(tmp_path, "steps: 2\nmodel: {vision: {patch: 0}}\n")
    res = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == [f"Error: {path}: model.vision.patch: must be ≥ 1 (got 0)"]
    assert ran == []


def test_cli_train_accepts_an_exponent_learning_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from radflash.cli import cli

    ran: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, **kw: object) -> trainer.TrainResult:
        ran.append(cfg)
        return trainer.TrainResult(output=tmp_path / "out", final_checkpoint=tmp_path / "ckpt", steps=2,
                                   losses=[(2, 0.5)], val_losses=[])

    monkeypatch.setattr(trainer, "train", fake_train)
    path = _yaml(tmp_path, "steps: 2\nlr: 1e-4\n")
    res = CliRunner().invoke(cli, ["train", str(path), "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert len(ran) == 1 and ran[0].lr == 1e-4 and ran[0].output == str(tmp_path / "out")
