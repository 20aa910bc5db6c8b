"""Cross-attention: Triton kernel (forced, interpreted on CPU) and torch reference vs a float64 formula."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

from radflash.kernels import _dispatch as dispatch
from radflash.kernels import cross_attention, cross_attention_ref, set_kernel_backend
from tests.tolerances import Tol, tolerance

pytestmark = pytest.mark.interpreter  # Triton on CPU tensors: see tests/conftest.py
ca_mod = importlib.import_module("radflash.kernels.attention")  # the module, not the function

HALF = [torch.float16, torch.bfloat16]


def attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """softmax(q·kᵀ/√Dh)·v per (n, h) in float64, written out (max-shifted exp, explicit sums).

    Also returns the magnitudes the error bound needs: L = max Σ_d |q_d k_d| / √Dh (the size of the
    terms of one logit) and W = max Σ_k p_k |v_k| (the size of the terms of one output).
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True))
    p = e / e.sum(-1, keepdim=True)
    out = torch.einsum("nhqk,nkhd->nqhd", p, v)
    big_l = float(torch.einsum("nqhd,nkhd->nhqk", q.abs(), k.abs()).amax()) * scale
    big_w = float(torch.einsum("nhqk,nkhd->nqhd", p, v.abs()).amax())
    return out, big_l, big_w


