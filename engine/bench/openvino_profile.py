"""Where an OpenVINO encoder's time goes, from the CPU plugin's own per-node counters.

A whole-tower fraction of the GEMM rate mixes three things: how fast the GEMMs run, how much time
attention takes, and everything else (norms, GELU, reorders, quantise/dequantise). To say which
one holds a row back, :func:`profile` recompiles the backend's IR with ``PERF_COUNT`` (same
properties otherwise), runs it, and groups the nodes' real times:

- ``weight GEMMs``: FullyConnected (int8 or not), MatMul and the patch Convolution, whose FLOPs are
  :func:`radflash.bench.harness.encoder_flops` minus the attention part;
- ``attention``: the ScaledDotProductAttention nodes, which the CPU plugin decomposes and fuses into an
  MHA ``Subgraph`` named after whichever of its nodes came last (found by its inputs instead:
  :func:`attention_nodes`), FLOPs :func:`radflash.bench.harness.encoder_attention_flops`;
- ``other``: every other node (no FLOPs counted).

Each group's achieved rate can then be set against the GEMM rate of its precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from radflash.backends.openvino import OpenVINOBackend

GEMM_NODES = frozenset({"FullyConnected", "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized", "MatMul",
                        "Convolution"})
GROUPS = ("weight GEMMs", "attention", "other")


@dataclass(frozen=True)
class Group:
    name: str
    seconds: float  # per batch
    share: float  # of the counted time
    flops: float | None  # per batch; None for "other"

    @property
    def rate(self) -> float | None:
        return None if not self.flops or self.seconds <= 0 else self.flops / self.seconds


def is_attention(layer_type: str, input_shapes: list[list[int]]) -> bool:
    """An SDPA node, or a fused Subgraph taking Q (…, h, n, d), K and V per head: the plugin's MHA kernel.

    K arrives as Kᵀ (…, d, n) when the kernel multiplies in float and as (…, n, d) when the whole of
    attention is int8 (the transpose folds into the kernel's int8 repacking). Nothing else in these
    towers fuses three per-head (4-D) tensors: element-wise Subgraphs work on the (…, n, h·d) token rows.
    Where the plugin does not fuse attention (an INT8 IR on an AVX2-only Zen 3: no MHA kernel for it),
    attention is its per-head MatMuls and Softmax, the only ones on 4-D operands (weight GEMMs are
    FullyConnected on token rows).
    """
    if layer_type == "ScaledDotProductAttention":
        return True
    if layer_type in ("MatMul", "Softmax"):  # unfused: Q·Kᵀ, softmax and P·V per head (4-D), as run without AVX-512
        return len(input_shapes) > 0 and all(len(s) == 4 for s in input_shapes[:2])
    if layer_type != "Subgraph" or len(input_shapes) < 3 or any(len(s) != 4 for s in input_shapes[:3]):
        return False
    q, k = input_shapes[0], input_shapes[1]
    return q[-1] != q[-2] and k[-2:] in (q[-2:], q[-2:][::-1])


def attention_nodes(compiled: Any) -> set[str]:
    """Names of the compiled model's attention nodes (:func:`is_attention`), as its counters name them."""
    names = set()
    for op in compiled.get_runtime_model().get_ops():
        layer_type = op.get_rt_info()["layerType"].astype(str)
        shapes = [[d.get_length() if d.is_static else -1 for d in op.input_value(i).get_partial_shape()]
                  for i in range(op.get_input_size())]
        if is_attention(layer_type, shapes):
            names.add(op.get_friendly_name())
    return names


def group_times(rows: list[tuple[str, str, float]], attention: set[str]) -> dict[str, float]:
    """Seconds per group from ``(node type, node name, seconds)`` rows (an executed node's counters)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for node_type, node_name, seconds in rows:
        group = "attention" if node_name in attention else "weight GEMMs" if node_type in GEMM_NODES else "other"
        out[group] += seconds
    return out


def profile(backend: OpenVINOBackend, pixels: torch.Tensor, *, flops: Mapping[str, float], runs: int = 3,
            ov: Any = None) -> list[Group]:
    """The groups' times for one batch of ``pixels`` (the run with the least counted time of ``runs``, after
    one warm-up), with ``flops`` per image by group (``weight GEMMs``, ``attention``).

    Compiled with the backend's properties but the ``LATENCY`` hint: the counters are one request's, and
    under ``THROUGHPUT`` one request runs on one stream's share of the threads (a batch job splits its
    batch over the streams), so its rates would be that share's."""
    from radflash.backends.openvino import import_openvino

    ov = ov or import_openvino()
    config = {**backend.config, "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(str(backend.ir_path), "CPU", config)
    attention = attention_nodes(compiled)
    request = compiled.create_infer_request()
    x = pixels.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    request.infer({0: x})
    best: dict[str, float] | None = None
    for _ in range(max(1, runs)):
        request.infer({0: x})
        rows = [(p.node_type, p.node_name, p.real_time.total_seconds()) for p in request.profiling_info]
        times = group_times(rows, attention)
        if best is None or sum(times.values()) < sum(best.values()):
            best = times
    total = sum(best.values()) or 1.0
    b = x.shape[0]
    return [Group(name, best[name], best[name] / total, flops[name] * b if name in flops else None)
            for name in GROUPS]
