"""pytest-benchmark suites for the CPU paths: head and maps (the ``_ref`` functions, which ARE the
CPU implementation), preprocessing and DICOM decode. Shapes: ``cpu_shapes.py``.

    python -m pytest benchmarks --benchmark-enable [--results-md benchmarks/results/cpu_paths.md]

Bytes/FLOP per call (the throughput column):
    head:       bytes = B·N·D·e + T·D·e + B·T·4 [+ B·T·(N−1)·e with maps];  FLOP = 4·B·T·N·D
    maps:       bytes = B·T·h·w·e_s + B·T·H·W·e_out  (e_out = 2 for fp16 probs, 1 for uint8 masks, 3 for both)
    preprocess: bytes = B·H·W·4 (read float32 pixels) + B·3·S·S·4 (write the normalised batch)
    decode:     pixels = H·W per file (reported as pixels/s)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cpu_shapes import DECODE_CPU, HEAD_CPU, MAPS_CPU, PREPROCESS_CPU

from radflash.kernels import upsample_maps_ref, vlcabs_ref
from radflash.preprocess import Preprocessing, preprocess

TAU = 0.07
ROUNDS = {"rounds": 5, "iterations": 1, "warmup_rounds": 1}  # 2 shared cores: keep every suite short


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("s", HEAD_CPU, ids=lambda s: s.name)
def test_head_ref(benchmark, record, s) -> None:
    dtype = getattr(torch, s.dtype)
    tokens = torch.randn(s.b, s.n, s.d, dtype=dtype)
    text = torch.randn(s.t, s.d, dtype=dtype)
    ln = {"ln_weight": torch.ones(s.d), "ln_bias": torch.zeros(s.d)} if s.fused_ln else {}
    logits, _ = benchmark.pedantic(lambda: vlcabs_ref(tokens, text, TAU, **ln, return_maps=s.return_maps), **ROUNDS)
    assert logits.shape == (s.b, s.t) and torch.isfinite(logits).all()
    e = tokens.element_size()
    nbytes = s.b * s.n * s.d * e + s.t * s.d * e + s.b * s.t * 4 + (s.b * s.t * (s.n - 1) * e if s.return_maps else 0)
    record(s.name, nbytes, "B", f"{4 * s.b * s.t * s.n * s.d / 1e9:.3g} GFLOP, bytes formula in module docstring")


@pytest.mark.parametrize("s", MAPS_CPU, ids=lambda s: s.name)
def test_maps_ref(benchmark, record, s) -> None:
    sim = torch.randn(s.b, s.t, *s.grid, dtype=getattr(torch, s.sim_dtype)) * 3
    out = benchmark.pedantic(lambda: upsample_maps_ref(sim, s.size, output=s.output,
                                                       prob_dtype=getattr(torch, s.prob_dtype)), **ROUNDS)
    assert out.peak.shape[:2] == (s.b, s.t)
    e_prob = getattr(torch, s.prob_dtype).itemsize
    e_out = {"mask": 1, "both": e_prob + 1}.get(s.output, e_prob)
    nbytes = sim.numel() * sim.element_size() + s.b * s.t * math.prod(s.size) * e_out
    record(s.name, nbytes, "B", "B·T·h·w·e_s + B·T·H·W·e_out")


@pytest.mark.parametrize("s", PREPROCESS_CPU, ids=lambda s: s.name)
def test_preprocess(benchmark, record, s) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((s.h, s.w), dtype=np.float32) for _ in range(s.b)]
    spec = Preprocessing(s.s, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = benchmark.pedantic(lambda: preprocess(images, spec), **ROUNDS)
    assert out.shape == (s.b, 3, s.s, s.s)
    record(s.name, s.b * s.h * s.w * 4 + s.b * 3 * s.s * s.s * 4, "B", "B·H·W·4 + B·3·S·S·4")


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory: pytest.TempPathFactory):
    phantom_dicom = pytest.importorskip("radflash.synthetic.dicom_archive")
    from radflash.training.phantoms import generate_phantom

    root = tmp_path_factory.mktemp("dicom")
    files = {}
    for i, s in enumerate(DECODE_CPU):
        if s.jpeg2000 and not phantom_dicom.jpeg2000_available():
            continue
        image = generate_phantom(i, s.size).image
        files[s] = phantom_dicom.write_dicom(image, root / f"{i}.dcm", photometric=s.photometric,
                                             bits_stored=s.bits, jpeg2000=s.jpeg2000, seed=i)
    return files


@pytest.mark.parametrize("s", DECODE_CPU, ids=lambda s: s.name)
def test_dicom_decode(benchmark, record, dicom_files, s) -> None:
    if s not in dicom_files:
        pytest.skip("JPEG 2000 encoder not installed (pip install pylibjpeg-openjpeg)")
    from radflash.io.imageio import load_image

    img = benchmark.pedantic(lambda: load_image(dicom_files[s]), **ROUNDS)
    assert img.pixels.shape == (s.size, s.size)
    record(s.name, s.size * s.size, "pixel", "H·W per file")
