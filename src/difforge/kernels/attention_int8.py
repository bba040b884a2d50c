"""8-bit attention: Q·Kᵀ in int8 with per-block scales, P·V in fp16/bf16 (SageAttention-style).

Math (non-causal, no mask), for q, k, v of shape ``[B, H, S, D]``:

1. Smooth K: subtract its mean over the sequence, per (batch, head). Every score row
   ``q_i·k_j`` shifts by the constant ``q_i·mean(k)``, which softmax ignores, but the
   centred keys quantize with a much smaller step when keys share a large offset.
2. Quantize q per block of ``block_m`` rows and k per block of ``block_n`` rows
   (:func:`quantize_per_block_int8`): one float32 scale per (batch, head, block).
3. Scores ``s = (q8 @ k8ᵀ) * q_scale * k_scale * sm_scale``: an int8 GEMM with int32
   accumulation, dequantized by two scalars per tile.
4. Softmax in float32, online (flash-attention style) in the kernel; ``log2(e) * sm_scale``
   is folded into the dequantization scale so the kernel uses ``exp2``.
5. ``P`` (unnormalised, in [0, 1]) is cast to v's dtype (fp16 or bf16) for ``P @ V`` with
   float32 accumulation; the row sum is divided out at the end.

:func:`attention_int8_reference` is the same math in plain torch and is the kernel's oracle.
:func:`attention_int8` launches the Triton kernel; ``torch.ops.difforge.attention_int8`` is
the same launcher as an opaque ``torch.library`` op for Dynamo/Inductor.

Speed (H100, torch 2.11, Triton 3.6, CUDA-graph timed;
``benchmarks/results/2026-11-27_h100_probe_int8attn_final_s13.json``): with fp8 P·V the
kernel alone beats cuDNN's fp16 SDPA at PixArt's head dim 72 (0.349 vs 0.449 ms at
2x16x4096², 128x64 tiles) and FLUX's 128 (0.405 vs 0.445), ties at SD3's and SDXL's 64, and
with fp16 P·V it loses everywhere. The softmax's float32 work, not the tensor cores,
bounds it: the scores become floats by an integer add (:data:`_MAGIC`; a conversion
instruction runs at a quarter of the float rate) and scale, max and log2(448) fold into one
FMA, but the loop stays FlashAttention-2-shaped (each warp group waits for its own MMAs;
Triton 3.6 warp-specializes loops only on Blackwell). Quantization: the eager op runs Triton
pre-passes (:func:`prepare_operands`); compiled graphs get the same values from torch ops
(:func:`prepare_operands_torch`, through :func:`attention_int8_fused`) that Inductor
fuses, which still cost PixArt-XL 2.65 ms a step against the kernel's 1.5 ms gain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from difforge.kernels import head_dim_tiles, token_major_empty
from difforge.kernels import interpreting as _interpreting
from difforge.kernels.rounding import fp8_e4m3_rne_as_fp32, round_half_even
from difforge.passes.registry import cacheable_target

__all__ = [
    "attention_int8",
    "attention_int8_reference",
    "benchmark_attention",
    "quantize_per_block_int8",
    "quantize_per_block_int8_triton",
]

_LOG2E = 1.4426950408889634
_INT8_MAX = 127.0
_FP8_MAX = 448.0
#: int32 -> float32 by bits: the float bits of 1.5 * 2**23 plus an integer t are the float
#: 1.5 * 2**23 + t, exactly, for |t| < 2**22 (Q·Kᵀ's int8 sums stay below 127² * 128 < 2**21).
_MAGIC = tl.constexpr(12582912.0)
_MAGIC_BITS = tl.constexpr(0x4B400000)
_LOG2_FP8_MAX = tl.constexpr(math.log2(_FP8_MAX))
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 64
DEFAULT_STAGES = 2


# --------------------------------------------------------------------------------------
# Plain-torch pieces (also the oracle)
# --------------------------------------------------------------------------------------


def quantize_per_block_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of ``x [B, H, S, D]`` per (batch, head, block of rows).

    Returns ``(x_int8 [B, H, S, D] contiguous, scale [B, H, ceil(S / block)] float32)`` with
    ``x ≈ x_int8 * scale`` broadcast over each block's rows. ``scale = absmax / 127`` over the
    block's ``block x D`` values, rounding is to nearest (ties to even, ``torch.round``). An
    all-zero block gets scale 1 so nothing divides by zero (its int8 values are 0 anyway).
    The last block may be ragged. Plain torch: the oracle of
    :func:`quantize_per_block_int8_triton`, which the attention launcher uses.
    """
    if x.dim() != 4:
        raise ValueError(f"quantize_per_block_int8: expected [B, H, S, D], got {tuple(x.shape)}")
    if block <= 0:
        raise ValueError(f"quantize_per_block_int8: block must be positive, got {block}")
    b, h, s, d = x.shape
    n_blocks = triton.cdiv(s, block)
    xf = x.float()
    pad = n_blocks * block - s
    if pad:
        # Zero rows do not change the absmax, so padding keeps the ragged block's scale exact.
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    blocks = xf.view(b, h, n_blocks, block, d)
    amax = blocks.abs().amax(dim=(-2, -1))
    scale = torch.where(amax > 0, amax / _INT8_MAX, torch.ones_like(amax))
    q = torch.round(blocks / scale[..., None, None]).clamp_(-_INT8_MAX, _INT8_MAX)
    q = q.to(torch.int8).view(b, h, n_blocks * block, d)[:, :, :s]
    return q.contiguous(), scale.contiguous()


def _k_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of k over the sequence, ``[B, H, D]`` float32 (shared by kernel and oracle)."""
    return k.mean(dim=2, dtype=torch.float32)


def _smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over the sequence (per batch, head), in float32."""
    return k.float() - _k_mean(k)[:, :, None, :]


def _expand_scale(scale: torch.Tensor, block: int, s: int) -> torch.Tensor:
    """Per-block scales ``[B, H, n_blocks]`` -> per-row scales ``[B, H, s]``."""
    return scale.repeat_interleave(block, dim=-1)[..., :s]


