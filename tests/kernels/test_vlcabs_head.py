"""VL-CABS head: Triton kernel (forced, interpreted on CPU) and torch reference vs float64 spec formulas."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from radflash.kernels import _dispatch as dispatch
from radflash.kernels import set_kernel_backend, vlcabs, vlcabs_ref
from tests.references import head_f64
from tests.tolerances import normwise_error as rel_err
from tests.tolerances import tolerance

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors: see tests/conftest.py
vl_mod = importlib.import_module("radflash.kernels.vlcabs_head")  # the module, not the function of that name

TAU = 0.07


def head_tols(dtype: torch.dtype, n: int, d: int) -> tuple[float, float]:
    """Normwise error bounds vs float64 for (logits, maps), derived from the formats.

    The inputs are already in ``dtype`` (the reference sees the same rounded values); the head
    accumulates in float32 over its longest reduction (N tokens or D channels), so logits get a
    float32 bound; maps are then stored in ``dtype`` and add its rounding (the interpreter's bf16
    store may truncate instead of rounding: one ulp = 2u, inside the safety factor).
    """
    terms = max(n, d)
    return (tolerance(torch.float32, terms=terms).rtol,
            tolerance(dtype, terms=terms, accumulate=torch.float32).rtol)


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails the test."""
    monkeypatch.setattr(vl_mod, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))


def make_inputs(b: int, n: int, d: int, t: int, dtype: torch.dtype, ln: bool):
    tokens = (torch.randn(b, n, d) * 2 + 0.5).to(dtype)
    text = torch.randn(t, d).to(dtype)
    kw = {"ln_weight": 1 + 0.3 * torch.randn(d), "ln_bias": 0.2 * torch.randn(d)} if ln else {}
    return tokens, text, kw


def run_both(tokens, text, kw, return_maps=True):
    with set_kernel_backend("triton"):
        got = vlcabs(tokens, text, TAU, return_maps=return_maps, **kw)
    ref = vlcabs_ref(tokens, text, TAU, return_maps=return_maps, **kw)
    return got, ref


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("ln", [False, True], ids=["prenormed", "fused_ln"])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("t", [1, 3, 33])
@pytest.mark.parametrize("n", [5, 17, 1370])
def test_vlcabs_fp32(n: int, t: int, d: int, ln: bool) -> None:
    tokens, text, kw = make_inputs(2, n, d, t, torch.float32, ln)
    (logits, maps), (ref_logits, ref_maps) = run_both(tokens, text, kw)
    exp_logits, exp_maps, _ = head_f64(tokens, text, TAU, kw.get("ln_weight"), kw.get("ln_bias"))
    assert logits.shape == (2, t) and logits.dtype == torch.float32
    assert maps.shape == (2, t, n - 1) and maps.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(maps).all()
    tol_logits, tol_maps = head_tols(torch.float32, n, d)
    assert rel_err(logits, exp_logits) <= tol_logits
    assert rel_err(ref_logits, exp_logits) <= tol_logits
    if n > 1:
        assert rel_err(maps, exp_maps) <= tol_maps
        assert rel_err(ref_maps, exp_maps) <= tol_maps


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("ln", [False, True], ids=["prenormed", "fused_ln"])
@pytest.mark.parametrize(("n", "t"), [(17, 3), (1370, 33)])
def test_vlcabs_half(n: int, t: int, ln: bool, dtype: torch.dtype) -> None:
    tokens, text, kw = make_inputs(2, n, 64, t, dtype, ln)
    (logits, maps), (ref_logits, ref_maps) = run_both(tokens, text, kw)
    exp_logits, exp_maps, _ = head_f64(tokens, text, TAU, kw.get("ln_weight"), kw.get("ln_bias"))
    assert maps.dtype == dtype and torch.isfinite(maps.float()).all() and torch.isfinite(logits).all()
    # Inputs are already rounded to the half dtype; the head itself accumulates in fp32.
    tol_logits, tol_maps = head_tols(dtype, n, 64)
    assert rel_err(logits, exp_logits) <= tol_logits
    assert rel_err(ref_logits, exp_logits) <= tol_logits
    assert rel_err(maps, exp_maps) <= tol_maps
    assert rel_err(ref_maps, exp_maps) <= tol_maps


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("ln", [False, True], ids=["prenormed", "fused_ln"])
def test_vlcabs_no_maps_odd_width(ln: bool) -> None:
    """D = 48 pads to BLOCK_D = 64: the masked lanes must not leak into norms or LayerNorm stats."""
    tokens, text, kw = make_inputs(3, 17, 48, 5, torch.float32, ln)
    (logits, maps), (ref_logits, ref_maps) = run_both(tokens, text, kw, return_maps=False)
    assert maps is None and ref_maps is None
    exp_logits, *_ = head_f64(tokens, text, TAU, kw.get("ln_weight"), kw.get("ln_bias"))
    tol_logits, _ = head_tols(torch.float32, 17, 48)
    assert rel_err(logits, exp_logits) <= tol_logits
    assert rel_err(ref_logits, exp_logits) <= tol_logits


