"""Attention's two activation products in INT8 for OpenVINO, kept only where they pay.

NNCF's transformer recipe quantises Q and K of each attention but leaves softmax·V in float, so
the CPU plugin's fused attention kernel (a Snippets MHA ``Subgraph``) multiplies P·V in bf16 or
f32: on a Zen 4 with VNNI that made attention 35% of the base tower's time at the bf16 rate while
its weight GEMMs ran at the int8 rate. The plugin runs the whole kernel in int8 once P and V also
arrive through FakeQuantize nodes it can fold (P unsigned on [0, max], V signed and symmetric),
which NNCF never inserts for SDPA. This module inserts them, from ranges calibrated on the same
images as NNCF's:

- :func:`decompose`: each ``ScaledDotProductAttention`` into MatMul(Q, Kᵀ)·scale → Softmax →
  MatMul(·, V), before NNCF (which then quantises Q and K as it did the SDPA's inputs);
- :func:`ranges`: per attention, the largest softmax probability and the largest |V| seen on the
  calibration images, reduced inside the graph (a 518² base tower's probabilities are 90 MB per
  layer per image);
- :func:`quantize_products`: the FakeQuantize pair on each attention's P and V;
- :func:`share_qkv_range`: then Q, K and V quantised once, on the QKV projection's output.

Whether the result is used is measured, not assumed (:func:`choose`): it must agree with float32
within the same bound ``auto`` applies, and be faster than NNCF's own IR on the machine
that quantises (a CPU without int8 kernels for the fused attention would run the new nodes as
extra work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVELS = 256


@dataclass(frozen=True)
class Variant:
    """One INT8 IR the quantiser made, compiled one way: how far it is from float32 and how fast it ran."""

    attention: str  # "float": NNCF's own (Q·Kᵀ int8, P·V float); "int8": P·V too; "int8-shared": and one QKV range
    max_abs_dprob: float
    seconds: float  # fastest of a few interleaved calls on one held-out image, on this machine
    rest: str = "bf16"  # what its unquantised ops ran in (the CPU plugin's INFERENCE_PRECISION_HINT): bf16 or f32


def _ops() -> Any:
    import openvino.opset13 as ops

    return ops


def _sdpa_nodes(model: Any) -> list[Any]:
    """The SDPA nodes :func:`decompose` can rewrite: Q, K, V only (no mask, no explicit scale), not causal."""
    return [op for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"
            and op.get_input_size() == 3 and not op.get_attributes().get("causal", False)]


def decompose(model: Any) -> int:
    """Rewrite each plain SDPA of ``model`` (in place) as MatMul–Softmax–MatMul; returns how many.

    The scale is SDPA's default, 1/√d with d the head size (Q's last dimension), applied to the
    scores as the CPU plugin's own decomposition does.
    """
    ops = _ops()
    nodes = _sdpa_nodes(model)
    for op in nodes:
        q, k, v = (op.input_value(i) for i in range(3))
        head = q.get_partial_shape()[-1].get_length()
        scores = ops.multiply(ops.matmul(q, k, False, True), ops.constant(np.float32(1 / np.sqrt(head))))
        out = ops.matmul(ops.softmax(scores, -1), v, False, False)
        op.output(0).replace(out.output(0))
    model.validate_nodes_and_infer_types()
    return len(nodes)


def _products(model: Any) -> list[tuple[Any, Any]]:
    """Each attention's (softmax node, P·V MatMul node), in graph order."""
    pairs = []
    for op in model.get_ops():
        if op.get_type_name() != "Softmax":
            continue
        users = [i.get_node() for i in op.output(0).get_target_inputs()]
        if len(users) == 1 and users[0].get_type_name() == "MatMul":
            pairs.append((op, users[0]))
    return pairs


def ranges(model: Any, batches: Sequence[np.ndarray], ov: Any) -> list[tuple[float, float]]:
    """Per attention of the float ``model`` (decomposed): (max probability, max |V|) over ``batches``."""
    probe = model.clone()
    outputs = []
    for softmax, matmul in _products(probe):
        outputs += [_max(softmax.output(0)), _max(matmul.input_value(1), absolute=True)]
    if not outputs:
        return []
    first = len(probe.outputs)
    probe.add_outputs(outputs)
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    best = np.zeros(len(outputs))
    for batch in batches:
        result = compiled(batch)
        best = np.maximum(best, [float(result[first + i]) for i in range(len(outputs))])
    return [(float(best[i]), float(best[i + 1])) for i in range(0, len(outputs), 2)]


def _max(x: Any, *, absolute: bool = False) -> Any:
    """A scalar output: the largest (absolute) value of ``x`` over all its axes."""
    ops = _ops()
    axes = ops.constant(np.arange(len(x.get_partial_shape()), dtype=np.int64))
    return ops.reduce_max(ops.abs(x) if absolute else x, axes, False).output(0)


