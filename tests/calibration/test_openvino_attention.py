"""Attention's P·V in INT8 for OpenVINO: the SDPA rewrite keeps the tower's output, the calibrated ranges are
the activations' real maxima, the inserted FakeQuantize nodes carry them, and the faster passing IR is kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from radflash.api import RadFlashModel
from radflash.checkpoints.factory import random_checkpoint
from radflash.models.config import preset

pytest.importorskip("openvino")

FAMILIES = {"radzero": ("tiny", 56), "carzero": ("carzero-tiny", 64)}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(family: str) -> RadFlashModel:
    name, size = FAMILIES[family]
    cfg = dataclasses.replace(preset(name), image_size=size)
    return RadFlashModel(random_checkpoint(cfg, seed=int(torch.randint(0, 2**31, ()))), device="cpu")


def _float_ir(model: RadFlashModel):
    from radflash.backends.openvino import import_openvino, load_ir

    ov = import_openvino()
    return ov, ov.Core().read_model(str(load_ir(model, ov)))


def _run(ov, ir, pixels: torch.Tensor) -> list[np.ndarray]:
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(pixels.numpy())
    return [result[i] for i in range(len(compiled.outputs))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decompose_keeps_the_towers_output(family: str, cache: Path) -> None:
    from radflash.backends.openvino import float_attention_share
    from radflash.calibration.openvino_attention import decompose

    model = _model(family)
    ov, ir = _float_ir(model)
    layers = model.config.vision.layers + model.config.align_layers
    assert decompose(ir) == layers
    assert not [op for op in ir.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert float_attention_share(ir) == 1.0  # no product quantised yet
    x = torch.randn(int(torch.randint(1, 4, ())), 3, model.config.image_size, model.config.image_size)
    with torch.inference_mode():
        ref = model.module.image_tokens(x).double()
    got = torch.from_numpy(_run(ov, ir, x)[0]).double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # float32 round-off through a few layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ranges_are_the_maxima_and_the_fake_quantize_nodes_carry_them(family: str, cache: Path) -> None:
    """ranges: each attention's max probability and max |V|; quantize_products puts them on P and V; then, after
    NNCF (Q, K), share_qkv_range quantises the QKV projection once with a range covering the three it replaces."""
    pytest.importorskip("nncf")
    from radflash.backends.openvino import float_attention_share
    from radflash.calibration.openvino_attention import (
        _head_split,
        _products,
        _range,
        decompose,
        quantize_products,
        ranges,
        share_qkv_range,
    )
    from radflash.calibration.quantize import nncf_quantize

    model = _model(family)
    ov, ir = _float_ir(model)
    n = decompose(ir)
    size = model.config.image_size
    batches = [torch.randn(1, 3, size, size) for _ in range(3)]
    bounds = ranges(ir, [b.numpy() for b in batches], ov)
    assert len(bounds) == n

    # the reference: each P and V as a whole tensor (model outputs, not the in-graph reduction), maxima in numpy
    probe = ir.clone()
    pairs = _products(probe)
    probe.add_outputs([out for s, m in pairs for out in (s.output(0), m.input_value(1))])
    want = np.zeros((n, 2))
    for b in batches:
        outs = _run(ov, probe, b)[1:]
        want = np.maximum(want, [[outs[2 * i].max(), np.abs(outs[2 * i + 1]).max()] for i in range(n)])
    tokens = (size // model.config.vision.patch) ** 2 + 1
    assert all(1 / tokens < p <= 1 for p, _ in bounds)
    np.testing.assert_allclose(np.array(bounds), want, rtol=1e-6)

    quantised = ir.clone()
    products = [matmul for _, matmul in _products(quantised)]
    assert quantize_products(quantised, bounds) == n
    assert float_attention_share(quantised) == 0.5  # P·V quantised, Q·Kᵀ left to NNCF
    for matmul, (pmax, vmax) in zip(products, bounds, strict=True):
        fq_p, fq_v = (matmul.input_value(i).get_node() for i in range(2))
        assert fq_p.get_type_name() == fq_v.get_type_name() == "FakeQuantize"
        lo_p, hi_p = (float(fq_p.input_value(i).get_node().get_data()) for i in (1, 2))
        lo_v, hi_v = (float(fq_v.input_value(i).get_node().get_data()) for i in (1, 2))
        assert (lo_p, hi_p) == pytest.approx((0.0, pmax)) and (lo_v, hi_v) == pytest.approx((-vmax, vmax * 127 / 128))
    x = batches[0]
    ref, got = (torch.from_numpy(_run(ov, m, x)[0]).double() for m in (ir, quantised))
    rel = float((got - ref).norm() / ref.norm())
    # 8-bit P and V (steps of max/255 and max/128) through a few layers: above float round-off, well below 5%
    assert 1e-5 < rel < 0.05, rel

    # NNCF quantises Q and K per head; with P and V that makes three per-head FakeQuantize nodes per attention
    per_head = nncf_quantize(ir, [b.numpy() for b in batches])
    quantize_products(per_head, bounds)
    before = {}  # reshape name → the per-head ranges of Q, K, V
    for op in per_head.get_ops():
        if op.get_type_name() == "FakeQuantize" and (split := _head_split(op)) is not None:
            before.setdefault(split[0].get_friendly_name(), []).append(_range(op))
    assert len(before) == n and all(len(r) == 3 for r in before.values())
    shared = per_head.clone()
    assert share_qkv_range(shared) == n
    assert not [op for op in shared.get_ops() if op.get_type_name() == "FakeQuantize" and _head_split(op)]
    assert float_attention_share(shared) == 0.0
    for op in shared.get_ops():
        if op.get_type_name() == "Reshape" and op.get_friendly_name() in before:
            low, high = _range(op.input_value(0).get_node())
            a = max(max(-lo, hi * 128 / 127) for lo, hi in before[op.get_friendly_name()])
            assert (low, high) == pytest.approx((-a, a * 127 / 128), rel=1e-6)
    ref, got = (torch.from_numpy(_run(ov, m, x)[0]).double() for m in (per_head, shared))
    # a coarser step for Q, K or V: 8-bit error (seen: 0.4–2.5% through the tiny towers), not a clipped range
    assert float((got - ref).norm() / ref.norm()) < 0.1


def test_choose_keeps_the_fastest_within_the_bound() -> None:
    from radflash.calibration.openvino_attention import Variant, choose

    fast, slow = (float(t) for t in torch.sort(torch.rand(2) + 0.1).values)
    int8, flt = Variant("int8", 0.005, fast), Variant("float", 0.004, slow)
    assert choose([flt, int8], 0.02) is int8
    assert choose([flt, dataclasses.replace(int8, seconds=2 * slow)], 0.02).attention == "float"  # slower: not kept
    assert choose([flt, dataclasses.replace(int8, max_abs_dprob=0.03)], 0.02) is flt  # outside the bound
    assert choose([dataclasses.replace(flt, max_abs_dprob=0.05)], 0.02).attention == "float"  # nothing passes
