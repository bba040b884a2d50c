# ruff: noqa: B023  (each closure is timed inside the loop iteration that defines it)
"""Micro-benchmarks that decide which rewrites are worth building (GPU only).

Each probe times candidate implementations of one op at the shapes of the preset models
(CUDA-event medians via ``triton.testing.do_bench``, fresh random inputs) and checks that
they compute the same function (relative error against a float32 reference):

- ``attention``: SDPA backends (cuDNN / flash / efficient) and q/k/v memory layouts
  (eager's ``view+transpose`` of a [B,S,H*D] projection, contiguous [B,H,S,D], the
  three-way split of a fused QKV projection), and the same attention compiled.
- ``gelu``: linear + tanh-GELU as two kernels vs cuBLASLt's GELU epilogue
  (``torch._addmm_activation``) vs Inductor.
- ``fp8``: ``torch._scaled_mm`` with row-wise scales vs fp16/bf16 GEMM at DiT shapes.
- ``int8attn``: difforge's 8-bit attention kernel vs SDPA per head dim and tile.
- ``fp8block``: a feed-forward's GELU + fp8 quantization + FF2 GEMM with row-wise scales
  (today's O3) vs 1x128 activation / 128x128 weight block scales (one read to quantize).
- ``sdxl8``: SDXL's GEGLU + fp8 quantization (exact looped / persistent / bounded) and
  its attention projections in fp16 vs fp8, per transformer level.
- ``headpad``: SDPA with head dim 72 zero-padded to 80/96/128 (a padded projection's output).
- ``catquant``: fp8 row quantization of a GELU output (FF1) and of FLUX's single-block
  ``cat([attention, gelu(mlp)])``: Inductor's compiled composite (what O3 runs today)
  against difforge's one-kernel Triton quantizer, next to a copy of the same bytes.
- ``lnquant``: LayerNorm + adaLN modulation + fp8 row quantization (what O3 runs before
  each fp8 attention/FF projection of a DiT block) as O3 compiles it against difforge's
  one-kernel Triton version (not yet in any graph), next to a copy of the same bytes.
- ``onepass``: the 8-bit attention with q quantized in its kernel and one k/v pre-pass
  against today's two preparations and SDPA.
- ``rope``: FLUX's per-head RMSNorm + rotary embedding of q and k, stock Inductor against
  difforge's Triton kernel, alone and with the SDPA after it.
- ``ffblock``: PixArt-XL's feed-forward half-block (LayerNorm + adaLN, FF1, tanh GELU,
  FF2, residual) compiled fp16 at O2 and with fp8 linears, with and without the
  ``gelu_tanh_sigmoid`` pass; block time and the time of each kernel.

    python benchmarks/probe_ops.py --probes attention,gelu,fp8,int8attn --output-json out/p.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

from difforge.bench.report import environment

# (name, batch, heads, seq_q, seq_kv, head_dim, dtype) at 1024² with CFG where it applies.
ATTENTION_SHAPES = (
    ("pixart-self", 2, 16, 4096, 4096, 72, torch.float16),
    ("pixart-cross", 2, 16, 4096, 300, 72, torch.float16),
    ("sd3-joint", 2, 24, 4250, 4250, 64, torch.float16),
    ("flux-joint", 1, 24, 4608, 4608, 128, torch.bfloat16),
)

# (name, M, K, N, dtype): the big GEMMs of a step.
GEMM_SHAPES = (
    ("pixart-qkv", 8192, 1152, 3456, torch.float16),
    ("pixart-ff1", 8192, 1152, 4608, torch.float16),
    ("pixart-ff2", 8192, 4608, 1152, torch.float16),
    ("pixart-out", 8192, 1152, 1152, torch.float16),
    ("sd3-ff1", 8192, 1536, 6144, torch.float16),
    ("flux-ff1", 4608, 3072, 12288, torch.bfloat16),
    ("flux-single-proj", 4608, 15360, 3072, torch.bfloat16),
)


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _profiled(fn: Callable[[], object], iters: int) -> Any:
    """The profiler's per-kernel averages over ``iters`` calls of ``fn`` (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def _kernel_ms(fn: Callable[[], object], pattern: tuple[str, ...], iters: int = 10) -> float:
    """Profiler time per call of the kernels whose names contain one of ``pattern``."""
    total = 0.0
    for evt in _profiled(fn, iters):
        name = evt.key.lower()
        if any(p in name for p in pattern):
            total += getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0))
    return total / iters / 1000.0


def probe_attention() -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows: list[dict[str, Any]] = []
    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for name, b, h, sq, skv, d, dtype in ATTENTION_SHAPES:
        flops = 4 * b * h * sq * skv * d
        proj_q = torch.randn(b, sq, h * d, device="cuda", dtype=dtype)
        fused = torch.randn(b, skv, 3 * h * d, device="cuda", dtype=dtype)
        kv = torch.randn(b, skv, 2 * h * d, device="cuda", dtype=dtype)
        layouts = {
            "view_transpose": (
                proj_q.view(b, sq, h, d).transpose(1, 2),
                kv[..., : h * d].contiguous().view(b, skv, h, d).transpose(1, 2),
                kv[..., h * d :].contiguous().view(b, skv, h, d).transpose(1, 2),
            ),
            "contiguous_bhsd": (
                proj_q.view(b, sq, h, d).transpose(1, 2).contiguous(),
                kv[..., : h * d].reshape(b, skv, h, d).transpose(1, 2).contiguous(),
                kv[..., h * d :].reshape(b, skv, h, d).transpose(1, 2).contiguous(),
            ),
        }
        if sq == skv:
            q3, k3, v3 = fused.split(h * d, dim=-1)
            layouts["fused_qkv_split"] = tuple(
                t.view(b, skv, h, d).transpose(1, 2) for t in (q3, k3, v3)
            )
        ref = F.scaled_dot_product_attention(*(t.float() for t in layouts["view_transpose"]))
        for layout, (q, k, v) in layouts.items():
            for backend_name, backend in backends.items():
                row: dict[str, Any] = {
                    "shape": name,
                    "head_dim": d,
                    "layout": layout,
                    "backend": backend_name,
                }
                try:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v)
                        ms = _bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                    if layout == "view_transpose":
                        row["rel_err"] = _rel(out, ref)
                except RuntimeError as exc:
                    row["error"] = str(exc).splitlines()[0][:120]
                rows.append(row)
        # The whole projection + attention + output projection, eager vs compiled: does
        # Inductor hand the attention kernel another layout, and what does it cost?
        if sq == skv:
            wq = torch.randn(3 * h * d, h * d, device="cuda", dtype=dtype) * (h * d) ** -0.5
            x = torch.randn(b, sq, h * d, device="cuda", dtype=dtype)

            def block(x: torch.Tensor, wq: torch.Tensor = wq) -> torch.Tensor:
                q, k, v = F.linear(x, wq).split(h * d, dim=-1)
                q, k, v = (t.view(b, sq, h, d).transpose(1, 2) for t in (q, k, v))
                o = F.scaled_dot_product_attention(q, k, v)
                return o.transpose(1, 2).reshape(b, sq, h * d)

            compiled = torch.compile(block)
            compiled(x)
            for variant, fn in (("eager", block), ("compiled", compiled)):
                rows.append(
                    {
                        "shape": name,
                        "head_dim": d,
                        "layout": f"block_{variant}",
                        "backend": "default",
                        "ms": _bench(lambda fn=fn: fn(x)),
                        "attention_kernel_ms": _kernel_ms(
                            lambda fn=fn: fn(x), ("sdpa", "flash", "fmha", "attention")
                        ),
                    }
                )
            torch._dynamo.reset()
    return rows


