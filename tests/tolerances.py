"""Numeric tolerances derived from the floating-point format, never picked by hand.

A value stored in a format with unit roundoff ``u = eps / 2`` is off by at most ``u`` relative;
a sum or dot product of ``n`` terms accumulated in a format with roundoff ``u_acc`` is off by
about ``√n · u_acc`` times the size of its terms (the probabilistic bound of Higham & Mary 2019;
the worst case ``n · u_acc`` is never approached by random data, and blocked/pairwise reductions
as in torch and Triton do better still). Values near zero cannot carry a relative error
(cancellation: a float32 loss of 2e-4 built from logits of size 14 is off by ~1e-7 absolute,
3.7e-4 relative), so every tolerance has an absolute term scaled by the magnitude of the
intermediates: ``rtol = SAFETY · (u_store + u_acc · √terms)`` and
``atol = SAFETY · u_acc · (1 + √terms) · magnitude``.

SAFETY is the one factor of the whole suite. It covers the handful of chained operations in each
checked formula (normalise, exp, divide, …), and it is small enough that any genuine mistake (a
wrong scale, a dropped term, a swapped axis, a half-precision accumulator) still fails by orders
of magnitude: float32 tolerances stay around 1e-6 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

SAFETY = 8.0


def unit_roundoff(dtype: torch.dtype | np.dtype | type) -> float:
    """Half the machine epsilon of a torch or numpy floating dtype (2⁻²⁴ for float32)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps / 2
    return float(np.finfo(dtype).eps) / 2


@dataclass(frozen=True)
class Tol:
    """A relative and an absolute tolerance, usable with pytest.approx and torch's assert_close."""

    rtol: float
    atol: float

    def bound(self, scale: float) -> float:
        """The largest allowed |actual − expected| where |expected| is at most ``scale``."""
        return self.atol + self.rtol * scale

    def approx(self, expected: Any) -> Any:
        return pytest.approx(expected, rel=self.rtol, abs=self.atol)

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, **kw: Any) -> None:
        """torch.testing.assert_close with these tolerances; the dtypes may differ (a float64 reference)."""
        torch.testing.assert_close(actual, expected, rtol=self.rtol, atol=self.atol, check_dtype=False, **kw)


def tolerance(
    dtype: torch.dtype | np.dtype | type,
    *,
    terms: int = 0,
    magnitude: float = 1.0,
    accumulate: torch.dtype | np.dtype | type | None = None,
    safety: float = SAFETY,
) -> Tol:
    """Tolerance for a result stored in ``dtype`` after ``terms`` accumulated terms.

    ``accumulate`` is the dtype the arithmetic runs in (default: ``dtype``; half-precision kernels
    accumulate in float32). The relative part covers the rounding of the result itself and of the
    sums; the absolute part covers the arithmetic's error where the result is near zero, which
    scales with ``magnitude``, the size of the intermediates (e.g. ``1 / τ`` for logits).
    """
    u_acc = unit_roundoff(accumulate if accumulate is not None else dtype)
    root = math.sqrt(max(terms, 0))
    return Tol(rtol=safety * (unit_roundoff(dtype) + u_acc * root),
               atol=safety * u_acc * (1 + root) * magnitude)


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|: the error relative to the result's scale.

    Elementwise relative error is meaningless for entries that are near zero by chance (cosines).
    """
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max())
