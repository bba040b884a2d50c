"""The 8-bit attention with q quantized in its kernel and one k/v pre-pass: against the
three-quantizer path (same values) and exact attention; the op; GPU shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difforge.kernels import attention_int8 as a8
from difforge.kernels import attention_int8_onepass as onepass
from difforge.kernels.attention_int8_onepass import attention_int8_onepass, quantize_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, Sq, Skv, D): ragged q and kv tails, cross-attention both ways, D=72's tiles, one
# token (an int argument of 1 is specialized by Triton).
SHAPES = [(1, 2, 37, 53, 64), (2, 1, 16, 130, 72), (1, 1, 65, 17, 128), (1, 1, 1, 1, 72)]
BLOCKS = {"block_m": 16, "block_n": 32}
#: Against the three-quantizer path: same quantized operands (k's mean summed in another
#: order may move an int8 k value by a step at a tie), so the outputs agree up to that:
#: 0 on the CPU shapes, 1.4e-3 at FLUX's bf16 4608 tokens (H200, 15b1a1d).
SAME_PATH_TOL = 3e-3
#: fp8 P·V against exact attention (test_attention_int8 measured 3.1e-2 .. 3.7e-2).
FP8_PV_VS_SDPA_TOL = 5e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def fused_qkv(
    b: int, h: int, s: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``[B, H, S, D]`` views of one ``[B, S, 3, H, D]`` projection output."""
    fused = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=dtype)
    q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_three_quantizer_path(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    b, h, sq, skv, d = shape
    q = torch.randn(b, h, sq, d, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(b, h, skv, d, device=DEVICE, dtype=dtype) * 2 + 0.5 for _ in range(2))
    out = attention_int8_onepass(q, k, v, **BLOCKS)
    before = a8.attention_int8(q, k, v, pv_fp8=True, **BLOCKS)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out, before) < SAME_PATH_TOL
    assert rel_err(out, exact) < FP8_PV_VS_SDPA_TOL


@pytest.mark.parametrize("s,max_chunks", [(1, 32), (17, 32), (700, 32), (700, 2)])
def test_quantize_kv_matches_the_torch_quantizers(
    s: int, max_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Smoothed int8 k and fp8 Vᵀ as prepare_operands_torch makes them: V's values and
    scales bit for bit (a max is exact), k within one step and its scales within float
    rounding (the mean is summed in chunks); zero padding where the kernel expects it.
    700 tokens: 6 partials (masked to 8 in the finishing kernel's load); with at most 2
    partials allowed, chunks of 512 rows."""
    monkeypatch.setattr(onepass, "MAX_CHUNKS", max_chunks)
    assert -(-s // onepass.stats_chunk(s)) <= max_chunks
    q, k, v = fused_qkv(2, 3, s, 72, torch.float16)
    k = k * 3 + 1.5  # an offset for the smoothing to remove
    v[0, 0, :, 5] = 0  # an all-zero channel keeps scale 1
    k8, k_scale, vt8, v_scale = quantize_kv(k, v, 32)
    ref = a8.prepare_operands_torch(q, k, v, 16, 32, True)
    assert k8.dtype == torch.int8 and k8.shape == ref.k8.shape == (2, 3, s, 96)
    assert (k8.int() - ref.k8.int()).abs().max() <= 1
    assert (k8[..., 72:] == 0).all()
    torch.testing.assert_close(k_scale, ref.k_scale, rtol=1e-5, atol=0)
    assert vt8.shape == ref.v_main.shape == (2, 3, 80, -(-s // 32) * 32)
    assert torch.equal(vt8.float(), ref.v_main.float())
    assert torch.equal(v_scale, ref.v_scale) and v_scale[0, 0, 5] == 1


def test_rejects_small_kv_blocks_and_bad_inputs() -> None:
    q, k, v = fused_qkv(1, 1, 16, 64, torch.float16)
    with pytest.raises(ValueError, match="block_n must be >= 32"):
        attention_int8_onepass(q, k, v, block_n=16)
    with pytest.raises(TypeError, match="dtype"):
        attention_int8_onepass(q.float(), k.float(), v.float())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_op_compiles_as_one_opaque_node(backend: str) -> None:
    q, k, v = fused_qkv(1, 2, 40, 64, torch.float16)
    torch.library.opcheck(
        torch.ops.difforge.attention_int8_onepass.default,
        (q, k, v, None, 16, 32),
        test_utils=("test_schema", "test_faketensor"),
    )

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.difforge.attention_int8_onepass(q, k, v, None, 16, 32)

    out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    assert torch.equal(out, attention_int8_onepass(q, k, v, **BLOCKS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "b,h,s,d,dtype",
    [(2, 16, 4096, 72, torch.float16), (2, 24, 4250, 64, torch.float16),
     (1, 24, 4608, 128, torch.bfloat16)],
    ids=["pixart", "sd3", "flux"],
)  # fmt: skip
def test_gpu_dit_shapes(b: int, h: int, s: int, d: int, dtype: torch.dtype) -> None:
    q, k, v = fused_qkv(b, h, s, d, dtype)
    out = attention_int8_onepass(q, k, v)
    before = a8.attention_int8(q, k, v, pv_fp8=True)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(out, before) < SAME_PATH_TOL
    assert rel_err(out, exact) < FP8_PV_VS_SDPA_TOL
