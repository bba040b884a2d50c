"""Exact fp16/bf16 attention for Hopper written in Gluon (Triton's explicit-layout dialect).

Why: cuDNN's flash attention is ~45% of a compiled DiT step and runs at ~340-380 TFLOP/s at
PixArt's head dim 72 on an H100/H200. Triton's own ``tl.dot`` pipeline waits for each
warp group's MMAs before the softmax (FlashAttention-2's shape; Triton 3.6 warp-specializes
loops only on Blackwell), so a plain Triton kernel loses to cuDNN. Gluon exposes Hopper's
asynchronous ``wgmma`` directly, so this kernel issues the Q·Kᵀ of kv block ``j`` and the
P·V of block ``j - 1`` together and runs the softmax of block ``j`` while the second is in
flight (FlashAttention-3's intra-warpgroup pipelining), with K and V streamed through a TMA
ring of ``STAGES`` buffers.

Status (H200, ``benchmarks/results/2026-11-29_h200_probe_hopperattn_v*_s30.json``): exact
(SDPA's own error) but 0.82-0.94x cuDNN at the DiT shapes (1.06-1.13x at SDXL's 1024-token
level), so nothing uses it yet. The PTX has the overlap; ptxas does not keep it: it moves the
wait for the P·V to the first warp shuffle of the softmax's row max (``WARPGROUP.DEPBAR.LE
gsb0, 0x0`` before the ``MUFU.EX2``s in the SASS), so the softmax and the P·V run one after
the other. P from shared memory instead of registers did not change that (slower).

Inputs are ``[B*H*S, D]`` row-major views (one row per token of one head). Triton's tensor
shapes are powers of two, so a head dim such as 72 is read as a 64-column block and a
16-column tail whose TMA box reaches past the tensor's last column: TMA fills those columns
with zeros, which add nothing to q·kᵀ, and the TMA store clips them from the output.
Sequence lengths must be multiples of the blocks (no masking yet).
"""

from __future__ import annotations

import math

import torch

try:  # Gluon ships with Triton >= 3.5; difforge falls back to SDPA without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634


