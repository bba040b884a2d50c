"""Probe: a Triton GEMM with GEGLU's gate in its epilogue against cuBLAS + Inductor's GEGLU.

The SDXL UNet's 70 feed-forward blocks start with diffusers' ``GEGLU``: one linear to
``2 * inner`` features, ``a * gelu(g)`` of its halves. Inductor runs cuBLAS's GEMM, then a
pointwise kernel that reads both halves back (1.75 ms of a 32 ms O2 step on an H100), and no
cuBLASLt epilogue pairs column ``j`` with ``j + inner``. Here one Triton kernel accumulates
each output tile's ``a`` and ``g`` columns side by side and stores only the product: with
pointer loads (``cp.async``), with tensor-memory-accelerator loads (host-made descriptors),
one tile per program or persistent programs. Measured on an H100 (fp16, SDXL's shapes;
``benchmarks/results/2026-11-27_h100_probe_geglu_s14.json``, ``..._probe_geglu_tma_s14.txt``),
the best (TMA, persistent) ties Inductor at the 1280-channel blocks (0.105 ms; Triton's GEMM
reaches ~510 TFLOP/s where cuBLAS reaches 650) and wins 14% at the 640-channel ones: about
0.2 ms of a 32 ms step, so difforge has no such pass (a ``geglu_gemm`` rewrite with the
pointer kernel lost: 0.115 vs 0.105 ms).

    python benchmarks/probe_geglu.py --output-json out/probe_geglu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from tabulate import tabulate
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from difforge.bench.report import environment


class GegluConfig(NamedTuple):
    """One tiling of the kernel."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


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
def _k_step(x_ptrs, a_ptrs, g_ptrs, offs_k, k_left, acc_a, acc_g, EVEN_K: tl.constexpr):
    """One BLOCK_K slice of both accumulators."""
    if EVEN_K:
        x = tl.load(x_ptrs)
        wa = tl.load(a_ptrs)
        wg = tl.load(g_ptrs)
    else:
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        wa = tl.load(a_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        wg = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
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
    for k0 in range(0, K, BLOCK_K):
        acc_a, acc_g = _k_step(x_ptrs, a_ptrs, g_ptrs, offs_k, K - k0, acc_a, acc_g, EVEN_K)
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


def geglu_pointer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    approximate: str = "none",
    config: GegluConfig | None = None,
) -> torch.Tensor:
    """The pointer-load kernel on ``x [..., K]``, ``weight [2N, K]``, ``bias [2N]``."""
    out = x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0] // 2
    if m == 0:
        return out
    cfg = config or GegluConfig()
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
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


SHAPES = (("sdxl-1280", 2048, 1280, 5120), ("sdxl-640", 8192, 640, 2560))
#: Pointer-load tilings: (block_m, block_n, block_k, warps, stages).
POINTER_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 4, 4),
)
#: TMA tilings: (block_m, block_n, block_k, warps, stages, persistent, flatten).
TILES = (
    (128, 128, 64, 8, 3, False, False),
    (128, 128, 64, 8, 4, False, False),
    (128, 128, 64, 8, 3, True, False),
    (128, 128, 64, 8, 3, True, True),
    (128, 128, 64, 8, 4, True, True),
    (128, 128, 32, 8, 5, True, True),
    (128, 64, 64, 4, 4, True, True),
)


@triton.jit
def _tile(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_n
    first_m = (tile_id // group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile_id % rows), (tile_id % group) // rows


@triton.jit
def _geglu_tma_kernel(
    x_desc,
    w_desc,
    b_ptr,
    out_desc,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile_id, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            x = x_desc.load([off_m, off_k])
            wa = w_desc.load([off_n, off_k])
            wg = w_desc.load([N + off_n, off_k])
            acc_a = tl.dot(x, wa.T, acc_a)
            acc_g = tl.dot(x, wg.T, acc_g)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        keep = offs_n < N
        a = acc_a + tl.load(b_ptr + offs_n, mask=keep, other=0.0).to(tl.float32)[None, :]
        g = acc_g + tl.load(b_ptr + N + offs_n, mask=keep, other=0.0).to(tl.float32)[None, :]
        out = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        out_desc.store([off_m, off_n], out.to(out_desc.dtype))


def geglu_tma(x, w, b, tile):  # type: ignore[no-untyped-def]
    bm, bn, bk, warps, stages, persistent, flatten = tile
    m, k = x.shape
    n = w.shape[0] // 2
    out = x.new_empty((m, n))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = (
        min(torch.cuda.get_device_properties(0).multi_processor_count, tiles)
        if persistent
        else tiles
    )
    _geglu_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        b,
        TensorDescriptor.from_tensor(out, [bm, bn]),
        m, n, k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_PROGRAMS=programs, FLATTEN=flatten,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(2 * n, k, device="cuda", dtype=torch.float16) * k**-0.5
        b = torch.randn(2 * n, device="cuda", dtype=torch.float16)
        ref = geglu_reference(x.float(), w.float(), b.float())
        compiled = torch.compile(geglu_reference)
        operands = (x, w, b)
        variants = [
            ("cublas_linear_only", lambda a=operands: F.linear(*a)),
            ("inductor", lambda a=operands, c=compiled: c(*a)),
        ]
        for bm, bn, bk, warps, stages in POINTER_TILES:
            cfg = GegluConfig(bm, bn, bk, 8, warps, stages)
            label = f"pointer {bm}x{bn}x{bk} w{warps} s{stages}"
            variants.append((label, lambda c=cfg, a=operands: geglu_pointer(*a, config=c)))
        for tile in TILES:
            label = "tma {}x{}x{} w{} s{}{}".format(*tile[:5], " persistent" if tile[5] else "")
            label += " flat" if tile[6] else ""
            variants.append((label, lambda t=tile, a=operands: geglu_tma(*a, t)))
        for label, fn in variants:
            row: dict[str, Any] = {"shape": name, "variant": label}
            try:
                out = fn()
                ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except Exception as exc:  # a tiling that does not compile or fit: say so, go on
                row["error"] = repr(exc)[:300]
                rows.append(row)
                continue
            row.update({"ms": ms, "tflops": 4 * m * k * n / ms / 1e9})
            if label != "cublas_linear_only":
                row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
            rows.append(row)
        torch._dynamo.reset()
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(torch.device("cuda")), "geglu_tma": rows}
        args.output_json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