def attention_tol(dtype: torch.dtype, n_keys: int, head_dim: int, big_l: float, big_w: float) -> Tol:
    """Elementwise bound vs float64, from the formats (the error model of tests/tolerances.py).

    fp32 arithmetic (every path): a logit is a Dh-term dot, off by ≈ u·√Dh·L; a logit error ε moves
    the output by at most 2ε·W; the weighted sum and its normaliser are K-term sums of terms of
    size W. So float32 with terms = max(K, Dh) and magnitude W·(1 + 2L). Half inputs are already
    rounded (the formula sees the same values); on top, the output is stored in the half dtype
    (relative u_h) and the kernel rounds each weight p to it once for the tensor-core dot (absolute
    u_h·Σ p|v| ≤ u_h·W, no growth with K): tolerance(dtype, magnitude=W).
    """
    acc = tolerance(torch.float32, terms=max(n_keys, head_dim), magnitude=big_w * (1 + 2 * big_l))
    if dtype == torch.float32:
        return acc
    rnd = tolerance(dtype, magnitude=big_w)
    return Tol(rtol=acc.rtol + rnd.rtol, atol=acc.atol + rnd.atol)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails; logs each launch."""
    log: list[tuple[int, ...]] = []

    def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        log.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ca_mod, "_alloc", alloc)
    return log


def make_qkv(n: int, nq: int, nk: int, h: int, dh: int, dtype: torch.dtype, q_scale: float = 1.0):
    q = (torch.randn(n, nq, h, dh) * q_scale).to(dtype)
    k = torch.randn(n, nk, h, dh).to(dtype)
    v = (torch.randn(n, nk, h, dh) + 0.3).to(dtype)  # an offset: outputs are not all near zero
    return q, k, v


def check_both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, launches: list) -> None:
    """The forced Triton path and the reference, each against the float64 formula."""
    with set_kernel_backend("triton"):
        got = cross_attention(q, k, v)
    assert launches, "the Triton launcher never ran"
    ref = cross_attention_ref(q, k, v)
    exp, big_l, big_w = attention_f64(q, k, v)
    n, nq, h, dh = q.shape
    for out in (got, ref):
        assert out.shape == (n, nq, h, dh) and out.dtype == q.dtype and out.is_contiguous()
        assert torch.isfinite(out.float()).all()
    tol = attention_tol(q.dtype, k.shape[1], dh, big_l, big_w)
    tol.assert_close(got, exp)
    tol.assert_close(ref, exp)


# (N, Q, K, H, Dh): odd sizes; partial query tiles (16) and key blocks (≤ 64); Dh pads to 16, 32, 256.
CASES = [
    (1, 1, 1, 1, 8),  # one key, one query
    (3, 5, 7, 4, 24),
    (1, 17, 98, 4, 24),  # t2i's key count: two key blocks, two query tiles
    (3, 5, 197, 1, 8),  # i2t's key count: four key blocks, the last holding 5 keys
    (1, 5, 98, 4, 192),  # the real head dim
]


def case_id(c: tuple[int, ...]) -> str:
    return "N{}Q{}K{}H{}D{}".format(*c)


@pytest.mark.parametrize(("n", "nq", "nk", "h", "dh"), CASES, ids=[case_id(c) for c in CASES])
def test_fp32(n: int, nq: int, nk: int, h: int, dh: int, launches: list) -> None:
    check_both(*make_qkv(n, nq, nk, h, dh, torch.float32), launches)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(("n", "nq", "nk", "h", "dh"), [CASES[i] for i in (1, 2, 4)],
                         ids=[case_id(CASES[i]) for i in (1, 2, 4)])
def test_half(n: int, nq: int, nk: int, h: int, dh: int, dtype: torch.dtype, launches: list) -> None:
    """Half inputs: the kernel accumulates in fp32 and the reference upcasts; both return the half dtype."""
    check_both(*make_qkv(n, nq, nk, h, dh, dtype), launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("nk", "dh"), [(98, 24), (197, 8)])
def test_large_logits(nk: int, dh: int, dtype: torch.dtype, launches: list) -> None:
    """Logits of ±100 and more: exp overflows float32 above 88.7, so only a max-shifted online softmax,
    rescaled whenever a later key block raises the running maximum, stays finite and right."""
    q, k, v = make_qkv(3, 5, nk, 2, dh, dtype, q_scale=40.0)
    s = torch.einsum("nqhd,nkhd->nhqk", q.double(), k.double()) / math.sqrt(dh)
    assert s.amax() > 89 and s.amin() < -89, "the test data must overflow an unshifted exp"
    check_both(q, k, v, launches)


def test_strided_views(launches: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Views of fused projections (the caller's layout), queries expanded over the batch (stride 0),
    a head-major transpose and a non-unit last stride all give the formula's result, and the launcher
    reads them in place (no copies)."""
    n, nq, nk, h, dh = 3, 5, 98, 2, 24
    qkv = torch.randn(n, nq, 3, h, dh)
    kv = torch.randn(n, nk, 2, h, dh)
    q, k, v = qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_both(q, k, v, launches)

    q_shared = torch.randn(1, nq, h, dh).expand(n, -1, -1, -1)  # one set of queries for every row: stride 0
    check_both(q_shared, k, v, launches)

    q_t = torch.randn(n, h, nq, dh).transpose(1, 2)  # (N, Q, H, Dh) view of a head-major tensor
    k_wide = torch.randn(n, nk, h, 2 * dh)[..., ::2]  # stride 2 along Dh
    v_off = torch.randn(n, nk + 3, h, dh)[:, 3:]  # a storage offset
    check_both(q_t, k_wide, v_off, launches)

    seen: list[int] = []
    real_kernel = ca_mod._cross_attention_kernel

    class Spy:  # records the data pointers the kernel is launched with
        def __getitem__(self, grid: tuple[int, ...]):
            def launch(*args: object, **kwargs: object) -> None:
                seen.extend(a.data_ptr() for a in args[:3])
                real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ca_mod, "_cross_attention_kernel", Spy())
    with set_kernel_backend("triton"):
        cross_attention(q, k, v)
    assert seen == [q.data_ptr(), k.data_ptr(), v.data_ptr()]


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 4, 8)
    with set_kernel_backend("triton"):
        with pytest.raises(ValueError, match="same shape"):
            cross_attention(q, k, k[:, :4])
        with pytest.raises(ValueError, match="agree"):
            cross_attention(q, k[:1], k[:1])
        with pytest.raises(ValueError, match="at least one key"):
            cross_attention(q, k[:, :0], k[:, :0])
        with pytest.raises(TypeError, match="float32"):
            cross_attention(q.double(), k.double(), k.double())
        with pytest.raises(TypeError, match="share one"):
            cross_attention(q, k.half(), k.half())
    with pytest.raises(ValueError, match="expected q"):
        cross_attention_ref(q[0], k, k)


