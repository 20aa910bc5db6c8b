"""The verbs' options: flags → a few typed groups, checked once, at the boundary.

``score``, ``segment`` and ``serve`` share the groups that describe the same stages: which model and
where it runs (:class:`ModelSpec`, whose :meth:`~ModelSpec.load` is the one way a driver, a Ray
actor's driver copy or a server builds it), where items come from (:class:`SourceOptions`), and how
they are decoded (:class:`DecodeOptions`). Each verb composes them with its own (``score``:
:class:`OutputOptions` and :class:`ScoreOptions`; ``serve``: :mod:`radflash.serving.options`), and a
run's manifest records the composed options instead of repeating its parameters by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radflash.errors import InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel
    from radflash.archive.pipeline import BatchObserver
    from radflash.archive.ray_executor import RayOptions
    from radflash.io.selection import SelectionRules
    from radflash.io.source import Source


@dataclass(frozen=True)
class ModelSpec:
    """Which model, on which device, in which precision and runtime."""

    model: Any = None  # a checkpoint path, a loaded RadFlashModel, or None: the embedded demo model
    device: str = "auto"
    dtype: str | None = None  # the image encoder's precision; "auto": measured (radflash.backends.auto)
    backend: str | None = None  # None: "auto" when dtype is "auto" (runtime and precision together), else "eager"

    def __post_init__(self) -> None:
        if self.backend is None:  # resolved here, so the manifest and a resume see the runtime actually asked for
            object.__setattr__(self, "backend", "auto" if self.dtype == "auto" else "eager")

    @property
    def measured(self) -> bool:
        """Whether runtime or precision is chosen by measurement at the run's batch size."""
        return self.backend == "auto" or self.dtype == "auto"

    def check_device(self) -> None:
        """An absent ``--device`` fails here, before discovery and the model load."""
        if self.model is None or isinstance(self.model, (str, Path)):
            from radflash.devices import resolve_device

            resolve_device(self.device)

    def load(self, *, batch_size: int, on_ray: bool = False) -> RadFlashModel:
        """The model as a run uses it. ``auto`` runtime or precision is timed at ``batch_size``.

        ``on_ray``: the driver's copy only names the model (id, hash, size) and makes maps from the
        actors' tokens, on the CPU; the actors build their own from this spec.
        """
        from radflash.api import as_model

        measured = self.measured and not on_ray
        model = as_model(self.model, device="cpu" if on_ray else self.device,
                         dtype=None if measured or self.dtype == "auto" else self.dtype,
                         backend="eager" if measured or on_ray else self.backend)
        if measured:
            model.set_backend(self.backend, dtype=self.dtype, batch_size=batch_size)
        return model

    def named(self, loaded: RadFlashModel) -> Any:
        """How a manifest names the model: its path as given, or a loaded model's id."""
        return self.model if self.model is None or isinstance(self.model, (str, Path)) else loaded.model_id


@dataclass(frozen=True)
class SourceOptions:
    """Where the items come from: files and folders, one PACS query URL, or a ready ``Source``."""

    inputs: Any = None  # None: the embedded demo archive
    num_parts: int = 1
    part_id: int = 0
    auth: Any = None  # radflash.io.dicomweb.Auth for dicomweb+http(s):// inputs

    def check(self) -> None:
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise InputError(f"part_id must be in [0, num_parts): got part {self.part_id} of {self.num_parts}")

    def open(self) -> tuple[Source, bool]:
        """The :class:`radflash.io.source.Source` and whether it is the embedded demo archive."""
        from radflash.archive.sources import open_source

        return open_source(self.inputs, num_parts=self.num_parts, part_id=self.part_id, auth=self.auth)


