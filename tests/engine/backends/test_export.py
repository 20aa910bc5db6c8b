"""ONNX export of the image tower: dynamic batch, validation bounds, the export CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from radflash.checkpoints.factory import random_checkpoint
from radflash.cli import cli
from radflash.errors import InputError
from radflash.models.config import preset

pytest.importorskip("onnxruntime")

SIZE = 56


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from radflash.checkpoints.format import save_checkpoint

    cfg = dataclasses.replace(preset("tiny"), image_size=SIZE)
    return save_checkpoint(random_checkpoint(cfg, seed=5), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def model(ckpt_dir: Path):
    import radflash

    return radflash.load(ckpt_dir, device="cpu")


def test_fp32_export_has_a_dynamic_batch_axis(model, tmp_path: Path) -> None:
    import onnx

    from radflash.backends.export import export_onnx, ort_session, run_session

    result = export_onnx(model, tmp_path / "enc.onnx", max_batch=8)
    assert result.validation is not None and result.validation.ok
    assert result.validation.rel <= 1e-3 and result.validation.batches == (1, 3)
    graph = onnx.load(str(result.path)).graph
    assert not isinstance(graph.input[0].type.tensor_type.shape.dim[0].dim_value, int) or \
        graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = ort_session(result.path)
    for b in (2, 7):
        x = torch.randn(b, 3, SIZE, SIZE)
        with torch.inference_mode():
            ref = model.module.image_tokens(x)
        got = run_session(session, x)
        assert got.shape == (b, 17, 192)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-3


def test_fp16_export_within_its_bound(model, tmp_path: Path) -> None:
    from radflash.backends.export import BOUNDS, export_onnx

    result = export_onnx(model, tmp_path / "enc16.onnx", precision="fp16", image_size=70)  # 5×5 grid
    assert result.image_size == 70 and result.validation.ok and result.validation.rel <= BOUNDS["fp16"]


def test_bad_requests_are_input_errors(model, tmp_path: Path) -> None:
    from radflash.backends.export import export_onnx

    with pytest.raises(InputError, match="multiple of the patch"):
        export_onnx(model, tmp_path / "x.onnx", image_size=60)
    with pytest.raises(InputError, match="precision"):
        export_onnx(model, tmp_path / "x.onnx", precision="fp8")


def test_export_cli(ckpt_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.onnx"
    res = runner.invoke(cli, ["export", "onnx", str(ckpt_dir), str(out), "--max-batch", "4"])
    assert res.exit_code == 0, res.output
    assert out.exists() and "validation OK" in res.output and "max abs error" in res.output
    both = runner.invoke(cli, ["export", "onnx", str(ckpt_dir), str(out), "--model", str(ckpt_dir)])
    assert both.exit_code == 2 and "not both" in both.output
    missing = runner.invoke(cli, ["export", "onnx", str(tmp_path / "nope"), str(out)])
    assert missing.exit_code == 2


def test_export_tensorrt_cli_without_tensorrt(ckpt_dir: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    res = CliRunner().invoke(cli, ["export", "tensorrt", str(ckpt_dir), str(tmp_path / "e.plan")])
    assert res.exit_code == 1 and "pip install tensorrt" in res.output and "Traceback" not in res.output


def test_onnx_cache_key_names_everything_that_makes_a_graph_stale() -> None:
    from radflash.backends.export import onnx_cache_key

    kw = dict(model_key="ab" * 32, image_size=518, precision="fp32", opset=18, radflash_version="0.1.0",
              torch_version="2.13.0+cpu", onnx_version="1.23.2", ort_version="1.32.0")
    key = onnx_cache_key(**kw)
    assert key == "abababababababab-518px-fp32-opset18-rf0.1.0-torch2.13.0+cpu-onnx1.23.2-ort1.32.0.onnx"
    for field, value in (("model_key", "cd" * 32), ("image_size", 1036), ("precision", "fp16"), ("opset", 20),
                         ("radflash_version", "0.2.0"), ("torch_version", "2.14.0"), ("onnx_version", "1.24.0"),
                         ("ort_version", "1.33.0"), ("onnx_version", None)):
        assert onnx_cache_key(**{**kw, field: value}) != key, field
    odd = onnx_cache_key(**{**kw, "torch_version": "2.13.0/../x y"})
    assert "/" not in odd and " " not in odd  # a version string can never leave the cache folder


def test_onnx_cache_path_follows_the_installed_versions(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    import radflash
    from radflash.backends.export import DEFAULT_OPSET, onnx_cache_path

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path))
    path = onnx_cache_path(model, image_size=SIZE, precision="fp32")
    assert path.parent == tmp_path / "onnx"
    for part in (f"{SIZE}px", f"opset{DEFAULT_OPSET}", f"rf{radflash.__version__}", f"torch{torch.__version__}",
                 f"ort{onnxruntime.__version__}", "-onnx"):
        assert part in path.name, part
    monkeypatch.setattr(radflash, "__version__", radflash.__version__ + ".dev1")
    assert onnx_cache_path(model, image_size=SIZE, precision="fp32") != path
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert "torch0.0.0" in onnx_cache_path(model, image_size=SIZE, precision="fp32").name