def test_empty_batch(launches: list) -> None:
    """No rows or no queries: an empty output of the right shape, and no kernel launch needed."""
    for n, nq in ((0, 5), (2, 0)):
        q, k, v = make_qkv(n, nq, 7, 2, 8, torch.float32)
        with set_kernel_backend("triton"):
            out = cross_attention(q, k, v)
        assert out.shape == (n, nq, 2, 8) and cross_attention_ref(q, k, v).shape == (n, nq, 2, 8)


def test_op_registration() -> None:
    """Fake kernel and schema agree with the real launcher, so torch.compile can trace the decoder."""
    qkv = torch.randn(2, 5, 3, 2, 8)
    kv = torch.randn(2, 7, 2, 2, 8)
    torch.library.opcheck(
        torch.ops.radflash.cross_attention.default,
        (qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]),
        test_utils=("test_schema", "test_faketensor"),
    )
    with set_kernel_backend("triton"):
        compiled = torch.compile(lambda a, b: cross_attention(a[:, :, 0], b[:, :, 0], b[:, :, 1]), backend="eager",
                                 fullgraph=True)
        out = compiled(qkv, kv)
    exp, big_l, big_w = attention_f64(qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1])
    attention_tol(torch.float32, 7, 8, big_l, big_w).assert_close(out, exp)


# ------------------------------------------------------------------------------------------- dispatch


def test_dispatch_cpu_auto_uses_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(ca_mod, "_cross_attention_launch", lambda *a: pytest.fail("Triton launched for CPU tensors"))
    q, k, v = make_qkv(2, 3, 7, 2, 8, torch.float32)
    assert dispatch.kernel_backend() == "auto"
    assert torch.equal(cross_attention(q, k, v), cross_attention_ref(q, k, v))


def test_dispatch_torch_never_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """"torch" wins over the environment asking for Triton, and the environment's "torch" alone suffices."""
    monkeypatch.setattr(ca_mod, "_cross_attention_launch", lambda *a: pytest.fail("Triton launched under 'torch'"))
    q, k, v = make_qkv(2, 3, 7, 2, 8, torch.float32)
    expected = cross_attention_ref(q, k, v)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with set_kernel_backend("torch"):
        assert torch.equal(cross_attention(q, k, v), expected)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert torch.equal(cross_attention(q, k, v), expected)


_SUBPROCESS_CHECKS = {
    # Kernels decorated without the interpreter (as in production on a CPU-only host): "auto" runs
    # the reference, a forced "triton" on CPU tensors stops with the dispatcher's error, not a crash.
    "no_interpreter": (
        "import torch\n"
        "from radflash.kernels import cross_attention, set_kernel_backend\n"
        "q = torch.randn(1, 3, 2, 8); k = torch.randn(1, 5, 2, 8)\n"
        "assert cross_attention(q, k, k).shape == (1, 3, 2, 8)\n"
        "set_kernel_backend('triton')\n"
        "try:\n"
        "    cross_attention(q, k, k)\n"
        "except RuntimeError as e:\n"
        "    assert 'CUDA' in str(e) and 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    ),
    # Triton stays optional: unimportable, the module still imports and the torch path works.
    "no_triton": (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from radflash.kernels import cross_attention, set_kernel_backend\n"
        "q = torch.randn(1, 3, 2, 8); k = torch.randn(1, 5, 2, 8)\n"
        "assert cross_attention(q, k, k).shape == (1, 3, 2, 8)\n"
        "set_kernel_backend('triton')\n"
        "try:\n"
        "    cross_attention(q, k, k)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    ),
}


@pytest.mark.parametrize("case", list(_SUBPROCESS_CHECKS))
def test_dispatch_in_fresh_process(case: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.ENV_VAR, "TRITON_INTERPRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors only, even on a GPU host
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_CHECKS[case]], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