def attention_int8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    pv_fp8: bool = False,
) -> torch.Tensor:
    """Plain-torch oracle of :func:`attention_int8`: the same quantization, same math.

    Accepts float32 too (then ``P`` stays float32 unless ``pv_fp8``, which isolates the
    int8 Q·Kᵀ error when comparing with ``F.scaled_dot_product_attention``). Memory is
    ``O(Sq * Skv)``: a test oracle, not a fallback.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    sq, skv = q.shape[2], k.shape[2]
    q8, q_scale = quantize_per_block_int8(q, block_m)
    k8, k_scale = quantize_per_block_int8(_smooth_k(k), block_n)
    # Integer products summed in float32 are exact here (|sum| <= 127^2 * 128 < 2^24), so
    # this matches the kernel's int32 accumulation bit for bit before scaling.
    scores = q8.float() @ k8.float().transpose(-1, -2)
    row_scale = _expand_scale(q_scale, block_m, sq) * sm_scale
    scores = scores * row_scale[..., :, None] * _expand_scale(k_scale, block_n, skv)[..., None, :]
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    denom = p.sum(dim=-1, keepdim=True)
    if pv_fp8:
        v8, v_scale = quantize_v_fp8_reference(v)
        p8 = (p * _FP8_MAX).to(torch.float8_e4m3fn)
        out = (p8.float() @ v8.float()) * (v_scale[:, :, None, :] / _FP8_MAX) / denom
    else:
        out = (p.to(v.dtype).float() @ v.float()) / denom
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


def stride_alignment(*strides: int) -> int:
    """The largest power of two up to 16 dividing every stride (in elements).

    Triton marks an integer argument as aligned only when it is a multiple of 16, so the
    head stride 72 of a ``[B, S, H, 72]`` tensor seen as ``[B, H, S, 72]`` leaves every row
    address "unaligned" and each load split into 2-byte pieces: the quantizers ran 4x slower
    at PixArt's head dim than at 64 or 128 (H100, 2026-11-28). The kernels take this value
    as a constexpr and hint their offsets with it (``tl.multiple_of``)."""
    align = 16
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


@triton.jit
def _row_offsets(b, h, rows, stride_b, stride_h, stride_s, ALIGN: tl.constexpr):
    """``(b * stride_b + h * stride_h, rows * stride_s)`` in int64 / int32, both hinted as
    multiples of ``ALIGN`` (:func:`stride_alignment` of the three strides), so loads and
    stores along the contiguous last dim vectorize."""
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    row = rows * stride_s
    if ALIGN > 1:
        base = tl.multiple_of(base, ALIGN)
        row = tl.multiple_of(row, ALIGN)
    return base, row


@triton.jit
def _load_row_block(
    x_ptr, stride_xb, stride_xh, stride_xs, n_heads, seq,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """This program's ``[BLOCK, BLOCK_D]`` rows of ``x [B, H, S, D]`` in float32 (grid:
    row block, batch x head), zero past the sequence and the head dim; with the offsets and
    the mask of the real elements. ``ALIGN``: :func:`stride_alignment` of x's strides."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s < seq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    base, rows = _row_offsets(b, h, offs_s, stride_xb, stride_xh, stride_xs, ALIGN)
    x = tl.load(x_ptr + base + rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), offs_s, offs_d, mask


@triton.jit
def quantize_int8_lanes(x, mask, scale):
    """int8 ``round(x / scale)`` (ties to even) clamped to ±127, 0 where ``mask`` is false.

    Padding lanes divide the scale by itself, not 0 by the scale: a zero numerator takes
    the IEEE division's slow path, and with 56 of 128 columns padding at head dim 72 that
    made the quantizer 4.5x slower per byte than at head dim 128 (H100, 2026-11-28).
    IEEE division (div_rn, not Triton's approximate '/') so the GPU matches torch exactly."""
    q = round_half_even(tl.div_rn(tl.where(mask, x, scale), scale))
    return tl.where(mask, tl.minimum(tl.maximum(q, -127.0), 127.0), 0.0).to(tl.int8)


