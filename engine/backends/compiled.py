"""``torch.compile`` of the image tower; on CUDA also CUDA graphs, one per batch bucket.

Shapes are static per bucket (``dynamic=False``): inductor specialises the GEMMs and, on CUDA,
``mode="reduce-overhead"`` records one CUDA graph per bucket, which removes the ~30 kernel
launches per layer that dominate batch-1 latency. Batches are padded to the next bucket and
sliced back (:mod:`radflash.backends.buckets`), so at most ``len(buckets)`` graphs are compiled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from radflash.backends.buckets import DEFAULT_BUCKETS, check_buckets, run_bucketed
from radflash.backends.eager import checked_precision, image_tower
from radflash.devices import PRECISION_DTYPES
from radflash.errors import InputError

if TYPE_CHECKING:
    from radflash.api import RadFlashModel

log = logging.getLogger("radflash.backends")


class CompiledBackend:
    name = "compile"

    def __init__(self, model: RadFlashModel, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 mode: str | None = None, cuda_graphs: bool | None = None, precision: str | None = None) -> None:
        """``mode`` defaults to ``reduce-overhead`` (CUDA graphs) on CUDA and inductor's default on CPU;
        ``cuda_graphs=False`` on CUDA compiles without graphs (``max-autotune-no-cudagraphs`` is another choice).
        ``precision`` (default: the model's): a float precision other than the module's compiles a copy
        of the image tower in it (:func:`radflash.backends.eager.image_tower`).
        """
        self.precision = checked_precision(model, precision, self.name)
        self.dtype = PRECISION_DTYPES[self.precision]
        self.out_dtype = model.dtype
        self.module = model.module if self.dtype == model.dtype else image_tower(model.module, self.dtype)
        self.device = model.device
        self.buckets = check_buckets(buckets)
        on_cuda = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise InputError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = cuda_graphs
        self.mode = mode if mode is not None else ("reduce-overhead" if cuda_graphs else None)
        # one compiled entry per bucket shape; the default recompile limit (8) must cover them all
        limit = len(self.buckets) + 1
        if torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit
        self._fn = torch.compile(self.module.image_tokens, mode=self.mode, dynamic=False, fullgraph=True)
        log.info("compile backend: mode=%s, buckets=%s, device=%s", self.mode, self.buckets, self.device)

    def _call(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # previous outputs were cloned: graph memory is free
        return self._fn(chunk)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=self.device, dtype=self.dtype).contiguous()
        # CUDA-graph outputs live in the graph's static pool and are overwritten by the next replay
        return run_bucketed(self._call, pixels, self.buckets, clone=self.cuda_graphs).to(self.out_dtype)

    @torch.inference_mode()
    def warmup(self, buckets: Sequence[int] | None = None, image_size: int | None = None) -> None:
        """Compile (and record graphs for) ``buckets`` now instead of on first use."""
        size = image_size or self.module.cfg.image_size
        for b in buckets or self.buckets:
            x = torch.zeros(b, 3, size, size, device=self.device, dtype=self.dtype)
            for _ in range(3 if self.cuda_graphs else 1):  # cudagraph trees record on the 2nd/3rd call
                self.encode(x)
