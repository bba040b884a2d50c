"""Exact fp16/bf16 attention for Hopper written in Gluon (Triton's explicit-layout dialect).

Why: cuDNN's flash attention is ~45% of a compiled DiT step and runs at ~340-380 TFLOP/s at
PixArt's head dim 72 on an H100/H200. Triton's own ``tl.dot`` pipeline waits for each MMA
before the softmax (FlashAttention-2's shape; Triton 3.6 warp-specializes loops only on
Blackwell), so a plain Triton kernel loses to cuDNN. Gluon exposes Hopper's asynchronous
``wgmma`` directly: here the softmax of kv block ``j`` runs while the P·V of block ``j - 1``
is in flight on the tensor cores, with K and V streamed through a TMA ring of ``STAGES``
buffers.

The issue order matters more than the PTX suggests. FlashAttention-3 issues ``S_j = Q K_jᵀ``
and ``P_{j-1} V_{j-1}`` together and waits for the first alone; ptxas then waits for both at
the softmax's first warp shuffle (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` before the exponentials
in the SASS), so nothing overlaps. Waiting for ``S_j`` before issuing the P·V keeps one group
in flight through the softmax, and ptxas interleaves the P·V's HGMMAs with it. And the loop
carries P as the 16-bit MMA operand, converted after the P·V's wait: carried in float32 and
converted at the top, the new exponentials took the registers the running P·V reads.

Status (H200, ``benchmarks/results/2026-11-29_h200_probe_hopperattn_v*_s30.json``): exact
(SDPA's own error); against cuDNN 1.0-1.04x at PixArt's self-attention, 1.27x at SDXL's
1024-token level, 0.87-0.98x at SD3's, FLUX's and SDXL's 4096-token shapes. Its two warp
groups run in step (a CTA-wide barrier before each refill), so both do their softmax at once;
:mod:`difforge.kernels.attention_hopper_ws` splits them with a producer warp and is the one
the ``attention_hopper`` pass uses (1.19x cuDNN at PixArt). This module keeps the per-block
math both share (``_scores``, ``_pv``), the descriptors and the input checks.

q, k, v are ``[B, H, S, D]`` with any strides that are 16-byte multiples, a contiguous head
dim and a 16-byte-aligned start (views of one fused projection included): TMA reads them through 4-D descriptors over the ``[B, S, H, D]`` view,
and the output is written ``[B, S, H, D]``-contiguous (returned as its ``[B, H, S, D]``
view, so the usual ``transpose(1, 2).reshape(B, S, H * D)`` after attention is free).
Triton's tensor shapes are powers of two, so a head dim such as 72 is read as a 64-column
block and a 16-column tail whose TMA box reaches past the last column: TMA fills those
columns with zeros, which add nothing to q·kᵀ, and the TMA store clips them from the output.
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
        heads,
        qk_scale,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        HEAD_MAIN: gl.constexpr,
        HEAD_TAIL: gl.constexpr,
        HAS_TAIL: gl.constexpr,
        STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        dtype: gl.constexpr = q_desc.dtype
        m0 = gl.program_id(0) * BLOCK_M
        b = gl.program_id(1) // heads
        h = gl.program_id(1) % heads
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

        # TMA boxes are [1, rows, 1, cols] of the [B, S, H, D] view; the MMAs see them as
        # [rows, cols] through reshape
        q_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, 1, HEAD_MAIN], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_MAIN], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, 1, HEAD_MAIN], v_desc.layout)
        if HAS_TAIL:
            qt_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, 1, HEAD_TAIL], qt_desc.layout)
            kt_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, HEAD_TAIL], kt_desc.layout
            )
            vt_smem = gl.allocate_shared_memory(
                dtype, [STAGES, 1, BLOCK_N, 1, HEAD_TAIL], vt_desc.layout
            )
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
        kv_bytes: gl.constexpr = k_desc.block_type.nbytes + HAS_TAIL * kt_desc.block_type.nbytes
        mbarrier.expect(q_bar, q_bytes)
        tma.async_copy_global_to_shared(q_desc, [b, m0, h, 0], q_bar, q_smem)
        if HAS_TAIL:
            tma.async_copy_global_to_shared(qt_desc, [b, m0, h, HEAD_MAIN], q_bar, qt_smem)
        for i in gl.static_range(STAGES):
            if i < n_blocks:
                _load_kv(k_desc, kt_desc, k_bars, k_smem, kt_smem, i, i * BLOCK_N, b, h,
                         kv_bytes, HEAD_MAIN, HAS_TAIL)  # fmt: skip
                _load_kv(v_desc, vt_desc, v_bars, v_smem, vt_smem, i, i * BLOCK_N, b, h,
                         kv_bytes, HEAD_MAIN, HAS_TAIL)  # fmt: skip

        q_a = q_smem.reshape([BLOCK_M, HEAD_MAIN])
        if HAS_TAIL:  # noqa: SIM108 (a constexpr branch: the other reshape must not exist)
            qt_a = qt_smem.reshape([BLOCK_M, HEAD_TAIL])
        else:
            qt_a = q_a
        # kv block 0: scores, then the first probabilities (nothing to overlap yet)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        s = _scores(q_a, qt_a, k_smem, kt_smem, 0, s, BLOCK_N, HEAD_MAIN, HEAD_TAIL, HAS_TAIL)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        _refill(k_desc, kt_desc, k_bars, k_smem, kt_smem, 0, STAGES, n_blocks, b, h, kv_bytes,
                BLOCK_N, HEAD_MAIN, HAS_TAIL, num_warps)  # fmt: skip
        m_i, p, l_i = _first_probs(s, qk_scale)
        p_op, pt_op = _operands(p, dtype, p_layout, pt_layout)
        acc = gl.zeros([BLOCK_M, HEAD_MAIN], gl.float32, o_layout)
        acc_t = gl.zeros([BLOCK_M, HEAD_TAIL], gl.float32, t_layout)

        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            s, acc, acc_t, m_i, l_i, p_op, pt_op = _attend_block(
                q_a, qt_a, k_smem, kt_smem, v_smem, vt_smem, slot, prev, s, p_op, pt_op, acc,
                acc_t, m_i, l_i, qk_scale, dtype, p_layout, pt_layout, o_rows, t_rows, BLOCK_N,
                HEAD_MAIN, HEAD_TAIL, HAS_TAIL,
            )  # fmt: skip
            # K_j and V_{j-1} are consumed: their buffers take the blocks STAGES further on
            _refill(k_desc, kt_desc, k_bars, k_smem, kt_smem, slot, j + STAGES, n_blocks, b,
                    h, kv_bytes, BLOCK_N, HEAD_MAIN, HAS_TAIL, num_warps)  # fmt: skip
            _refill(v_desc, vt_desc, v_bars, v_smem, vt_smem, prev, j - 1 + STAGES, n_blocks,
                    b, h, kv_bytes, BLOCK_N, HEAD_MAIN, HAS_TAIL, num_warps)  # fmt: skip

        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc, acc_t = _pv(p_op, pt_op, v_smem, vt_smem, last, acc, acc_t, BLOCK_N, HEAD_MAIN,
                         HEAD_TAIL, HAS_TAIL)  # fmt: skip
        acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
        # the output leaves through Q's buffers (same box, dtype and layout): every read of
        # Q is done, and a separate buffer would cost a kv ring stage
        _store_normalized(q_a, qt_a, acc, acc_t, l_i, o_rows, t_rows, dtype, HAS_TAIL)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, m0, h, 0], q_smem)
        if HAS_TAIL:
            tma.async_copy_shared_to_global(ot_desc, [b, m0, h, HEAD_MAIN], qt_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _first_probs(s, qk_scale):
        """Row max, probabilities and row sums of the first score block (log2 domain)."""
        m_i = gl.max(s, axis=1) * qk_scale
        p = gl.exp2(s * qk_scale - m_i[:, None])
        return m_i, p, gl.sum(p, axis=1)

    @gluon.jit
    def _next_probs(s, m_i, l_i, qk_scale):
        """Online softmax over the next score block: the new row max, the factor ``alpha``
        that moves the running sums to it, the block's probabilities and the row sums."""
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return m_new, alpha, p, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _rescaled(acc, acc_t, alpha, o_rows: gl.constexpr, t_rows: gl.constexpr,
                  HAS_TAIL: gl.constexpr):  # fmt: skip
        """The output accumulators (main and tail columns) moved to the new row max."""
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        if HAS_TAIL:
            acc_t = acc_t * gl.convert_layout(alpha, t_rows)[:, None]
        return acc, acc_t

    @gluon.jit
    def _operands(p, dtype: gl.constexpr, p_layout: gl.constexpr, pt_layout: gl.constexpr):
        """P as the 16-bit register A operand of the main and tail P·V MMAs."""
        p16 = p.to(dtype)
        return gl.convert_layout(p16, p_layout), gl.convert_layout(p16, pt_layout)

    @gluon.jit
    def _store_normalized(q_a, qt_a, acc, acc_t, l_i, o_rows: gl.constexpr,
                          t_rows: gl.constexpr, dtype: gl.constexpr, HAS_TAIL: gl.constexpr):  # fmt: skip
        """O = acc / l into Q's buffers (main and tail columns), for the TMA store."""
        q_a.store((acc / gl.convert_layout(l_i, o_rows)[:, None]).to(dtype))
        if HAS_TAIL:
            qt_a.store((acc_t / gl.convert_layout(l_i, t_rows)[:, None]).to(dtype))

    @gluon.jit
    def _attend_block(q_a, qt_a, k_smem, kt_smem, v_smem, vt_smem, slot, prev, s, p_op, pt_op,
                      acc, acc_t, m_i, l_i, qk_scale, dtype: gl.constexpr,
                      p_layout: gl.constexpr, pt_layout: gl.constexpr, o_rows: gl.constexpr,
                      t_rows: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_MAIN: gl.constexpr,
                      HEAD_TAIL: gl.constexpr, HAS_TAIL: gl.constexpr):  # fmt: skip
        """One kv block (K in ring ``slot``; the previous block's V in ``prev``, whose
        probabilities are ``p_op``): S_j = Q K_jᵀ waited for first, then only
        P_{j-1}·V_{j-1} in flight while the softmax of S_j runs, then the accumulators
        rescaled and P_j made the next P·V operand, after that wait (see the module notes).
        The caller's barrier waits come before and its refills after: ptxas waits for every
        pending wgmma at a branch between issue and wait."""
        s = _scores(q_a, qt_a, k_smem, kt_smem, slot, s, BLOCK_N, HEAD_MAIN, HEAD_TAIL,
                    HAS_TAIL)  # fmt: skip
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        acc, acc_t = _pv(p_op, pt_op, v_smem, vt_smem, prev, acc, acc_t, BLOCK_N, HEAD_MAIN,
                         HEAD_TAIL, HAS_TAIL)  # fmt: skip
        m_i, alpha, p, l_i = _next_probs(s, m_i, l_i, qk_scale)
        acc, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_t))
        acc, acc_t = _rescaled(acc, acc_t, alpha, o_rows, t_rows, HAS_TAIL)
        p_op, pt_op = _operands(p, dtype, p_layout, pt_layout)
        return s, acc, acc_t, m_i, l_i, p_op, pt_op

    @gluon.jit
    def _load_kv(desc, tail_desc, bars, smem, tail_smem, slot, row, b, h,
                 nbytes: gl.constexpr, HEAD_MAIN: gl.constexpr, HAS_TAIL: gl.constexpr):  # fmt: skip
        """One kv block (and its head-dim tail) into ring ``slot``, completing its barrier."""
        bar = bars.index(slot)
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(desc, [b, row, h, 0], bar, smem.index(slot))
        if HAS_TAIL:
            tma.async_copy_global_to_shared(
                tail_desc, [b, row, h, HEAD_MAIN], bar, tail_smem.index(slot)
            )

    @gluon.jit
    def _refill(desc, tail_desc, bars, smem, tail_smem, slot, block, n_blocks, b, h,
                nbytes: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_MAIN: gl.constexpr,
                HAS_TAIL: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Load kv block ``block`` (if it exists) into ``slot``, whose MMA is done."""
        if block < n_blocks:
            if num_warps > 4:  # one warp group's wgmma wait does not cover the other
                gl.thread_barrier()
            _load_kv(desc, tail_desc, bars, smem, tail_smem, slot, block * BLOCK_N, b, h,
                     nbytes, HEAD_MAIN, HAS_TAIL)  # fmt: skip

    @gluon.jit
    def _scores(q, qt, k_smem, kt_smem, slot, s, BLOCK_N: gl.constexpr,
                HEAD_MAIN: gl.constexpr, HEAD_TAIL: gl.constexpr, HAS_TAIL: gl.constexpr):  # fmt: skip
        """Issue S = Q Kᵀ over ring ``slot`` (main head-dim columns, then the tail)."""
        k = k_smem.index(slot).reshape([BLOCK_N, HEAD_MAIN])
        s = warpgroup_mma(q, k.permute((1, 0)), s, use_acc=False, is_async=True)
        if HAS_TAIL:
            kt = kt_smem.index(slot).reshape([BLOCK_N, HEAD_TAIL])
            s = warpgroup_mma(qt, kt.permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _pv(p_op, pt_op, v_smem, vt_smem, slot, acc, acc_t, BLOCK_N: gl.constexpr,
            HEAD_MAIN: gl.constexpr, HEAD_TAIL: gl.constexpr, HAS_TAIL: gl.constexpr):  # fmt: skip
        """Issue O += P V over ring ``slot`` (and the tail columns' accumulator)."""
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_MAIN])
        acc = warpgroup_mma(p_op, v, acc, is_async=True)
        if HAS_TAIL:
            vt = vt_smem.index(slot).reshape([BLOCK_N, HEAD_TAIL])
            acc_t = warpgroup_mma(pt_op, vt, acc_t, is_async=True)
        return acc, acc_t


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
    """TMA descriptors of ``[B, S, H, D]`` q/k/v/out views with boxes ``[1, rows, 1, cols]``:
    over the main head-dim columns, then over the tail (8 columns when there is none, which
    is how a kernel tells: a real tail is at least 16)."""
    main, tail = split_head_dim(q.shape[-1])
    dtype = getattr(gl, _GL_DTYPES[q.dtype])

    def desc(t: torch.Tensor, rows: int, cols: int) -> object:
        box = [1, rows, 1, cols]
        layout = gl.NVMMASharedLayout.get_default_for(box, dtype)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)

    rows = (block_m, block_n, block_n, block_m)
    tensors = (q, k, v, out)
    mains = [desc(t, r, main) for t, r in zip(tensors, rows, strict=True)]
    tails = [desc(t, r, tail or 8) for t, r in zip(tensors, rows, strict=True)]
    return mains + tails


