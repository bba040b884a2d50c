"""8-bit attention with one pre-pass: q quantized inside the kernel, k and v in three launches.

:mod:`difforge.kernels.attention_int8`'s kernel reads int8 q, smoothed int8 k and fp8 Vᵀ.
Made by separate quantizers (or by Inductor from torch ops), those cost PixArt-XL's
self-attention more than the kernel saves over cuDNN. Here:

* q is not pre-quantized at all: each kernel program owns exactly one quantization block
  of q (its ``block_m`` rows), so it loads the fp16/bf16 rows, takes their absmax and
  rounds them itself (``Q_FLOAT``), the same math as ``quantize_per_block_int8``.
* k and v need a statistic over the whole sequence before any block can be quantized
  (k's mean, v's per-channel absmax), hence three launches: :func:`_kv_stats_kernel` reads
  k and v once in chunks and writes per-chunk partial sums / maxima;
  :func:`_kv_finish_kernel` reduces them per (batch, head) in a fixed order (so the result
  is deterministic; reducing them in every quantize program instead read ~32 MB of
  partials from L2 at PixArt's size); :func:`_kv_quantize_kernel` writes smoothed int8 k
  with its block scales and fp8 Vᵀ, reading k and v a second time.

Measured (H200, PixArt self-attention 2x16x4096² d72, CUDA-graph timed;
``benchmarks/results/2026-11-29_h200_probe_onepass_v*_s25.json``): the kernel quantizing q
itself takes 0.400 ms against 0.371 on int8 q, and the k/v launches 0.07-0.09 ms, so the
whole (0.48-0.50 ms) loses to the torch-op preparation that Inductor fuses (0.45-0.47) and
to cuDNN's SDPA (0.46). The attention_int8 pass therefore does not use it; it stays for
the probe and as the starting point for a faster pre-pass.

Values: as :func:`~difforge.kernels.attention_int8.attention_int8` with ``pv_fp8``, except
that k's mean is summed in chunks (float32, a different order than ``torch.mean``), so an
int8 k value may differ by one step where a rounding tie moves.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from difforge.kernels import head_dim_tiles, token_major_empty
from difforge.kernels import interpreting as _interpreting
from difforge.kernels.attention_int8 import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    DEFAULT_STAGES,
    Operands,
    _check_block,
    _check_device,
    _check_inputs,
    _default_warps,
    _launch,
    _row_offsets,
    quantize_int8_lanes,
    stride_alignment,
)
from difforge.kernels.rounding import fp8_e4m3_rne_as_fp32

__all__ = ["attention_int8_onepass", "kv_stats", "quantize_kv", "quantize_kv_from_stats"]

#: Rows of k/v per stats program: 4096 tokens x 32 heads -> 512 programs on 132 SMs
#: (H200, PixArt's k and v: 0.025 ms; 128-row chunks of 32-row loads took longer).
STATS_CHUNK = 256
#: At most this many partials per (batch, head): longer sequences take longer chunks.
MAX_CHUNKS = 32
_STATS_ROWS = 64  # rows per load inside a chunk (registers)


@triton.jit
def _kv_stats_kernel(
    k_ptr,  # fp16/bf16 [B, H, S, D], last stride 1
    v_ptr,  # fp16/bf16 [B, H, S, D], last stride 1
    ksum_ptr,  # float32 [B * H, n_chunks, D]: per-chunk column sums of k
    vmax_ptr,  # float32 [B * H, n_chunks, D]: per-chunk column absmax of v
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    n_heads,
    seq,
    n_chunks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
    K_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(CHUNK // ROWS):
        offs_s = pid_c * CHUNK + r * ROWS + tl.arange(0, ROWS)
        mask = (offs_s < seq)[:, None] & d_mask[None, :]
        k_base, k_rows = _row_offsets(b, h, offs_s, stride_kb, stride_kh, stride_ks, K_ALIGN)
        k = tl.load(k_ptr + k_base + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        ksum += tl.sum(k.to(tl.float32), 0)
        v_base, v_rows = _row_offsets(b, h, offs_s, stride_vb, stride_vh, stride_vs, V_ALIGN)
        v = tl.load(v_ptr + v_base + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        vmax = tl.maximum(vmax, tl.max(tl.abs(v.to(tl.float32)), 0))
    out = (pid_bh * n_chunks + pid_c) * HEAD_DIM + offs_d
    tl.store(ksum_ptr + out, ksum, mask=d_mask)
    tl.store(vmax_ptr + out, vmax, mask=d_mask)


@triton.jit
def _kv_finish_kernel(
    ksum_ptr,  # float32 [B * H, n_chunks, D] from _kv_stats_kernel
    vmax_ptr,  # float32 [B * H, n_chunks, D]
    mean_ptr,  # float32 [B * H, D]: k's mean over the sequence
    v_scale_ptr,  # float32 [B, H, DV] contiguous: v's channel scales, 1 past the head dim
    seq_f,  # the sequence length as a float (an int argument of 1 would be specialized)
    n_chunks,
    HEAD_DIM: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNKS_P2: tl.constexpr,  # n_chunks rounded up to a power of two
):
    # One program per (batch, head): the partials in one 2-D load, reduced by a fixed tree
    # (deterministic), once; the quantize kernel's programs then read D floats each.
    pid_bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_c = tl.arange(0, CHUNKS_P2)
    part = (pid_bh * n_chunks + offs_c[:, None]) * HEAD_DIM + offs_d[None, :]
    part_mask = (offs_c < n_chunks)[:, None] & d_mask[None, :]
    ksum = tl.sum(tl.load(ksum_ptr + part, mask=part_mask, other=0.0), 0)
    vmax = tl.max(tl.load(vmax_ptr + part, mask=part_mask, other=0.0), 0)
    mean = tl.div_rn(ksum, tl.zeros_like(ksum) + seq_f)
    tl.store(mean_ptr + pid_bh * HEAD_DIM + offs_d, mean, mask=d_mask)
    v_scale = tl.where(vmax > 0, tl.div_rn(vmax, 448.0), 1.0)
    tl.store(v_scale_ptr + pid_bh * DV + offs_d, v_scale, mask=offs_d < DV)


@triton.jit
def _kv_quantize_kernel(
    k_ptr,  # fp16/bf16 [B, H, S, D], last stride 1
    v_ptr,  # fp16/bf16 [B, H, S, D], last stride 1
    mean_ptr,  # float32 [B * H, D] from _kv_finish_kernel
    v_scale_ptr,  # float32 [B, H, DV] from _kv_finish_kernel
    k8_ptr,  # int8 [B, H, S, DQ] contiguous; columns D..DQ written as 0
    k_scale_ptr,  # float32 [B, H, n_blocks] contiguous
    vt8_ptr,  # fp8 e4m3 [B, H, DV, S_PAD] contiguous; rows D..DV and columns S.. are 0
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    n_heads,
    seq,
    seq_pad,
    n_blocks,
    HEAD_DIM: tl.constexpr,
    DQ: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    K_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    v_scale = tl.load(v_scale_ptr + pid_bh * DV + offs_d, mask=offs_d < DV, other=1.0)

    offs_s = pid_blk * BLOCK + tl.arange(0, BLOCK)
    s_mask = offs_s < seq
    mask = s_mask[:, None] & d_mask[None, :]
    # k: smoothed (padded rows stay 0, not -mean), one int8 scale per block of rows.
    k_base, k_rows = _row_offsets(b, h, offs_s, stride_kb, stride_kh, stride_ks, K_ALIGN)
    k = tl.load(k_ptr + k_base + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    k = tl.where(mask, k.to(tl.float32) - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(k), 1), 0)
    k_scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    k8 = quantize_int8_lanes(k, mask, k_scale)
    k8_base = k8_ptr + pid_bh.to(tl.int64) * seq * DQ
    k8_mask = s_mask[:, None] & (offs_d < DQ)[None, :]
    tl.store(k8_base + offs_s[:, None] * DQ + offs_d[None, :], k8, mask=k8_mask)
    tl.store(k_scale_ptr + pid_bh * n_blocks + pid_blk, k_scale)

    # v: per channel over the whole sequence, stored transposed (the sequence contiguous,
    # as the fp8 P·V MMA wants it), zero past the sequence up to the padded length.
    v_base, v_rows = _row_offsets(b, h, offs_s, stride_vb, stride_vh, stride_vs, V_ALIGN)
    v = tl.load(v_ptr + v_base + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    y = tl.where(mask, tl.div_rn(tl.where(mask, v.to(tl.float32), 1.0), v_scale[None, :]), 0.0)
    if INTERPRET:
        y = fp8_e4m3_rne_as_fp32(y)
    vt_base = vt8_ptr + pid_bh.to(tl.int64) * DV * seq_pad
    vt_mask = (offs_s < seq_pad)[:, None] & (offs_d < DV)[None, :]
    tl.store(
        vt_base + offs_d[None, :] * seq_pad + offs_s[:, None], y.to(tl.float8e4nv), mask=vt_mask
    )


def kv_stats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k's mean over the sequence, float32 ``[B * H, D]``, and v's fp8 channel scales,
    float32 ``[B, H, DV]`` (1 past the head dim): the first two launches of
    :func:`quantize_kv` (per-chunk partials, then their reduction)."""
    b, h, s, d = k.shape
    chunk = stats_chunk(s)
    n_chunks = triton.cdiv(s, chunk)
    dv = sum(head_dim_tiles(d, 16))
    ksum = torch.empty((b * h, n_chunks, d), dtype=torch.float32, device=k.device)
    vmax = torch.empty_like(ksum)
    block_d = max(16, triton.next_power_of_2(d))
    _kv_stats_kernel[(n_chunks, b * h)](
        k, v, ksum, vmax, *k.stride()[:3], *v.stride()[:3], h, s, n_chunks,
        HEAD_DIM=d, BLOCK_D=block_d, CHUNK=chunk,
        ROWS=_STATS_ROWS, K_ALIGN=stride_alignment(*k.stride()[:3]),
        V_ALIGN=stride_alignment(*v.stride()[:3]), num_warps=4,
    )  # fmt: skip
    mean = torch.empty((b * h, d), dtype=torch.float32, device=k.device)
    v_scale = torch.empty((b, h, dv), dtype=torch.float32, device=k.device)
    _kv_finish_kernel[(b * h,)](
        ksum, vmax, mean, v_scale, float(s), n_chunks, HEAD_DIM=d, DV=dv,
        BLOCK_D=max(block_d, triton.next_power_of_2(dv)),
        CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=4,
    )  # fmt: skip
    return mean, v_scale


