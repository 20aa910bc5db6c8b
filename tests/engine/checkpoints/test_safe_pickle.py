"""The restricted unpickler: Lightning checkpoints load as data, anything executable is refused.

Files are written with torch.save (pickle only CREATES them here); every load goes through
:func:`radflash.checkpoints.safe_pickle.load_ckpt`. Classes of libraries that are not installed
(omegaconf, pytorch_lightning) are faked in ``sys.modules`` only while pickling.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import os
import pathlib
import subprocess
import sys
import types
import typing
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from radflash.checkpoints.safe_pickle import InertStub, load_ckpt
from radflash.errors import CheckpointError

FOREIGN = ("omegaconf", "pytorch_lightning", "nt")


@contextmanager
def fake_globals(named: dict[str, Callable[..., Any] | type | None]) -> Iterator[dict[str, Any]]:
    """Make each ``{"pkg.mod.Name": obj}`` importable under that name for pickling, then remove it.

    ``obj=None`` creates a fresh empty class of that name. Only modules that did not exist are
    registered (and removed again), so nothing real is shadowed or left behind.
    """
    added: list[str] = []
    made: dict[str, Any] = {}
    try:
        for dotted, obj in named.items():
            module_name, name = dotted.rsplit(".", 1)
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    assert sub.split(".")[0] in FOREIGN, f"refusing to fake a real module {sub}"
                    sys.modules[sub] = types.ModuleType(sub)
                    added.append(sub)
                    if i > 1:
                        setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
            if obj is None:
                obj = type(name, (), {})
            obj.__module__, obj.__qualname__ = module_name, name
            setattr(sys.modules[module_name], name, obj)
            made[dotted] = obj
        yield made
    finally:
        for sub in reversed(added):
            del sys.modules[sub]


class Reduce:
    """Unpickles as ``fn(*args)``: the classic pickle payload."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def lightning_like(state_dict: dict[str, Any], marker: Path | None = None) -> dict[str, Any]:
    """A dict shaped like a PyTorch Lightning 1.1 checkpoint, with omegaconf/Lightning objects.

    Must be pickled inside :func:`lightning_globals`. With ``marker``, the fake DictConfig's
    ``__setstate__`` creates that file: proof that the stub, not the class, receives the state.
    """
    classes = _LIGHTNING_CLASSES
    any_meta = classes["omegaconf.base.ContainerMetadata"]()
    any_meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={},
                             key_type=typing.Any, element_type=typing.Any)
    node = classes["omegaconf.nodes.AnyNode"]()
    node.__dict__.update(_val=1e-4, _metadata=classes["omegaconf.base.Metadata"]())
    hparams = classes["omegaconf.dictconfig.DictConfig"]()
    hparams.__dict__.update(_metadata=any_meta, _parent=None,
                            _content={"lr": node, "model": {"vision": "vit_base_patch16"}})
    if marker is not None:
        hparams.marker = str(marker)
    namespace = argparse.Namespace(config="configs/carzero.yaml", gpus=1)
    checkpoint_cb = classes["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    early = classes["pytorch_lightning.callbacks.early_stopping.EarlyStopping"]
    return {
        "epoch": 3,
        "global_step": 10,
        "pytorch-lightning_version": "1.1.4",
        "state_dict": state_dict,
        "hparams_name": "cfg",
        "hyper_parameters": hparams,
        "args": namespace,
        "callbacks": {
            checkpoint_cb: {"monitor": "val_loss", "best_model_score": torch.tensor(0.25),
                            "current_score": np.float64(0.25),
                            "best_model_path": pathlib.PosixPath("/data/ckpt/epoch=3.ckpt"),
                            "dirpath": pathlib.PosixPath("/data/ckpt")},
            early: {"wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.25), "patience": 10},
        },
        "optimizer_states": [{
            "state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}],
        }],
        "lr_schedulers": [{"last_epoch": 3, "_last_lr": [1e-4], "base_lrs": [1e-4], "flags": {1, 2},
                           "history": collections.defaultdict(list, {"lr": [1e-4]}), "raw": b"\x00\xff"}],
    }


_LIGHTNING_NAMES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)
_LIGHTNING_CLASSES: dict[str, Any] = {}


@contextmanager
def lightning_globals() -> Iterator[None]:
    """Fake omegaconf / pytorch_lightning classes, importable only inside the block."""

    def setstate(self: Any, state: dict[str, Any]) -> None:  # what the "real" class would run
        if "marker" in state:
            Path(state["marker"]).write_text("the real __setstate__ ran")
        self.__dict__.update(state)

    with fake_globals(dict.fromkeys(_LIGHTNING_NAMES)) as made:
        made["omegaconf.dictconfig.DictConfig"].__setstate__ = setstate
        _LIGHTNING_CLASSES.clear()
        _LIGHTNING_CLASSES.update(made)
        try:
            yield
        finally:
            _LIGHTNING_CLASSES.clear()


def save(obj_factory: Callable[[], Any], path: Path, **kwargs: Any) -> Path:
    """torch.save what ``obj_factory`` builds while the fake Lightning classes exist."""
    with lightning_globals():
        torch.save(obj_factory(), path, **kwargs)
    return path


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_ckpt(path)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    assert str(path) in message
    return message


FORMATS = [pytest.param({}, id="zip"), pytest.param({"_use_new_zipfile_serialization": False}, id="legacy"),
           pytest.param({"pickle_protocol": 4}, id="zip-protocol4")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_checkpoint_loads_as_data_with_inert_stubs(tmp_path: Path, fmt: dict[str, Any]) -> None:
    weights = {"CARZero.a.weight": torch.randn(4, 3), "CARZero.b": torch.arange(5)}
    marker = tmp_path / "setstate-ran"
    path = save(lambda: lightning_like(weights, marker), tmp_path / "model.ckpt", **fmt)
    assert not any(m.split(".")[0] in FOREIGN for m in sys.modules), "the fakes are gone"

    loaded = load_ckpt(path)
    assert not marker.exists(), "the foreign class's __setstate__ never runs"
    assert not any(m.split(".")[0] in ("omegaconf", "pytorch_lightning") for m in sys.modules)
    assert loaded["epoch"] == 3 and loaded["pytorch-lightning_version"] == "1.1.4"
    for key, value in weights.items():
        assert type(loaded["state_dict"][key]) is torch.Tensor
        torch.testing.assert_close(loaded["state_dict"][key], value, rtol=0, atol=0)
    hparams = loaded["hyper_parameters"]
    assert isinstance(hparams, InertStub) and type(hparams).stub_of == "omegaconf.dictconfig.DictConfig"
    assert hparams.state["marker"] == str(marker)
    assert hparams.state["_content"]["model"] == {"vision": "vit_base_patch16"}
    ref_type = hparams.state["_metadata"].state["ref_type"]  # typing.Any → a stub class, not typing's
    assert issubclass(ref_type, InertStub) and ref_type.stub_of == "typing.Any"
    assert sorted(cls.stub_of for cls in loaded["callbacks"]) == [
        "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    ]
    assert isinstance(loaded["args"], InertStub)
    assert loaded["args"].state == {"config": "configs/carzero.yaml", "gpus": 1}
    saved = next(state for cls, state in loaded["callbacks"].items() if cls.stub_of.endswith("ModelCheckpoint"))
    assert isinstance(saved["current_score"], InertStub)  # numpy scalars stay stubs: numpy code never runs
    sched = loaded["lr_schedulers"][0]
    assert sched["history"] == {"lr": [1e-4]} and sched["flags"] == {1, 2} and sched["raw"] == b"\x00\xff"


def test_the_fake_checkpoint_is_armed(tmp_path: Path) -> None:
    """Control: a plain unpickler WITH the classes importable runs their code (the threat)."""
    marker = tmp_path / "setstate-ran"
    with lightning_globals():
        torch.save(lightning_like({}, marker), tmp_path / "m.ckpt")
        torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert marker.exists()


PAYLOADS = {  # keyed by the global the pickle names (builtins.open is io.open)
    "io.open": lambda target: Reduce(builtins.open, str(target), "w"),
    "posix.system": lambda target: Reduce(os.system, f"touch {target}"),
    "builtins.eval": lambda target: Reduce(builtins.eval, f"open({str(target)!r}, 'w')"),
    "builtins.exec": lambda target: Reduce(builtins.exec, f"open({str(target)!r}, 'w')"),
    "subprocess.Popen": lambda target: Reduce(subprocess.Popen, ["touch", str(target)]),
    "builtins.getattr": lambda target: Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"),
}


@pytest.mark.skipif(os.name != "posix", reason="os.system is posix.system here")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_code_in_the_state_dict_is_refused_and_never_runs(tmp_path: Path, name: str, fmt: dict[str, Any]) -> None:
    target = tmp_path / "pwned"
    weights = {"CARZero.a.weight": torch.randn(2), "CARZero.evil": PAYLOADS[name](target)}
    path = save(lambda: lightning_like(weights), tmp_path / "evil.ckpt", **fmt)
    message = _error(path)
    assert f"refusing to unpickle global '{name}'" in message
    assert "radflash loads only tensors and plain data" in message
    assert not target.exists()


def test_windows_system_is_refused(tmp_path: Path) -> None:
    calls = []

    def system(command: str) -> int:  # stands in for nt.system on this machine
        calls.append(command)
        return 0

    with fake_globals({"nt.system": system}):
        torch.save({"state_dict": {"x": Reduce(system, "del C:\\")}}, tmp_path / "evil.ckpt")
    assert "global 'nt.system'" in _error(tmp_path / "evil.ckpt")
    assert calls == []


def test_dotted_names_and_private_names_of_stubbed_libraries_are_refused(tmp_path: Path) -> None:
    """Stubs cover public classes only: ``omegaconf.OmegaConf.create``-style paths are refused."""
    def create(*args: Any) -> None:
        raise AssertionError("never called")

    with fake_globals({"omegaconf._impl": create}):
        torch.save({"state_dict": {}, "x": Reduce(create, 1)}, tmp_path / "a.ckpt")
    assert "global 'omegaconf._impl'" in _error(tmp_path / "a.ckpt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_checkpoint_is_one_line(tmp_path: Path, fmt: dict[str, Any]) -> None:
    path = save(lambda: lightning_like({"w": torch.randn(64, 64)}), tmp_path / "m.ckpt", **fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _error(path)
    assert "truncated or corrupt" in message


@pytest.mark.parametrize("content", [b"", b"hello", b"\x80\x02}q\x00(X" + bytes(range(40)), None],
                         ids=["empty", "text", "broken-pickle", "random"])
def test_non_checkpoints_are_one_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.ckpt"
    noise = torch.randint(0, 256, (256,), dtype=torch.uint8).numpy().tobytes()  # seeded per test
    path.write_bytes(content if content is not None else noise)
    _error(path)


def test_torchscript_archives_and_safetensors_are_refused(tmp_path: Path) -> None:
    ts = tmp_path / "scripted.ckpt"
    with zipfile.ZipFile(ts, "w") as archive:
        for name in ("archive/data.pkl", "archive/constants.pkl", "archive/code/__torch__.py"):
            archive.writestr(name, b"")
    assert "TorchScript" in _error(ts)
    st = tmp_path / "w.ckpt"
    save_file({"a": torch.zeros(2)}, str(st))
    assert "safetensors" in _error(st)
    assert "no such file" in _error(tmp_path / "absent.ckpt")


def test_forced_weights_only_mode_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}}, path)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" in _error(path)


def test_loaded_tensors_can_share_storage(tmp_path: Path) -> None:
    shared = torch.randn(6)
    torch.save({"state_dict": {"a": shared, "b": shared, "c": shared[2:4]}}, tmp_path / "m.ckpt")
    sd = load_ckpt(tmp_path / "m.ckpt")["state_dict"]
    assert sd["a"] is sd["b"]
    torch.testing.assert_close(sd["c"], shared[2:4], rtol=0, atol=0)