#: The most shared memory a Hopper CTA may use (H100/H200: 227 KiB).
SHARED_MEMORY_LIMIT = 232448
#: Grid dimension y (one program per batch x head) is limited to this.
MAX_BATCH_HEADS = 65535


def tma_readable(shape: tuple[int, ...], strides: tuple[int, ...], offset: int, elem: int) -> bool:
    """Whether TMA can read a tensor of these sizes in place: a contiguous last dim, other
    strides 16-byte multiples (none 0 along a dim longer than 1: no broadcast views), and a
    16-byte-aligned start relative to an aligned base (its storage offset)."""
    if strides[-1] != 1 or offset * elem % 16:
        return False
    for size, stride in zip(shape[:-1], strides[:-1], strict=True):
        if stride * elem % 16 or (stride == 0 and size > 1):
            return False
    return True


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int,
    block_n: int,
    scale: float | None = None,
) -> None:
    """Raise ``ValueError`` for what the kernels do not take (before any GPU work)."""
    if q.dtype not in _GL_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention_hopper takes fp16 or bf16 q/k/v, got {q.dtype}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention_hopper takes equal [B, H, S, D] q/k/v, got {q.shape}")
    b, h, s, d = q.shape
    if s % block_n or s % block_m:
        raise ValueError(f"sequence length {s} must be a multiple of {block_m} and {block_n}")
    if d % 8 or not 16 <= d <= 128:
        raise ValueError(f"head dim {d} must be a multiple of 8 in 16..128")
    if b * h > MAX_BATCH_HEADS:
        raise ValueError(f"batch x heads {b * h} is over the grid's {MAX_BATCH_HEADS}")
    if scale is not None and not scale > 0:
        # the running row max is taken before scaling: a negative scale would pick the
        # minimum and overflow the exponentials
        raise ValueError(f"scale must be positive, got {scale}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not tma_readable(tuple(t.shape), t.stride(), 0, t.element_size()):
            raise ValueError(
                f"{name} needs a contiguous head dim and 16-byte strides (TMA), got {t.stride()}"
            )
        if t.data_ptr() % 16:
            raise ValueError(f"{name} must start 16-byte aligned (TMA)")


def shared_memory_bytes(
    block_m: int, block_n: int, stages: int, head_dim: int, q_tiles: int
) -> int:
    """Shared memory a tile takes: ``q_tiles`` Q blocks (reused for the output) and a ring
    of K and V blocks over the head dim's main and tail columns, plus its barriers."""
    main, tail = split_head_dim(head_dim)
    row_bytes = 2 * (main + tail)
    barriers = 8 * (q_tiles + 3 * stages)
    return q_tiles * block_m * row_bytes + 2 * stages * block_n * row_bytes + barriers


def attention_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 64,
    stages: int = 3,
    num_warps: int = 8,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for ``[B, H, S, D]`` fp16/bf16 q, k, v (any strides with a
    contiguous head dim); the result is a ``[B, H, S, D]`` view of a ``[B, S, H, D]`` tensor."""
    if not HAVE_GLUON:
        raise RuntimeError("attention_hopper needs Triton's Gluon (triton >= 3.5)")
    check_inputs(q, k, v, block_m, block_n, scale)
    if block_m < 16 * num_warps:
        raise ValueError(f"block_m {block_m} is under 16 rows per warp of {num_warps} warps")
    b, h, s, d = q.shape
    out = torch.empty(b, s, h, d, device=q.device, dtype=q.dtype)
    views = [t.transpose(1, 2) for t in (q, k, v)]
    descs = descriptors(*views, out, block_m, block_n)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    main, tail = split_head_dim(d)
    _attention_hopper_kernel[(s // block_m, b * h)](
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
        num_warps=num_warps,
    )
    return out.transpose(1, 2)