@triton.jit
def _quantize_per_block_int8_kernel(
    x_ptr,  # fp16/bf16/fp32 [B, H, S, D], any strides with the last one 1
    mean_ptr,  # float32 [B, H, D] contiguous (only read when SUBTRACT_MEAN)
    out_ptr,  # int8 [B, H, S, D_OUT] contiguous; columns D..D_OUT are written as 0
    scale_ptr,  # float32 [B, H, cdiv(S, BLOCK)] contiguous
    stride_xb,
    stride_xh,
    stride_xs,
    n_heads,
    seq,
    n_blocks,
    HEAD_DIM: tl.constexpr,
    D_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
    ALIGN: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    x, offs_s, offs_d, mask = _load_row_block(
        x_ptr, stride_xb, stride_xh, stride_xs, n_heads, seq, HEAD_DIM, BLOCK, BLOCK_D, ALIGN
    )
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        # Padded rows must stay 0, not -mean, or they would inflate the block's absmax.
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    # IEEE divisions (div_rn, not Triton's approximate '/') so the GPU matches torch exactly.
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    q = quantize_int8_lanes(x, mask, scale)
    out_base = out_ptr + pid_bh.to(tl.int64) * seq * D_OUT
    out_mask = (offs_s < seq)[:, None] & (offs_d < D_OUT)[None, :]
    tl.store(out_base + offs_s[:, None] * D_OUT + offs_d[None, :], q, mask=out_mask)
    tl.store(scale_ptr + pid_bh * n_blocks + pid_blk, scale)


def quantize_per_block_int8_triton(
    x: torch.Tensor,
    block: int,
    *,
    subtract_mean: torch.Tensor | None = None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_per_block_int8` (bit-identical results).

    ``subtract_mean`` (``[B, H, D]`` float32) is subtracted from every row first, in the
    same pass: that is how the attention launcher smooths K without a float32 copy of it.
    ``pad_to`` widens the contiguous int8 output to that many columns, the extra ones 0, so
    the attention kernel loads whole aligned rows. ``x`` needs a contiguous last dim;
    ``block`` a power of two.
    """
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(
            f"quantize_per_block_int8_triton: expected [B, H, S, D] with a contiguous last dim, "
            f"got shape {tuple(x.shape)} strides {x.stride()}"
        )
    _check_device("quantize_per_block_int8_triton", x)
    _check_block("block", block)
    b, h, s, d = x.shape
    width = d if pad_to is None else pad_to
    if width < d:
        raise ValueError(f"quantize_per_block_int8_triton: pad_to={pad_to} < head dim {d}")
    n_blocks = triton.cdiv(s, block)
    out = torch.empty((b, h, s, width), dtype=torch.int8, device=x.device)
    scale = torch.empty((b, h, n_blocks), dtype=torch.float32, device=x.device)
    if subtract_mean is not None:
        if subtract_mean.shape != (b, h, d) or subtract_mean.dtype != torch.float32:
            raise ValueError(
                f"quantize_per_block_int8_triton: subtract_mean must be float32 {(b, h, d)}, got "
                f"{subtract_mean.dtype} {tuple(subtract_mean.shape)}"
            )
        subtract_mean = subtract_mean.contiguous()
    _quantize_per_block_int8_kernel[(n_blocks, b * h)](
        x,
        scale if subtract_mean is None else subtract_mean,  # dummy pointer when unused
        out,
        scale,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        h,
        s,
        n_blocks,
        HEAD_DIM=d,
        D_OUT=width,
        BLOCK_D=max(16, triton.next_power_of_2(width)),
        BLOCK=block,
        SUBTRACT_MEAN=subtract_mean is not None,
        ALIGN=stride_alignment(*x.stride()[:3]),
        num_warps=8 if block >= 128 else 4,
    )
    return out, scale


def v_fp8_scales(v: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Per-channel scales of V for fp8 P·V: ``absmax over the sequence / 448``, float32
    ``[B, H, width]`` (columns past the head dim and all-zero channels get 1)."""
    # inf-norm: one read of V, no |V| temporary
    amax = torch.linalg.vector_norm(v, ord=float("inf"), dim=2).float()
    scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    width = v.shape[-1] if width is None else width
    if width > scale.shape[-1]:
        scale = torch.nn.functional.pad(scale, (0, width - scale.shape[-1]), value=1.0)
    return scale.contiguous()


def quantize_v_fp8_reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch fp8 V: ``(v / scale)`` in e4m3, ``[B, H, S, D]``, with its scales."""
    scale = v_fp8_scales(v)
    return (v.float() / scale[:, :, None, :]).to(torch.float8_e4m3fn), scale


@triton.jit
def _quantize_v_fp8_kernel(
    v_ptr,  # fp16/bf16 [B, H, S, D], any strides with the last one 1
    scale_ptr,  # float32 [B, H, DV] contiguous
    out_ptr,  # fp8 e4m3 [B, H, DV, S_PAD] contiguous (transposed, zero-padded)
    stride_vb,
    stride_vh,
    stride_vs,
    n_heads,
    seq,
    seq_pad,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGN: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    x, offs_s, offs_d, mask = _load_row_block(
        v_ptr, stride_vb, stride_vh, stride_vs, n_heads, seq, HEAD_DIM, BLOCK_S, BLOCK_D, ALIGN
    )
    scale = tl.load(scale_ptr + pid_bh * DV + offs_d, mask=offs_d < DV, other=1.0)
    # Padding lanes: 1 / 1 then 0, not 0 / 1 (the division's slow path; see the int8 one).
    y = tl.where(mask, tl.div_rn(tl.where(mask, x, 1.0), scale[None, :]), 0.0)
    if INTERPRET:
        y = fp8_e4m3_rne_as_fp32(y)
    y = y.to(tl.float8e4nv)
    out_base = out_ptr + pid_bh.to(tl.int64) * DV * seq_pad
    out_mask = (offs_s < seq_pad)[:, None] & (offs_d < DV)[None, :]
    tl.store(out_base + offs_d[None, :] * seq_pad + offs_s[:, None], y, mask=out_mask)


def quantize_v_fp8_transposed(
    v: torch.Tensor, width: int, seq_multiple: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 Vᵀ for the kernel's P·V: ``([B, H, width, S_pad] e4m3, scales [B, H, width])``.

    Transposed so the sequence (P·V's reduction dim) is contiguous, as 8-bit tensor-core
    operands need; rows past the head dim and columns past S are 0. Same values as
    :func:`quantize_v_fp8_reference`, transposed.
    """
    b, h, s, d = v.shape
    scale = v_fp8_scales(v, width)
    seq_pad = triton.cdiv(s, seq_multiple) * seq_multiple
    out = torch.empty((b, h, width, seq_pad), dtype=torch.float8_e4m3fn, device=v.device)
    block_s = 64
    _quantize_v_fp8_kernel[(triton.cdiv(seq_pad, block_s), b * h)](
        v, scale, out, v.stride(0), v.stride(1), v.stride(2), h, s, seq_pad,
        HEAD_DIM=d, DV=width, BLOCK_D=max(16, triton.next_power_of_2(width)), BLOCK_S=block_s,
        INTERPRET=_interpreting(), ALIGN=stride_alignment(*v.stride()[:3]), num_warps=4,
    )  # fmt: skip
    return out, scale


def quantize_v_fp8_transposed_torch(
    v: torch.Tensor, width: int, seq_multiple: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_v_fp8_transposed` in plain torch ops (same values, bit for bit), for
    compiled graphs: Inductor writes the transposed fp8 copy in one tiled kernel."""
    s, d = v.shape[2:]
    scale = v_fp8_scales(v, width)
    y = v.float() / scale[:, :, None, :d]
    seq_pad = triton.cdiv(s, seq_multiple) * seq_multiple
    y = torch.nn.functional.pad(y, (0, width - y.shape[-1])).transpose(-1, -2)
    y = torch.nn.functional.pad(y, (0, seq_pad - s))
    return y.to(torch.float8_e4m3fn).contiguous(), scale


@triton.jit
def _bf16_rne_as_fp32(x):
    """Round float32 ``x`` to the nearest bfloat16 (ties to even), kept in float32.

    Interpreter only: its float32 -> bfloat16 cast truncates, while the GPU rounds to
    nearest; emulating the GPU keeps the CPU tests as tight as the math allows.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a tile, masking rows and/or columns only where the constexpr flags say so
    (unmasked loads of full tiles vectorize and pipeline best)."""
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=row_mask, other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=col_mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _pv_dot(p, v, acc, alpha, PV_FP8: tl.constexpr, PV_IN_FP32: tl.constexpr):
    """``acc * alpha + p @ v`` with p cast for the chosen P·V precision (module docstring)."""
    if PV_FP8:
        # p arrives scaled to [0, 448] (the exponent carries log2(448)), so it uses e4m3's
        # whole range; the row sum carries the same factor, and V's channel scales are
        # applied once at the end.
        # The MMA accumulates across kv blocks. Hopper's fp8 MMA adds with fewer mantissa
        # bits than float32: fine for P·V's signed sums (same error as a float32 sum on an
        # H100), not for P's positive row sums, which the softmax keeps in float32. Adding
        # each block in float32 instead made the kernel 10-40% slower (H100, 2026-11-27).
        if PV_IN_FP32:
            return acc * alpha[:, None] + tl.dot(
                fp8_e4m3_rne_as_fp32(p.to(tl.float32)), v.to(tl.float32)
            )
        return tl.dot(p.to(tl.float8e4nv), v, acc * alpha[:, None])
    if PV_IN_FP32:
        # fp16/bf16 products are exact in float32, so this equals the half-precision dot.
        if v.dtype == tl.bfloat16:
            p = _bf16_rne_as_fp32(p)
        else:
            p = p.to(tl.float32).to(v.dtype).to(tl.float32)
        return acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
    return tl.dot(p.to(v.dtype), v, acc * alpha[:, None])


@triton.jit
def _attend_kv_block(
    q_main,
    q_tail,
    q_scale,
    acc_main,
    acc_tail,
    l_i,
    m_i,
    k_base,
    v_base,
    vt_base,
    k_scale_row_ptr,
    stride_ks,
    stride_vs,
    stride_vd,
    stride_vts,
    stride_vtd,
    seq_kv,
    j,
    QK_MAIN: tl.constexpr,
    QK_TAIL: tl.constexpr,
    PV_MAIN: tl.constexpr,
    PV_TAIL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KV: tl.constexpr,
    PV_FP8: tl.constexpr,
    PV_IN_FP32: tl.constexpr,
    V_ALIGN: tl.constexpr,
):
    """One online-softmax step over kv block ``j``; returns the updated accumulators
    (``m_i``: the running row max of the scores in log2 units)."""
    offs_kv = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_mask = offs_kv < seq_kv
    # K tiles loaded transposed ([D, BLOCK_N]) straight from the row-major, zero-padded
    # int8 copy: every column exists, so only a ragged last block masks anything.
    offs_qk = tl.arange(0, QK_MAIN)
    k = _load_tile(
        k_base + offs_kv[None, :] * stride_ks + offs_qk[:, None],
        kv_mask[None, :], kv_mask[None, :], MASK_KV, False,
    )  # fmt: skip
    s = tl.dot(q_main, k, out_dtype=tl.int32)
    if QK_TAIL > 0:
        offs_qt = QK_MAIN + tl.arange(0, QK_TAIL)
        kt = _load_tile(
            k_base + offs_kv[None, :] * stride_ks + offs_qt[:, None],
            kv_mask[None, :], kv_mask[None, :], MASK_KV, False,
        )  # fmt: skip
        s = tl.dot(q_tail, kt, s, out_dtype=tl.int32)
    c = q_scale * tl.load(k_scale_row_ptr + j)  # int score -> log2 units
    # f = MAGIC + s as a float, by an integer add (a conversion instruction runs at a
    # quarter of the float rate and would cost as much as the exponential).
    f = (s + _MAGIC_BITS).to(tl.float32, bitcast=True)
    if MASK_KV:
        # Ragged last kv block: padded keys must get zero weight, not exp2(0 - m).
        f = tl.where(kv_mask[None, :], f, float("-inf"))
    # Every kv block holds at least one real key, so m_new is finite: no NaN from inf - inf.
    m_new = tl.maximum(m_i, (tl.max(f, 1) - _MAGIC) * c)
    alpha = tl.exp2(m_i - m_new)
    # One FMA per score: (f - MAGIC) * c - m_new, plus log2(448) for fp8 P (see _pv_dot).
    bias = -m_new - _MAGIC * c
    if PV_FP8:
        bias += _LOG2_FP8_MAX
    p = tl.exp2(f * c + bias[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    # V's main and tail column groups both exist in memory (the tail zero-padded by the
    # launcher): Triton 3.6 made sm_90 code that faulted for a column-masked 16-wide tail.
    # fp8 Vᵀ is zero-padded to whole kv blocks, so its loads need no mask: a mask along its
    # contiguous (sequence) axis would split them into single bytes.
    mask_v: tl.constexpr = MASK_KV and not PV_FP8
    offs_vm = tl.arange(0, PV_MAIN)
    v_rows = offs_kv * stride_vs
    if not PV_FP8 and V_ALIGN > 1:  # V rows: hinted like the base (stride_alignment)
        v_rows = tl.multiple_of(v_rows, V_ALIGN)
    v = _load_tile(
        v_base + v_rows[:, None] + offs_vm[None, :] * stride_vd,
        kv_mask[:, None], kv_mask[:, None], mask_v, False,
    )  # fmt: skip
    acc_main = _pv_dot(p, v, acc_main, alpha, PV_FP8, PV_IN_FP32)
    if PV_TAIL > 0:
        offs_vt = tl.arange(0, PV_TAIL)
        vt = _load_tile(
            vt_base + offs_kv[:, None] * stride_vts + offs_vt[None, :] * stride_vtd,
            kv_mask[:, None], kv_mask[:, None], mask_v, False,
        )  # fmt: skip
        acc_tail = _pv_dot(p, vt, acc_tail, alpha, PV_FP8, PV_IN_FP32)
    return acc_main, acc_tail, l_i, m_new


@triton.jit
def _store_out(
    o_base, stride_os, offs_m, m_mask, acc, l_i, v_scale_ptr,
    D0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr,
    INTERPRET: tl.constexpr, O_ALIGN: tl.constexpr,
):  # fmt: skip
    """Normalise one column group of the accumulator and store its real head-dim columns."""
    offs_d = D0 + tl.arange(0, WIDTH)
    out = acc / l_i[:, None]  # for fp8 P both carry the factor 448
    if PV_FP8:
        out = out * tl.load(v_scale_ptr + offs_d)[None, :]
    if INTERPRET and o_base.dtype.element_ty == tl.bfloat16:
        out = _bf16_rne_as_fp32(out)
    mask = m_mask[:, None]
    if D0 + WIDTH > HEAD_DIM:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m * stride_os
    if O_ALIGN > 1:
        rows = tl.multiple_of(rows, O_ALIGN)
    tl.store(
        o_base + rows[:, None] + offs_d[None, :],
        out.to(o_base.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _quantize_q_block(
    q_base, q_rows, m_mask, offs_qm, offs_qt, HEAD_DIM: tl.constexpr, QK_TAIL: tl.constexpr
):
    """This program's fp16/bf16 q rows as int8 main and tail tiles (zero past the head dim)
    and their block scale: absmax / 127 over all the rows' real columns."""
    mask_m = m_mask[:, None] & (offs_qm < HEAD_DIM)[None, :]
    xm = tl.load(q_base + q_rows[:, None] + offs_qm[None, :], mask=mask_m, other=0.0)
    xm = xm.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(xm), 1), 0)
    mask_t = m_mask[:, None] & (offs_qt < HEAD_DIM)[None, :]
    xt = xm
    if QK_TAIL > 0:
        xt = tl.load(q_base + q_rows[:, None] + offs_qt[None, :], mask=mask_t, other=0.0)
        xt = xt.to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.max(tl.abs(xt), 1), 0))
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    q_main = quantize_int8_lanes(xm, mask_m, scale)
    q_tail = q_main
    if QK_TAIL > 0:
        q_tail = quantize_int8_lanes(xt, mask_t, scale)
    return q_main, q_tail, scale


