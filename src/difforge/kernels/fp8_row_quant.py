"""fp8 row quantization in one Triton kernel: of ``cat([gelu?(a), gelu?(b)], dim=-1)``, and
of a LayerNorm + adaLN modulation (:func:`quantize_layer_norm_rows_triton`; the
``fp8_layer_norm_quant_kernel`` pass, off: it paid nowhere in an O3 step, see
:mod:`difforge.passes.quant_fusion`).

The same function as :func:`difforge.quant.fp8.quantize_cat_rows` (its row bound, its
scale, its rounding), computed by one program per row in two sweeps over the row: the first
reads the row and takes its bound (the max of a GELU part, the absmax of a plain part), the
second reads it again, applies the GELU, scales and stores float8. A row is at most a few
tens of KB (FLUX.1's single blocks: 3072 + 12288 bf16 columns, 30 KB), so the second sweep
reads what the first left in L2: DRAM sees the row once in and once out. Holding the whole
row in registers instead (one load of it, all in flight at once) measured slower at every
shape, 4 to 16 warps (H200: FLUX single block 0.096 -> 0.152 ms at best, PixArt FF1 0.047
-> 0.071; ``benchmarks/results/2026-11-28_h200_probe_ropekern_s22.json``), most likely
because a row's registers leave few programs per SM, too few rows in flight to hide DRAM
latency (not profiled); it was removed.

Why it exists: Inductor compiles the composite into a row-reduction kernel and a separate
pointwise kernel that both read the row from DRAM. In FLUX.1-dev's O3 step (H100,
``benchmarks/results/2026-11-28_h100_step_o3_flux_s19.json``) the single blocks'
GELU + concatenation + quantization took 5.07 ms over 38 calls (133 us each, 1.6 TB/s for
the bytes it must move) plus 1.41 ms of row maxima; the one-pass kernel must move 212 MB a
call, ~76 us at 2.8 TB/s. Measured (H200, ``benchmarks/probe_ops.py --probes catquant``):
1.10-1.82x Inductor's two kernels at FLUX/PixArt/SD3 shapes, hence on in ``low-precision``.

The GELU is evaluated as ``x * sigmoid(2·sqrt(2/pi)·(x + 0.044715·x³))`` with Triton's fast
``exp`` and division (no libdevice ``tanh``): a few instructions per element, so the kernel
stays memory-bound. The per-row scale and its reciprocal use IEEE division, as the torch
reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from difforge.inference_only import register_inference_only
from difforge.kernels import interpreting as _interpreting
from difforge.kernels import last_dim_dense
from difforge.kernels.rounding import fp8_e4m3_rne_as_fp32
from difforge.passes.activation import _TWO_SQRT_2_OVER_PI
from difforge.quant.fp8 import FP8_MAX, GELU_NEGATIVE_BOUND, SCALE_EPS

__all__ = [
    "KERNEL_DTYPES",
    "quantize_cat_rows_triton",
    "quantize_layer_norm_rows_triton",
    "quantize_residual_layer_norm_rows_triton",
]

#: The input dtypes the quantizers read (one for all parts of a call).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The torch reference's constants, as compile-time constants of the kernels.
_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
_GELU_C = tl.constexpr(_TWO_SQRT_2_OVER_PI)
_GELU_FLOOR = tl.constexpr(GELU_NEGATIVE_BOUND)
#: Columns one program handles per step: 8 bf16 (16 bytes) per thread at 4 warps.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _gelu_tanh(x):
    z = _GELU_C * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-z))


@triton.jit
def _nan_aware_max(values):
    """``max`` of a block that is NaN when any value is, as torch's ``amax``: the GPU's
    ``max.f32`` (what ``tl.max`` reduces with) returns the non-NaN operand, so a NaN
    activation would otherwise get a finite scale and a finite code, hiding the blow-up."""
    has_nan = tl.max((values != values).to(tl.int32), axis=0) > 0
    return tl.where(has_nan, float("nan"), tl.max(values, axis=0))


@triton.jit
def _clamp_fp8(x):
    """Clamp to ±448 keeping NaN (the cast then writes e4m3's NaN)."""
    x = tl.maximum(x, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _to_fp8(q, INTERPRET: tl.constexpr):
    """float32 (already within ±448, or NaN) -> e4m3, rounding to nearest even."""
    if INTERPRET:
        # The interpreter's cast drops a carry and turns NaN into a number: round in
        # float32 (kernels.rounding), then write e4m3's NaN code (0x7F) by its bits.
        bits = fp8_e4m3_rne_as_fp32(q).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        bits = tl.where(q != q, 0x7F, bits).to(tl.uint8)
        return bits.to(tl.float8e4nv, bitcast=True)
    return q.to(tl.float8e4nv)


@triton.jit
def _part_bound(row_ptr, K, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 1 over one part of a row: ``max(gelu(max x), floor)`` for a GELU part, else
    ``max |x|``."""
    # while, not for: Triton 3.6's interpreter cannot run range() over a runtime int with
    # numpy >= 2.4 (see kernels.attention_int8). A streaming loop loses nothing by it: the
    # latency hiding comes from the thousands of rows in flight, not from pipelining.
    cols = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], float("-inf") if GELU else 0.0, tl.float32)
    start = 0
    while start < K:
        mask = start + cols < K
        if GELU:
            x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        else:
            x = tl.abs(tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32))
        acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        start += BLOCK
    bound = _nan_aware_max(acc)
    if GELU:
        bound = tl.maximum(_gelu_tanh(bound), _GELU_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    return bound


@triton.jit
def _part_store(
    row_ptr, out_ptr, K, inv, GELU: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    """Sweep 2 over one part (the row is in L2 now): GELU, scale, clamp, round to nearest
    even, store ``K`` float8 values from ``out_ptr``."""
    cols = tl.arange(0, BLOCK)
    start = 0
    while start < K:
        mask = start + cols < K
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _gelu_tanh(x)
        tl.store(out_ptr + start + cols, _to_fp8(_clamp_fp8(x * inv), INTERPRET), mask=mask)
        start += BLOCK


@triton.jit
def _quantize_cat_rows_kernel(
    a_ptr, b_ptr, out_ptr, scale_ptr,
    stride_a, stride_b, stride_out, KA, KB,
    GELU_A: tl.constexpr, GELU_B: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # rows x 30 KB overflows int32 offsets
    a_row = a_ptr + row * stride_a
    b_row = b_ptr + row * stride_b
    out_row = out_ptr + row * stride_out
    bound = _part_bound(a_row, KA, GELU_A, BLOCK)
    if HAS_B:
        bound_b = _part_bound(b_row, KB, GELU_B, BLOCK)
        bound = tl.maximum(bound, bound_b, propagate_nan=tl.PropagateNan.ALL)
    bound = tl.maximum(bound, _SCALE_EPS, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.math.div_rn(bound, _FP8_MAX)
    tl.store(scale_ptr + row, scale)
    inv = tl.math.div_rn(1.0, scale)
    _part_store(a_row, out_row, KA, inv, GELU_A, BLOCK, INTERPRET)
    if HAS_B:
        _part_store(b_row, out_row + KA, KB, inv, GELU_B, BLOCK, INTERPRET)


def _check(parts: list[torch.Tensor], gelu: list[bool], *, device: bool = True) -> None:
    if len(parts) != len(gelu) or not 1 <= len(parts) <= 2:
        raise ValueError(
            "quantize_cat_rows_triton: one or two parts with one gelu flag each, got "
            f"{len(parts)} parts and {len(gelu)} flags"
        )
    if any(p.dim() != 2 for p in parts):
        raise ValueError(
            f"quantize_cat_rows_triton expects 2-D [M, K] parts, got {[p.shape for p in parts]}"
        )
    first = parts[0]
    for p in parts:
        if p.shape[0] != first.shape[0] or p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                "quantize_cat_rows_triton: parts must share rows, dtype and device, got "
                f"{[(tuple(p.shape), p.dtype, str(p.device)) for p in parts]}"
            )
    if first.dtype not in KERNEL_DTYPES:
        raise ValueError(f"quantize_cat_rows_triton: float16/bfloat16/float32, got {first.dtype}")
    if device and first.device.type != "cuda" and not _interpreting():
        raise ValueError(
            "quantize_cat_rows_triton runs on CUDA tensors (or CPU ones under "
            f"TRITON_INTERPRET=1), got {first.device}"
        )


def quantize_cat_rows_triton(
    parts: list[torch.Tensor], gelu: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8 [M, sum K], scale [M] float32)`` for ``cat([gelu(p) if g else p ...], -1)``,
    the values :func:`difforge.quant.fp8.quantize_cat_rows` computes. One or two 2-D parts of
    one float dtype; a part whose last stride is not 1 is copied first."""
    _check(parts, gelu)
    parts = [p if p.stride(-1) == 1 or p.shape[1] <= 1 else p.contiguous() for p in parts]
    m = parts[0].shape[0]
    widths = [p.shape[1] for p in parts]
    out = torch.empty((m, sum(widths)), dtype=torch.float8_e4m3fn, device=parts[0].device)
    scale = torch.empty((m,), dtype=torch.float32, device=parts[0].device)
    if m == 0:
        return out, scale
    a = parts[0]
    b = parts[1] if len(parts) == 2 else a  # unused when HAS_B is false
    _quantize_cat_rows_kernel[(m,)](
        a, b, out, scale, a.stride(0), b.stride(0), out.stride(0), widths[0],
        widths[1] if len(parts) == 2 else 0,
        GELU_A=bool(gelu[0]), GELU_B=bool(gelu[-1]) and len(parts) == 2,
        HAS_B=len(parts) == 2, BLOCK=_BLOCK, INTERPRET=_interpreting(), num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out, scale


@torch.library.custom_op("difforge::fp8_quantize_cat_rows_triton", mutates_args=())
def _quantize_cat_rows_op(
    parts: list[torch.Tensor], gelu: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.difforge.fp8_quantize_cat_rows_triton``: one opaque graph node."""
    return quantize_cat_rows_triton(list(parts), list(gelu))


@_quantize_cat_rows_op.register_fake
def _quantize_cat_rows_fake(
    parts: list[torch.Tensor], gelu: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(list(parts), list(gelu), device=False)
    m = parts[0].shape[0]
    width = sum(p.shape[1] for p in parts)
    out = parts[0].new_empty((m, width), dtype=torch.float8_e4m3fn)
    return out, parts[0].new_empty((m,), dtype=torch.float32)


# Quantization has no useful gradient: a model called outside ``torch.no_grad`` with
# parameters that require grad (fresh from from_pretrained) still compiles, and a backward
# through the op raises (difforge.inference_only).
register_inference_only(_quantize_cat_rows_op, "the fp8 GELU (+ cat) quantizer kernel")


# --------------------------------------------------------------------------------------
# LayerNorm + adaLN modulation + fp8 row quantization, one read of each row
# --------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_quant_kernel(
    x_ptr, y_ptr, gate_ptr, h_ptr, scale_ptr, shift_ptr, out_ptr, row_scale_ptr,
    stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_mb, stride_sb, stride_out,
    S, D, eps,
    BLOCK_D: tl.constexpr, RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    # The whole row in registers (D <= 8192): one DRAM read, one float8 write (and with
    # RESIDUAL, h = x + gate * y: one more read, and h written once).
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    t = row - b * S
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x_in = tl.load(x_ptr + b * stride_xb + t * stride_xs + cols, mask=mask, other=0.0)
    x = x_in.to(tl.float32)
    if RESIDUAL:
        y = tl.load(y_ptr + b * stride_yb + t * stride_ys + cols, mask=mask, other=0.0)
        y = y.to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(gate_ptr + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
        # The residual stream is stored in its dtype, and the norm reads what was stored.
        h = (x + y).to(x_in.dtype)
        tl.store(h_ptr + row * D + cols, h, mask=mask)
        x = h.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    mod_scale = tl.load(scale_ptr + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
    mod_shift = tl.load(shift_ptr + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(mask, xc * rstd * (1.0 + mod_scale) + mod_shift, 0.0)
    bound = tl.maximum(_nan_aware_max(tl.abs(y)), _SCALE_EPS, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.math.div_rn(bound, _FP8_MAX)
    tl.store(row_scale_ptr + row, scale)
    q = _to_fp8(_clamp_fp8(y * tl.math.div_rn(1.0, scale)), INTERPRET)
    tl.store(out_ptr + row * stride_out + cols, q, mask=mask)


#: Widest row the LayerNorm quantizer keeps in registers.
LAYER_NORM_QUANT_MAX_WIDTH = 8192


def _check_layer_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    y: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> None:
    """x ``[B, S, D]``, scale and shift ``[B, D]`` (and a residual ``[B, S, D]`` and gate
    ``[B, D]``); one float dtype and device; D within the register limit. Errors name the
    function that was called."""
    name = (
        "quantize_layer_norm_rows_triton"
        if y is None
        else "quantize_residual_layer_norm_rows_triton"
    )
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]) or shift.shape != scale.shape:
        raise ValueError(
            f"{name} expects x [B, S, D] and scale, shift [B, D], got "
            f"{tuple(x.shape)}, {tuple(scale.shape)}, {tuple(shift.shape)}"
        )
    if y is not None and y.shape != x.shape:
        raise ValueError(f"{name}: the residual's y must be x's shape, got {tuple(y.shape)}")
    if gate is not None and gate.shape != scale.shape:
        raise ValueError(f"{name}: the gate must be [B, D], got {tuple(gate.shape)}")
    if y is not None and y.dtype != x.dtype:
        raise ValueError(f"{name}: x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: float16/bfloat16/float32, got {x.dtype}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{name} runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {x.device}"
        )
    if x.shape[2] > LAYER_NORM_QUANT_MAX_WIDTH:
        raise ValueError(f"{name}: rows up to {LAYER_NORM_QUANT_MAX_WIDTH} wide, got {x.shape[2]}")


def _launch_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    b, s, d = x.shape
    x, scale, shift = last_dim_dense(x), last_dim_dense(scale), last_dim_dense(shift)
    y = last_dim_dense(y) if y is not None else None
    gate = last_dim_dense(gate) if gate is not None else None
    out = torch.empty((b * s, d), dtype=torch.float8_e4m3fn, device=x.device)
    row_scale = torch.empty((b * s,), dtype=torch.float32, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if y is not None else None
    if b * s == 0:
        return out, row_scale, h
    block_d = triton.next_power_of_2(d)
    yy = y if y is not None else x  # unused when RESIDUAL is false
    gg = gate if gate is not None else scale  # unused when HAS_GATE is false
    _layer_norm_quant_kernel[(b * s,)](
        x, yy, gg, h if h is not None else x, scale, shift, out, row_scale,
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), gg.stride(0), scale.stride(0),
        shift.stride(0), out.stride(0), s, d, eps,
        BLOCK_D=block_d, RESIDUAL=y is not None, HAS_GATE=gate is not None,
        INTERPRET=_interpreting(), num_warps=4 if block_d <= 2048 else 8,
    )  # fmt: skip
    return out, row_scale, h


def quantize_layer_norm_rows_triton(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(layer_norm(x) * (1 + scale[:, None]) + shift[:, None])`` flattened to
    ``[B * S, D]``, with every intermediate in float32 (no rounding to x's dtype between
    the steps, as Inductor computes the composite). ``x`` is ``[B, S, D]`` (last stride
    1), ``scale`` and ``shift`` ``[B, D]``: the adaLN modulation of a DiT block feeding
    its fp8 projection. Returns ``(x_fp8 [B * S, D], row scales [B * S] float32)``."""
    _check_layer_norm(x, scale, shift)
    out, row_scale, _ = _launch_layer_norm(x, None, None, scale, shift, eps)
    return out, row_scale


def quantize_residual_layer_norm_rows_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual update before a DiT block's norm and the quantization after it:
    ``h = x + gate[:, None] * y`` (``x + y`` without a gate; float32 math, rounded once to
    x's dtype), then :func:`quantize_layer_norm_rows_triton` of ``h`` as stored. Returns
    ``(h [B, S, D] contiguous, x_fp8 [B * S, D], row scales [B * S] float32)``."""
    _check_layer_norm(x, scale, shift, y, gate)
    out, row_scale, h = _launch_layer_norm(x, y, gate, scale, shift, eps)
    assert h is not None
    return h, out, row_scale


@torch.library.custom_op("difforge::fp8_quantize_layer_norm_rows_triton", mutates_args=())
def _layer_norm_quant_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.difforge.fp8_quantize_layer_norm_rows_triton``: one opaque graph node."""
    return quantize_layer_norm_rows_triton(x, scale, shift, eps)


@_layer_norm_quant_op.register_fake
def _layer_norm_quant_fake(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 3 or scale.dim() != 2 or shift.dim() != 2:
        raise ValueError("fp8_quantize_layer_norm_rows_triton: x [B, S, D], scale/shift [B, D]")
    rows = x.shape[0] * x.shape[1]
    out = x.new_empty((rows, x.shape[2]), dtype=torch.float8_e4m3fn)
    return out, x.new_empty((rows,), dtype=torch.float32)


register_inference_only(_layer_norm_quant_op, "the fp8 LayerNorm quantizer kernel")


@torch.library.custom_op("difforge::fp8_quantize_residual_layer_norm_rows_triton", mutates_args=())
def _residual_layer_norm_quant_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.difforge.fp8_quantize_residual_layer_norm_rows_triton``."""
    return quantize_residual_layer_norm_rows_triton(x, y, gate, scale, shift, eps)


@_residual_layer_norm_quant_op.register_fake
def _residual_layer_norm_quant_fake(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() != 3 or y.shape != x.shape or scale.dim() != 2 or shift.dim() != 2:
        raise ValueError(
            "fp8_quantize_residual_layer_norm_rows_triton: x, y [B, S, D], scale/shift [B, D]"
        )
    rows = x.shape[0] * x.shape[1]
    q = x.new_empty((rows, x.shape[2]), dtype=torch.float8_e4m3fn)
    h = x.new_empty(x.shape)  # contiguous, as the kernel writes it
    return h, q, x.new_empty((rows,), dtype=torch.float32)


register_inference_only(_residual_layer_norm_quant_op, "the fp8 LayerNorm quantizer kernel")