def probe_gelu() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, m, k, n, dtype in GEMM_SHAPES:
        if "ff1" not in name:
            continue
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        bias = torch.randn(n, device="cuda", dtype=dtype)
        ref = F.gelu(F.linear(x.float(), w.float(), bias.float()), approximate="tanh")

        def two_kernels() -> torch.Tensor:
            return F.gelu(F.linear(x, w, bias), approximate="tanh")

        def epilogue() -> torch.Tensor:
            return torch._addmm_activation(bias, x, w.t(), use_gelu=True)

        def linear_only() -> torch.Tensor:
            return F.linear(x, w, bias)

        compiled = torch.compile(two_kernels)
        for variant, fn in (
            ("linear_only", linear_only),
            ("linear+gelu", two_kernels),
            ("addmm_activation", epilogue),
            ("inductor", compiled),
        ):
            out = fn()
            ms = _bench(fn)
            rows.append(
                {
                    "shape": name,
                    "variant": variant,
                    "ms": ms,
                    "tflops": 2 * m * k * n / ms / 1e9,
                    "rel_err": None if variant == "linear_only" else _rel(out, ref),
                }
            )
        torch._dynamo.reset()
    return rows


def probe_fp8() -> list[dict[str, Any]]:
    from difforge.quant.fp8 import _scaled_mm_linear, quantize_rows, quantize_weight

    rows: list[dict[str, Any]] = []
    for name, m, k, n, dtype in GEMM_SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        bias = torch.randn(n, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), w.float(), bias.float())
        w8, ws = quantize_weight(w)
        x8, xs = quantize_rows(x)

        def hp() -> torch.Tensor:
            return F.linear(x, w, bias)

        def mm_only() -> torch.Tensor:
            return _scaled_mm_linear(x8, xs, w8, ws, bias, dtype)

        def with_quant() -> torch.Tensor:
            a8, a_s = quantize_rows(x)
            return _scaled_mm_linear(a8, a_s, w8, ws, bias, dtype)

        compiled_quant = torch.compile(with_quant)
        row: dict[str, Any] = {"shape": name, "m": m, "k": k, "n": n}
        try:
            row["hp_ms"] = _bench(hp)
            row["fp8_mm_ms"] = _bench(mm_only)
            compiled_quant()
            row["fp8_quant_compiled_ms"] = _bench(compiled_quant)
            row["speedup_mm"] = row["hp_ms"] / row["fp8_mm_ms"]
            row["speedup_with_quant"] = row["hp_ms"] / row["fp8_quant_compiled_ms"]
            row["rel_err_hp"] = _rel(hp(), ref)
            row["rel_err_fp8"] = _rel(mm_only(), ref)
        except RuntimeError as exc:
            row["error"] = str(exc).splitlines()[0][:160]
        rows.append(row)
        torch._dynamo.reset()
    return rows


# (block_m, block_n, num_warps, num_stages): tiles that compile without register spills
# for sm_90a at head dims 64 and 72 (ptxas -v on the CPU), plus the 128-wide kv tile.
#: (block_m, block_n, warps, stages) per P·V precision: fp16 P·V at the two tiles the
#: 2026-11-26 H100 sweep liked; fp8 P·V over more tiles, as its registers differ.
INT8_ATTENTION_TILES = {
    False: ((128, 64, 8, 3), (64, 64, 4, 3)),
    True: ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)),
}
#: More attention shapes for the 8-bit sweep: SDXL's UNet self-attention at both levels.
INT8_EXTRA_SHAPES = (
    ("sdxl-self-64", 2, 10, 4096, 4096, 64, torch.float16),
    ("sdxl-self-32", 2, 20, 1024, 1024, 64, torch.float16),
)


def probe_int8_attention() -> list[dict[str, Any]]:
    """difforge's 8-bit attention per shape, tile and P·V precision against SDPA (timed once
    per shape), all timed as CUDA-graph replays; each row includes the quantization
    pre-pass (``int8_ms``) and not (``int8_kernel_only_ms``)."""
    from difforge.kernels.attention_int8 import benchmark_attention

    rows: list[dict[str, Any]] = []
    for name, b, h, sq, skv, d, dtype in ATTENTION_SHAPES + INT8_EXTRA_SHAPES:
        sdpa_ms: float | None = None
        for pv_fp8, tiles in INT8_ATTENTION_TILES.items():
            for block_m, block_n, warps, stages in tiles:
                row: dict[str, Any] = {
                    "shape": name, "block_m": block_m, "block_n": block_n, "num_warps": warps,
                    "num_stages": stages, "pv": "fp8" if pv_fp8 else "fp16",
                }  # fmt: skip
                try:
                    res = benchmark_attention(
                        b, h, sq, d, skv, dtype, block_m=block_m, block_n=block_n,
                        num_warps=warps, num_stages=stages, pv_fp8=pv_fp8, rep_ms=40,
                        sdpa_ms=sdpa_ms,
                    )  # fmt: skip
                    sdpa_ms = res["sdpa_ms"]
                    row.update(res)
                except Exception as exc:  # a tile that does not compile is a result too
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
    return rows