@triton.jit
def _attention_int8_kernel(
    q_ptr,  # int8 [B, H, Sq, DQ], DQ = QK_MAIN + QK_TAIL zero-padded columns; or (Q_FLOAT)
    # fp16/bf16 [B, H, Sq, HEAD_DIM], quantized here
    k_ptr,  # int8 [B, H, Skv, DQ], smoothed, zero-padded the same way
    v_ptr,  # V's first PV_MAIN columns: fp16/bf16 rows [B, H, Skv, >=PV_MAIN], or fp8 Vᵀ
    vt_ptr,  # V's PV_TAIL tail columns, zero-padded: fp16/bf16 [B, H, Skv, PV_TAIL] or in Vᵀ
    o_ptr,  # fp16/bf16 [B, H, Sq, D], any row stride
    q_scale_ptr,  # float32 [B, H, cdiv(Sq, BLOCK_M)] contiguous (unused when Q_FLOAT)
    k_scale_ptr,  # float32 [B, H, cdiv(Skv, BLOCK_N)] contiguous
    v_scale_ptr,  # float32 [B, H, DV] contiguous (PV_FP8 only)
    qk_scale,  # sm_scale * log2(e)
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_vtb,
    stride_vth,
    stride_vts,
    stride_vtd,
    stride_ob,
    stride_oh,
    stride_os,
    n_heads,
    seq_q,
    seq_kv,
    n_q_blocks,
    n_kv_blocks,
    HEAD_DIM: tl.constexpr,
    QK_MAIN: tl.constexpr,
    QK_TAIL: tl.constexpr,
    PV_MAIN: tl.constexpr,
    PV_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_KV: tl.constexpr,
    PV_FP8: tl.constexpr,
    INTERPRET: tl.constexpr,
    V_ALIGN: tl.constexpr,  # stride_alignment of V's batch, head and row (fp8: column) strides
    O_ALIGN: tl.constexpr,  # stride_alignment of the output's batch, head and row strides
    Q_FLOAT: tl.constexpr = False,  # q is fp16/bf16: quantize its block here (one read)
    Q_ALIGN: tl.constexpr = 1,  # stride_alignment of q's batch, head and row strides
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # int64 base offsets: B*H*S*D overflows int32 at large batch x resolution.
    q_off, q_rows = _row_offsets(b, h, offs_m, stride_qb, stride_qh, stride_qs, Q_ALIGN)
    q_base = q_ptr + q_off
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_off = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    if V_ALIGN > 1:
        v_off = tl.multiple_of(v_off, V_ALIGN)
    v_base = v_ptr + v_off
    vt_base = vt_ptr + b.to(tl.int64) * stride_vtb + h.to(tl.int64) * stride_vth
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if O_ALIGN > 1:
        o_off = tl.multiple_of(o_off, O_ALIGN)
    o_base = o_ptr + o_off

    m_mask = offs_m < seq_q
    # The head dim is covered by a power-of-two main tile plus an optional narrower tail
    # (72 -> 64 + 32 for Q·Kᵀ, 64 + 16 for P·V) instead of one 128-wide padded tile.
    offs_qm = tl.arange(0, QK_MAIN)
    offs_qt = QK_MAIN + tl.arange(0, QK_TAIL if QK_TAIL > 0 else 16)
    if Q_FLOAT:
        # One quantization block per program (its BLOCK_M rows), so q needs no pre-pass:
        # the same math as quantize_per_block_int8, on the tile this program loads anyway.
        q_main, q_tail, q_scale = _quantize_q_block(
            q_base, q_rows, m_mask, offs_qm, offs_qt, HEAD_DIM, QK_TAIL
        )
    else:
        q_main = tl.load(q_base + q_rows[:, None] + offs_qm[None, :], mask=m_mask[:, None], other=0)
        q_tail = q_main  # placeholder when there is no tail (never used then)
        if QK_TAIL > 0:
            q_tail = tl.load(
                q_base + q_rows[:, None] + offs_qt[None, :], mask=m_mask[:, None], other=0
            )
        q_scale = tl.load(q_scale_ptr + pid_bh * n_q_blocks + pid_m)
    # Fold the softmax scale and log2(e) into the one q scale so the inner loop does a
    # single multiply.
    q_scale = q_scale * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_main = tl.zeros([BLOCK_M, PV_MAIN], dtype=tl.float32)
    acc_tail = tl.zeros([BLOCK_M, PV_TAIL if PV_TAIL > 0 else 16], dtype=tl.float32)
    k_scale_row = k_scale_ptr + pid_bh * n_kv_blocks

    # INTERPRET (TRITON_INTERPRET=1, the CPU tests) works around two bugs of Triton 3.6's
    # interpreter: range(runtime_int) fails with numpy >= 2.4 (int() of a 1-element array),
    # and tl.dot on bfloat16 returns garbage. Same math either way.
    if INTERPRET:
        j = 0
        while j < n_kv_blocks:
            acc_main, acc_tail, l_i, m_i = _attend_kv_block(
                q_main, q_tail, q_scale, acc_main, acc_tail, l_i, m_i, k_base, v_base,
                vt_base, k_scale_row, stride_ks, stride_vs, stride_vd, stride_vts, stride_vtd,
                seq_kv, j, QK_MAIN,
                QK_TAIL, PV_MAIN, PV_TAIL, BLOCK_N, True, PV_FP8, True, V_ALIGN,
            )  # fmt: skip
            j += 1
    else:
        # A for loop the compiler software-pipelines; masked only when the kv length is not
        # a multiple of BLOCK_N (cross-attention's 120 or 300 text tokens, SD3's 4096 + 154).
        # One loop either way: a separate masked last iteration after the pipelined loop
        # gave wrong results and illegal addresses on an H100 (Triton 3.6).
        for j in range(0, n_kv_blocks):
            acc_main, acc_tail, l_i, m_i = _attend_kv_block(
                q_main, q_tail, q_scale, acc_main, acc_tail, l_i, m_i, k_base, v_base,
                vt_base, k_scale_row, stride_ks, stride_vs, stride_vd, stride_vts, stride_vtd,
                seq_kv, j, QK_MAIN, QK_TAIL, PV_MAIN, PV_TAIL, BLOCK_N, not EVEN_KV, PV_FP8,
                False, V_ALIGN,
            )  # fmt: skip

    v_scale_row = v_scale_ptr + pid_bh * (PV_MAIN + PV_TAIL)
    _store_out(
        o_base, stride_os, offs_m, m_mask, acc_main, l_i, v_scale_row,
        0, PV_MAIN, HEAD_DIM, PV_FP8, INTERPRET, O_ALIGN,
    )  # fmt: skip
    if PV_TAIL > 0:
        _store_out(
            o_base, stride_os, offs_m, m_mask, acc_tail, l_i, v_scale_row,
            PV_MAIN, PV_TAIL, HEAD_DIM, PV_FP8, INTERPRET, O_ALIGN,
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Refuse layouts and dtypes the kernel does not handle, with a message saying why."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"attention_int8: {name} must be [B, H, S, D] (4-D), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"attention_int8: {name} has dtype {t.dtype}; supported: float16, bfloat16 "
                "(use attention_int8_reference for float32)"
            )
        if t.stride(-1) != 1:
            raise ValueError(
                f"attention_int8: {name} must have a contiguous last dim (stride 1), got strides "
                f"{t.stride()}; call .contiguous() or transpose so D is innermost"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"attention_int8: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"attention_int8: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    b, h, _, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"attention_int8: k and v must have the same shape, got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise ValueError(
            f"attention_int8: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and "
            "D (no broadcasting or GQA)"
        )
    if d > _MAX_HEAD_DIM or d % 8 != 0:
        raise ValueError(
            f"attention_int8: head dim {d} not supported; need a multiple of 8 and at most "
            f"{_MAX_HEAD_DIM} (tested: 64, 72, 128)"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(
            f"attention_int8: empty sequence (Sq={q.shape[2]}, Skv={k.shape[2]}) is not supported"
        )


def _check_device(fn: str, t: torch.Tensor) -> None:
    """Triton compiles for GPUs; CPU tensors only work in the interpreter (tests)."""
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{fn}: needs CUDA tensors, got {t.device}; on the CPU use attention_int8_reference "
            "(or TRITON_INTERPRET=1 set before triton is imported, for tests)"
        )


def _check_block(name: str, block: int) -> None:
    # tl.dot needs each dim >= 16, tl.arange needs powers of two.
    if block < 16 or block & (block - 1):
        raise ValueError(f"attention_int8: {name} must be a power of two >= 16, got {block}")


def _default_warps(block_m: int) -> int:
    return 8 if block_m >= 128 else 4


class Operands(NamedTuple):
    """What the kernel reads, prepared by :func:`prepare_operands`."""

    q8: torch.Tensor  # int8 [B, H, Sq, DQ], zero-padded columns
    q_scale: torch.Tensor  # float32 [B, H, cdiv(Sq, block_m)]
    k8: torch.Tensor  # int8 [B, H, Skv, DQ], smoothed
    k_scale: torch.Tensor  # float32 [B, H, cdiv(Skv, block_n)]
    v_main: torch.Tensor  # fp16/bf16 [B, H, Skv, >= PV_MAIN] rows, or fp8 Vᵀ [B, H, DV, S_pad]
    v_tail: torch.Tensor | None  # fp16/bf16 [B, H, Skv, PV_TAIL] zero-padded (fp16 P·V only)
    v_scale: torch.Tensor | None  # float32 [B, H, DV] (fp8 P·V only)


def prepare_operands(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int,
    block_n: int,
    pv_fp8: bool,
) -> Operands:
    """Quantize q and (smoothed) k to padded int8 with block scales; V to fp8 Vᵀ with
    channel scales, or kept, with its tail columns copied into a zero-padded buffer (a
    ``[B, H, Skv, 16]`` copy at head dim 72, ~5% of V's bytes) and V fully padded when the
    head dim is below the 16-wide minimum tile."""
    d = q.shape[-1]
    width = sum(head_dim_tiles(d, 32))
    q8, q_scale = quantize_per_block_int8_triton(q, block_m, pad_to=width)
    k8, k_scale = quantize_per_block_int8_triton(k, block_n, subtract_mean=_k_mean(k), pad_to=width)
    return _with_v(q8, q_scale, k8, k_scale, v, block_n, pv_fp8, quantize_v_fp8_transposed)


def _with_v(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    block_n: int,
    pv_fp8: bool,
    quantize_v: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
) -> Operands:
    """The operands with V's part: fp8 Vᵀ by ``quantize_v``, or V and its padded tail."""
    d = v.shape[-1]
    pv_main, pv_tail = head_dim_tiles(d, 16)
    if pv_fp8:
        # Sequence padded to whole kv blocks: the kernel loads Vᵀ without masks.
        vt8, v_scale = quantize_v(v, pv_main + pv_tail, max(16, block_n))
        return Operands(q8, q_scale, k8, k_scale, vt8, None, v_scale)
    if pv_main > d:
        v = torch.nn.functional.pad(v, (0, pv_main - d))
    tail = None
    if pv_tail:
        tail = torch.nn.functional.pad(v[..., pv_main:], (0, pv_main + pv_tail - d))
    return Operands(q8, q_scale, k8, k_scale, v, tail, None)


def prepare_operands_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int,
    block_n: int,
    pv_fp8: bool,
) -> Operands:
    """:func:`prepare_operands` in plain torch ops, for compiled graphs: Inductor fuses the
    quantization into the kernels that produce q, k and v (a projection's bias, a norm,
    RoPE) and writes 8-bit copies in place of a second pass. Same values (the quantizers
    are the oracles of the Triton ones, tested bit for bit)."""
    d = q.shape[-1]
    pad = sum(head_dim_tiles(d, 32)) - d
    q8, q_scale = quantize_per_block_int8(q, block_m)
    k8, k_scale = quantize_per_block_int8(_smooth_k(k), block_n)
    q8, k8 = (torch.nn.functional.pad(t, (0, pad)) for t in (q8, k8))
    return _with_v(q8, q_scale, k8, k_scale, v, block_n, pv_fp8, quantize_v_fp8_transposed_torch)


