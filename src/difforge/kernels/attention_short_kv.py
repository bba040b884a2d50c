"""Attention over a short key/value sequence (cross-attention to text tokens) in one pass.

PixArt's cross-attention reads 4096 image queries against 120 (Alpha) or 300 (Sigma) T5
tokens; SDXL's against 77 CLIP tokens. There the whole key/value sequence fits one tile, so
the flash-attention machinery (an online softmax over kv blocks, a software pipeline over
them) has nothing to pipeline: each of cuDNN's programs loads its query tile, one kv block,
and waits. On an H200 cuDNN took 0.062 ms for PixArt's 2x16x4096x300 (head dim 72,
``benchmarks/results/2026-11-26_h200_probe_ops.json``), where reading q and writing the output
alone take ~8 µs and the math ~20 µs at the tensor cores' rate.

This kernel loads the kv sequence once per program (padded to a power of two, at most
:data:`MAX_KV`), computes the whole score tile, an exact (not online) float32 softmax with
the optional additive mask, and ``P @ V``, for one ``[BLOCK_M, head_dim]`` query tile. Head dims
that are not a power of two are split into two MMA widths (72 = 64 + 16, the tail masked).
The output is allocated token-major (``[B, S, H, D]`` memory, returned as the ``[B, H, S, D]``
view), so the usual ``transpose(1, 2).reshape(B, S, H * D)`` after attention is free.

:func:`attention_short_kv_reference` (``scaled_dot_product_attention`` in float32) is the
oracle; ``torch.ops.difforge.attention_short_kv`` the op the ``attention_short_kv`` pass puts
into graphs (on the CPU, outside Triton's interpreter, it runs the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from difforge.kernels import head_dim_tiles, token_major_empty
from difforge.kernels import interpreting as _interpreting

__all__ = ["MAX_KV", "attention_short_kv", "attention_short_kv_reference"]

#: The longest key/value sequence the kernel takes (one tile of scores per query block).
MAX_KV = 256
MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def attention_short_kv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` in float32 (the oracle), cast back to q's dtype."""
    m = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, scale=scale)
    return out.to(q.dtype)


