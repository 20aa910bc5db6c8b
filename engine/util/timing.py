"""Timers and summaries for benchmarks: CUDA events on GPU, ``perf_counter`` on CPU.

GPU work is asynchronous, so a host clock around a launch measures the launch, not the work.
On CUDA every boundary is a ``torch.cuda.Event`` recorded on the current stream and the
iteration ends with one ``synchronize``; the segments between consecutive events partition
the iteration exactly. On CPU the same boundaries are ``time.perf_counter`` readings.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA. On CPU the peak resident set size
(``VmHWM``) is reset through ``/proc/self/clear_refs`` (Linux ≥ 4.0) so that each measured
block gets its own peak; where that is not possible the process-lifetime peak from
``resource.getrusage`` is reported and marked as such.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# Fewest samples for a tail percentile to mean anything: the q-th percentile of n samples has
# n·(1 − q/100) samples above it, so below 1/(1 − q/100) samples (20 for p95, 100 for p99) it is
# an interpolation between the two slowest runs, i.e. a relabelled maximum. Such values are left out.
MIN_SAMPLES = {95: 20, 99: 100}


def tail_percentile(samples: Sequence[float], q: int) -> float | None:
    """The ``q``-th percentile when ``len(samples)`` supports it (:data:`MIN_SAMPLES`), else ``None``."""
    return percentile(samples, q) if len(samples) >= MIN_SAMPLES[q] else None


@dataclass(frozen=True)
class Stats:
    """Summary of timed iterations, in milliseconds; ``p95_ms``/``p99_ms`` are ``None`` with too few samples."""

    n: int
    mean_ms: float
    median_ms: float
    p95_ms: float | None
    p99_ms: float | None
    min_ms: float
    max_ms: float
    samples_ms: tuple[float, ...]

    @classmethod
    def from_seconds(cls, samples_s: Sequence[float]) -> Stats:
        ms = [1e3 * s for s in samples_s]
        return cls(n=len(ms), mean_ms=sum(ms) / len(ms), median_ms=percentile(ms, 50),
                   p95_ms=tail_percentile(ms, 95), p99_ms=tail_percentile(ms, 99), min_ms=min(ms), max_ms=max(ms),
                   samples_ms=tuple(ms))

    def to_dict(self) -> dict:
        """JSON-ready; a percentile the sample count does not support is left out, not written as null/NaN."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["samples_ms"] = list(self.samples_ms)
        return d


def images_per_s(images: int, stats: Stats) -> float:
    """Throughput at the median latency: images / median seconds."""
    return images / (stats.median_ms / 1e3)


class StageClock:
    """Boundaries inside one timed iteration: ``start()``, ``mark(stage)`` after each stage, ``stop()``.

    ``stop()`` returns ``{stage: seconds, ..., "total": seconds}``; the stages are consecutive
    segments of the total, so their sum never exceeds it (on CPU the difference is loop overhead).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[str, object]] = []

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def stop(self) -> dict[str, float]:
        synchronize(self.device)
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            out[name] = out.get(name, 0.0) + self._elapsed(a, b)
        out["total"] = self._elapsed(self._marks[0][1], self._marks[-1][1])
        return out

    def _elapsed(self, a: object, b: object) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]  # events report ms
        return float(b) - float(a)  # type: ignore[arg-type]


def time_fn(fn: Callable[[], object], *, device: torch.device, iterations: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (warm-up calls excluded), synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    clock = StageClock(device)
    samples = []
    for _ in range(iterations):
        clock.start()
        fn()
        clock.mark("call")
        samples.append(clock.stop()["total"])
    return samples


# ---- memory ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPeak:
    cpu_peak_rss_mb: float | None
    cuda_max_allocated_mb: float | None
    rss_scope: str  # "block": reset before the block; "process": lifetime peak (reset unsupported)

    def to_dict(self) -> dict:
        return asdict(self)


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory block; returns whether the CPU RSS peak could be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device, *, reset_ok: bool) -> MemoryPeak:
    rss = _vm_hwm_mb() if reset_ok else None
    scope = "block" if rss is not None else "process"
    if rss is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return MemoryPeak(cpu_peak_rss_mb=rss, cuda_max_allocated_mb=cuda, rss_scope=scope)


# ---- physical limits --------------------------------------------------------------------------
@dataclass(frozen=True)
class Peaks:
    """Measured (not datasheet) rates on this machine: matmul FLOP/s and copy bytes/s."""

    matmul_flops_per_s: float
    matmul_dtype: str
    matmul_shape: int
    copy_bytes_per_s: float
    copy_mib: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_peaks(device: torch.device, dtype: torch.dtype, *, iterations: int = 5) -> Peaks:
    """Best-of-``iterations`` square matmul rate (2·n³ FLOP) and tensor-copy rate (2·bytes: read + write).

    Sizes are chosen to saturate each device quickly: n = 8192 / 1 GiB on CUDA, n = 1024 /
    64 MiB on CPU (≈ 0.1 s in all on two cores).
    """
    cuda = device.type == "cuda"
    n, mib = (8192, 1024) if cuda else (1024, 64)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = min(time_fn(lambda: a @ b, device=device, iterations=iterations, warmup=1))
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    cp = min(time_fn(lambda: dst.copy_(src), device=device, iterations=iterations, warmup=1))
    return Peaks(matmul_flops_per_s=2 * n**3 / mm, matmul_dtype=str(dtype).removeprefix("torch."), matmul_shape=n,
                 copy_bytes_per_s=2 * src.numel() * 4 / cp, copy_mib=mib)
