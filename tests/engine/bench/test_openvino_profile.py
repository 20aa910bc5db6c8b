"""Where an OpenVINO encoder's time goes: the CPU plugin's counters grouped into GEMMs, attention and the rest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from radflash.api import RadFlashModel
from radflash.bench.harness import encoder_attention_flops, encoder_flops
from radflash.bench.openvino_profile import GROUPS, attention_nodes, is_attention, profile
from radflash.checkpoints.factory import random_checkpoint
from radflash.models.config import preset

FAMILIES = {"radzero": ("tiny", 56), "carzero": ("carzero-tiny", 64)}


@pytest.mark.parametrize(("layer_type", "shapes", "expected"), [
    ("ScaledDotProductAttention", [[1, 12, 1370, 64]] * 3, True),
    ("Subgraph", [[-1, 12, 1370, 64], [-1, 12, 64, 1370], [-1, 12, 1370, 64]], True),  # MHA: Q, Kᵀ, V
    ("Subgraph", [[-1, 3, 17, 64], [-1, 3, 64, 17], [-1, 3, 17, 64]], True),
    ("Subgraph", [[-1, 12, 1370, 64]] * 3, True),  # int8 MHA: K not transposed, the kernel repacks it
    ("Subgraph", [[-1, 12, 64, 64]] * 3, False),  # element-wise on one shape (a square one: not a transposed pair)
    ("Subgraph", [[-1, 1370, 768], [-1, 1370, 768], [768]], False),  # a fused multiply-add
    ("FullyConnected", [[-1, 1370, 64], [64, 1370], [-1, 1370, 64]], False),
    ("MatMul", [[-1, 12, 1370, 1370], [-1, 12, 1370, 64]], True),  # unfused P·V (an INT8 IR on AVX2)
    ("Softmax", [[-1, 12, 1370, 1370]], True),
    ("MatMul", [[-1, 1370, 768], [768, 768]], False),  # a weight GEMM left as MatMul
    ("Softmax", [[-1, 1370, 768]], False),
])
def test_is_attention(layer_type: str, shapes: list[list[int]], expected: bool) -> None:
    assert is_attention(layer_type, shapes) is expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_finds_one_attention_per_layer_and_groups_every_node(family: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    from radflash.backends.openvino import OpenVINOBackend, import_openvino

    monkeypatch.setenv("RADFLASH_CACHE", str(tmp_path / "cache"))
    name, size = FAMILIES[family]
    cfg = dataclasses.replace(preset(name), image_size=size)
    model = RadFlashModel(random_checkpoint(cfg, seed=int(torch.randint(0, 2**31, ()))), device="cpu")
    backend = OpenVINOBackend(model, precision="fp32")
    assert backend.float_attention() == 1.0  # a float IR: every attention product in float
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(backend.ir_path), "CPU", backend.config)
    layers = cfg.vision.layers + cfg.align_layers  # one fused kernel per layer, or its two MatMuls and softmax
    assert len(attention_nodes(compiled)) in (layers, 3 * layers)

    b = int(torch.randint(1, 4, ()))
    attention = encoder_attention_flops(cfg, size)
    flops = {"weight GEMMs": encoder_flops(cfg, size) - attention, "attention": attention}
    groups = profile(backend, torch.randn(b, 3, size, size), flops=flops, runs=2)
    assert [g.name for g in groups] == list(GROUPS)
    assert sum(g.share for g in groups) == pytest.approx(1.0)
    by = {g.name: g for g in groups}
    assert by["weight GEMMs"].seconds > 0 and by["attention"].seconds > 0
    assert by["attention"].flops == b * attention and by["other"].flops is None and by["other"].rate is None
    assert by["weight GEMMs"].rate == pytest.approx(b * flops["weight GEMMs"] / by["weight GEMMs"].seconds)