def stats_chunk(seq: int) -> int:
    """Rows per stats program: :data:`STATS_CHUNK`, doubled until at most
    :data:`MAX_CHUNKS` partials remain (the finishing kernel loads them all at once)."""
    chunk = STATS_CHUNK
    while triton.cdiv(seq, chunk) > MAX_CHUNKS:
        chunk *= 2
    return chunk


def quantize_kv(
    k: torch.Tensor, v: torch.Tensor, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smoothed int8 k and fp8 Vᵀ for the kernel, in three launches (two small).

    Returns ``(k8 [B, H, S, DQ], k_scale [B, H, cdiv(S, block_n)], vt8 [B, H, DV, S_pad],
    v_scale [B, H, DV])`` with DQ/DV the Q·Kᵀ/P·V tile widths of the head dim and S_pad
    the sequence rounded up to whole ``block_n`` blocks (block_n >= 32, a power of two).
    """
    mean, v_scale = kv_stats(k, v)
    return quantize_kv_from_stats(k, v, mean, v_scale, block_n)


def quantize_kv_from_stats(
    k: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, v_scale: torch.Tensor, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last launch of :func:`quantize_kv`, on :func:`kv_stats`' results."""
    b, h, s, d = k.shape
    dq = sum(head_dim_tiles(d, 32))
    dv = v_scale.shape[-1]
    n_blocks = triton.cdiv(s, block_n)
    seq_pad = n_blocks * block_n
    dev = k.device
    k8 = torch.empty((b, h, s, dq), dtype=torch.int8, device=dev)
    k_scale = torch.empty((b, h, n_blocks), dtype=torch.float32, device=dev)
    vt8 = torch.empty((b, h, dv, seq_pad), dtype=torch.float8_e4m3fn, device=dev)
    _kv_quantize_kernel[(n_blocks, b * h)](
        k, v, mean, v_scale, k8, k_scale, vt8, *k.stride()[:3], *v.stride()[:3], h, s,
        seq_pad, n_blocks, HEAD_DIM=d, DQ=dq, DV=dv,
        BLOCK_D=max(16, triton.next_power_of_2(max(dq, dv))), BLOCK=block_n,
        INTERPRET=_interpreting(), K_ALIGN=stride_alignment(*k.stride()[:3]),
        V_ALIGN=stride_alignment(*v.stride()[:3]), num_warps=8 if block_n >= 128 else 4,
    )  # fmt: skip
    return k8, k_scale, vt8, v_scale


def attention_int8_onepass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int | None = None,
    num_stages: int = DEFAULT_STAGES,
) -> torch.Tensor:
    """:func:`~difforge.kernels.attention_int8.attention_int8` with fp8 P·V, prepared in
    two launches over k and v and none over q (module docstring). Same arguments, layout
    and result; ``block_n`` >= 32."""
    _check_inputs(q, k, v)
    _check_device("attention_int8_onepass", q)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if block_n < 32:
        raise ValueError(f"attention_int8_onepass: block_n must be >= 32, got {block_n}")
    d = q.shape[-1]
    k8, k_scale, vt8, v_scale = quantize_kv(k, v, block_n)
    out = token_major_empty(q)
    ops = Operands(q, k_scale, k8, k_scale, vt8, None, v_scale)  # q: quantized in-kernel
    _launch(
        ops, out, 1.0 / math.sqrt(d) if sm_scale is None else sm_scale, head_dim=d,
        seq_kv=k.shape[2], block_m=block_m, block_n=block_n,
        num_warps=num_warps or _default_warps(block_m), num_stages=num_stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("difforge::attention_int8_onepass", mutates_args=())
def _attention_int8_onepass_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 0,
    num_stages: int = DEFAULT_STAGES,
) -> torch.Tensor:
    """``torch.ops.difforge.attention_int8_onepass``: one opaque graph node (``num_warps``
    0: the default for ``block_m``)."""
    return attention_int8_onepass(
        q, k, v, sm_scale, block_m=block_m, block_n=block_n, num_warps=num_warps or None,
        num_stages=num_stages,
    )  # fmt: skip


@_attention_int8_onepass_op.register_fake
def _attention_int8_onepass_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 0,
    num_stages: int = DEFAULT_STAGES,
) -> torch.Tensor:
    _check_inputs(q, k, v)
    return token_major_empty(q)
