"""The Gluon Hopper attention with its warp groups decoupled (warp specialization).

:mod:`difforge.kernels.attention_hopper` runs two warp groups per CTA in lockstep: a CTA-wide
barrier before each K/V refill makes both do their softmax at the same time, when the tensor
cores have nothing to do. Here one producer warp issues every TMA load, and two consumer warp
groups (each with its own ``BLOCK_M`` rows of Q) release a ring slot by arriving on its
"empty" barrier when their P·V on it is done; neither waits for the other, so one's softmax
can run under the other's MMAs (FlashAttention-3's ping-pong, here without forcing the
alternation). The per-block math is :mod:`~difforge.kernels.attention_hopper`'s (its
``_scores`` / ``_pv`` helpers and issue order).
"""

from __future__ import annotations

import math

import torch

from difforge.kernels import token_major_empty
from difforge.kernels.attention_hopper import (
    HAVE_GLUON,
    LOG2E,
    check_inputs,
    descriptors,
    split_head_dim,
)

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma_wait,
    )

    from difforge.kernels.attention_hopper import (
        _attend_block,
        _first_probs,
        _operands,
        _pv,
        _scores,
        _store_normalized,
    )

    @gluon.jit
    def _attention_hopper_ws_kernel(
        q_desc,
        k_desc,
        v_desc,
        o_desc,
        qt_desc,
        kt_desc,
        vt_desc,
        ot_desc,
        seq_len,
        heads,
        qk_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_MAIN: gl.constexpr,
        HEAD_TAIL: gl.constexpr,
        HAS_TAIL: gl.constexpr,
        STAGES: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        m0 = gl.program_id(0) * (2 * BLOCK_M)
        b = gl.program_id(1) // heads
        h = gl.program_id(1) % heads
        n_blocks = seq_len // BLOCK_N

        q_smem = gl.allocate_shared_memory(dtype, [2, 1, BLOCK_M, 1, HEAD_MAIN], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_MAIN], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_MAIN], v_desc.layout)
        if HAS_TAIL:
            qt_smem = gl.allocate_shared_memory(
                dtype, [2, 1, BLOCK_M, 1, HEAD_TAIL], qt_desc.layout
            )
            kt_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, HEAD_TAIL], kt_desc.layout
            )
            vt_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, HEAD_TAIL], vt_desc.layout
            )
        else:  # never read
            qt_smem = q_smem
            kt_smem = k_smem
            vt_smem = v_smem
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(2):
            mbarrier.init(q_bars.index(c), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer

        # (Gluon's jit takes tuple concatenation, not unpacking)
        shared = (q_desc, o_desc, qt_desc, ot_desc, k_smem, kt_smem, v_smem, vt_smem, k_full,
                  v_full, kv_empty, b, h, n_blocks, qk_scale)  # fmt: skip
        first = shared + (q_smem.index(0), qt_smem.index(0), q_bars.index(0), m0)  # noqa: RUF005
        second = shared + (q_smem.index(1), qt_smem.index(1), q_bars.index(1), m0 + BLOCK_M)  # noqa: RUF005
        loads = (q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, qt_smem, k_smem,
                 kt_smem, v_smem, vt_smem, q_bars, k_full, v_full, kv_empty, b, h, m0,
                 n_blocks)  # fmt: skip
        gl.warp_specialize(
            [(_consumer, first), (_consumer, second), (_producer, loads)],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, qt_desc, kt_desc, vt_desc, q_smem, qt_smem, k_smem,
                  kt_smem, v_smem, vt_smem, q_bars, k_full, v_full, kv_empty, b, h, m0,
                  n_blocks):  # fmt: skip
        """Every TMA load: both consumers' Q, then K and V block by block into the ring,
        each slot once both consumers have released it."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[2]
        BLOCK_N: gl.constexpr = k_smem.shape[2]
        HEAD_MAIN: gl.constexpr = k_smem.shape[4]
        HAS_TAIL: gl.constexpr = qt_desc.block_type.shape[3] >= 16  # 8 columns: no tail
        for c in gl.static_range(2):
            bar = q_bars.index(c)
            mbarrier.expect(bar, q_desc.block_type.nbytes + HAS_TAIL * qt_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m0 + c * BLOCK_M, h, 0], bar,
                                            q_smem.index(c))  # fmt: skip
            if HAS_TAIL:
                tma.async_copy_global_to_shared(qt_desc, [b, m0 + c * BLOCK_M, h, HEAD_MAIN], bar,
                                                qt_smem.index(c))  # fmt: skip
        kv_bytes: gl.constexpr = k_desc.block_type.nbytes + HAS_TAIL * kt_desc.block_type.nbytes
        for j in range(n_blocks):
            slot = j % STAGES
            if j >= STAGES:  # wait for both consumers' release of the block STAGES back
                mbarrier.wait(kv_empty.index(slot), ((j // STAGES) - 1) & 1)
            row = j * BLOCK_N
            mbarrier.expect(k_full.index(slot), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [b, row, h, 0], k_full.index(slot),
                                            k_smem.index(slot))  # fmt: skip
            if HAS_TAIL:
                tma.async_copy_global_to_shared(kt_desc, [b, row, h, HEAD_MAIN],
                                                k_full.index(slot), kt_smem.index(slot))  # fmt: skip
            mbarrier.expect(v_full.index(slot), kv_bytes)
            tma.async_copy_global_to_shared(v_desc, [b, row, h, 0], v_full.index(slot),
                                            v_smem.index(slot))  # fmt: skip
            if HAS_TAIL:
                tma.async_copy_global_to_shared(vt_desc, [b, row, h, HEAD_MAIN],
                                                v_full.index(slot), vt_smem.index(slot))  # fmt: skip

    @gluon.jit
    def _consumer(q_desc, o_desc, qt_desc, ot_desc, k_smem, kt_smem, v_smem, vt_smem, k_full,
                  v_full, kv_empty, b, h, n_blocks, qk_scale, q_smem, qt_smem, q_bar,
                  m):  # fmt: skip
        """One warp group's attention over the ``BLOCK_M`` rows of Q from row ``m`` (its own
        ``q_smem`` / ``qt_smem`` buffers, loaded by the producer onto ``q_bar``)."""
        dtype: gl.constexpr = q_desc.dtype
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[1]
        BLOCK_N: gl.constexpr = k_smem.shape[2]
        HEAD_MAIN: gl.constexpr = k_smem.shape[4]
        HEAD_TAIL: gl.constexpr = qt_desc.block_type.shape[3]
        HAS_TAIL: gl.constexpr = HEAD_TAIL >= 16  # descriptors() gives 8 columns for none
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_MAIN, 16]
        )
        t_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_TAIL, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        pt_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=t_layout, k_width=2)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        t_rows: gl.constexpr = gl.SliceLayout(1, t_layout)

        q_a = q_smem.reshape([BLOCK_M, HEAD_MAIN])
        if HAS_TAIL:  # noqa: SIM108 (a constexpr branch: the other reshape must not exist)
            qt_a = qt_smem.reshape([BLOCK_M, HEAD_TAIL])
        else:
            qt_a = q_a
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_full.index(0), 0)
        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        s = _scores(q_a, qt_a, k_smem, kt_smem, 0, s, BLOCK_N, HEAD_MAIN, HEAD_TAIL, HAS_TAIL)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        m_i, p, l_i = _first_probs(s, qk_scale)
        p_op, pt_op = _operands(p, dtype, p_layout, pt_layout)
        acc = gl.zeros([BLOCK_M, HEAD_MAIN], gl.float32, o_layout)
        acc_t = gl.zeros([BLOCK_M, HEAD_TAIL], gl.float32, t_layout)

        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_full.index(prev), ((j - 1) // STAGES) & 1)
            s, acc, acc_t, m_i, l_i, p_op, pt_op = _attend_block(
                q_a, qt_a, k_smem, kt_smem, v_smem, vt_smem, slot, prev, s, p_op, pt_op, acc,
                acc_t, m_i, l_i, qk_scale, dtype, p_layout, pt_layout, o_rows, t_rows, BLOCK_N,
                HEAD_MAIN, HEAD_TAIL, HAS_TAIL,
            )  # fmt: skip
            # this consumer is done with block j-1's K and V
            mbarrier.arrive(kv_empty.index(prev))

        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_full.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc, acc_t = _pv(p_op, pt_op, v_smem, vt_smem, last, acc, acc_t, BLOCK_N, HEAD_MAIN,
                         HEAD_TAIL, HAS_TAIL)  # fmt: skip
        acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))
        _store_normalized(q_a, qt_a, acc, acc_t, l_i, o_rows, t_rows, dtype, HAS_TAIL)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, m, h, 0], q_smem)
        if HAS_TAIL:
            tma.async_copy_shared_to_global(ot_desc, [b, m, h, HEAD_MAIN], qt_smem)
        tma.store_wait(pendings=0)


def attention_hopper_ws(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    stages: int = 3,
    producer_regs: int = 40,
    consumer_regs: int = 232,
) -> torch.Tensor:
    """:func:`~difforge.kernels.attention_hopper.attention_hopper` with one producer warp and
    two free-running consumer warp groups of ``block_m`` rows each (a CTA covers
    ``2 * block_m`` rows)."""
    if not HAVE_GLUON:
        raise RuntimeError("attention_hopper_ws needs Triton's Gluon (triton >= 3.5)")
    check_inputs(q, k, v, 2 * block_m, block_n, scale)
    if stages < 2:
        # a consumer needs K_j while it still holds V_{j-1}: one slot would deadlock
        raise ValueError(f"stages must be at least 2, got {stages}")
    b, h, s, d = q.shape
    out = torch.empty(b, s, h, d, device=q.device, dtype=q.dtype)
    views = [t.transpose(1, 2) for t in (q, k, v)]
    descs = descriptors(*views, out, block_m, block_n)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    main, tail = split_head_dim(d)
    _attention_hopper_ws_kernel[(s // (2 * block_m), b * h)](
        *descs,
        s,
        h,
        sm_scale * LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_MAIN=main,
        HEAD_TAIL=tail or 8,
        HAS_TAIL=tail > 0,
        STAGES=stages,
        PRODUCER_REGS=producer_regs,
        CONSUMER_REGS=consumer_regs,
        num_warps=4,
    )
    return out.transpose(1, 2)


@torch.library.custom_op("difforge::attention_hopper", mutates_args=())
def _attention_hopper_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    block_m: int,
    block_n: int,
    stages: int,
) -> torch.Tensor:
    """What the ``attention_hopper`` pass inserts: :func:`attention_hopper_ws` as one op."""
    return attention_hopper_ws(q, k, v, scale=scale, block_m=block_m, block_n=block_n,
                               stages=stages)  # fmt: skip


@_attention_hopper_op.register_fake
def _attention_hopper_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    block_m: int,
    block_n: int,
    stages: int,
) -> torch.Tensor:
    return token_major_empty(q)
