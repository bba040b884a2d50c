"""GEGLU's projection and gate in one GEMM: ``a * gelu(g)`` for ``[a, g] = linear(x, W, b)``.

The SDXL UNet's 70 feed-forward blocks (and SD 1.5's) start with diffusers' ``GEGLU``: one
linear to ``2 * inner`` features, split into halves ``a`` and ``g``, ``a * gelu(g)``. cuBLAS
computes the GEMM, then Inductor's pointwise kernel reads both halves back and writes the
product: 1.75 ms of a 32 ms SDXL UNet step on an H100 (read 2 x, write 1 x the output;
``benchmarks/results/2026-11-26_h100_step_o2_unet.json``, ``triton_poi_fused_gelu_mul_split``).

Here one Triton kernel computes, per ``[BLOCK_M, BLOCK_N]`` tile of the output, both
accumulators (the tile's ``a`` columns and the matching ``g`` columns, read from the two halves
of the weight where they lie) over K, then applies bias, GELU (erf or tanh form) and the
product in float32 and stores the one ``inner``-wide result. The pre-activations never reach
memory, and are not rounded to the input dtype before the GELU (so the result is, if
anything, closer to float32 than eager's).

:func:`geglu_reference` is the oracle (torch, in the input dtype as eager computes it);
:func:`geglu_linear` launches the kernel; ``torch.ops.difforge.geglu_linear`` is the opaque
op that the ``geglu_gemm`` pass puts into graphs (on the CPU it runs the reference, which
is what the pass's CPU tests compile).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["GegluConfig", "geglu_linear", "geglu_reference", "pick_config"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
APPROXIMATIONS = ("none", "tanh")


class GegluConfig(NamedTuple):
    """One tiling of the kernel."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def pick_config(m: int, n: int, k: int) -> GegluConfig:
    """The tiling for an ``[m, k] x [k, 2n]`` GEGLU (measured choice, see the module doc)."""
    del m, n  # one tiling for now; `benchmarks/probe_ops.py --probes geglu` measures others
    return GegluConfig(block_k=64 if k % 64 == 0 else 32)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def geglu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none"
) -> torch.Tensor:
    """``a * gelu(g)`` for ``a, g = linear(x, weight, bias).chunk(2, -1)``, as diffusers'
    GEGLU computes it (in ``x``'s dtype)."""
    a, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return a * F.gelu(g, approximate=approximate)


@triton.jit
def _gelu(g, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly at both ends.
        return 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def _k_step(
    x_ptrs,
    a_ptrs,
    g_ptrs,
    offs_k,
    k_left,
    acc_a,
    acc_g,
    EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One BLOCK_K slice of both accumulators."""
    if EVEN_K:
        x = tl.load(x_ptrs)
        wa = tl.load(a_ptrs)
        wg = tl.load(g_ptrs)
    else:
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        wa = tl.load(a_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        wg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    if INTERPRET:  # products of fp16/bf16 values are exact in float32: the same dot
        x = x.to(tl.float32)
        wa = wa.to(tl.float32)
        wg = wg.to(tl.float32)
    return tl.dot(x, wa, acc_a), tl.dot(x, wg, acc_g)


@triton.jit
def _geglu_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns load a clamped, valid index instead of a mask: their
    # results are never stored, and unmasked loads keep the K loop's copies whole.
    rm = tl.where(offs_m < M, offs_m, 0)
    rn = tl.where(offs_n < N, offs_n, 0)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W is [2N, K]: the tile's `a` rows are rn, its gate rows rn + N; loaded as [K, N] tiles.
    a_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    g_ptrs = a_ptrs + N * stride_wn

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # INTERPRET (TRITON_INTERPRET=1, the CPU tests) works around two bugs of Triton 3.6's
    # interpreter: range() over a runtime int fails with numpy >= 2.4, and tl.dot on
    # bfloat16 returns garbage. Same math either way.
    if INTERPRET:
        k0 = 0
        while k0 < K:
            acc_a, acc_g = _k_step(
                x_ptrs, a_ptrs, g_ptrs, offs_k, K - k0, acc_a, acc_g, EVEN_K, True
            )
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_wk
            g_ptrs += BLOCK_K * stride_wk
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc_a, acc_g = _k_step(
                x_ptrs, a_ptrs, g_ptrs, offs_k, K - k0, acc_a, acc_g, EVEN_K, False
            )
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_wk
            g_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc_a += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + N + rn).to(tl.float32)[None, :]
    out = acc_a * _gelu(acc_g, APPROX_TANH)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_shapes(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(
            f"geglu_linear: approximate must be one of {APPROXIMATIONS}, got {approximate!r}"
        )
    if weight.dim() != 2 or weight.shape[0] % 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"geglu_linear: needs x [..., K] and weight [2N, K], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"geglu_linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> None:
    _check_shapes(x, weight, bias, approximate)
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"geglu_linear: x, weight and bias must share fp16 or bf16, got {sorted(map(str, dtypes))}"
        )


def _empty_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def geglu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    config: GegluConfig | None = None,
) -> torch.Tensor:
    """The fused kernel on ``x [..., K]``, ``weight [2N, K]``, ``bias [2N]``: ``[..., N]``."""
    _check(x, weight, bias, approximate)
    out = _empty_out(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0] // 2
    if m == 0:
        return out
    cfg = config or pick_config(m, n, k)
    out2 = out.view(m, n)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _geglu_kernel[grid](
        x2, weight, bias if bias is not None else weight, out2,
        m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        out2.stride(0), out2.stride(1),
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INTERPRET=_interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("difforge::geglu_linear", mutates_args=())
def geglu_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> torch.Tensor:
    """``torch.ops.difforge.geglu_linear``: :func:`geglu_linear` on CUDA (and under Triton's
    interpreter), :func:`geglu_reference` elsewhere."""
    if x.is_cuda or (_interpreting() and x.dtype in _SUPPORTED_DTYPES):
        return geglu_linear(x, weight, bias, approximate)
    _check_shapes(x, weight, bias, approximate)
    return geglu_reference(x, weight, bias, approximate)


@geglu_linear_op.register_fake
def _geglu_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str
) -> torch.Tensor:
    _check_shapes(x, weight, bias, approximate)
    return _empty_out(x, weight)