def probe_attention_quant() -> list[dict[str, Any]]:
    """Where the 8-bit attention's quantization pre-pass spends its time, per piece, at the
    self/joint attention shapes, with q/k/v as views of one fused projection output as in
    a compiled DiT: each piece's CUDA-graph time next to the time a plain copy of the same
    bytes takes (``copy_ms``: what moving them costs on this card). The thirteenth session
    measured the whole pre-pass at 0.31 ms for PixArt-XL's self-attention against a kernel
    that saves 0.10 ms over cuDNN; which piece is slow decides what to rewrite."""
    from difforge.kernels import attention_int8 as a8

    rows: list[dict[str, Any]] = []
    for name, b, h, sq, skv, d, dtype in ATTENTION_SHAPES:
        if sq != skv:
            continue  # cross-attention: q and kv come from different projections
        fused = torch.randn(b, sq, 3, h, d, device="cuda", dtype=dtype)
        q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, S, D] views
        width = sum(a8.head_dim_tiles(d, 32))
        pv_width = sum(a8.head_dim_tiles(d, 16))
        block_m, block_n = a8.DEFAULT_BLOCK_M, a8.DEFAULT_BLOCK_N
        mean = a8._k_mean(k)
        one = q.numel() * q.element_size()  # bytes of one of q, k, v
        pieces: dict[str, tuple[Callable[[], object], int]] = {
            # (what runs, bytes it must move at least)
            "k_mean (torch)": (lambda: a8._k_mean(k), one),
            "v_scales (torch)": (lambda: a8.v_fp8_scales(v, pv_width), one),
            "q_quant (triton)": (
                lambda: a8.quantize_per_block_int8_triton(q, block_m, pad_to=width),
                one + one // 2,
            ),
            "k_quant (triton)": (
                lambda: a8.quantize_per_block_int8_triton(
                    k, block_n, subtract_mean=mean, pad_to=width
                ),
                one + one // 2,
            ),
            "v_quant_t (triton)": (
                lambda: a8.quantize_v_fp8_transposed(v, pv_width, block_n),
                one + one // 2,
            ),
            "prepare_operands (all)": (
                lambda: a8.prepare_operands(q, k, v, block_m, block_n, True),
                3 * one + 3 * one // 2,
            ),
        }
        compiled = torch.compile(a8.prepare_operands_torch, dynamic=False)
        pieces["prepare_operands_torch (compiled)"] = (
            lambda: compiled(q, k, v, block_m, block_n, True),
            3 * one + 3 * one // 2,
        )
        scratch = torch.empty_like(q)
        copy_ms = a8.cuda_graph_ms(lambda: scratch.copy_(q), 40)
        for piece, (fn, nbytes) in pieces.items():
            row: dict[str, Any] = {"shape": name, "piece": piece}
            try:
                ms = a8.cuda_graph_ms(fn, 40)
                row.update(
                    ms=ms,
                    min_bytes_mb=nbytes / 1e6,
                    gb_per_s=nbytes / (ms * 1e-3) / 1e9,
                    copy_ms=copy_ms,
                    copy_gb_per_s=2 * one / (copy_ms * 1e-3) / 1e9,
                )
            except Exception as exc:  # one piece failing must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
    return rows + _attention_quant_layouts()


def _attention_quant_layouts() -> list[dict[str, Any]]:
    """The q quantizer at PixArt's batch, heads and tokens for head dims 64 / 72 / 128, on
    a view of a fused q/k/v projection and on a contiguous ``[B, H, S, D]`` copy, with 64-
    and 128-row blocks: the 2026-11-28 probe ran it 4x slower per byte at head dim 72 than at
    64 or 128 (still 0.11 ms after the loads were made 16 bytes wide); these rows say whether
    the head dim or the strided layout is to blame, and (head dim 128 with columns 72.. set
    to 0) whether zeros in the data cost the IEEE division its slow path."""
    from difforge.kernels import attention_int8 as a8

    rows: list[dict[str, Any]] = []
    b, h, s = 2, 16, 4096
    for d in (64, 72, 128):
        fused = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.float16)
        view = fused[:, :, 0].transpose(1, 2)
        width = sum(a8.head_dim_tiles(d, 32))
        layouts = [("fused view", view), ("contiguous", view.contiguous())]
        if d == 128:  # zeros in the data itself: does a zero numerator slow the division?
            layouts.append(("zero cols 72+", view.contiguous()))
            layouts[-1][1][..., 72:] = 0
        for layout, q in layouts:
            for block in (64, 128):
                row: dict[str, Any] = {
                    "shape": f"pixart-q d{d} {layout}",
                    "piece": f"q_quant block {block}",
                }
                ms = a8.cuda_graph_ms(
                    lambda q=q, block=block: a8.quantize_per_block_int8_triton(
                        q, block, pad_to=width
                    ),
                    40,
                )
                nbytes = q.numel() * 3  # fp16 in, int8 out
                row.update(ms=ms, min_bytes_mb=nbytes / 1e6, gb_per_s=nbytes / (ms * 1e-3) / 1e9)
                rows.append(row)
    return rows


def _time_quantizers(
    label: dict[str, Any],
    ways: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]],
    moved: int,
    exact: torch.Tensor,
) -> list[dict[str, Any]]:
    """One row per way of quantizing the same activation: CUDA-graph ms, GB/s of the
    ``moved`` bytes, the ms of a copy moving as many, and the error against ``exact``."""
    from difforge.kernels import attention_int8 as a8
    from difforge.quant.fp8 import dequantize

    src = torch.empty(moved // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)  # a copy moving the same bytes: read half, write half
    copy_ms = a8.cuda_graph_ms(lambda: dst.copy_(src), 40)
    rows = []
    for way, fn in ways.items():
        row: dict[str, Any] = {**label, "way": way}
        try:
            q, scale = fn()
            ms = a8.cuda_graph_ms(fn, 40)
            row.update(
                ms=ms,
                gb_per_s=moved / (ms * 1e-3) / 1e9,
                copy_ms=copy_ms,
                rel_err=_rel(dequantize(q, scale), exact),
            )
        except Exception as exc:  # one way failing must not hide the other
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows


# (name, rows, part widths, GELU per part, dtype): the fp8 activation quantizations O3 runs.
CAT_QUANT_SHAPES = (
    ("flux-single", 4608, (3072, 12288), (False, True), torch.bfloat16),
    ("flux-double-ff", 4096, (12288,), (True,), torch.bfloat16),
    ("pixart-ff1", 8192, (4608,), (True,), torch.float16),
    ("sd3-ff1", 8192, (6144,), (True,), torch.float16),
)


def probe_cat_quant() -> list[dict[str, Any]]:
    """GELU (+ concatenation) + fp8 row quantization: Inductor's two kernels (row bound,
    then GELU + scale + cast, each reading the row from DRAM) against the one-kernel Triton
    quantizer (the second sweep reads the row from L2), CUDA-graph timed, with the GB/s of
    the bytes each must move and the time a plain copy of those bytes takes."""
    from difforge.kernels.fp8_row_quant import quantize_cat_rows_triton
    from difforge.passes.activation import gelu_tanh_float
    from difforge.quant.fp8 import quantize_cat_rows

    compiled = torch.compile(quantize_cat_rows, dynamic=False)
    rows: list[dict[str, Any]] = []
    for name, m, widths, gelu, dtype in CAT_QUANT_SHAPES:
        parts = [torch.randn(m, w, device="cuda", dtype=dtype) for w in widths]
        flags = list(gelu)
        exact = torch.cat(
            [gelu_tanh_float(p) if g else p.float() for p, g in zip(parts, flags, strict=True)],
            dim=-1,
        )
        moved = sum(p.numel() * p.element_size() for p in parts) + exact.numel()  # + fp8 out
        ways: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
            "inductor (compiled composite)": lambda: compiled(parts, flags),
            "triton (one kernel)": lambda: quantize_cat_rows_triton(parts, flags),
        }
        label = {"shape": name, "rows": m, "widths": widths}
        rows += _time_quantizers(label, ways, moved, exact)
    return rows


