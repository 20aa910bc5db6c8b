"""Pad-and-slice to batch buckets: compiled graphs see a few fixed batch sizes only.

Compiled encoders (torch.compile with CUDA graphs, TensorRT profiles) are fastest on static
shapes, but callers send whatever batch they have (the score pipeline closes a batch after
``--batch-size`` images *or* a max-wait, so the last batch is usually short). Each call is padded
to the next bucket, run, and the outputs sliced back; batches larger than the biggest bucket are
split into chunks. Transformers never mix batch rows, so padding cannot change another image's
result beyond GEMM blocking noise (tested in ``tests/engine/backends/test_backends.py``).

Nothing here knows about :class:`radflash.archive.batching.Batcher`: it works on any tensor function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from radflash.errors import InputError

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise InputError(f"batch buckets must be positive integers, got {list(buckets)}")
    return out


def bucket_for(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket ≥ ``n`` (``n`` must not exceed the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise InputError(f"batch of {n} exceeds the largest bucket {max(buckets)}")


def plan(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[tuple[int, int, int]]:
    """Chunks ``(start, stop, bucket)`` covering ``n`` rows: full largest buckets, then one padded tail."""
    if n < 1:
        raise InputError("empty batch")
    top = max(buckets)
    chunks = []
    start = 0
    while n - start > top:
        chunks.append((start, start + top, top))
        start += top
    chunks.append((start, n, bucket_for(n - start, buckets)))
    return chunks


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero rows appended along dim 0 up to ``size`` (no copy when already that size)."""
    if x.shape[0] == size:
        return x
    if x.shape[0] > size:
        raise InputError(f"cannot pad a batch of {x.shape[0]} down to {size}")
    pad = x.new_zeros((size - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


def iter_bucketed(x: torch.Tensor, buckets: Sequence[int]) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(padded_chunk, real_rows)`` for each chunk of :func:`plan`."""
    for start, stop, bucket in plan(x.shape[0], buckets):
        yield pad_to(x[start:stop], bucket), stop - start


def run_bucketed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, *, clone: bool = False) -> torch.Tensor:
    """``fn`` applied to ``x`` through bucket-sized calls; rows of the result match rows of ``x``.

    ``clone=True`` copies each sliced output: needed when ``fn`` returns memory that its next call
    overwrites (CUDA-graph static outputs).
    """
    outs = []
    for chunk, real in iter_bucketed(x, buckets):
        y = fn(chunk)[:real]
        outs.append(y.clone() if clone else y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
