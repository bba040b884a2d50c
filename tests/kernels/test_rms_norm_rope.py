"""The RMSNorm + RoPE kernel against diffusers' composite (:func:`rms_norm_rope_reference`):
in Triton's interpreter here, compiled for sm90 without a GPU, and on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch
from tests.helpers import compile_for_sm90

from difforge.kernels.rms_norm_rope import rms_norm_rope_reference, rms_norm_rope_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def angles(tokens: int, d: int, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin as FLUX's position embedding makes them: float32 ``[S, D]``, each
    angle repeated for the two channels of its pair."""
    theta = torch.rand(tokens, d // 2, device=device) * 6.3
    return theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and contiguous layout; values within one rounding of the output
    dtype (two at most, where the norm's own rounding moved by one step first) of the
    composite's: rsqrt and the summation order are the only freedom."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    step = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * step, atol=2 * step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["flat", "broadcast", "per-sample"])
def test_one_part_matches_the_composite(dtype: torch.dtype, layout: str) -> None:
    b, s, h, d = 2, 7, 3, 16
    x = torch.randn(b, s, h, d, device=DEVICE, dtype=dtype) * 3 + 0.5
    w = torch.randn(d, device=DEVICE, dtype=dtype)
    cos, sin = angles(s, d)
    if layout == "broadcast":  # diffusers' cos[None, :, None, :]
        cos, sin = cos[None, :, None], sin[None, :, None]
    elif layout == "per-sample":
        cos, sin = (t[None, :, None].expand(b, s, 1, d).contiguous() for t in (cos, sin))
        cos[1], sin[1] = sin[1].clone(), cos[1].clone()  # the second sample's own angles
    got = rms_norm_rope_triton([x], [w], 1e-6, cos, sin)
    assert_matches(got, rms_norm_rope_reference([x], [w], 1e-6, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_parts_joined_along_tokens(dtype: torch.dtype) -> None:
    """FLUX's double blocks: text tokens (their own norm weights) before image tokens,
    each rotated by its own position in the joined sequence; heads not a multiple of the
    kernel's head block."""
    b, h, d = 1, 11, 32
    txt = torch.randn(b, 4, h, d, device=DEVICE, dtype=dtype)
    img = torch.randn(b, 9, h, d, device=DEVICE, dtype=dtype) * 5
    weights = [torch.randn(d, device=DEVICE, dtype=dtype) for _ in range(2)]
    cos, sin = angles(13, d)
    got = rms_norm_rope_triton([txt, img], weights, 1e-6, cos, sin)
    assert_matches(got, rms_norm_rope_reference([txt, img], weights, 1e-6, cos, sin))
    # each part really is normalised on its own: swapping the weights changes the output
    swapped = rms_norm_rope_triton([txt, img], weights[::-1], 1e-6, cos, sin)
    assert not torch.allclose(swapped[:, :4].float(), got[:, :4].float())


def test_strided_parts_and_no_weight() -> None:
    """q as a column slice of a fused projection's output (token stride > H * D) and a
    part whose last stride is not 1 (copied first); a norm without weight."""
    b, s, h, d = 2, 5, 4, 8
    fused = torch.randn(b, s, 3 * h * d + 8, device=DEVICE)
    q = fused[..., 8 : 8 + h * d].unflatten(-1, (h, d))
    odd = torch.randn(b, s, h, d, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q.stride(1) == 3 * h * d + 8 and odd.stride(-1) != 1
    cos, sin = angles(s, d)
    for x in (q, odd):
        got = rms_norm_rope_triton([x], [None], 1e-5, cos, sin)
        assert_matches(got, rms_norm_rope_reference([x], [None], 1e-5, cos, sin))


def test_zero_rows_and_rotation_by_zero() -> None:
    """A zero head stays zero (eps keeps rsqrt finite); angle 0 leaves the norm's output."""
    x = torch.randn(1, 3, 2, 8, device=DEVICE)
    x[0, 1] = 0
    zeros = torch.zeros(3, 8, device=DEVICE)
    out = rms_norm_rope_triton([x], [None], 1e-6, torch.ones(3, 8, device=DEVICE), zeros)
    assert bool((out[0, 1] == 0).all()) and torch.isfinite(out).all()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out[0, [0, 2]], normed[0, [0, 2]], rtol=1e-5, atol=1e-6)


def test_rejects_bad_inputs() -> None:
    x = torch.randn(1, 3, 2, 8, device=DEVICE)
    cos, sin = angles(3, 8)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_rope_triton([x[..., :6]], [None], 1e-6, cos[:, :6], sin[:, :6])
    with pytest.raises(ValueError, match=r"\[B, S_i, H, D\]"):
        rms_norm_rope_triton(
            [x, torch.randn(1, 3, 4, 8, device=DEVICE)], [None, None], 1e-6, cos, sin
        )
    with pytest.raises(ValueError, match="one weight"):
        rms_norm_rope_triton([x], [], 1e-6, cos, sin)
    with pytest.raises(ValueError, match=r"weights are \[D\]"):
        rms_norm_rope_triton([x], [torch.ones(4, device=DEVICE)], 1e-6, cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        rms_norm_rope_triton([x], [None], 1e-6, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        rms_norm_rope_triton([x.double()], [None], 1e-6, cos, sin)


def test_op_opcheck_and_fake() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.difforge.rms_norm_rope.default
    x = torch.randn(1, 3, 2, 8, device=DEVICE)
    cos, sin = angles(5, 8)
    args = ([x, torch.randn(1, 2, 2, 8, device=DEVICE)], [torch.randn(8, device=DEVICE), None])
    torch.library.opcheck(
        op, (*args, 1e-6, cos, sin), test_utils=("test_schema", "test_faketensor")
    )
    with FakeTensorMode():
        out = op([torch.empty(2, 6, 4, 16)], [None], 1e-6, torch.empty(6, 16), torch.empty(6, 16))
        assert out.shape == (2, 6, 4, 16) and out.is_contiguous()


_COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import difforge.kernels.rms_norm_rope as m

    kernel = m._rms_norm_rope_kernel
    consts = {"D": 128, "BLOCK_H": m._BLOCK_H, "HAS_W": True}
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
             "out_ptr": "*bf16", "eps": "fp32"}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    aligned = ("x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "out_ptr", "stride_xb", "stride_xs",
               "stride_xh", "stride_cs", "stride_ss", "stride_ob", "stride_os", "stride_oh")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": m._NUM_WARPS}).asm["ptx"]
    assert re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", ptx), "bf16 loads must be 16 bytes"
    assert re.search(r"st\\.global(\\.\\w+)*\\.v\\d\\.b32", ptx), "stores must be vectors"
    assert "ld.local" not in ptx and "st.local" not in ptx, "spilled to local memory"
    print("sm90 ok")
    """
)


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    compile_for_sm90(_COMPILE_FOR_SM90)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "txt,img,heads", [(0, 4608, 24), (512, 4096, 24), (7, 300, 5)], ids=["single", "double", "odd"]
)
def test_gpu_matches_the_composite(dtype: torch.dtype, txt: int, img: int, heads: int) -> None:
    """FLUX.1 at 1024²: single blocks (4608 tokens), double blocks (512 text + 4096 image)."""
    d = 128
    fused = torch.randn(1, img, 3 * heads * d, device="cuda", dtype=dtype)
    parts = [fused[..., : heads * d].unflatten(-1, (heads, d))]
    if txt:
        parts.insert(0, torch.randn(1, txt, heads, d, device="cuda", dtype=dtype))
    weights = [torch.rand(d, device="cuda", dtype=dtype) + 0.5 for _ in parts]
    cos, sin = angles(txt + img, d, "cuda")
    cos, sin = cos[None, :, None], sin[None, :, None]
    got = rms_norm_rope_triton(parts, weights, 1e-6, cos, sin)
    assert_matches(got, rms_norm_rope_reference(parts, weights, 1e-6, cos, sin))