@dataclass(frozen=True)
class DecodeOptions:
    """How items are read, selected and decoded, and how long any of it may take."""

    workers: int | None = None  # decode processes; 0 in-process; None: decode_pool.default_workers()
    timeout: float | None = 120.0  # s one file may take to decode
    stall_after: float | None = None  # s without a finished step; None: radflash.util.watchdog.stall_limit
    rules: SelectionRules | None = None  # None: the default chest CR/DX rules
    max_pixels: int | None = None  # overrides the rules' pixel budget
    fast_decode: bool = False  # decode JPEG 2000 / 8-bit JPEG only at the resolution the model needs

    def check(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise InputError(f"workers must be ≥ 0, got {self.workers}")

    def selection(self) -> SelectionRules:
        """The selection rules with the pixel budget applied."""
        from radflash.io.selection import SelectionRules

        rules = self.rules or SelectionRules()
        return rules if self.max_pixels is None else dataclasses.replace(rules, max_pixels=self.max_pixels)

    def stall_limit(self) -> float:
        """Seconds without a finished step before the run stops (radflash.util.watchdog)."""
        from radflash.util.watchdog import stall_limit

        return stall_limit(self.timeout, self.stall_after)

    def processes(self) -> int:
        from radflash.archive.decode_pool import default_workers

        return default_workers() if self.workers is None else self.workers


@dataclass(frozen=True)
class OutputOptions:
    """Where and how results are kept: a folder of committed parts (resumable) or memory."""

    output: Path | None = None
    fmt: str = "parquet"
    include_phi: bool = False
    resume: bool = False
    commit_every: int = 256  # files per committed part: the most work a crash can lose

    def check(self) -> None:
        from radflash.archive.sinks import FORMATS

        if self.fmt not in FORMATS:
            raise InputError(f"unknown format {self.fmt!r}; choose from {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ScoreOptions:
    """Everything :func:`radflash.archive.verb.score` takes, grouped by the stage that uses it."""

    source: SourceOptions = field(default_factory=SourceOptions)
    model: ModelSpec = field(default_factory=ModelSpec)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    findings: str | Path | Mapping[str, Any] | Sequence[str] | None = None
    batch_size: int = 16
    store: str | None = None  # results back to a PACS: dicomweb+http(s)://…, dimse://…, or "same"
    ray: RayOptions | None = None
    progress: bool = True
    observer: BatchObserver | None = None

    @classmethod
    def from_flat(cls, inputs: Any = None, output: str | Path | None = None, *, model: Any = None,
                  findings: Any = None, device: str = "auto", dtype: str | None = None, batch_size: int = 16,
                  workers: int | None = None, backend: str | None = None, fmt: str = "parquet",
                  include_phi: bool = False, resume: bool = False, num_parts: int = 1, part_id: int = 0,
                  rules: SelectionRules | None = None, progress: bool = True, commit_every: int = 256,
                  timeout: float | None = 120.0, stall_after: float | None = None, max_pixels: int | None = None,
                  fast_decode: bool = False, auth: Any = None, stow: str | None = None,
                  ray: RayOptions | None = None, observer: BatchObserver | None = None) -> ScoreOptions:
        """The groups from ``score``'s keyword arguments (the flat form callers and the CLI use)."""
        return cls(
            source=SourceOptions(inputs, num_parts, part_id, auth),
            model=ModelSpec(model, device, dtype, backend),
            decode=DecodeOptions(workers, timeout, stall_after, rules, max_pixels, fast_decode),
            output=OutputOptions(None if output is None else Path(output), fmt, include_phi, resume, commit_every),
            findings=findings, batch_size=batch_size, store=stow, ray=ray, progress=progress, observer=observer)

    def check(self) -> None:
        """One-line errors for bad values, before anything slow (findings, model, discovery)."""
        self.output.check()
        if self.batch_size < 1:
            raise InputError(f"batch_size must be ≥ 1, got {self.batch_size}")
        self.source.check()
        self.decode.check()

    def manifest_args(self, described: Mapping[str, Any], loaded: RadFlashModel) -> dict[str, Any]:
        """The run's arguments as the manifest records them (a resumed run is checked against them)."""
        from radflash.io.source import path_text

        out, m, d, o = self.output.output, self.model, self.decode, self.output
        rules = d.selection()
        return {
            "inputs": described.get("inputs"), "output": None if out is None else path_text(out),
            "model": m.named(loaded),
            "findings": self.findings if self.findings is None or isinstance(self.findings, (str, Path))
            else "<in memory>",
            "device": m.device, "dtype": m.dtype, "batch_size": self.batch_size, "workers": d.workers,
            "backend": m.backend, "format": o.fmt, "include_phi": o.include_phi, "resume": o.resume,
            "num_parts": self.source.num_parts, "part_id": self.source.part_id, "commit_every": o.commit_every,
            "timeout": d.timeout,
            "rules": dataclasses.asdict(rules) if dataclasses.is_dataclass(rules) else repr(rules),
        }
