"""Read pickled PyTorch (Lightning) ``.ckpt`` files without running code from them.

A pickle is a program: every global it names is imported and may be called, so a plain
``torch.load`` of a downloaded checkpoint runs whatever its author wanted. ``weights_only=True``
is safe but refuses what a PyTorch Lightning 1.1 checkpoint also holds (an omegaconf
``DictConfig`` of hyper-parameters, callback states keyed by callback classes). So torch's own
loader (zip or legacy format, storages, persistent ids) runs with this module as its
``pickle_module``: its :class:`Unpickler` resolves globals from a fixed table only and never
imports anything.

- Tensor rebuild functions, storage classes, dtypes, ``torch.Size``/``torch.device`` and plain
  containers map to the real objects: they only build data.
- Classes of libraries a Lightning checkpoint refers to (omegaconf, Lightning callbacks,
  ``argparse.Namespace``, ``pathlib`` paths, ``typing.Any``, numpy scalars) map to
  :class:`InertStub` subclasses that store whatever state they are given and do nothing else;
  the real libraries are never imported (radflash needs only the ``state_dict``).
- Every other global is refused before it is resolved: :func:`load_ckpt` raises one
  :class:`CheckpointError` line naming it.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import collections
import functools
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch

from radflash.errors import CheckpointError

_WHY = "radflash loads only tensors and plain data from .ckpt files"


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allowed table (raised before anything is resolved)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refusing to unpickle global {name!r} ({_WHY})")
        self.name = name


class InertStub:
    """Stand-in for a class of a library that radflash never imports (omegaconf, Lightning, ...).

    Accepts any constructor arguments, ``__setstate__`` state, items and list appends that the
    pickle hands it, keeps them as plain attributes for inspection, and has no other behaviour.
    Each stubbed global gets its own subclass (callback states are keyed by class), whose
    ``stub_of`` names the original.
    """

    stub_of: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertStub:
        self = object.__new__(cls)
        self.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: ``__new__`` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:
        self.__dict__["elements"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["elements"].extend(values)

    def __repr__(self) -> str:
        return f"<inert stub of {self.stub_of}>"


@functools.cache
def _stub_class(qualified: str) -> type[InertStub]:
    name = qualified.rsplit(".", 1)[-1]
    return type(name, (InertStub,), {"stub_of": qualified, "__module__": __name__,
                                     "__qualname__": f"InertStub[{qualified}]"})


# Globals replaced by stubs: exact names, and whole modules whose public classes only carry data.
_STUB_NAMES = frozenset({
    "typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional", "typing.Union",
    "argparse.Namespace",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
    "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "numpy.dtype", "numpy.ndarray",
    "numpy.core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy._core.multiarray._reconstruct",
})
_STUB_MODULES = frozenset({
    "omegaconf", "omegaconf.base", "omegaconf.basecontainer", "omegaconf.dictconfig",
    "omegaconf.listconfig", "omegaconf.nodes", "numpy.dtypes",
})
_STUB_PACKAGES = ("pytorch_lightning.callbacks", "lightning.pytorch.callbacks")


@functools.cache
def _allowed() -> dict[str, Any]:
    """The real objects a checkpoint may name: they construct tensors and plain data, nothing else."""
    table: dict[str, Any] = {}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            table[f"torch._utils.{name}"] = getattr(torch._utils, name)
    table["torch._tensor._rebuild_from_type_v2"] = torch._tensor._rebuild_from_type_v2
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or (name.endswith("Storage") and isinstance(value, type)):
            table[f"torch.{name}"] = value
    table.update({
        "torch.storage.UntypedStorage": torch.storage.UntypedStorage,
        "torch.storage.TypedStorage": torch.storage.TypedStorage,
        "torch.Size": torch.Size, "torch.device": torch.device, "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "collections.OrderedDict": collections.OrderedDict, "collections.defaultdict": collections.defaultdict,
        "collections.Counter": collections.Counter, "collections.deque": collections.deque,
        # protocol-2 pickles (torch.save's default) spell bytes as _codecs.encode(text, "latin1")
        "_codecs.encode": _codecs.encode,
    })
    # no range: list(range(10**12)) would turn a few bytes of pickle into any amount of memory
    for kind in (set, frozenset, bytearray, bytes, complex, list, dict, tuple, int, float, str, bool):
        table[f"builtins.{kind.__name__}"] = kind
    return table


def resolve(module: str, name: str) -> Any:
    """The object a pickle's ``module.name`` global stands for, or :class:`RefusedGlobal`.

    Python-2 names (protocol < 3 pickles write ``__builtin__.set``) are mapped as the standard
    unpickler maps them; nothing is ever imported.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    qualified = f"{module}.{name}"
    allowed = _allowed()
    if qualified in allowed:
        return allowed[qualified]
    public_class = name.isidentifier() and not name.startswith("_")
    if qualified in _STUB_NAMES or (public_class and (
            module in _STUB_MODULES or any(module == p or module.startswith(p + ".") for p in _STUB_PACKAGES))):
        return _stub_class(qualified)
    raise RefusedGlobal(qualified)


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from :func:`resolve` (torch subclasses it)."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve(module, name)


def load(file: BinaryIO, **kwargs: Any) -> Any:
    """``pickle.load`` with :class:`Unpickler`: what torch's legacy format calls on this module."""
    return Unpickler(file, **kwargs).load()


def load_ckpt(path: str | Path) -> Any:
    """Everything a ``torch.save`` file holds, with foreign classes as inert stubs.

    Raises one :class:`CheckpointError` line naming the file and the reason for a refused global,
    a truncated or corrupt file, or a file that is not a ``torch.save`` pickle at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    is_zip = _check_container(path)
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise CheckpointError(f"{path}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which rules out radflash's restricted "
                              "unpickler (it never runs code from the file); unset it to convert")
    try:
        # zip files are memory-mapped: the optimizer states a training checkpoint also holds (twice
        # the weights for Adam) are then never read into memory
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__],
                          mmap=is_zip)
    except RefusedGlobal as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt data surfaces as any of pickle's, zip's or torch's errors
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot read the checkpoint, truncated or corrupt? "
                              f"({type(exc).__name__}: {reason})") from None


def _check_container(path: Path) -> bool:
    """Refuse what torch.load would hand to other loaders (TorchScript: code; safetensors).

    Returns whether the file is torch's zip format (else the legacy format is assumed).
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: only {len(head)} bytes, not a PyTorch checkpoint (empty or truncated)")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: the zip archive is truncated or corrupt ({exc})") from None
        inner = {n.split("/", 1)[-1] for n in names}
        if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
            raise CheckpointError(f"{path}: a TorchScript archive (it holds code), not a training checkpoint; "
                                  "radflash does not load it")
        if "data.pkl" not in inner:
            raise CheckpointError(f"{path}: a zip archive without data.pkl, not a torch.save checkpoint")
        return True
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and header_len < path.stat().st_size:
        raise CheckpointError(f"{path}: a safetensors file, not a pickled .ckpt")
    return False