@triton.jit
def _short_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    o_ptr,
    H,
    SQ,
    SKV,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_bb,
    stride_bh,
    stride_bq,
    stride_bk,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    HEAD_DIM: tl.constexpr,
    D_MAIN: tl.constexpr,
    D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kv = tl.arange(0, BLOCK_KV)
    rows = offs_m < SQ
    keys = offs_kv < SKV
    q_base = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_kv[None, :] * stride_ks
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_kv[:, None] * stride_vs
    d_main = tl.arange(0, D_MAIN)

    # Scores of the whole kv sequence at once: q [M, D] @ k^T [D, KV], in two widths.
    q = tl.load(q_base + d_main[None, :] * stride_qd, mask=rows[:, None], other=0.0)
    kt = tl.load(k_base + d_main[:, None] * stride_kd, mask=keys[None, :], other=0.0)
    if INTERPRET:  # Triton 3.6's interpreter computes bf16 dots wrongly; fp32 is the same
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt)
    if D_TAIL > 0:
        # The tail's columns past the head dim are clamped to its last column and zeroed
        # after the load, never masked in it: Triton 3.6's sm_90 code for a column-masked
        # 16-wide load faulted and returned wrong tail columns (H100, 2026-11-27).
        d_tail = D_MAIN + tl.arange(0, D_TAIL)
        in_dim = d_tail < HEAD_DIM
        d_read = tl.minimum(d_tail, HEAD_DIM - 1)
        qt = tl.load(q_base + d_read[None, :] * stride_qd, mask=rows[:, None], other=0.0)
        qt = tl.where(in_dim[None, :], qt, 0.0)
        ktt = tl.load(k_base + d_read[:, None] * stride_kd, mask=keys[None, :], other=0.0)
        ktt = tl.where(in_dim[:, None], ktt, 0.0)
        if INTERPRET:
            qt = qt.to(tl.float32)
            ktt = ktt.to(tl.float32)
        s = tl.dot(qt, ktt, s)

    # Exact softmax in base 2: the scale (and log2 e) folded into one multiply.
    s = s * qk_scale
    if HAS_BIAS:
        bias_base = bias_ptr + b * stride_bb + h * stride_bh
        if BIAS_ROWS:
            bias = tl.load(
                bias_base + offs_m[:, None] * stride_bq + offs_kv[None, :] * stride_bk,
                mask=rows[:, None] & keys[None, :], other=0.0,
            )  # fmt: skip
            s += bias.to(tl.float32) * 1.4426950408889634
        else:  # one row for every query (a padding mask): a [KV] vector, not a tile
            bias = tl.load(bias_base + offs_kv * stride_bk, mask=keys, other=0.0)
            s += (bias.to(tl.float32) * 1.4426950408889634)[None, :]
    s = tl.where(keys[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a fully masked row: zeros
    p = tl.exp2(s - row_max[:, None])
    denom = tl.sum(p, axis=1)
    inv = tl.where(denom > 0, 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)

    o_base = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
    v = tl.load(v_base + d_main[None, :] * stride_vd, mask=keys[:, None], other=0.0)
    if INTERPRET:
        p_in = p
        v = v.to(tl.float32)
    else:
        p_in = p.to(v.dtype)
    o = tl.dot(p_in, v) * inv[:, None]
    tl.store(o_base + d_main[None, :] * stride_od, o.to(o_ptr.dtype.element_ty), mask=rows[:, None])
    if D_TAIL > 0:
        # Columns past the head dim (duplicates of the last) only reach unstored outputs.
        vt = tl.load(v_base + d_read[None, :] * stride_vd, mask=keys[:, None], other=0.0)
        if INTERPRET:
            vt = vt.to(tl.float32)
        ot = tl.dot(p_in, vt) * inv[:, None]
        tl.store(
            o_base + d_tail[None, :] * stride_od,
            ot.to(o_ptr.dtype.element_ty),
            mask=rows[:, None] & in_dim[None, :],
        )


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention_short_kv takes [B, H, S, D] q, k and v")
    b, h, _, d = q.shape
    if tuple(k.shape[:2]) != (b, h) or k.shape != v.shape or k.shape[3] != d:
        raise ValueError(
            f"attention_short_kv: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
            "must share batch, heads and head dim, k and v one shape"
        )
    if not 1 <= k.shape[2] <= MAX_KV:
        raise ValueError(
            f"attention_short_kv: kv length must be in [1, {MAX_KV}], got {k.shape[2]}"
        )
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention_short_kv: head dim must be <= {MAX_HEAD_DIM}, got {d}")
    if mask is not None:
        if mask.dim() > 4:
            raise ValueError(f"attention_short_kv: mask must have at most 4 dims, got {mask.dim()}")
        torch.broadcast_shapes(mask.shape, (b, h, q.shape[2], k.shape[2]))  # raises if not


def attention_short_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 128,
    num_warps: int = 8,
) -> torch.Tensor:
    """SDPA of ``[B, H, Sq, D]`` queries over at most :data:`MAX_KV` keys, one pass; ``mask``
    is additive (float) or boolean (True = attend), broadcastable to ``[B, H, Sq, Skv]``."""
    _check(q, k, v, mask)
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention_short_kv: q, k, v must share fp16 or bf16, got {q.dtype}")
    b, h, sq, d = q.shape
    skv = k.shape[2]
    out = token_major_empty(q)
    if out.numel() == 0:
        return out
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, float("-inf")
        )
    bias = mask.expand(b, h, sq, skv) if mask is not None else None
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    d_main, d_tail = head_dim_tiles(d, 16)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = (triton.cdiv(sq, block_m), b * h)
    _short_kv_kernel[grid](
        q, k, v, bias if bias is not None else q, out,
        h, sq, skv, sm_scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        HEAD_DIM=d, D_MAIN=d_main, D_TAIL=d_tail, BLOCK_M=block_m,
        BLOCK_KV=max(16, triton.next_power_of_2(skv)), HAS_BIAS=bias is not None,
        BIAS_ROWS=bias is not None and sq > 1 and bias.stride(2) != 0, INTERPRET=_interpreting(), num_warps=num_warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("difforge::attention_short_kv", mutates_args=())
def attention_short_kv_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """``torch.ops.difforge.attention_short_kv``: the kernel on CUDA (and under Triton's
    interpreter), the float32 reference elsewhere (same output layout either way)."""
    if q.is_cuda or (_interpreting() and q.dtype in _SUPPORTED_DTYPES):
        return attention_short_kv(q, k, v, mask, scale)
    _check(q, k, v, mask)
    return token_major_empty(q).copy_(attention_short_kv_reference(q, k, v, mask, scale))


@attention_short_kv_op.register_fake
def _attention_short_kv_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    _check(q, k, v, mask)
    return token_major_empty(q)