def _launch(
    ops: Operands,
    out: torch.Tensor,
    sm_scale: float,
    *,
    head_dim: int,
    seq_kv: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """Run the kernel on prepared operands (checked by the caller). ``ops.q8`` may be the
    fp16/bf16 q itself (``ops.q_scale`` then unused): the kernel quantizes it."""
    b, h, sq, dq = ops.q8.shape
    pv_fp8 = ops.v_scale is not None
    qk_main, qk_tail = head_dim_tiles(head_dim, 32)
    pv_main, pv_tail = head_dim_tiles(head_dim, 16)
    q_float = ops.q8.dtype != torch.int8
    assert dq == (head_dim if q_float else qk_main + qk_tail), (dq, qk_main, qk_tail)
    v = ops.v_main
    if pv_fp8:  # Vᵀ: the tail is rows PV_MAIN.. of the same buffer
        v_strides = (v.stride(0), v.stride(1), 1, v.stride(2))
        vt, vt_strides = v[:, :, pv_main:], v_strides
    else:
        v_strides = (v.stride(0), v.stride(1), v.stride(2), 1)
        vt = ops.v_tail if ops.v_tail is not None else v  # v: unused placeholder
        vt_strides = (vt.stride(0), vt.stride(1), vt.stride(2), 1)
    n_q_blocks = triton.cdiv(sq, block_m)
    n_kv_blocks = triton.cdiv(seq_kv, block_n)
    _attention_int8_kernel[(n_q_blocks, b * h)](
        ops.q8, ops.k8, v, vt, out, ops.k_scale if q_float else ops.q_scale, ops.k_scale,
        ops.q_scale if ops.v_scale is None else ops.v_scale,
        sm_scale * _LOG2E,
        *ops.q8.stride()[:3], *ops.k8.stride()[:3], *v_strides, *vt_strides,
        out.stride(0), out.stride(1), out.stride(2),
        h, sq, seq_kv, n_q_blocks, n_kv_blocks,
        HEAD_DIM=head_dim, QK_MAIN=qk_main, QK_TAIL=qk_tail, PV_MAIN=pv_main, PV_TAIL=pv_tail,
        BLOCK_M=block_m, BLOCK_N=block_n, EVEN_KV=seq_kv % block_n == 0, PV_FP8=pv_fp8,
        INTERPRET=_interpreting(),
        # fp8 Vᵀ's contiguous axis is the sequence: its column stride is the one to align.
        V_ALIGN=stride_alignment(*v_strides[:2], v_strides[3] if pv_fp8 else v_strides[2]),
        O_ALIGN=stride_alignment(*out.stride()[:3]),
        Q_FLOAT=q_float, Q_ALIGN=stride_alignment(*ops.q8.stride()[:3]),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def attention_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_STAGES,
    pv_fp8: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ * sm_scale) v with int8 Q·Kᵀ; q ``[B, H, Sq, D]``, k/v ``[B, H, Skv, D]``.

    Non-causal, no mask; ``Sq != Skv`` (cross-attention) is fine. q, k, v: float16 or
    bfloat16, same dtype and device, any strides with the last one 1. Head dim: multiple of
    8, at most 128 (see :func:`head_dim_tiles` for how 72 is tiled). ``pv_fp8``: P·V in fp8
    e4m3 too (V per channel, P scaled by 448), else in q's dtype. ``block_m``/``block_n``
    are also the quantization blocks; ``num_warps``/``num_stages`` tune the kernel.
    Returns q's dtype, shape ``[B, H, Sq, D]`` in ``[B, Sq, H, D]`` memory order. Expected
    error against float SDPA ~1e-2 relative. Inference only (no autograd formula).
    """
    _check_inputs(q, k, v)
    _check_device("attention_int8", q)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if pv_fp8 and block_n < 32:
        raise ValueError(f"attention_int8: pv_fp8 needs block_n >= 32, got {block_n}")
    d = q.shape[-1]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    operands = prepare_operands(q, k, v, block_m, block_n, pv_fp8)
    out = token_major_empty(q)
    _launch(
        operands, out, sm_scale, head_dim=d, seq_kv=k.shape[2], block_m=block_m,
        block_n=block_n, num_warps=num_warps or _default_warps(block_m), num_stages=num_stages,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# torch.library op: one opaque node for Dynamo / Inductor
# --------------------------------------------------------------------------------------


@torch.library.custom_op("difforge::attention_int8", mutates_args=())
def _attention_int8_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 0,
    num_stages: int = DEFAULT_STAGES,
    pv_fp8: bool = False,
) -> torch.Tensor:
    """``torch.ops.difforge.attention_int8``: :func:`attention_int8` as a library op
    (``num_warps`` 0: the default for ``block_m``)."""
    return attention_int8(
        q, k, v, sm_scale, block_m=block_m, block_n=block_n, num_warps=num_warps or None,
        num_stages=num_stages, pv_fp8=pv_fp8,
    )  # fmt: skip


@_attention_int8_op.register_fake
def _attention_int8_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 0,
    num_stages: int = DEFAULT_STAGES,
    pv_fp8: bool = False,
) -> torch.Tensor:
    # Same checks as the real op, so a bad call fails at trace time, not at run time.
    _check_inputs(q, k, v)
    return token_major_empty(q)


@torch.library.custom_op("difforge::attention_int8_prepared", mutates_args=())
def _attention_int8_prepared_op(
    q8: torch.Tensor,
    head_dim: int,
    out_dtype: torch.dtype,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v_main: torch.Tensor,
    v_tail: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    sm_scale: float,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """``torch.ops.difforge.attention_int8_prepared``: the kernel on operands that
    :func:`prepare_operands_torch` made inside the graph (see :func:`attention_int8_fused`).
    What the output's shape depends on comes first, so the fake needs no full signature."""
    ops = Operands(q8, q_scale, k8, k_scale, v_main, v_tail, v_scale)
    out = token_major_empty(q8, head_dim, out_dtype)
    _launch(
        ops, out, sm_scale, head_dim=head_dim, seq_kv=k8.shape[2], block_m=block_m,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


@_attention_int8_prepared_op.register_fake
def _attention_int8_prepared_fake(
    q8: torch.Tensor, head_dim: int, out_dtype: torch.dtype, *operands: object
) -> torch.Tensor:
    return token_major_empty(q8, head_dim, out_dtype)


@cacheable_target
def attention_int8_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    pv_fp8: bool,
) -> torch.Tensor:
    """What the ``attention_int8`` graph pass puts in place of SDPA: the quantization in
    torch ops (:func:`prepare_operands_torch`, fused by Inductor into the producers of q,
    k, v), then the kernel as one opaque op. Same arguments and result as
    :func:`attention_int8` (inputs checked at trace time by the pass)."""
    d = q.shape[-1]
    q8, *operands = prepare_operands_torch(q, k, v, block_m, block_n, pv_fp8)
    return torch.ops.difforge.attention_int8_prepared(
        q8, d, q.dtype, *operands, d**-0.5 if sm_scale is None else sm_scale, block_m,
        block_n, num_warps or _default_warps(block_m), num_stages,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Timing helper for the benchmark scripts
# --------------------------------------------------------------------------------------


def cuda_graph_ms(fn: Callable[[], object], rep_ms: int = 20) -> float:
    """Median ms of ``fn`` replayed in a CUDA graph (as a compiled model runs it: no launch
    overhead), after one call outside the capture that compiles and warms it up."""
    from triton.testing import do_bench_cudagraph

    fn()
    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def benchmark_attention(
    batch: int = 2,
    heads: int = 16,
    seq_q: int = 4096,
    head_dim: int = 72,
    seq_kv: int | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_STAGES,
    pv_fp8: bool = False,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    device: str = "cuda",
    timer: Callable[[Callable[[], object]], float] | None = None,
    sdpa_ms: float | None = None,
) -> dict[str, float]:
    """Median ms of SDPA vs :func:`attention_int8` on fresh random inputs. Not a test.

    Returns ``{"sdpa_ms", "int8_ms", "int8_kernel_only_ms", "speedup", "rel_err",
    "int8_tflops", "sdpa_tflops"}``: ``int8_ms`` includes the quantization pre-pass and K's
    mean, ``int8_kernel_only_ms`` is the attention kernel alone on pre-quantized inputs,
    ``rel_err`` is ``‖int8 − sdpa‖ / ‖sdpa‖``, TFLOP/s count ``4·B·H·Sq·Skv·D`` (unpadded D).
    ``timer`` (default: ``triton.testing.do_bench_cudagraph``, the median over CUDA-graph
    replays, so the launches' CPU time, which a compiled model's CUDA graph does not pay,
    stays out) is injectable so the plumbing is testable on the CPU; ``sdpa_ms`` skips
    re-timing SDPA in a sweep over kernel configurations.
    """
    if timer is None:
        if device != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("benchmark_attention needs a CUDA GPU (or an explicit timer)")

        def timer(fn: Callable[[], object]) -> float:
            return cuda_graph_ms(fn, rep_ms)

    seq_kv = seq_q if seq_kv is None else seq_kv
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, s, head_dim, device=device, dtype=dtype, generator=gen)
        for s in (seq_q, seq_kv, seq_kv)
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    config = {
        "block_m": block_m,
        "block_n": block_n,
        "num_warps": num_warps or _default_warps(block_m),
        "num_stages": num_stages,
    }

    ref = sdpa(q, k, v)
    out = attention_int8(q, k, v, pv_fp8=pv_fp8, **config)
    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    if sdpa_ms is None:
        sdpa_ms = timer(lambda: sdpa(q, k, v))
    int8_ms = timer(lambda: attention_int8(q, k, v, pv_fp8=pv_fp8, **config))

    # Kernel alone: the floor that a pre-pass fused into the QKV projection could reach.
    operands = prepare_operands(q, k, v, block_m, block_n, pv_fp8)
    o = token_major_empty(q)
    sm_scale = 1.0 / math.sqrt(head_dim)

    def kernel() -> None:
        _launch(operands, o, sm_scale, head_dim=head_dim, seq_kv=seq_kv, **config)

    kernel_ms = timer(kernel)
    torch.testing.assert_close(o, out, rtol=0, atol=0)  # same inputs, same kernel
    tflop = 4.0 * batch * heads * seq_q * seq_kv * head_dim / 1e12
    return {
        "sdpa_ms": float(sdpa_ms),
        "int8_ms": float(int8_ms),
        "int8_kernel_only_ms": float(kernel_ms),
        "speedup": float(sdpa_ms / int8_ms),
        "rel_err": rel_err,
        "int8_tflops": tflop / (int8_ms / 1e3),
        "sdpa_tflops": tflop / (sdpa_ms / 1e3),
    }
