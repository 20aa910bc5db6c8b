"""The verbs' typed option groups (radflash.archive.options): the flat keyword form maps onto the
groups one to one, bad values are one-line errors before anything slow, and the manifest records
the options a resumed run is checked against."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from radflash.archive.options import DecodeOptions, ModelSpec, ScoreOptions
from radflash.archive.verb import score
from radflash.errors import InputError


def test_every_keyword_of_score_lands_in_one_group() -> None:
    """score(**flat) and ScoreOptions.from_flat take the same parameters, with the same defaults."""
    flat = inspect.signature(score).parameters
    grouped = inspect.signature(ScoreOptions.from_flat).parameters
    assert set(flat) == set(grouped)
    for name, p in flat.items():
        assert grouped[name].default == p.default, name


def test_from_flat_groups_by_stage(tmp_path: Path) -> None:
    o = ScoreOptions.from_flat(["a.dcm"], tmp_path / "out", model="ckpt", device="cpu", dtype="auto", batch_size=4,
                               workers=0, backend="auto", fmt="csv", include_phi=True, resume=True, num_parts=3,
                               part_id=2, commit_every=7, timeout=9.0, stall_after=30.0, max_pixels=1000,
                               fast_decode=True, stow="same")
    assert o.model == ModelSpec("ckpt", "cpu", "auto", "auto") and o.model.measured
    assert o.decode == DecodeOptions(0, 9.0, 30.0, None, 1000, True)
    assert (o.source.inputs, o.source.num_parts, o.source.part_id) == (["a.dcm"], 3, 2)
    assert dataclasses.astuple(o.output) == (tmp_path / "out", "csv", True, True, 7)
    assert (o.batch_size, o.store) == (4, "same")
    assert o.decode.selection().max_pixels == 1000
    assert o.decode.stall_limit() == 30.0 and DecodeOptions(timeout=100.0).stall_limit() == 300.0


def test_dtype_auto_alone_measures_runtime_and_precision_together() -> None:
    """``--dtype auto`` without ``--backend`` chooses the runtime too; a named backend keeps its runtime."""
    assert ModelSpec("m", dtype="auto").backend == "auto"
    assert ModelSpec("m", dtype="auto", backend="eager").backend == "eager"
    assert ModelSpec("m").backend == "eager" and ModelSpec("m", dtype="bfloat16").backend == "eager"
    assert ScoreOptions.from_flat(dtype="auto").model.backend == "auto"


@pytest.mark.parametrize("kwargs, message", [
    ({"fmt": "xlsx"}, "unknown format 'xlsx'"),
    ({"batch_size": 0}, "batch_size must be ≥ 1"),
    ({"num_parts": 2, "part_id": 2}, r"part_id must be in \[0, num_parts\)"),
    ({"workers": -1}, "workers must be ≥ 0"),
])
def test_bad_values_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ScoreOptions.from_flat(**kwargs).check()


def test_the_manifest_records_the_options(tiny_model: Path, tmp_path: Path) -> None:
    from radflash.archive.verb import DEMO_ARCHIVE

    run = score([DEMO_ARCHIVE / "patient00"], tmp_path / "out", model=tiny_model, workers=0, batch_size=3,
                max_pixels=10_000_000, timeout=50.0, progress=False)
    args = run.manifest["args"]
    assert (args["model"], args["batch_size"], args["workers"], args["timeout"]) == (tiny_model, 3, 0, 50.0)
    assert args["rules"]["max_pixels"] == 10_000_000 and args["output"] == str(tmp_path / "out")