@pytest.mark.usefixtures("poisoned")
def test_vlcabs_many_prompts() -> None:
    """T > 2048 spans 129 prompt tiles; the last one is partial."""
    tokens, text, kw = make_inputs(1, 17, 32, 2049, torch.float32, True)
    (logits, maps), _ = run_both(tokens, text, kw)
    exp_logits, exp_maps, _ = head_f64(tokens, text, TAU, kw["ln_weight"], kw["ln_bias"])
    tol_logits, tol_maps = head_tols(torch.float32, 17, 32)
    assert rel_err(logits, exp_logits) <= tol_logits
    assert rel_err(maps, exp_maps) <= tol_maps


def test_vlcabs_strided_inputs() -> None:
    """Non-contiguous views (e.g. a token slice of a larger buffer) give the same result."""
    big = torch.randn(2, 20, 64)
    tokens = big[:, 3:, :32]
    text = torch.randn(32, 4).T
    with set_kernel_backend("triton"):
        logits, maps = vlcabs(tokens, text, TAU, return_maps=True)
    exp_logits, exp_maps, _ = head_f64(tokens, text, TAU)
    tol_logits, tol_maps = head_tols(torch.float32, 17, 32)
    assert rel_err(logits, exp_logits) <= tol_logits
    assert rel_err(maps, exp_maps) <= tol_maps


def test_vlcabs_rejects_bad_inputs() -> None:
    tokens, text = torch.randn(2, 5, 32), torch.randn(3, 32)
    with set_kernel_backend("triton"):
        with pytest.raises(ValueError, match="width"):
            vlcabs(tokens, torch.randn(3, 16), TAU)
        with pytest.raises(ValueError, match="both"):
            vlcabs(tokens, text, TAU, ln_weight=torch.ones(32))
        with pytest.raises(TypeError, match="float32"):
            vlcabs(tokens.double(), text.double(), TAU)
    with pytest.raises(ValueError, match="tau"):
        vlcabs_ref(tokens, text, 0.0)


def test_vlcabs_op_registration() -> None:
    """Fake kernel and schema agree with the real launcher, so torch.compile can trace the head."""
    tokens, text, kw = make_inputs(2, 17, 32, 3, torch.float32, True)
    for maps in (True, False):
        torch.library.opcheck(
            torch.ops.radflash.vlcabs.default,
            (tokens, text, TAU, kw["ln_weight"], kw["ln_bias"], 1e-5, maps),
            test_utils=("test_schema", "test_faketensor"),
        )
    with set_kernel_backend("triton"):
        compiled = torch.compile(lambda a, b: vlcabs(a, b, TAU, return_maps=True, **kw), backend="eager",
                                 fullgraph=True)
        logits, maps = compiled(tokens, text)
    exp_logits, *_ = head_f64(tokens, text, TAU, kw["ln_weight"], kw["ln_bias"])
    assert rel_err(logits, exp_logits) <= head_tols(torch.float32, 17, 32)[0] and maps.shape == (2, 3, 16)


# ------------------------------------------------------------------------------------------- dispatch


def test_dispatch_cpu_defaults_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(vl_mod, "_vlcabs_launch", lambda *a: pytest.fail("Triton launched for CPU tensors"))
    assert dispatch.kernel_backend() == "auto"
    assert not dispatch.use_triton(torch.zeros(1))
    logits, _ = vlcabs(torch.randn(1, 5, 32), torch.randn(2, 32), TAU)
    assert logits.shape == (1, 2)


def test_dispatch_env_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.use_triton(cpu)  # TRITON_INTERPRET=1 is set by conftest
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert not dispatch.use_triton(cpu)
    with set_kernel_backend("triton"):  # the explicit choice wins over the environment
        assert dispatch.kernel_backend() == "triton" and dispatch.use_triton(cpu)
        with set_kernel_backend("torch"):
            assert not dispatch.use_triton(cpu)
        assert dispatch.kernel_backend() == "triton"
    assert dispatch.kernel_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.kernel_backend()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_kernel_backend("fast")


def test_dispatch_forced_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with set_kernel_backend("triton"), pytest.raises(RuntimeError, match="CUDA"):
        dispatch.use_triton(torch.zeros(1))


def test_dispatch_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert not dispatch.use_triton(torch.zeros(1))
    with set_kernel_backend("triton"), pytest.raises(RuntimeError, match="pip install triton"):
        vlcabs(torch.randn(1, 5, 32), torch.randn(2, 32), TAU)


def test_import_without_triton() -> None:
    """Triton stays optional: with it unimportable, the package imports and the torch path works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from radflash.kernels import set_kernel_backend, vlcabs, upsample_maps\n"
        "logits, maps = vlcabs(torch.randn(1, 5, 8), torch.randn(2, 8), 0.07, return_maps=True)\n"
        "assert logits.shape == (1, 2) and maps.shape == (1, 2, 4)\n"
        "assert upsample_maps(maps.view(1, 2, 2, 2), (5, 3)).probs.shape == (1, 2, 5, 3)\n"
        "set_kernel_backend('triton')\n"
        "try:\n"
        "    vlcabs(torch.randn(1, 5, 8), torch.randn(2, 8), 0.07)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
