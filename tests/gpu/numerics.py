"""Error bounds, precision switches and the float64 bilinear shared by the GPU tests (no test functions here).

The float64 VL-CABS head is in :mod:`tests.references`, shared with the CPU kernel tests.

Bounds follow the project rule: an implementation's error against a float64 reference may be at
most twice plain torch's own error in the same precision on the same data, plus one rounding term
``eps · sqrt(K) · max|ref|`` for a K-term reduction (an absolute term, so outputs near zero and a
baseline that happens to be exact cannot make the bound vanish). Nothing here is tuned by hand.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

# Machine epsilon per dtype; "tf32" is the operand precision of tensor-core fp32 dots (10 mantissa bits).
EPS: dict[torch.dtype | str, float] = {
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float64: torch.finfo(torch.float64).eps,
    "tf32": 2.0**-10,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| in float64 on ref's device (max norm: elementwise relative error is meaningless near 0)."""
    return float((x.detach().to(device=ref.device, dtype=torch.float64) - ref).abs().max())


def bound(baseline_err: float, ref: torch.Tensor, eps: float, k: int = 1) -> float:
    """2 × the baseline's error + eps·sqrt(k)·max|ref| (see the module docstring)."""
    return 2.0 * baseline_err + eps * math.sqrt(k) * float(ref.abs().max())


@contextlib.contextmanager
def fp32_math(*, tf32: bool) -> Iterator[None]:
    """fp32 matmuls and cuDNN convolutions in IEEE fp32 (``tf32=False``) or on TF32 tensor cores.

    torch's defaults differ (IEEE matmuls, TF32 convolutions); tests pin both so a float32 result is
    really float32, or so a baseline runs at the same operand precision as a Triton dot. Only the
    legacy switches are used: mixing them with the per-backend ``fp32_precision`` API raises.
    """
    old_mm, old_conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_mm)
        torch.backends.cudnn.allow_tf32 = old_conv


def bilinear_f64(sim: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (B, T, h, w) to size, in float64, as gathers.

    PyTorch's rule: src = (dst + ½)·in/out − ½ clamped at 0, i0 = floor(src), i1 = min(i0 + 1, in − 1).
    """
    x = sim.double()
    h, w = x.shape[-2:]

    def axis(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = ((torch.arange(n_out, device=x.device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), src - i0

    y0, y1, ly = axis(size[0], h)
    x0, x1, lx = axis(size[1], w)
    rows = x[..., y0, :] * (1 - ly)[:, None] + x[..., y1, :] * ly[:, None]  # (B, T, H, w)
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx
