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

Status: correctness is tested on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).
Speed is unmeasured until the GPU run (``benchmark_attention`` and the ``gpu`` tests); the
block sizes and warp counts below are untuned first guesses. Quantization runs as a separate
Triton pre-pass (:func:`quantize_per_block_int8_triton`, bit-identical to the plain-torch
:func:`quantize_per_block_int8`): it reads q once and k twice (once for K's mean, in torch)
and writes int8 copies, so at DiT shapes it is not free next to the attention itself;
``benchmark_attention`` reports the kernel alone and the total so the GPU run can tell.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

__all__ = [
    "attention_int8",
    "attention_int8_reference",
    "benchmark_attention",
    "quantize_per_block_int8",
    "quantize_per_block_int8_triton",
]

_LOG2E = 1.4426950408889634
_INT8_MAX = 127.0
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 64


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
) -> torch.Tensor:
    """Plain-torch oracle of :func:`attention_int8`: the same quantization, same math.

    Accepts float32 too (then ``P`` stays float32, which isolates the int8 Q·Kᵀ error when
    comparing with ``F.scaled_dot_product_attention``). Memory is ``O(Sq * Skv)``: a test
    oracle, not a fallback.
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
    out = (p.to(v.dtype).float() @ v.float()) / denom
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(x):
    """Round float32 to the nearest integer, ties to even (``torch.round``'s rule).

    Written with floor because libdevice's rint is missing from Triton's interpreter.
    ``x + 0.5`` is exact for ``0.5 <= |x| < 2**22``; below 0.5 the answer is 0 anyway.
    """
    r = tl.floor(x + 0.5)
    odd_tie = ((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    r = tl.where(odd_tie, r - 1.0, r)
    return tl.where(tl.abs(x) < 0.5, 0.0, r)


@triton.jit
def _quantize_per_block_int8_kernel(
    x_ptr,  # fp16/bf16/fp32 [B, H, S, D], any strides with the last one 1
    mean_ptr,  # float32 [B, H, D] contiguous (only read when SUBTRACT_MEAN)
    out_ptr,  # int8 [B, H, S, D] contiguous
    scale_ptr,  # float32 [B, H, cdiv(S, BLOCK)] contiguous
    stride_xb,
    stride_xh,
    stride_xs,
    n_heads,
    seq,
    n_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_s = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_s < seq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_base = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_base + offs_s[:, None] * stride_xs + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        mean = tl.load(mean_ptr + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        # Padded rows must stay 0, not -mean, or they would inflate the block's absmax.
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    # IEEE divisions (div_rn, not Triton's approximate '/') so the GPU matches torch exactly.
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    q = _round_half_even(tl.div_rn(x, scale))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    out_base = out_ptr + pid_bh.to(tl.int64) * seq * HEAD_DIM
    tl.store(out_base + offs_s[:, None] * HEAD_DIM + offs_d[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + pid_bh * n_blocks + pid_blk, scale)


def quantize_per_block_int8_triton(
    x: torch.Tensor, block: int, *, subtract_mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_per_block_int8` (bit-identical results).

    ``subtract_mean`` (``[B, H, D]`` float32) is subtracted from every row first, in the
    same pass: that is how the attention launcher smooths K without a float32 copy of it.
    ``x`` needs a contiguous last dim; ``block`` a power of two.
    """
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(
            f"quantize_per_block_int8_triton: expected [B, H, S, D] with a contiguous last dim, "
            f"got shape {tuple(x.shape)} strides {x.stride()}"
        )
    _check_device("quantize_per_block_int8_triton", x)
    _check_block("block", block)
    b, h, s, d = x.shape
    n_blocks = triton.cdiv(s, block)
    out = torch.empty((b, h, s, d), dtype=torch.int8, device=x.device)
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
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK=block,
        SUBTRACT_MEAN=subtract_mean is not None,
        num_warps=8 if block >= 128 else 4,
    )
    return out, scale


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
def _attend_kv_block(
    q,
    q_scale,
    acc,
    l_i,
    m_i,
    k_base,
    v_base,
    k_scale_row_ptr,
    stride_ks,
    stride_vs,
    seq_kv,
    j,
    offs_n,
    offs_d,
    d_mask,
    BLOCK_N: tl.constexpr,
    PV_IN_FP32: tl.constexpr,
):
    """One online-softmax step over kv block ``j``; returns the updated (acc, l, m)."""
    offs_kv = j * BLOCK_N + offs_n
    kv_mask = offs_kv < seq_kv
    # K loaded transposed ([BLOCK_D, BLOCK_N]) straight from the row-major layout.
    k = tl.load(
        k_base + offs_kv[None, :] * stride_ks + offs_d[:, None],
        mask=kv_mask[None, :] & d_mask[:, None],
        other=0,
    )
    k_scale = tl.load(k_scale_row_ptr + j)
    s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
    # Ragged last kv block: padded keys must get zero weight, not exp2(0 - m).
    s = tl.where(kv_mask[None, :], s, float("-inf"))
    # Every kv block holds at least one real key, so m_new is finite: no NaN from inf - inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + offs_kv[:, None] * stride_vs + offs_d[None, :],
        mask=kv_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if PV_IN_FP32:
        # fp16/bf16 products are exact in float32, so this equals the half-precision dot.
        if v.dtype == tl.bfloat16:  # noqa: SIM108 (constexpr dtype branch, not a value)
            p = _bf16_rne_as_fp32(p)
        else:
            p = p.to(v.dtype).to(tl.float32)
        pv = tl.dot(p, v.to(tl.float32))
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _attention_int8_kernel(
    q_ptr,  # int8 [B, H, Sq, D]
    k_ptr,  # int8 [B, H, Skv, D], smoothed
    v_ptr,  # fp16/bf16 [B, H, Skv, D]
    o_ptr,  # fp16/bf16 [B, H, Sq, D]
    q_scale_ptr,  # float32 [B, H, cdiv(Sq, BLOCK_M)] contiguous
    k_scale_ptr,  # float32 [B, H, cdiv(Skv, BLOCK_N)] contiguous
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
    stride_ob,
    stride_oh,
    stride_os,
    n_heads,
    seq_q,
    seq_kv,
    n_q_blocks,
    n_kv_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    # int64 base offsets: B*H*S*D overflows int32 at large batch x resolution.
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # HEAD_DIM may be < BLOCK_D (72 -> 128): padded lanes load 0 and contribute nothing.
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_q

    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0,
    )
    # One q scale per program (its rows are exactly one quantization block); fold the
    # softmax scale and log2(e) in once so the inner loop does a single multiply.
    q_scale = tl.load(q_scale_ptr + pid_bh * n_q_blocks + pid_m) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # INTERPRET (TRITON_INTERPRET=1, the CPU tests) works around two bugs of Triton 3.6's
    # interpreter: range(runtime_int) fails with numpy >= 2.4 (int() of a 1-element array),
    # and tl.dot on bfloat16 returns garbage. Same math either way.
    if INTERPRET:
        j = 0
        while j < n_kv_blocks:
            acc, l_i, m_i = _attend_kv_block(
                q, q_scale, acc, l_i, m_i, k_base, v_base, k_scale_ptr + pid_bh * n_kv_blocks,
                stride_ks, stride_vs, seq_kv, j, offs_n, offs_d, d_mask, BLOCK_N, True,
            )  # fmt: skip
            j += 1
    else:
        # A for loop so the compiler can software-pipeline the K/V loads on the GPU.
        for j in range(0, n_kv_blocks):
            acc, l_i, m_i = _attend_kv_block(
                q, q_scale, acc, l_i, m_i, k_base, v_base, k_scale_ptr + pid_bh * n_kv_blocks,
                stride_ks, stride_vs, seq_kv, j, offs_n, offs_d, d_mask, BLOCK_N, False,
            )  # fmt: skip

    out = acc / l_i[:, None]
    if INTERPRET and o_ptr.dtype.element_ty == tl.bfloat16:
        out = _bf16_rne_as_fp32(out)
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


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


def _launch(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    k8: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    sm_scale: float,
    block_m: int,
    block_n: int,
) -> None:
    """Run the kernel on already quantized q/k (checked by the caller)."""
    b, h, sq, d = q8.shape
    skv = k8.shape[2]
    n_q_blocks = triton.cdiv(sq, block_m)
    n_kv_blocks = triton.cdiv(skv, block_n)
    _attention_int8_kernel[(n_q_blocks, b * h)](
        q8,
        k8,
        v,
        out,
        q_scale,
        k_scale,
        sm_scale * _LOG2E,
        q8.stride(0),
        q8.stride(1),
        q8.stride(2),
        k8.stride(0),
        k8.stride(1),
        k8.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        sq,
        skv,
        n_q_blocks,
        n_kv_blocks,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        INTERPRET=_interpreting(),
        # Untuned first guess: 8 warps for the 128-row tiles, 4 for smaller ones. ptxas for
        # sm_90a (compiled on the CPU): 128x64 / 8 warps uses 255 registers and spills 24 B
        # (D=72) or 88 B (D=128); 128x32 / 8 and 64x64 / 4 do not spill. Sweep on the GPU.
        num_warps=8 if block_m >= 128 else 4,
        num_stages=2,
    )


def attention_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    *,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
) -> torch.Tensor:
    """softmax(q kᵀ * sm_scale) v with int8 Q·Kᵀ; q ``[B, H, Sq, D]``, k/v ``[B, H, Skv, D]``.

    Non-causal, no mask; ``Sq != Skv`` (cross-attention) is fine. q, k, v: float16 or
    bfloat16, same dtype and device, any strides with the last one 1. Head dim: multiple of
    8, at most 128; a head dim that is not a power of two is padded to the next one inside
    the kernel (72 -> 128: the two GEMMs then do 128/72 = 1.78x the work and the q, k, v and
    accumulator tiles take 1.78x the registers, so D=72 runs at best at D=128's time).
    Returns a contiguous ``[B, H, Sq, D]`` tensor of q's dtype. Expected error against float
    SDPA ~1e-2 relative (int8 Q·Kᵀ). Inference only (no autograd formula). Speed is
    unmeasured until the GPU run.
    """
    _check_inputs(q, k, v)
    _check_device("attention_int8", q)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    b, h, sq, d = q.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)

    q8, q_scale = quantize_per_block_int8_triton(q, block_m)
    k8, k_scale = quantize_per_block_int8_triton(k, block_n, subtract_mean=_k_mean(k))
    out = torch.empty((b, h, sq, d), dtype=q.dtype, device=q.device)
    _launch(q8, q_scale, k8, k_scale, v, out, sm_scale, block_m, block_n)
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
) -> torch.Tensor:
    """``torch.ops.difforge.attention_int8``: :func:`attention_int8` as a library op."""
    return attention_int8(q, k, v, sm_scale, block_m=block_m, block_n=block_n)


