"""Rounding helpers shared by the Triton kernels (interpretable: plain ``tl`` ops only)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fp8_e4m3_rne_as_fp32", "round_half_even"]


@triton.jit
def round_half_even(x):
    """Round float32 to the nearest integer, ties to even (``torch.round``'s rule).

    Written with floor because libdevice's rint is missing from Triton's interpreter.
    ``x + 0.5`` is exact for ``0.5 <= |x| < 2**22``; below 0.5 the answer is 0 anyway.
    """
    r = tl.floor(x + 0.5)
    odd_tie = ((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    r = tl.where(odd_tie, r - 1.0, r)
    return tl.where(tl.abs(x) < 0.5, 0.0, r)


@triton.jit
def fp8_e4m3_rne_as_fp32(x):
    """Round float32 ``x`` (|x| <= 448) to the nearest e4m3 value, ties to even, in float32.

    Interpreter only: Triton 3.6's interpreter drops the carry when rounding up into the
    next binade (7.97 -> 4 instead of 8); the GPU's ``cvt.rn`` rounds correctly.
    """
    ax = tl.abs(x)
    # e4m3: 3 mantissa bits; exponents below -6 are subnormal with the step of -6.
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(ax, 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    r = round_half_even(ax / step) * step
    r = tl.where(x < 0, -tl.minimum(r, 448.0), tl.minimum(r, 448.0))
    return tl.where(x != x, x, r)  # NaN stays NaN, as the GPU's cvt keeps it
