"""The short-kv attention kernel: Triton's interpreter on the CPU, the real kernel on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compile_for_sm90, rel_err

from difforge.kernels import head_dim_tiles
from difforge.kernels.attention_short_kv import attention_short_kv, attention_short_kv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Half-precision kernel against the float32 oracle: P and V rounded to the input dtype.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _qkv(b: int, h: int, sq: int, skv: int, d: int, dtype: torch.dtype, device: str = DEVICE):
    gen = torch.Generator().manual_seed(b * 7 + h * 5 + sq + skv + d)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(device, dtype) for s in (sq, skv, skv))
    return q, k, v


def test_head_dim_tiles_for_16_bit_mmas() -> None:
    assert head_dim_tiles(72, 16) == (64, 16)
    assert head_dim_tiles(64, 16) == (64, 0)
    assert head_dim_tiles(128, 16) == (128, 0)
    assert head_dim_tiles(40, 16) == (32, 16)
    assert head_dim_tiles(96, 16) == (64, 32)
    assert head_dim_tiles(8, 16) == (16, 0)
    q, k, v = _qkv(1, 1, 4, 4, 130, torch.float16)
    with pytest.raises(ValueError, match="head dim"):
        attention_short_kv(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 37, 20, 72), (1, 3, 64, 77, 64), (2, 1, 50, 120, 40), (1, 1, 9, 5, 128)],
    ids=["pixart-d72", "sdxl-77", "d40", "tiny"],
)
def test_kernel_matches_sdpa(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    q, k, v = _qkv(*shape, dtype)
    out = attention_short_kv(q, k, v, block_m=32, num_warps=4)
    assert out.shape == q.shape and out.dtype == dtype
    # token-major memory: the transpose(1, 2).reshape after attention is a view
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out.float(), attention_short_kv_reference(q, k, v).float()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_with_masks_and_scale(dtype: torch.dtype) -> None:
    b, h, sq, skv, d = 2, 2, 33, 24, 72
    q, k, v = _qkv(b, h, sq, skv, d, dtype)
    # PixArt's padded prompt: an additive bias per sample and key, broadcast over heads/rows
    keep = torch.ones(b, skv, dtype=torch.bool)
    keep[0, 17:] = False
    bias = ((~keep).to(dtype) * -10000.0).view(b, 1, 1, skv).to(DEVICE)
    for mask in (bias, keep.view(b, 1, 1, skv).to(DEVICE)):
        out = attention_short_kv(q, k, v, mask, scale=0.3, block_m=16, num_warps=4)
        ref = attention_short_kv_reference(q, k, v, mask, scale=0.3)
        assert rel_err(out.float(), ref.float()) < TOL[dtype]
    full = torch.randn(b, h, sq, skv).to(DEVICE, dtype)  # a general additive mask
    out = attention_short_kv(q, k, v, full, block_m=16, num_warps=4)
    assert rel_err(out.float(), attention_short_kv_reference(q, k, v, full).float()) < TOL[dtype]


def test_fully_masked_rows_are_zero_and_strided_inputs_work() -> None:
    q, k, v = _qkv(1, 2, 16, 8, 64, torch.float16)
    mask = torch.ones(1, 1, 16, 8, dtype=torch.bool, device=DEVICE)
    mask[..., 3, :] = False
    out = attention_short_kv(q, k, v, mask, block_m=16, num_warps=4)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isfinite(out).all()
    # q, k, v as the transposed views of [B, S, H, D] projections (how models hand them over)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert rel_err(attention_short_kv(qs, ks, vs, block_m=16, num_warps=4).float(),
                   attention_short_kv_reference(q, k, v).float()) < TOL[torch.float16]  # fmt: skip


def test_library_op_and_bad_inputs() -> None:
    q, k, v = _qkv(1, 2, 16, 8, 64, torch.float16)
    out = torch.ops.difforge.attention_short_kv(q, k, v, None, None)
    assert rel_err(out.float(), attention_short_kv_reference(q, k, v).float()) < 2e-3
    with pytest.raises(ValueError, match="kv length"):
        attention_short_kv(q, *_qkv(1, 2, 300, 300, 64, torch.float16)[1:])
    with pytest.raises(ValueError, match="must share batch"):
        attention_short_kv(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="fp16 or bf16"):
        attention_short_kv(q.float(), k.float(), v.float())
    with pytest.raises(RuntimeError):  # a mask that does not broadcast
        attention_short_kv(q, k, v, torch.zeros(1, 3, 1, 8, device=DEVICE))


_COMPILE_FOR_SM90 = textwrap.dedent(
    r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import difforge.kernels.attention_short_kv as m

    kernel = m._short_kv_kernel
    for dt, d, kv, bias in (("fp16", 72, 128, True), ("bf16", 64, 128, False), ("fp16", 72, 256, True)):
        main, tail = m.head_dim_tiles(d, 16)
        consts = {"HEAD_DIM": d, "D_MAIN": main, "D_TAIL": tail, "BLOCK_M": 128, "BLOCK_KV": kv,
                  "HAS_BIAS": bias, "BIAS_ROWS": False, "INTERPRET": False,
                  "stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1}
        types = {n: "i32" for n in kernel.arg_names}
        types.update({"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
                      "o_ptr": f"*{dt}", "qk_scale": "fp32"})
        sig = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n.endswith("_ptr") or (n.startswith("stride_") and n not in consts and "_b" not in n[6:8])}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm
        assert "cubin" in asm, "ptxas did not run"
        ptx_dt = {"fp16": "f16", "bf16": "bf16"}[dt]
        assert f"f32.{ptx_dt}.{ptx_dt}" in asm["ptx"] and "mma" in asm["ptx"], "no tensor-core MMA"
        assert "ex2.approx" in asm["ptx"]
    print("sm90 ok")
    """
)


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """Lowering and ptxas for H100 (sm_90a) on the CPU: tensor-core MMAs, exp2."""
    compile_for_sm90(_COMPILE_FOR_SM90)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 16, 4096, 120, 72), (2, 16, 4096, 256, 72), (2, 10, 4096, 77, 64), (2, 20, 1024, 77, 64)],
    ids=["pixart-alpha", "kv-limit", "sdxl-640", "sdxl-1280"],
)
def test_gpu_kernel_matches_sdpa_at_model_shapes(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    q, k, v = _qkv(*shape, dtype, device="cuda")
    ref = attention_short_kv_reference(q, k, v).float()
    out = attention_short_kv(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v).float()
    # Not farther from float32 than the half-precision SDPA, with a floor for ties at ~1e-3.
    assert rel_err(out.float(), ref) <= max(1.5 * rel_err(sdpa, ref), TOL[dtype] / 2)
