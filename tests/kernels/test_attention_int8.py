"""8-bit attention: quantization, torch oracle vs SDPA, Triton kernel vs oracle, op registration.

On a CPU-only machine the kernel runs in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), so shapes are tiny and blocks are 16 to exercise several ragged q and
kv blocks; on a CUDA machine the same tests run the compiled kernel, plus the ``gpu`` tests at
real DiT shapes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compile_for_sm90

from difforge.kernels import attention_int8 as mod
from difforge.kernels.attention_int8 import (
    attention_int8,
    attention_int8_reference,
    quantize_per_block_int8,
    quantize_per_block_int8_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, Sq, Skv, D): ragged q and kv tails, cross-attention both ways, D=72 padded to 128.
SHAPES = [(1, 2, 37, 53, 64), (2, 1, 16, 130, 72), (1, 1, 65, 17, 128)]
DTYPES = [torch.float16, torch.bfloat16]
# Kernel vs oracle: same quantization, so only P's rounding to fp16/bf16 differs (the kernel
# rounds exp2(s - running max), the oracle exp(s - final max)) plus the output's rounding.
# Measured: fp16 <= 3e-4, bf16 <= 2e-3 at blocks of 16.
KERNEL_TOL = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
# int8 Q·Kᵀ against exact float32 attention: measured 1.0e-2 .. 1.3e-2 on unit Gaussians.
INT8_VS_SDPA_TOL = 3e-2
# fp8 P·V (e4m3 V per channel, P x 448): measured 3.1e-2 .. 3.7e-2 against exact attention,
# kernel vs oracle <= 1.9e-2 (independent P roundings, see the test).
FP8_PV_VS_SDPA_TOL = 5e-2
FP8_KERNEL_TOL = 3e-2
SMALL_BLOCKS = {"block_m": 16, "block_n": 16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def qkv(
    b: int, h: int, sq: int, skv: int, d: int, dtype: torch.dtype, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def draw(s: int) -> torch.Tensor:
        return torch.randn(b, h, s, d, device=device, dtype=dtype)

    return draw(sq), draw(skv), draw(skv)


def sdpa32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


# --------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("s,block", [(37, 16), (16, 16), (5, 64)])
def test_quantize_per_block_int8(s: int, block: int) -> None:
    x = torch.randn(2, 3, s, 72) * torch.linspace(0.1, 10, s)[:, None]
    x8, scale = quantize_per_block_int8(x, block)
    n_blocks = -(-s // block)
    assert x8.dtype == torch.int8 and x8.shape == x.shape and x8.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (2, 3, n_blocks)
    assert int(x8.abs().max()) <= 127
    row_scale = scale.repeat_interleave(block, dim=-1)[..., :s, None]
    # Round to nearest: every value within half a step of its dequantized value.
    assert ((x8.float() * row_scale - x).abs() <= row_scale / 2 * (1 + 1e-6)).all()
    for i in range(n_blocks):
        amax = x[:, :, i * block : (i + 1) * block].abs().amax(dim=(-2, -1))
        torch.testing.assert_close(scale[:, :, i], amax / 127)


def test_quantize_all_zero_block_gets_unit_scale() -> None:
    x = torch.randn(1, 1, 32, 64)
    x[:, :, 16:] = 0
    x8, scale = quantize_per_block_int8(x, 16)
    assert scale[0, 0, 1] == 1 and (x8[:, :, 16:] == 0).all()
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("s,d,block", [(37, 72, 16), (16, 64, 16), (5, 128, 64)])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothed"])
def test_quantize_triton_matches_torch(
    s: int, d: int, block: int, dtype: torch.dtype, smooth: bool
) -> None:
    # A strided view (diffusers' [B, S, H, D] -> [B, H, S, D]) with a shared offset, so the
    # smoothing has something to remove.
    x = (torch.randn(2, s, 3, d, device=DEVICE) * 3 + 1).to(dtype).transpose(1, 2)
    mean = mod._k_mean(x) if smooth else None
    x8, scale = quantize_per_block_int8_triton(x, block, subtract_mean=mean)
    ref8, ref_scale = quantize_per_block_int8(mod._smooth_k(x) if smooth else x, block)
    # Same float32 operations in the same order (IEEE divisions, ties to even): bit-identical.
    assert torch.equal(scale, ref_scale)
    assert torch.equal(x8, ref8)


def test_quantize_triton_pads_columns_with_zeros() -> None:
    x = torch.randn(1, 2, 40, 72, device=DEVICE, dtype=torch.float16)
    x8, scale = quantize_per_block_int8_triton(x, 16, pad_to=96)
    ref8, ref_scale = quantize_per_block_int8(x, 16)
    assert x8.shape == (1, 2, 40, 96) and x8.is_contiguous()
    torch.testing.assert_close(x8[..., :72], ref8, rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert (x8[..., 72:] == 0).all()
    with pytest.raises(ValueError, match="pad_to=64 < head dim 72"):
        quantize_per_block_int8_triton(x, 16, pad_to=64)


def test_quantize_triton_rejects_bad_inputs() -> None:
    x = torch.randn(1, 1, 16, 64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous last dim"):
        quantize_per_block_int8_triton(x.transpose(-1, -2), 16)
    with pytest.raises(ValueError, match="power of two"):
        quantize_per_block_int8_triton(x, 24)
    with pytest.raises(ValueError, match="subtract_mean must be float32"):
        quantize_per_block_int8_triton(x, 16, subtract_mean=torch.zeros(1, 1, 64).half())


# --------------------------------------------------------------------------------------
# the torch oracle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_float32_close_to_sdpa(shape: tuple[int, ...]) -> None:
    q, k, v = qkv(*shape, torch.float32)
    ref = sdpa32(q, k, v)
    out = attention_int8_reference(q, k, v, **SMALL_BLOCKS)
    err = rel_err(out, ref)
    # Not exact (it is quantized), but within the int8 error budget.
    assert 1e-4 < err < INT8_VS_SDPA_TOL


def test_reference_honours_sm_scale() -> None:
    q, k, v = qkv(1, 2, 20, 24, 64, torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert rel_err(attention_int8_reference(q, k, v, 0.3), ref) < INT8_VS_SDPA_TOL


def test_k_smoothing_invariance() -> None:
    """A constant vector added to every key leaves the output unchanged (softmax shift)."""
    q, k, v = qkv(1, 2, 37, 53, 64, torch.float32)
    offset = 5.0 * torch.randn(1, 2, 1, 64, device=DEVICE)
    out = attention_int8_reference(q, k, v, **SMALL_BLOCKS)
    shifted = attention_int8_reference(q, k + offset, v, **SMALL_BLOCKS)
    # Only float32 rounding of (k + c) - mean(k + c) vs k - mean(k) differs; it can flip a
    # rare int8 rounding, hence not bit-exact.
    assert rel_err(shifted, out) < 2e-3
    # Exact attention is invariant too, and the int8 error does not grow with the offset
    # (without smoothing the k quantization step would grow with |offset|).
    assert rel_err(shifted, sdpa32(q, k + offset, v)) < INT8_VS_SDPA_TOL


# --------------------------------------------------------------------------------------
# the Triton kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    q, k, v = qkv(*shape, dtype)
    out = attention_int8(q, k, v, **SMALL_BLOCKS)
    ref = attention_int8_reference(q, k, v, **SMALL_BLOCKS)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # [B, Sq, H, D] in memory, like flash SDPA
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < KERNEL_TOL[dtype]
    assert rel_err(out, sdpa32(q, k, v)) < INT8_VS_SDPA_TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_fp8_pv_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """fp8 P·V: each kv block rounds P (scaled to its running max) to e4m3 on its own, the
    oracle rounds P at the final max, so they differ by about one fp8 rounding; both stay
    within the fp8 budget of exact attention."""
    q, k, v = qkv(*shape, dtype)
    blocks = {"block_m": 16, "block_n": 32}
    out = attention_int8(q, k, v, pv_fp8=True, **blocks)
    ref = attention_int8_reference(q, k, v, pv_fp8=True, **blocks)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < FP8_KERNEL_TOL
    assert rel_err(out, sdpa32(q, k, v)) < FP8_PV_VS_SDPA_TOL
    # The fp16 P·V path is measurably closer: fp8 really changed the second GEMM.
    assert rel_err(attention_int8(q, k, v, **blocks), sdpa32(q, k, v)) < rel_err(
        out, sdpa32(q, k, v)
    )


@pytest.mark.parametrize("s", [1, 17, 64])
def test_quantize_v_fp8_transposed_matches_reference(s: int) -> None:
    """fp8 Vᵀ: the reference's values transposed, zero rows past D and columns past S; the
    channel scale maps each channel's absmax to 448."""
    v = torch.randn(2, 3, s, 72, device=DEVICE, dtype=torch.float16) * 3
    v[0, 0, :, 5] = 0  # an all-zero channel keeps scale 1
    vt8, scale = mod.quantize_v_fp8_transposed(v, 80)
    ref8, ref_scale = mod.quantize_v_fp8_reference(v)
    assert vt8.dtype == torch.float8_e4m3fn and vt8.shape == (2, 3, 80, -(-s // 16) * 16)
    torch.testing.assert_close(scale[..., :72], ref_scale, rtol=0, atol=0)
    assert (scale[..., 72:] == 1).all() and scale[0, 0, 5] == 1
    torch.testing.assert_close(vt8[:, :, :72, :s].float(), ref8.transpose(-1, -2).float())
    assert (vt8[:, :, 72:].float() == 0).all() and (vt8[..., s:].float() == 0).all()
    amax = (ref8.float().abs().amax(dim=2))[..., 6:]
    assert (amax == 448).all()


@pytest.mark.parametrize(
    ("d", "qk", "pv"),
    [(64, (64, 0), (64, 0)), (72, (64, 32), (64, 16)), (80, (64, 32), (64, 16)),
     (96, (64, 32), (64, 32)), (112, (128, 0), (128, 0)), (128, (128, 0), (128, 0)),
     (8, (32, 0), (16, 0)), (40, (64, 0), (32, 16))],
)  # fmt: skip
def test_head_dim_tiles(d: int, qk: tuple[int, int], pv: tuple[int, int]) -> None:
    assert mod.head_dim_tiles(d, 32) == qk
    assert mod.head_dim_tiles(d, 16) == pv
    assert sum(qk) >= d and sum(pv) >= d


@pytest.mark.parametrize(
    "strides,align",
    [
        ((4096 * 1152, 72, 1152), 8),
        ((4096 * 1152, 64, 1024), 16),
        ((40, 20, 10), 2),
        ((7, 3, 1), 1),
    ],
)
def test_stride_alignment(strides: tuple[int, ...], align: int) -> None:
    """The largest power of two up to 16 dividing every stride: PixArt's head stride 72 -> 8."""
    assert mod.stride_alignment(*strides) == align


@pytest.mark.parametrize("pv_fp8", [False, True], ids=["pv-fp16", "pv-fp8"])
def test_kernel_head_dim_below_the_minimum_tile(pv_fp8: bool) -> None:
    """Head dim 8: V is padded to the 16-wide P·V tile (and q/k to 32 for Q·Kᵀ)."""
    q, k, v = qkv(1, 2, 20, 33, 8, torch.float16)
    blocks = {"block_m": 16, "block_n": 32}
    out = attention_int8(q, k, v, pv_fp8=pv_fp8, **blocks)
    ref = attention_int8_reference(q, k, v, pv_fp8=pv_fp8, **blocks)
    assert out.shape == q.shape
    assert rel_err(out, ref) < (FP8_KERNEL_TOL if pv_fp8 else KERNEL_TOL[torch.float16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_default_blocks(dtype: torch.dtype) -> None:
    # Default tiles (128 x 64) are larger than these sequences: one ragged block each way.
    q, k, v = qkv(1, 2, 37, 53, 72, dtype)
    ref = attention_int8_reference(q, k, v)
    assert rel_err(attention_int8(q, k, v), ref) < KERNEL_TOL[dtype]


def test_kernel_sm_scale_and_key_offset() -> None:
    q, k, v = qkv(1, 1, 24, 40, 64, torch.float16)
    k = k + 4.0  # a shared key offset, as DiT keys often have; smoothing removes it
    out = attention_int8(q, k, v, 0.2, **SMALL_BLOCKS)
    ref = attention_int8_reference(q, k, v, 0.2, **SMALL_BLOCKS)
    assert rel_err(out, ref) < KERNEL_TOL[torch.float16]
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.2)
    assert rel_err(out, exact) < INT8_VS_SDPA_TOL


def test_kernel_arbitrary_strides() -> None:
    """diffusers layout: [B, S, H*D] projections viewed as [B, H, S, D] without a copy."""
    b, h, sq, skv, d = 2, 2, 21, 34, 64
    x = torch.randn(b, sq, 3 * h * d, device=DEVICE, dtype=torch.float16)  # fused qkv
    q = x[..., : h * d].view(b, sq, h, d).transpose(1, 2)
    kv = torch.randn(b, skv, 2 * h * d, device=DEVICE, dtype=torch.float16)
    k = kv[..., : h * d].view(b, skv, h, d).transpose(1, 2)
    v = kv[..., h * d :].view(b, skv, h, d).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention_int8(q, k, v, **SMALL_BLOCKS)
    ref = attention_int8(q.contiguous(), k.contiguous(), v.contiguous(), **SMALL_BLOCKS)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# launcher errors
# --------------------------------------------------------------------------------------


def test_launcher_rejects_bad_inputs() -> None:
    q, k, v = qkv(1, 1, 16, 16, 64, torch.float16)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        attention_int8(q.float(), k.float(), v.float())
    with pytest.raises(TypeError, match="share a dtype"):
        attention_int8(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="stride 1"):
        attention_int8(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # D-major
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        attention_int8(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same shape"):
        attention_int8(q, k, v[:, :, :8])
    with pytest.raises(ValueError, match="agree on B, H and D"):
        attention_int8(q, torch.cat([k, k], dim=1), torch.cat([v, v], dim=1))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        attention_int8(q, k, v, block_m=24)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        attention_int8(q, k, v, block_n=8)


@pytest.mark.skipif(DEVICE != "cpu", reason="about CPU tensors")
def test_launcher_rejects_cpu_tensors_outside_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mod, "_interpreting", lambda: False)
    q, k, v = qkv(1, 1, 16, 16, 64, torch.float16)
    with pytest.raises(ValueError, match="needs CUDA tensors.*attention_int8_reference"):
        attention_int8(q, k, v)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        quantize_per_block_int8_triton(q, 16)


@pytest.mark.parametrize("d", [20, 160, 256])
def test_launcher_rejects_head_dims(d: int) -> None:
    q, k, v = qkv(1, 1, 4, 4, d, torch.float16)
    with pytest.raises(ValueError, match=f"head dim {d} not supported"):
        attention_int8(q, k, v)


# --------------------------------------------------------------------------------------
# the torch.library op
# --------------------------------------------------------------------------------------


def test_op_opcheck() -> None:
    q, k, v = qkv(1, 2, 20, 24, 64, torch.float16)
    torch.library.opcheck(torch.ops.difforge.attention_int8.default, (q, k, v, None, 16, 16))


@pytest.mark.parametrize("pv_fp8", [False, True], ids=["pv-fp16", "pv-fp8"])
def test_prepared_op_opcheck(pv_fp8: bool) -> None:
    """The op the graph pass calls, on operands made by the torch-op quantization: its fake
    agrees with the real op, and its result with the eager op's (same operands, same kernel)."""
    q, k, v = qkv(1, 2, 20, 40, 72, torch.float16)
    q8, *operands = mod.prepare_operands_torch(q, k, v, 16, 32, pv_fp8)
    args = (q8, 72, torch.float16, *operands, 72**-0.5, 16, 32, 4, 2)
    op = torch.ops.difforge.attention_int8_prepared.default
    # torch's schema check compares inputs with allclose, which the CPU lacks for fp8.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    if not (pv_fp8 and DEVICE == "cpu"):
        utils = ("test_schema", *utils)
    torch.library.opcheck(op, args, test_utils=utils)
    eager = attention_int8(q, k, v, block_m=16, block_n=32, num_warps=4, pv_fp8=pv_fp8)
    torch.testing.assert_close(op(*args), eager, rtol=0, atol=0)


def test_op_fake_output_like_q() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = qkv(2, 3, 40, 7, 72, torch.bfloat16)
        out = torch.ops.difforge.attention_int8(q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_compiles_as_one_opaque_node(backend: str, dynamic: bool) -> None:
    q, k, v = qkv(1, 2, 20, 24, 64, torch.float16)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.difforge.attention_int8(q * 2, k, v, None, 16, 16) + 1

    out = torch.compile(f, backend=record, fullgraph=True, dynamic=dynamic)(q, k, v)
    eager = attention_int8(q * 2, k, v, **SMALL_BLOCKS) + 1
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if "attention_int8" in str(n.target)]
    assert len(calls) == 1


BENCH_KEYS = {
    "sdpa_ms",
    "int8_ms",
    "int8_kernel_only_ms",
    "speedup",
    "rel_err",
    "int8_tflops",
    "sdpa_tflops",
}


def test_benchmark_helper_plumbing() -> None:
    """The timing helper's plumbing on tiny inputs, with a stand-in timer (no CUDA events)."""
    calls: list[int] = []

    def timer(fn: Callable[[], object]) -> float:
        fn()
        calls.append(1)
        return 2.0

    res = mod.benchmark_attention(1, 2, 20, 72, seq_kv=33, device=DEVICE, timer=timer)
    assert set(res) == BENCH_KEYS and len(calls) == 3
    assert res["speedup"] == 1.0 and res["rel_err"] < INT8_VS_SDPA_TOL


def test_benchmark_helper_needs_cuda_without_a_timer() -> None:
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        mod.benchmark_attention(1, 1, 16, 64)


# --------------------------------------------------------------------------------------
# GPU code generation, checked without a GPU
# --------------------------------------------------------------------------------------

_COMPILE_FOR_SM90 = textwrap.dedent(
    r"""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import difforge.kernels.attention_int8 as m

    target = GPUTarget("cuda", 90, 32)

    def build(kernel, types, consts, aligned=(), **options):
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
        # what a launch specialises: pointers and strides that are multiples of 16
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=target, options=options).asm

    def count(pattern, ptx):
        return len(re.findall(pattern, ptx))

    for dt, d, fp8 in (("fp16", 72, False), ("bf16", 128, False), ("fp16", 72, True)):
        qk, pv = m.head_dim_tiles(d, 32), m.head_dim_tiles(d, 16)
        vt = "*fp8e4nv" if fp8 else f"*{dt}"
        types = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": vt, "vt_ptr": vt, "o_ptr": f"*{dt}", "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32",
                 "v_scale_ptr": "*fp32", "qk_scale": "fp32"}
        consts = {"HEAD_DIM": d, "QK_MAIN": qk[0],
                  "QK_TAIL": qk[1], "PV_MAIN": pv[0], "PV_TAIL": pv[1], "BLOCK_M": 128,
                  "BLOCK_N": 64, "EVEN_KV": d != 72 or fp8, "PV_FP8": fp8, "INTERPRET": False,
                  "stride_vs" if fp8 else "stride_vd": 1, "stride_vts" if fp8 else "stride_vtd": 1,
                  "V_ALIGN": 8, "O_ALIGN": 8, "Q_FLOAT": False, "Q_ALIGN": 16}
        asm = build(m._attention_int8_kernel, types, consts, num_warps=8, num_stages=2)
        assert "cubin" in asm, "ptxas did not run"
        assert "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8" in asm["ptx"], "no int8 wgmma"
        ptx_dt = "e4m3" if fp8 else {"fp16": "f16", "bf16": "bf16"}[dt]
        assert f"f32.{ptx_dt}.{ptx_dt}" in asm["ptx"], "P @ V is not the requested wgmma"
        if d == 72:  # 64 + 16 columns for P·V, not one 128-wide padded tile
            assert f"m64n16k{32 if fp8 else 16}.f32.{ptx_dt}" in asm["ptx"]
        # int32 scores become floats by an integer add, not a quarter-rate conversion
        assert "cvt.rn.f32.s32" not in asm["ptx"], "int -> float conversion in the loop"
        if d == 72 and not fp8:
            # PixArt's [B, S, H, 72] V and output: head stride 72 is not a multiple of 16,
            # so only the ALIGN hint makes V loads and output stores 16 bytes wide.
            ptrs = [n for n in m._attention_int8_kernel.arg_names if n.endswith("_ptr")]
            rows = ["stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks",
                    "stride_vb", "stride_vs", "stride_ob", "stride_os", "stride_vtb", "stride_vth",
                    "stride_vts"]
            for align, narrow in ((1, True), (8, False)):
                asm = build(m._attention_int8_kernel, types,
                            {**consts, "V_ALIGN": align, "O_ALIGN": align},
                            aligned=ptrs + rows, num_warps=8, num_stages=2)
                assert (count(r"ld\.global(\.\w+)*\.b16 ", asm["ptx"]) > 0) == narrow, align
                assert (count(r"st\.global(\.\w+)*\.b16 ", asm["ptx"]) > 0) == narrow, align
        if fp8:  # q quantized in the kernel (attention_int8_onepass): same MMAs, no spills
            asm = build(m._attention_int8_kernel, {**types, "q_ptr": f"*{dt}"},
                        {**consts, "Q_FLOAT": True, "Q_ALIGN": 8}, num_warps=8, num_stages=3)
            assert "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8" in asm["ptx"]
            assert "ld.local" not in asm["ptx"] and "st.local" not in asm["ptx"], "spills"
    types = {"v_ptr": "*fp16", "scale_ptr": "*fp32", "out_ptr": "*fp8e4nv"}
    for align, narrow in ((1, True), (8, False)):
        consts = {"HEAD_DIM": 72, "DV": 80, "BLOCK_D": 128, "BLOCK_S": 64, "INTERPRET": False,
                  "ALIGN": align}
        asm = build(m._quantize_v_fp8_kernel, types, consts, num_warps=4,
                    aligned=("v_ptr", "scale_ptr", "out_ptr", "stride_vb", "stride_vs", "seq_pad"))
        assert "cvt.rn.satfinite.e4m3x2.f32" in asm["ptx"], "fp8 V must round to nearest"
        assert (count(r"ld\.global(\.\w+)*\.b16 ", asm["ptx"]) > 0) == narrow, align
    types = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "out_ptr": "*i8", "scale_ptr": "*fp32"}
    for align, narrow in ((1, True), (8, False)):
        consts = {"HEAD_DIM": 72, "D_OUT": 96, "BLOCK_D": 128, "BLOCK": 128,
                  "SUBTRACT_MEAN": True, "ALIGN": align}
        asm = build(m._quantize_per_block_int8_kernel, types, consts, num_warps=8,
                    aligned=("x_ptr", "mean_ptr", "out_ptr", "scale_ptr", "stride_xb", "stride_xs"))
        assert "div.rn.f32" in asm["ptx"], "quantization must use IEEE division"
        assert (count(r"ld\.global(\.\w+)*\.b16 ", asm["ptx"]) > 0) == narrow, align
    print("sm90 ok")
    """
)


def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    """Frontend, lowering and ptxas for H100 (sm_90a): catches GPU-only errors on the CPU.

    Runs in a subprocess because this session's kernels were built for the interpreter.
    """
    compile_for_sm90(_COMPILE_FOR_SM90)


# --------------------------------------------------------------------------------------
# GPU: real DiT shapes (run on the GPU machine)
# --------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((2, 16, 4096, 4096, 72), torch.float16),  # PixArt-α/Σ 1024px, CFG batch
        ((1, 24, 4608, 4608, 128), torch.bfloat16),  # FLUX.1 1024px: 4096 image + 512 text
        ((2, 16, 4096, 120, 72), torch.float16),  # cross-attention to T5 tokens
    ],
    ids=["pixart-d72", "flux-d128", "cross-d72"],
)
@pytest.mark.parametrize("pv_fp8", [False, True], ids=["pv-fp16", "pv-fp8"])
def test_gpu_kernel_vs_sdpa_dit_shapes(
    shape: tuple[int, ...], dtype: torch.dtype, pv_fp8: bool
) -> None:
    q, k, v = qkv(*shape, dtype, device="cuda")
    out = attention_int8(q, k, v, pv_fp8=pv_fp8)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(out).all()
    # Long sequences average more keys per row, so the int8 error should not exceed the
    # tiny-shape budget; the half-precision SDPA is itself ~1e-3 off float32.
    assert rel_err(out, ref) < (FP8_PV_VS_SDPA_TOL if pv_fp8 else INT8_VS_SDPA_TOL)
    # Same inputs through the oracle: the compiled kernel does the oracle's math.
    small = [t[:, :2] for t in (q, k, v)]
    got = attention_int8(*small, pv_fp8=pv_fp8)
    oracle = attention_int8_reference(*small, pv_fp8=pv_fp8)
    assert rel_err(got, oracle) < (FP8_KERNEL_TOL if pv_fp8 else 2 * KERNEL_TOL[dtype])


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_helper_runs() -> None:
    res = mod.benchmark_attention(1, 4, 1024, 72, warmup_ms=5, rep_ms=10)
    assert set(res) == BENCH_KEYS
    assert res["sdpa_ms"] > 0 and res["int8_ms"] > 0 and res["rel_err"] < INT8_VS_SDPA_TOL