# (name, batch, tokens, width, dtype): the normalised inputs of DiT blocks' fp8 projections.
LN_QUANT_SHAPES = (
    ("flux-single", 1, 4608, 3072, torch.bfloat16),
    ("pixart", 2, 4096, 1152, torch.float16),
    ("sd3", 2, 4096, 1536, torch.float16),
)


def _ln_mod_quant(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(layer_norm(x) * (1 + scale) + shift)``, as an adaLN DiT block feeds
    its fp8 projections."""
    from difforge.quant.fp8 import quantize_rows

    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    return quantize_rows(h.reshape(-1, h.shape[-1]))


def _residual_ln_mod_quant(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual update before a DiT block's norm, then :func:`_ln_mod_quant` of it:
    ``(h, x_fp8, scales)``."""
    h = x + gate[:, None] * y
    return (h, *_ln_mod_quant(h, scale, shift))


def probe_ln_quant() -> list[dict[str, Any]]:
    """LayerNorm + modulation + fp8 row quantization as O3 compiles it against difforge's
    one-kernel Triton version (the row in registers: one read, one float8 write), CUDA-graph
    timed, next to a copy moving the bytes they must (read x, write float8)."""
    import difforge
    from difforge.kernels.fp8_row_quant import (
        quantize_layer_norm_rows_triton,
        quantize_residual_layer_norm_rows_triton,
    )

    rows: list[dict[str, Any]] = []
    for name, b, s, d, dtype in LN_QUANT_SHAPES:
        # O3's rewrites and Inductor settings without its CUDA graphs (the timer records
        # one); one compile per shape, so no recompile warning.
        options = {"mode": "max-optimize:low-precision"}
        compiled = difforge.compile(_ln_mod_quant, options=options)
        x = torch.randn(b, s, d, device="cuda", dtype=dtype)
        scale, shift = (0.5 * torch.randn(b, d, device="cuda", dtype=dtype) for _ in range(2))
        moved = x.numel() * (x.element_size() + 1)
        exact = (
            F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + scale.float()[:, None])
            + shift.float()[:, None]
        ).reshape(-1, d)
        ways: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
            "inductor (O3 settings)": lambda: compiled(x, scale, shift),
            "triton (one kernel)": lambda: quantize_layer_norm_rows_triton(x, scale, shift),
        }
        rows += _time_quantizers({"shape": name, "rows": b * s, "width": d}, ways, moved, exact)
        # With the residual update before the norm (what the model's norms read): one
        # more input read and h written; the error is the quantization's of that h.
        with_residual = difforge.compile(_residual_ln_mod_quant, options=options)
        y = torch.randn_like(x)
        gate = 0.5 * torch.randn(b, d, device="cuda", dtype=dtype)
        h = (x.float() + gate.float()[:, None] * y.float()).to(dtype)
        exact = (
            F.layer_norm(h.float(), (d,), eps=1e-6) * (1 + scale.float()[:, None])
            + shift.float()[:, None]
        ).reshape(-1, d)
        ways = {
            "inductor, residual (O3 settings)": lambda: with_residual(x, y, gate, scale, shift)[1:],
            "triton, residual (one kernel)": lambda: quantize_residual_layer_norm_rows_triton(
                x, y, gate, scale, shift
            )[1:],
        }
        moved_residual = x.numel() * (3 * x.element_size() + 1)  # x, y in; h, fp8 out
        label = {"shape": f"{name}+residual", "rows": b * s, "width": d}
        rows += _time_quantizers(label, ways, moved_residual, exact)
    return rows


# (name, text tokens, image tokens): FLUX.1-dev at 1024², 24 heads of 128, bf16.
ROPE_SHAPES = (("flux-single", 0, 4608), ("flux-double", 512, 4096))