if HAVE_GLUON:

    @gluon.jit
    def _attention_hopper_kernel(
        q_desc,
        k_desc,
        v_desc,
        o_desc,
        qt_desc,
        kt_desc,
        vt_desc,
        ot_desc,
        seq_len,
        qk_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_MAIN: gl.constexpr,
        HEAD_TAIL: gl.constexpr,
        HAS_TAIL: gl.constexpr,
        STAGES: gl.constexpr,
        Q_IN_REGS: gl.constexpr,
        OVERLAP_QK: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        q_row = bh * seq_len + pid_m * BLOCK_M
        kv_row = bh * seq_len
        n_blocks = seq_len // BLOCK_N

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_MAIN, 16]
        )
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_TAIL, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        pt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=t_layout, k_width=2)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        t_rows: gl.constexpr = gl.SliceLayout(1, t_layout)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_MAIN], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_MAIN], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_MAIN], v_desc.layout)
        if HAS_TAIL:
            qt_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_TAIL], qt_desc.layout)
            kt_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_TAIL], kt_desc.layout)
            vt_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_TAIL], vt_desc.layout)
        else:  # never read: no shared memory spent on a tail that is not there
            qt_smem = q_smem
            kt_smem = k_smem
            vt_smem = v_smem
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        q_bytes: gl.constexpr = q_desc.block_type.nbytes + HAS_TAIL * qt_desc.block_type.nbytes
        k_bytes: gl.constexpr = k_desc.block_type.nbytes + HAS_TAIL * kt_desc.block_type.nbytes
        mbarrier.expect(q_bar, q_bytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        if HAS_TAIL:
            tma.async_copy_global_to_shared(qt_desc, [q_row, HEAD_MAIN], q_bar, qt_smem)
        for i in gl.static_range(STAGES):
            if i < n_blocks:
                _load_kv(
                    k_desc,
                    kt_desc,
                    k_bars.index(i),
                    k_smem.index(i),
                    kt_smem.index(i),
                    kv_row + i * BLOCK_N,
                    k_bytes,
                    HEAD_MAIN,
                    HAS_TAIL,
                )
                _load_kv(
                    v_desc,
                    vt_desc,
                    v_bars.index(i),
                    v_smem.index(i),
                    vt_smem.index(i),
                    kv_row + i * BLOCK_N,
                    k_bytes,
                    HEAD_MAIN,
                    HAS_TAIL,
                )

        # kv block 0: scores, then the first probabilities (nothing to overlap yet)
        mbarrier.wait(q_bar, 0)
        if Q_IN_REGS:  # Q·Kᵀ's A operand from registers: half the shared-memory reads
            q_a = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
            qt_a = qt_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        else:
            q_a = q_smem
            qt_a = qt_smem
        mbarrier.wait(k_bars.index(0), 0)
        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        s = _scores(q_a, qt_a, k_smem.index(0), kt_smem.index(0), s, HAS_TAIL)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        _refill_k(
            k_desc,
            kt_desc,
            k_bars,
            k_smem,
            kt_smem,
            0,
            STAGES,
            n_blocks,
            kv_row,
            k_bytes,
            BLOCK_N,
            HEAD_MAIN,
            HAS_TAIL,
            num_warps,
        )
        m_i = gl.max(s, axis=1) * qk_scale
        p = gl.exp2(s * qk_scale - m_i[:, None])
        l_i = gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        pt_op = gl.convert_layout(p.to(dtype), pt_layout)
        acc = gl.zeros([BLOCK_M, HEAD_MAIN], gl.float32, o_layout)
        acc_t = gl.zeros([BLOCK_M, HEAD_TAIL], gl.float32, t_layout)

        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            # every wait on a TMA barrier comes before the MMAs are issued, and every
            # refill after their waits: ptxas waits for all pending wgmma at a branch
            # (a barrier's spin loop, a conditional refill) between issue and wait
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            s = _scores(q_a, qt_a, k_smem.index(slot), kt_smem.index(slot), s, HAS_TAIL)
            if OVERLAP_QK:
                # FlashAttention-3's order: S_j and P_{j-1}·V_{j-1} both in flight, S_j
                # waited for alone. ptxas then waits for the P·V too at the softmax's
                # first warp shuffle, so in practice nothing overlaps
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                if HAS_TAIL:
                    acc_t = warpgroup_mma(pt_op, vt_smem.index(prev), acc_t, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=2, deps=(s,))
                else:
                    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            else:
                # S_j waited for first; then only P_{j-1}·V_{j-1} is in flight while the
                # softmax of S_j runs, an order ptxas keeps overlapped
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                if HAS_TAIL:
                    acc_t = warpgroup_mma(pt_op, vt_smem.index(prev), acc_t, is_async=True)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            if HAS_TAIL:
                acc_t = acc_t * gl.convert_layout(alpha, t_rows)[:, None]
            # P_j becomes the P·V operand only now: the loop carries the 16-bit operand,
            # not the float32 probabilities. Carried in float32 and converted at the top,
            # the new exponentials take the registers of the operand the running P·V
            # reads, and ptxas then waits for that P·V before the softmax (no overlap)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            pt_op = gl.convert_layout(p.to(dtype), pt_layout)
            # K_j and V_{j-1} are consumed: their buffers take the blocks STAGES further on
            _refill_k(
                k_desc,
                kt_desc,
                k_bars,
                k_smem,
                kt_smem,
                slot,
                j + STAGES,
                n_blocks,
                kv_row,
                k_bytes,
                BLOCK_N,
                HEAD_MAIN,
                HAS_TAIL,
                num_warps,
            )
            nxt = j - 1 + STAGES
            if nxt < n_blocks:
                if num_warps > 4:  # one warp group's wgmma wait does not cover the other
                    gl.thread_barrier()
                _load_kv(
                    v_desc,
                    vt_desc,
                    v_bars.index(prev),
                    v_smem.index(prev),
                    vt_smem.index(prev),
                    kv_row + nxt * BLOCK_N,
                    k_bytes,
                    HEAD_MAIN,
                    HAS_TAIL,
                )

        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        if HAS_TAIL:
            acc_t = warpgroup_mma(pt_op, vt_smem.index(last), acc_t, is_async=True)
        acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
        # the output goes out through Q's buffers (same block shape, dtype and layout):
        # every read of Q is done, and a separate buffer would cost a kv ring stage
        q_smem.store((acc / gl.convert_layout(l_i, o_rows)[:, None]).to(dtype))
        if HAS_TAIL:
            qt_smem.store((acc_t / gl.convert_layout(l_i, t_rows)[:, None]).to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
        if HAS_TAIL:
            tma.async_copy_shared_to_global(ot_desc, [q_row, HEAD_MAIN], qt_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _load_kv(
        desc,
        tail_desc,
        bar,
        smem,
        tail_smem,
        row,
        nbytes: gl.constexpr,
        HEAD_MAIN: gl.constexpr,
        HAS_TAIL: gl.constexpr,
    ):
        """One kv block (and its head-dim tail) into a ring slot, completing ``bar``."""
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(desc, [row, 0], bar, smem)
        if HAS_TAIL:
            tma.async_copy_global_to_shared(tail_desc, [row, HEAD_MAIN], bar, tail_smem)

    @gluon.jit
    def _refill_k(
        k_desc,
        kt_desc,
        k_bars,
        k_smem,
        kt_smem,
        slot,
        block,
        n_blocks,
        kv_row,
        nbytes: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_MAIN: gl.constexpr,
        HAS_TAIL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """Load K block ``block`` (if it exists) into ring slot ``slot``, whose Q·Kᵀ is done."""
        if block < n_blocks:
            if num_warps > 4:  # one warp group's wgmma wait does not cover the other
                gl.thread_barrier()
            _load_kv(
                k_desc,
                kt_desc,
                k_bars.index(slot),
                k_smem.index(slot),
                kt_smem.index(slot),
                kv_row + block * BLOCK_N,
                nbytes,
                HEAD_MAIN,
                HAS_TAIL,
            )

    @gluon.jit
    def _scores(q, qt, k_smem, kt_smem, s, HAS_TAIL: gl.constexpr):
        """Issue S = Q Kᵀ (main head-dim columns, then the tail) without waiting."""
        s = warpgroup_mma(q, k_smem.permute((1, 0)), s, use_acc=False, is_async=True)
        if HAS_TAIL:
            s = warpgroup_mma(qt, kt_smem.permute((1, 0)), s, is_async=True)
        return s


_GL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def split_head_dim(d: int) -> tuple[int, int]:
    """(main, tail) column blocks covering head dim ``d``: powers of two (Triton's tensor
    shapes), the tail at least 16 (wgmma's k step) or 0; 72 -> (64, 16), 128 -> (128, 0)."""
    main = 1 << (d.bit_length() - 1)
    rest = d - main
    tail = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return main, tail


def descriptors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    block_m: int,
    block_n: int,
) -> list[object]:
    """TMA descriptors of ``[rows, D]`` q/k/v/out: boxes over the main head-dim columns,
    then over the tail (the same descriptors again when there is none)."""
    main, tail = split_head_dim(q.shape[-1])
    dtype = getattr(gl, _GL_DTYPES[q.dtype])

    def desc(t: torch.Tensor, rows: int, cols: int) -> object:
        layout = gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols], layout)

    rows = (block_m, block_n, block_n, block_m)
    mains = [desc(t, r, main) for t, r in zip((q, k, v, out), rows, strict=True)]
    tails = [desc(t, r, tail or 16) for t, r in zip((q, k, v, out), rows, strict=True)]
    return mains + tails


def attention_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 128,
    stages: int = 2,
    num_warps: int = 8,
    q_in_regs: bool = False,
    overlap_qk: bool = False,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for contiguous ``[B, H, S, D]`` fp16/bf16 q, k, v."""
    if not HAVE_GLUON:
        raise RuntimeError("attention_hopper needs Triton's Gluon (triton >= 3.5)")
    b, h, s, d = q.shape
    if s % block_n or s % block_m:
        raise ValueError(f"sequence length {s} must be a multiple of {block_m} and {block_n}")
    if q.dtype not in _GL_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention_hopper takes fp16 or bf16 q/k/v, got {q.dtype}")
    q2, k2, v2 = (t.contiguous().view(b * h * s, d) for t in (q, k, v))
    out = torch.empty_like(q2)
    descs = descriptors(q2, k2, v2, out, block_m, block_n)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    main, tail = split_head_dim(d)
    grid = (s // block_m, b * h)
    _attention_hopper_kernel[grid](
        *descs,
        s,
        sm_scale * LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_MAIN=main,
        HEAD_TAIL=tail or 16,
        HAS_TAIL=tail > 0,
        STAGES=stages,
        Q_IN_REGS=q_in_regs,
        OVERLAP_QK=overlap_qk,
        num_warps=num_warps,
    )
    return out.view(b, h, s, d)