def quantize_products(model: Any, bounds: Sequence[tuple[float, float]]) -> int:
    """Insert FakeQuantize on each attention's P (u8 on [0, max]) and V (i8, symmetric) of ``model`` (in place).

    The signed range is [−a, a·127/128]: the form the plugin's low-precision pass reads as i8 with a
    zero point of 0 (a symmetric [−a, a] would need a shift and stays float).
    """
    pairs = _products(model)
    if len(pairs) != len(bounds):
        raise ValueError(f"{len(pairs)} attentions in the model but {len(bounds)} calibrated ranges")
    for (softmax, matmul), (pmax, vmax) in zip(pairs, bounds, strict=True):
        vmax = max(vmax, 1e-6)
        matmul.input(0).replace_source_output(_fake_quantize(softmax.output(0), 0.0, max(pmax, 1e-6)).output(0))
        matmul.input(1).replace_source_output(_fake_quantize(matmul.input_value(1), -vmax, vmax * 127 / 128).output(0))
    model.validate_nodes_and_infer_types()
    return len(pairs)


def _fake_quantize(x: Any, low: float, high: float) -> Any:
    """An 8-bit FakeQuantize of ``x`` on [low, high], the same range in and out (what NNCF writes)."""
    ops = _ops()
    lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
    return ops.fake_quantize(x, lo, hi, lo, hi, LEVELS)


def share_qkv_range(model: Any) -> int:
    """Quantise Q, K and V once, on the fused QKV projection's output, with one range (in place); returns how
    many attentions changed.

    After :func:`quantize_products` each head's Q, K and V pass through their own FakeQuantize after the
    projection's output is split into heads (Reshape → Transpose → Slice → Squeeze). The CPU plugin runs
    those three in f32 with a layout reorder each, and moves the heads in float. One FakeQuantize on the
    projection's output instead fuses into the projection GEMM (it writes int8), and the head split moves
    int8. Its range must be one per-tensor range for the three (the covering one, in the signed symmetric
    form): the attention kernel's dequantisation takes a single scale per operand, and a per-channel range
    made the plugin fall back to bf16 attention. Coarser steps for the operand with the smaller range:
    :func:`choose` decides by measured agreement.
    """
    groups: dict[str, tuple[Any, dict[int, Any]]] = {}
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize" and (split := _head_split(op)) is not None:
            groups.setdefault(split[0].get_friendly_name(), (split[0], {}))[1][split[1]] = op
    changed = 0
    for reshape, fqs in groups.values():
        bounds = [_range(fq) for fq in fqs.values()]
        source = reshape.input_value(0)
        if (sorted(fqs) != [0, 1, 2] or None in bounds or len({fq.get_levels() for fq in fqs.values()}) != 1
                or len(source.get_target_inputs()) != 1):
            continue
        a = max(max(-low, high * 128 / 127) for low, high in bounds)  # type: ignore[misc]
        reshape.input(0).replace_source_output(_fake_quantize(source, -a, a * 127 / 128).output(0))
        for fq in fqs.values():
            fq.output(0).replace(fq.input_value(0))
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed


def _head_split(fq: Any) -> tuple[Any, int] | None:
    """(the Reshape, which of Q/K/V) when ``fq`` quantises one third of a fused QKV projection split into heads:
    FakeQuantize ← Squeeze ← Slice (one index of the leading axis) ← Transpose ← Reshape (…, 3, heads, d)."""
    nodes, node = [], fq
    for kind in ("Squeeze", "Slice", "Transpose", "Reshape"):
        node = node.input_value(0).get_node()
        if node.get_type_name() != kind:
            return None
        nodes.append(node)
    slice_, reshape = nodes[1], nodes[3]
    shape = reshape.get_output_partial_shape(0)
    if shape.rank.get_length() != 5 or shape[2].get_length() != 3 or slice_.get_input_size() < 3:
        return None
    start = slice_.input_value(1).get_node()
    if start.get_type_name() != "Constant" or start.get_data().size != 1:
        return None
    return reshape, int(start.get_data().ravel()[0])


def _range(fq: Any) -> tuple[float, float] | None:
    """A FakeQuantize's (low, high) when it is per-tensor with equal input and output ranges, else None."""
    values = [fq.input_value(i).get_node() for i in range(1, 5)]
    if any(v.get_type_name() != "Constant" or v.get_data().size != 1 for v in values):
        return None
    low, high, out_low, out_high = (float(v.get_data().ravel()[0]) for v in values)
    return (low, high) if (low, high) == (out_low, out_high) else None


def choose(variants: Sequence[Variant], bound: float) -> Variant:
    """The fastest variant within ``bound`` (max |Δprob| against float32); NNCF's own when none is."""
    passing = [v for v in variants if v.max_abs_dprob <= bound]
    if not passing:
        return next(v for v in variants if v.attention == "float")
    return min(passing, key=lambda v: v.seconds)