def probe_rope() -> list[dict[str, Any]]:
    """FLUX's per-head RMSNorm + RoPE of q and k: the composite compiled by stock Inductor
    against difforge's Triton kernel (``difforge::rms_norm_rope``), alone and followed by
    the SDPA that reads them (the layout each hands cuDNN is part of the cost); CUDA-graph
    timed, with the error against the float32 composite."""
    from difforge.kernels import attention_int8 as a8
    from difforge.kernels.rms_norm_rope import rms_norm_rope_reference

    heads, d, dtype = 24, 128, torch.bfloat16
    op = torch.ops.difforge.rms_norm_rope.default

    def qk(rope: Callable[..., torch.Tensor], parts: list[list[torch.Tensor]], weights, cs):
        return [rope(p, w, 1e-6, *cs) for p, w in zip(parts, weights, strict=True)]

    def attend(rope: Callable[..., torch.Tensor], parts, weights, cs, v):
        q, k = qk(rope, parts, weights, cs)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v)

    rows: list[dict[str, Any]] = []
    for name, txt, img in ROPE_SHAPES:
        s = txt + img
        fused = torch.randn(1, img, 3 * heads * d, device="cuda", dtype=dtype)
        parts = []
        for i in range(2):  # q, k: column slices of the fused projection, as in the model
            own = [fused[..., i * heads * d : (i + 1) * heads * d].unflatten(-1, (heads, d))]
            if txt:
                own.insert(0, torch.randn(1, txt, heads, d, device="cuda", dtype=dtype))
            parts.append(own)
        weights = [[torch.rand(d, device="cuda", dtype=dtype) + 0.5 for _ in p] for p in parts]
        theta = torch.rand(s, d // 2, device="cuda") * 6.3
        cs = tuple(t.repeat_interleave(2, -1)[None, :, None] for t in (theta.cos(), theta.sin()))
        v = torch.randn(1, heads, s, d, device="cuda", dtype=dtype)
        exact = qk(rms_norm_rope_reference, [[p.float() for p in q] for q in parts],
                   [[w.float() for w in ws] for ws in weights], cs)  # fmt: skip
        moved = 2 * sum(p.numel() * p.element_size() for q in parts for p in q)  # in + out
        ways = {
            "inductor (stock compile)": torch.compile(partial(qk, rms_norm_rope_reference)),
            "triton (difforge::rms_norm_rope)": partial(qk, op),
            "inductor + sdpa": torch.compile(partial(attend, rms_norm_rope_reference)),
            "triton + sdpa (compiled)": torch.compile(partial(attend, op)),
        }
        for way, fn in ways.items():
            row: dict[str, Any] = {"shape": name, "tokens": s, "way": way}
            call = (
                partial(fn, parts, weights, cs, v)
                if "sdpa" in way
                else partial(fn, parts, weights, cs)
            )
            try:
                out = call()
                ms = a8.cuda_graph_ms(call, 40)
                row["ms"] = ms
                if "sdpa" not in way:
                    row["gb_per_s"] = moved / (ms * 1e-3) / 1e9
                    row["rel_err"] = max(
                        _rel(o.float(), e) for o, e in zip(out, exact, strict=True)
                    )
            except Exception as exc:  # one way failing must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
    return rows


def _pixart_block() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """One PixArt-XL-2 transformer block (real config, random weights) and 1024² inputs."""
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(
        1152,
        16,
        72,
        cross_attention_dim=1152,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    block = block.to("cuda", torch.float16).eval().requires_grad_(False)
    inputs = (
        torch.randn(2, 4096, 1152, device="cuda", dtype=torch.float16),
        torch.randn(2, 300, 1152, device="cuda", dtype=torch.float16),
        torch.randn(2, 6 * 1152, device="cuda", dtype=torch.float16),
    )
    return block, inputs


def probe_attention_code(out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Which layouts Inductor hands cuDNN in a real PixArt block, and per-kernel times."""
    from torch._inductor.utils import run_and_get_code

    block, (x, ctx, t) = _pixart_block()

    def step(x: torch.Tensor, ctx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return block(x, encoder_hidden_states=ctx, timestep=t)

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        compiled = torch.compile(step)
        _, code = run_and_get_code(compiled, x, ctx, t)
        if out_dir is not None:
            (out_dir / "pixart_block_code.py").write_text("\n\n".join(code))
        for line in "\n".join(code).splitlines():
            if "attention" in line and ("extern_kernels" in line or "torch.ops" in line):
                rows.append({"code": line.strip()[:300]})
        for variant, fn in (("eager", step), ("compiled", compiled)):
            rows.append(
                {
                    "code": f"{variant}: block {_bench(lambda fn=fn: fn(x, ctx, t)):.4f} ms, "
                    f"attention kernels {_kernel_ms(lambda fn=fn: fn(x, ctx, t), ('sdpa', 'flash', 'fmha', 'attention')):.4f} ms"
                }
            )
    torch._dynamo.reset()
    return rows


def _kernel_table(fn: Callable[[], object], iters: int = 20) -> list[tuple[str, float]]:
    """(kernel name, us per call) of every GPU kernel ``fn`` launches, slowest first."""
    rows = [
        (evt.key[:100], round(evt.self_device_time_total / iters, 2))
        for evt in _profiled(fn, iters)
        if evt.self_device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r[1])[:6]


class _FeedForwardHalf(torch.nn.Module):
    """PixArt-XL's FF half-block: ``x + ff2(gelu_tanh(ff1(norm(x) * (1 + scale) + shift)))``."""

    def __init__(self, dim: int = 1152, hidden: int = 4608) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff1 = torch.nn.Linear(dim, hidden)
        self.ff2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * (1 + scale) + shift
        return x + self.ff2(F.gelu(self.ff1(h), approximate="tanh"))


def probe_ff_block() -> list[dict[str, Any]]:
    import difforge

    fp8 = {"quant.fp8_linear": True, "quant.min_weight_elements": 0, "quant.skip_edges": False}
    variants = {
        "fp16 O2": {"mode": "O2"},
        "fp8 O2, tanh GELU": {"mode": "O2", **fp8, "passes.gelu_tanh_sigmoid": False},
        "fp8 O2, sigmoid GELU": {"mode": "O2", **fp8},
        "fp8 O3 (fast-math, CUDA graphs)": {"mode": "O3", **fp8},
        "fp8 O3, persistent quantization": {
            "mode": "O3",
            **fp8,
            "heuristics.persistent_fp8_quant_max": 8192,
        },
    }
    torch.manual_seed(0)
    ref_model = _FeedForwardHalf().cuda().eval().requires_grad_(False)
    x = torch.randn(2, 4096, 1152, device="cuda")
    shift, scale = (torch.randn(2, 1, 1152, device="cuda") * 0.1 for _ in range(2))
    with torch.no_grad():
        ref = ref_model(x, shift, scale)
    low = tuple(t.half() for t in (x, shift, scale))
    rows: list[dict[str, Any]] = []
    for name, options in variants.items():
        torch._dynamo.reset()
        model = _FeedForwardHalf().cuda().half().eval().requires_grad_(False)
        model.load_state_dict(ref_model.state_dict())
        with torch.no_grad():
            compiled = difforge.compile(model, options=options)
            out = compiled(*low).clone()
            row: dict[str, Any] = {
                "variant": name,
                "block ms": _bench(lambda c=compiled: c(*low)),
                "rel err": _rel(out, ref),
            }
            row["kernels (us)"] = _kernel_table(lambda c=compiled: c(*low))
        rows.append(row)
    torch._dynamo.reset()
    return rows


#: (name, B, H, Sq, Skv, D): attention with a head dim no SDPA kernel is specialised for.
HEAD_PAD_SHAPES = (
    ("pixart-self", 2, 16, 4096, 4096, 72),
    ("pixart-cross", 2, 16, 4096, 120, 72),
)
HEAD_PAD_DIMS = (72, 80, 96, 128)


def probe_head_pad() -> list[dict[str, Any]]:
    """SDPA at a head dim zero-padded to a wider one (the scale kept at 1/sqrt(real dim)):
    q, k, v as a padded QKV projection would give them (token-major views of [B, S, H*Dp]).
    Zero columns add nothing to q·k and give zero output columns, so the result's first D
    columns are exact; the question is whether cuDNN or flash has a faster kernel there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows: list[dict[str, Any]] = []
    for name, b, h, sq, skv, d in HEAD_PAD_SHAPES:
        q, k, v = (
            torch.randn(b, s, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
            for s in (sq, skv, skv)
        )
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for dp in HEAD_PAD_DIMS:
            qp, kp, vp = (F.pad(t.transpose(1, 2), (0, dp - d)).transpose(1, 2) for t in (q, k, v))
            for backend in ("default", "cudnn", "flash"):

                def fn(backend: str = backend) -> torch.Tensor:
                    if backend == "default":
                        return F.scaled_dot_product_attention(qp, kp, vp, scale=d**-0.5)
                    chosen = {
                        "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "flash": SDPBackend.FLASH_ATTENTION,
                    }
                    with sdpa_kernel(chosen[backend]):
                        return F.scaled_dot_product_attention(qp, kp, vp, scale=d**-0.5)

                row: dict[str, Any] = {"shape": name, "head dim": dp, "backend": backend}
                try:
                    out = fn()[..., :d]
                    row["ms"] = _bench(fn)
                    row["rel_err"] = _rel(out, ref)
                    flops = 4 * b * h * sq * skv * d
                    row["TFLOP/s (real dim)"] = flops / row["ms"] / 1e9
                except Exception as exc:  # a backend that refuses the head dim: say so
                    row["error"] = repr(exc)[:160]
                rows.append(row)
    return rows


#: (name, M, K, N, dtype): a feed-forward's second GEMM, whose input is the GELU of the first's
#: output: the fp8 activation quantization that costs most in O3's steps.
FF2_SHAPES = (
    ("pixart-ff2", 8192, 4608, 1152, torch.float16),
    ("sd3-ff2", 8192, 6144, 1536, torch.float16),
    ("flux-ff2", 4096, 12288, 3072, torch.bfloat16),
)


def _quantize_blocks(t: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 of ``t [R, C]`` with one float32 scale per ``rows x 128`` block:
    ``quant.fp8.quantize_rows`` of each block laid out as a row. ``(t_fp8, scales [R / rows,
    C / 128])``, ``t = t_fp8 * scale`` per block."""
    from difforge.quant.fp8 import quantize_rows

    r, c = t.shape
    blocks = t.reshape(r // rows, rows, c // 128, 128).transpose(1, 2).reshape(-1, rows * 128)
    q, scale = quantize_rows(blocks)
    q = q.reshape(r // rows, c // 128, rows, 128).transpose(1, 2).reshape(r, c)
    return q, scale.reshape(r // rows, c // 128)


def probe_fp8_block() -> list[dict[str, Any]]:
    """The GELU + fp8 quantization of a feed-forward's hidden activation and the FF2 GEMM:
    today's row-wise recipe (one scale per token: Inductor reads the row twice, once for the
    absmax bound and once to scale) against 1x128 activation blocks with 128x128 weight
    blocks (``F.scaled_mm``'s BlockWise1x128 x BlockWise128x128, sm_90 only), whose scales
    need one read. Each scale layout the GEMM might want is tried; the row says which ran."""
    from torch.nn.functional import ScalingType

    from difforge.quant.fp8 import _scaled_mm_linear, quantize_gelu_rows, quantize_weight

    def gelu_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_gelu_rows(y)

    def gelu_blocks(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = _quantize_blocks(F.gelu(y, approximate="tanh"), 1)
        return q, scale.t().contiguous().t()  # "outer-dim-major": (M, K/128), stride (1, M)

    rows: list[dict[str, Any]] = []
    for name, m, k, n, dtype in FF2_SHAPES:
        y = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        ref = F.gelu(y.float(), approximate="tanh") @ w.float().t()
        w8_rows, ws_rows = quantize_weight(w)
        w8_blocks, ws_blocks = _quantize_blocks(w, 128)  # scales [N/128, K/128]
        quant_rows, quant_blocks = torch.compile(gelu_rows), torch.compile(gelu_blocks)
        row: dict[str, Any] = {"shape": name, "m": m, "k": k, "n": n}
        try:
            row["quant_rows_ms"] = _bench(lambda: quant_rows(y))
            row["quant_blocks_ms"] = _bench(lambda: quant_blocks(y))
            a8, a_s = quant_rows(y)
            row["gemm_rows_ms"] = _bench(
                lambda: _scaled_mm_linear(a8, a_s, w8_rows, ws_rows, None, dtype)
            )
            row["rel_err_rows"] = _rel(
                _scaled_mm_linear(a8, a_s, w8_rows, ws_rows, None, dtype), ref
            )
            b8, b_s = quant_blocks(y)
            row["rel_err_block_quant"] = _rel(
                (b8.float().reshape(m, k // 128, 128) * b_s[:, :, None]).reshape(m, k),
                F.gelu(y.float(), approximate="tanh"),
            )
        except RuntimeError as exc:
            row["error"] = str(exc).splitlines()[0][:160]
            rows.append(row)
            torch._dynamo.reset()
            continue
        for label, scale_b in (
            ("w scales (K/128, N/128)", ws_blocks.t()),
            ("w scales (K/128, N/128) contiguous", ws_blocks.t().contiguous()),
            ("w scales (N/128, K/128)", ws_blocks),
        ):

            def gemm(scale_b: torch.Tensor = scale_b) -> torch.Tensor:
                return F.scaled_mm(
                    b8, w8_blocks.t(), b_s, ScalingType.BlockWise1x128,
                    scale_b, ScalingType.BlockWise128x128, output_dtype=dtype,
                )  # fmt: skip

            try:
                err = _rel(gemm(), ref)
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                row[f"block gemm error, {label}"] = str(exc).splitlines()[0][:120]
                continue
            if err < 0.1:  # a wrong layout runs but scales the wrong blocks
                row["block_scale_layout"] = label
                row["gemm_blocks_ms"] = _bench(gemm)
                row["rel_err_blocks"] = err
                row["speedup_quant+gemm"] = (row["quant_rows_ms"] + row["gemm_rows_ms"]) / (
                    row["quant_blocks_ms"] + row["gemm_blocks_ms"]
                )
                break
            row[f"block gemm rel err, {label}"] = err
        rows.append(row)
        torch._dynamo.reset()
    return rows


# SDXL UNet's transformer levels at 1024² with CFG: (name, tokens M, channels C).
SDXL_LEVELS = (("sdxl-1280", 2048, 1280), ("sdxl-640", 8192, 640))


def probe_sdxl_fp8() -> list[dict[str, Any]]:
    """SDXL's fp8 candidates, per transformer level: (1) GEGLU + fp8 row quantization of
    FF2's input as Inductor fuses it today (the exact absmax: a looped reduction that
    evaluates the erf GELU in both passes), the same kept persistent (one read), and
    ``quantize_geglu_rows``' bound (one GELU per element), against the fp16 GEGLU alone,
    each plus FF2's GEMM; (2) the attention projections (kept fp16 by O3's size filter at
    1280x1280): fp16 GEMM vs row quantization + fp8 GEMM, unfused (N = C) and with q/k/v
    fused (N = 3C)."""
    from difforge.heuristics import DifforgeChoices, installed
    from difforge.quant.fp8 import (
        FP8_MAX,
        GELU_NEGATIVE_BOUND,
        SCALE_EPS,
        _scaled_mm_linear,
        _to_fp8,
        quantize_rows,
        quantize_weight,
    )

    def quantize_geglu_rows(
        h: torch.Tensor, gate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The bound scale max|h| * max(gelu(max gate), 0.1701) >= the exact absmax (the
        # exact GELU stays above -0.17 and rises above -0.76), found without evaluating
        # the GELU, which then runs once per element, in the scaling pass.
        gate_bound = F.gelu(gate.float().amax(dim=-1)).clamp_min(GELU_NEGATIVE_BOUND)
        scale = (h.float().abs().amax(dim=-1) * gate_bound).clamp_min(SCALE_EPS) / FP8_MAX
        return _to_fp8(h.float() * F.gelu(gate.float()), scale), scale

    def geglu(y: torch.Tensor) -> torch.Tensor:
        h, gate = y.chunk(2, dim=-1)
        return h * F.gelu(gate)

    def geglu_exact(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(geglu(y))

    def geglu_bound(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, gate = y.chunk(2, dim=-1)
        return quantize_geglu_rows(h, gate)

    rows: list[dict[str, Any]] = []
    dtype = torch.float16
    for name, m, c in SDXL_LEVELS:
        inner = 4 * c
        y = torch.randn(m, 2 * inner, device="cuda", dtype=dtype)
        w2 = torch.randn(c, inner, device="cuda", dtype=dtype) * inner**-0.5
        w8, ws = quantize_weight(w2)
        ref = geglu(y.float()) @ w2.float().t()
        row: dict[str, Any] = {"level": name, "m": m, "c": c}
        fp16 = torch.compile(geglu)
        row["geglu_fp16_ms"] = _bench(lambda: fp16(y))
        act = fp16(y)
        row["ff2_fp16_ms"] = _bench(lambda: act @ w2.t())
        row["ff2_fp16_rel_err"] = _rel(act @ w2.t(), ref)
        variants: list[tuple[str, Callable[..., Any], DifforgeChoices | None]] = [
            ("exact", geglu_exact, None),
            ("exact_persistent", geglu_exact, DifforgeChoices(None, 16384)),
            ("bound", geglu_bound, None),
        ]
        for label, fn, choices in variants:
            torch._dynamo.reset()  # each variant compiles under its own heuristics
            compiled = torch.compile(fn)
            # No FX-graph cache: plain torch.compile's key does not see the heuristics.
            with installed(choices), torch._inductor.config.patch(fx_graph_cache=False):
                a8, a_s = compiled(y)
            row[f"quant_{label}_ms"] = _bench(lambda compiled=compiled: compiled(y))
            out = _scaled_mm_linear(a8, a_s, w8, ws, None, dtype)
            row[f"ff2_fp8_{label}_rel_err"] = _rel(out, ref)
        row["ff2_fp8_gemm_ms"] = _bench(lambda: _scaled_mm_linear(a8, a_s, w8, ws, None, dtype))
        row["geglu+ff2 fp16 / fp8 bound"] = (row["geglu_fp16_ms"] + row["ff2_fp16_ms"]) / (
            row["quant_bound_ms"] + row["ff2_fp8_gemm_ms"]
        )
        x = torch.randn(m, c, device="cuda", dtype=dtype)
        quant = torch.compile(quantize_rows)
        row["quant_x_ms"] = _bench(lambda: quant(x))
        x8, xs = quant(x)
        for label, n in (("proj", c), ("qkv", 3 * c)):
            w = torch.randn(n, c, device="cuda", dtype=dtype) * c**-0.5
            wq, wqs = quantize_weight(w)
            row[f"{label}_fp16_ms"] = _bench(lambda w=w: x @ w.t())
            row[f"{label}_fp8_ms"] = _bench(
                lambda wq=wq, wqs=wqs: _scaled_mm_linear(x8, xs, wq, wqs, None, dtype)
            )
        # Cross-attention k/v from the 77 text tokens (2048 wide) of both CFG halves: the
        # size filter passes them at 1280 (2048x1280), though only 154 rows are multiplied.
        text = torch.randn(154, 2048, device="cuda", dtype=dtype)
        w = torch.randn(c, 2048, device="cuda", dtype=dtype) * 2048**-0.5
        wq, wqs = quantize_weight(w)
        row["text_kv_fp16_ms"] = _bench(lambda: text @ w.t())
        row["text_kv_quant+fp8_ms"] = _bench(
            lambda: _scaled_mm_linear(*quant(text), wq, wqs, None, dtype)
        )
        rows.append(row)
        torch._dynamo.reset()
    return rows


def probe_attention_onepass() -> list[dict[str, Any]]:
    """The 8-bit attention (fp8 P·V) prepared three ways against SDPA, q/k/v as views of
    one fused projection (as in a compiled DiT), all CUDA-graph timed: the Triton
    quantizers (``attention_int8``), the torch-op preparation Inductor compiles (what the
    attention_int8 pass emits today), and one k/v pre-pass with q quantized in the kernel
    (``attention_int8_onepass``); plus the k/v pre-pass alone. Per shape and tile."""
    from difforge.kernels import attention_int8 as a8
    from difforge.kernels.attention_int8_onepass import attention_int8_onepass

    sdpa = F.scaled_dot_product_attention
    fused_prep = torch.compile(a8.attention_int8_fused, dynamic=False)
    rows: list[dict[str, Any]] = []
    for name, b, h, sq, skv, d, dtype in ATTENTION_SHAPES:
        if sq != skv:
            continue
        fused = torch.randn(b, sq, 3, h, d, device="cuda", dtype=dtype)
        q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
        ref = sdpa(q.float(), k.float(), v.float())
        sdpa_ms = a8.cuda_graph_ms(lambda: sdpa(q, k, v), 40)
        for block_m, block_n, warps, stages in INT8_ATTENTION_TILES[True]:
            cfg = {"block_m": block_m, "block_n": block_n, "num_warps": warps,
                   "num_stages": stages}  # fmt: skip
            row: dict[str, Any] = {"shape": name, **cfg, "sdpa_ms": sdpa_ms}
            variants: dict[str, Callable[[], torch.Tensor]] = {
                "triton_prep": lambda: a8.attention_int8(q, k, v, pv_fp8=True, **cfg),
                "inductor_prep": lambda: fused_prep(
                    q, k, v, None, block_m, block_n, warps, stages, True
                ),
                "onepass": lambda: attention_int8_onepass(q, k, v, **cfg),
            }
            for label, fn in variants.items():
                try:
                    row[f"{label}_ms"] = a8.cuda_graph_ms(fn, 40)
                    row[f"{label}_speedup"] = sdpa_ms / row[f"{label}_ms"]
                    row[f"{label}_rel_err"] = _rel(fn(), ref)
                except Exception as exc:  # one failing variant must not hide the others
                    row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            try:
                row.update(_onepass_pieces(q, k, v, block_m, block_n, warps, stages))
            except Exception as exc:
                row["pieces_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            torch._dynamo.reset()
    return rows


def _onepass_pieces(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
    warps: int, stages: int,
) -> dict[str, float]:  # fmt: skip
    """CUDA-graph ms of each launch of the one-pass attention, the kernel on int8 q
    (prepared) against the same kernel quantizing q itself, and a copy of k and v."""
    from difforge.kernels import attention_int8 as a8
    from difforge.kernels.attention_int8_onepass import (
        kv_stats,
        quantize_kv,
        quantize_kv_from_stats,
    )

    d, seq_kv = q.shape[-1], k.shape[2]
    mean, v_scale = kv_stats(k, v)
    k8, k_scale, vt8, v_scale = quantize_kv(k, v, block_n)
    prepared = a8.prepare_operands(q, k, v, block_m, block_n, True)
    in_kernel = a8.Operands(q, k_scale, k8, k_scale, vt8, None, v_scale)
    out = a8.token_major_empty(q)
    launch = partial(
        a8._launch, out=out, sm_scale=d**-0.5, head_dim=d, seq_kv=seq_kv, block_m=block_m,
        block_n=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    kc, vc = torch.empty_like(k), torch.empty_like(v)
    return {
        "kv_stats_ms": a8.cuda_graph_ms(lambda: kv_stats(k, v), 40),
        "kv_quant_ms": a8.cuda_graph_ms(
            lambda: quantize_kv_from_stats(k, v, mean, v_scale, block_n), 40
        ),
        "kv_copy_ms": a8.cuda_graph_ms(lambda: (kc.copy_(k), vc.copy_(v)), 40),
        "kernel_int8_q_ms": a8.cuda_graph_ms(lambda: launch(prepared), 40),
        "kernel_float_q_ms": a8.cuda_graph_ms(lambda: launch(in_kernel), 40),
    }


#: (name, batch, heads, tokens, head dim, dtype) at which the Gluon attention is probed:
#: the self-attention of each DiT family at 1024² (SD3's joint 4250 tokens cut to 4096, as
#: the kernel has no kv masking yet) and SDXL's two transformer levels.
HOPPER_ATTENTION_SHAPES = [
    ("pixart_self", 2, 16, 4096, 72, torch.float16),
    ("sd3_image", 2, 24, 4096, 64, torch.float16),
    ("flux_joint", 1, 24, 4608, 128, torch.bfloat16),
    ("sdxl_640", 2, 10, 4096, 64, torch.float16),
    ("sdxl_1280", 2, 20, 1024, 64, torch.float16),
]
#: (kernel, block_m, block_n, stages, num_warps) tried per shape; "ws" is the
#: warp-specialized kernel (block_m rows per consumer warp group, two per CTA).
HOPPER_ATTENTION_TILES = [
    ("plain", 64, 128, 2, 4),
    ("ws", 64, 128, 3, 4),
    ("ws", 64, 128, 4, 4),
    ("ws", 64, 256, 2, 4),
    ("ws", 64, 256, 3, 4),
    ("ws", 64, 64, 6, 4),
]


def probe_hopper_attention() -> list[dict[str, Any]]:
    """difforge's Gluon attention (async wgmma, the softmax overlapped with the previous
    block's P·V) per shape, layout and tile against SDPA's default (cuDNN) and flash
    backends, CUDA-graph timed; error against float32 SDPA. Layouts: contiguous
    ``[B, H, S, D]``, and views of one fused projection ``[B, S, 3, H, D]`` (SDPA's output
    then still needs the ``[B, S, H*D]`` copy the Gluon kernel writes directly)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from difforge.kernels import attention_int8 as a8
    from difforge.kernels.attention_hopper import attention_hopper
    from difforge.kernels.attention_hopper_ws import attention_hopper_ws

    sdpa = F.scaled_dot_product_attention
    rows: list[dict[str, Any]] = []
    for name, b, h, s, d, dtype in HOPPER_ATTENTION_SHAPES:
        for layout in ("bhsd", "fused"):
            if layout == "bhsd":
                q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
            else:
                fused = torch.randn(b, s, 3, h, d, device="cuda", dtype=dtype)
                q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
            ref = sdpa(q.float(), k.float(), v.float())
            flops = 4 * b * h * s * s * d
            # what the model needs after attention: [B, S, H*D] rows
            sdpa_rows = lambda: sdpa(q, k, v).transpose(1, 2).reshape(b, s, h * d)  # noqa: E731
            base: dict[str, Any] = {
                "shape": name,
                "layout": layout,
                "sdpa_ms": a8.cuda_graph_ms(lambda: sdpa(q, k, v), 40),
                "sdpa_rows_ms": a8.cuda_graph_ms(sdpa_rows, 40),
                "sdpa_rel_err": _rel(sdpa(q, k, v), ref),
            }
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                base["flash_ms"] = a8.cuda_graph_ms(lambda: sdpa(q, k, v), 40)
            for kernel, block_m, block_n, stages, warps in HOPPER_ATTENTION_TILES:
                row = {**base, "kernel": kernel, "block_m": block_m, "block_n": block_n,
                       "stages": stages, "num_warps": warps}  # fmt: skip
                if kernel == "ws":
                    fn = lambda: attention_hopper_ws(  # noqa: E731
                        q, k, v, block_m=block_m, block_n=block_n, stages=stages
                    )
                else:
                    fn = lambda: attention_hopper(  # noqa: E731
                        q, k, v, block_m=block_m, block_n=block_n, stages=stages, num_warps=warps
                    )
                rows_fn = lambda: fn().transpose(1, 2).reshape(b, s, h * d)  # noqa: E731
                try:
                    row["rel_err"] = _rel(fn(), ref)
                    row["ms"] = a8.cuda_graph_ms(fn, 40)
                    row["rows_ms"] = a8.cuda_graph_ms(rows_fn, 40)
                    row["speedup"] = row["sdpa_ms"] / row["ms"]
                    row["rows_speedup"] = row["sdpa_rows_ms"] / row["rows_ms"]
                    row["tflops"] = flops / row["ms"] / 1e9
                except Exception as exc:  # one failing tile must not hide the others
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(row, flush=True)
    return rows


PROBES = {
    "attention": probe_attention,
    "gelu": probe_gelu,
    "fp8": probe_fp8,
    "int8attn": probe_int8_attention,
    "attncode": probe_attention_code,
    "ffblock": probe_ff_block,
    "headpad": probe_head_pad,
    "fp8block": probe_fp8_block,
    "sdxl8": probe_sdxl_fp8,
    "attnquant": probe_attention_quant,
    "catquant": probe_cat_quant,
    "lnquant": probe_ln_quant,
    "rope": probe_rope,
    "onepass": probe_attention_onepass,
    "hopperattn": probe_hopper_attention,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", default=",".join(PROBES))
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("probe_ops.py needs a CUDA GPU")
    results: dict[str, Any] = {"environment": environment(torch.device("cuda"))}
    for name in args.probes.split(","):
        probe = PROBES[name]
        if name == "attncode" and args.output_json:
            rows = probe(args.output_json.parent)
        else:
            rows = probe()
        results[name] = rows
        print(f"\n## {name}")
        print(tabulate(rows, headers="keys", floatfmt=".4g"))
        if args.output_json:
            args.output_json.parent.mkdir(parents=True, exist_ok=True)
            args.output_json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