@_attention_int8_op.register_fake
def _attention_int8_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
) -> torch.Tensor:
    # Same checks as the real op, so a bad call fails at trace time, not at run time.
    _check_inputs(q, k, v)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------
# Timing helper for the benchmark scripts
# --------------------------------------------------------------------------------------


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
    warmup_ms: int = 25,
    rep_ms: int = 100,
    device: str = "cuda",
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> dict[str, float]:
    """Median ms of SDPA vs :func:`attention_int8` on fresh random inputs. Not a test.

    Returns ``{"sdpa_ms", "int8_ms", "int8_kernel_only_ms", "speedup", "rel_err",
    "int8_tflops", "sdpa_tflops"}``: ``int8_ms`` includes the quantization pre-pass and K's
    mean, ``int8_kernel_only_ms`` is the attention kernel alone on pre-quantized inputs,
    ``rel_err`` is ``‖int8 − sdpa‖ / ‖sdpa‖``, TFLOP/s count ``4·B·H·Sq·Skv·D`` (unpadded D).
    ``timer`` (default: ``triton.testing.do_bench``, median of CUDA-event timings after
    warm-up) is injectable so the plumbing is testable on the CPU.
    """
    if timer is None:
        if device != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("benchmark_attention needs a CUDA GPU (or an explicit timer)")
        from triton.testing import do_bench

        def timer(fn: Callable[[], object]) -> float:
            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    seq_kv = seq_q if seq_kv is None else seq_kv
    q = torch.randn(batch, heads, seq_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, seq_kv, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, heads, seq_kv, head_dim, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    ref = sdpa(q, k, v)
    out = attention_int8(q, k, v, block_m=block_m, block_n=block_n)
    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    sdpa_ms = timer(lambda: sdpa(q, k, v))
    int8_ms = timer(lambda: attention_int8(q, k, v, block_m=block_m, block_n=block_n))

    # Kernel alone: the floor that a pre-pass fused into the QKV projection could reach.
    q8, q_scale = quantize_per_block_int8_triton(q, block_m)
    k8, k_scale = quantize_per_block_int8_triton(k, block_n, subtract_mean=_k_mean(k))
    o = torch.empty_like(q)
    sm_scale = 1.0 / math.sqrt(head_dim)
    kernel_ms = timer(lambda: _launch(q8, q_scale, k8, k_scale, v, o, sm_scale, block_m, block_n))
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
