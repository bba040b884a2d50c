"""The one-kernel fp8 row quantization of ``cat([gelu?(a), gelu?(b)])`` against its torch
reference (:func:`difforge.quant.fp8.quantize_cat_rows`): the same scales and the same
float8 values, in Triton's interpreter here and compiled on a GPU."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compile_for_sm90

from difforge.kernels import fp8_row_quant as mod
from difforge.kernels.fp8_row_quant import (
    quantize_cat_rows_triton,
    quantize_layer_norm_rows_triton,
    quantize_residual_layer_norm_rows_triton,
)
from difforge.quant.fp8 import FP8_MAX, SCALE_EPS, quantize_cat_rows, quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_same_quantization(
    got: tuple[torch.Tensor, torch.Tensor],
    want: tuple[torch.Tensor, torch.Tensor],
    scale_rtol: float = 2.5e-7,
) -> None:
    """Scales within ``scale_rtol`` (default 2 float32 ulps: the GELU of the row max, fast
    exp and division in the kernel) and float8 values equal, except one e4m3 step where the
    scaled value sits on a rounding boundary and the last float32 bits decide."""
    (q, scale), (q_ref, scale_ref) = got, want
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=scale_rtol, atol=0)
    qf, rf = q.float(), q_ref.float()
    differ = qf != rf
    assert int(differ.sum()) <= max(1, qf.numel() // 1000), int(differ.sum())
    if differ.any():  # one step of e4m3 (3 mantissa bits) at that magnitude
        step = torch.exp2(torch.floor(torch.log2(rf.abs().clamp_min(2**-6))) - 3)
        assert bool(((qf - rf).abs() <= step)[differ].all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "widths,gelu",
    [
        ((40,), (False,)),  # a plain row quantization
        ((2100,), (True,)),  # an FF's GELU output: three column blocks, the last ragged
        ((48, 1100), (False, True)),  # FLUX's single blocks: attention, GELU(mlp)
        ((1025, 17), (True, True)),
        ((1, 1024), (True, False)),
    ],
)
def test_matches_the_torch_reference(
    dtype: torch.dtype, widths: tuple[int, ...], gelu: tuple[bool, ...]
) -> None:
    parts = [
        torch.randn(6, w, dtype=dtype, device=DEVICE) * (1 + 2 * i) for i, w in enumerate(widths)
    ]
    got = quantize_cat_rows_triton(parts, list(gelu))
    assert_same_quantization(got, quantize_cat_rows(parts, list(gelu)))
    assert bool(got[0].float().abs().max() <= FP8_MAX)


def test_special_rows() -> None:
    """A zero row (scale from the floor, values exact zeros), a row below the GELU floor
    (scale from 0.1701, nothing saturates), a row with one huge outlier (it maps to 448) and
    a row that is all negative (the GELU part's bound is the floor)."""
    a = torch.randn(4, 300, device=DEVICE)
    a[0] = 0
    a[1] = 1e-3 * torch.randn(300, device=DEVICE)
    a[2, 7] = 3e4
    a[3] = -a[3].abs() - 1
    for gelu in (True, False):
        q, scale = quantize_cat_rows_triton([a], [gelu])
        assert_same_quantization((q, scale), quantize_cat_rows([a], [gelu]))
        assert float(scale[0]) == pytest.approx((0.1701 if gelu else SCALE_EPS) / FP8_MAX)
        assert bool((q[0].float() == 0).all())
        assert float(q[2].float().abs().max()) == FP8_MAX
    assert torch.isfinite(q.float()).all()


def test_nan_and_inf_rows_stay_visible() -> None:
    """As the torch reference: a row holding a NaN gets a NaN scale and NaN codes, a row
    holding an inf an inf scale and a NaN code where the inf was (a blow-up must not come
    out of the quantizer as finite activations). The GPU's plain ``max.f32`` drops NaN;
    the sm90 test checks the kernels use the NaN-propagating form."""
    a = torch.randn(3, 40, device=DEVICE)
    a[0, 5] = float("nan")
    a[1, 9] = float("inf")
    for gelu in (False, True):
        q, scale = quantize_cat_rows_triton([a], [gelu])
        q_ref, scale_ref = quantize_cat_rows([a], [gelu])
        for got, want in ((scale, scale_ref), (q.float(), q_ref.float())):
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.isnan(scale[0]) and torch.isnan(q[0].float()).all()
        assert torch.isnan(q[1, 9].float()) and bool((q[1].float().nan_to_num() == 0).all())
        assert torch.isfinite(scale[2]) and torch.isfinite(q[2].float()).all()
    x = torch.randn(1, 3, 32, device=DEVICE)
    x[0, 1, 4] = float("nan")
    zeros = torch.zeros(1, 32, device=DEVICE)
    q, scale = quantize_layer_norm_rows_triton(x, zeros, zeros)
    assert torch.isnan(scale[1]) and torch.isfinite(scale[[0, 2]]).all()
    assert torch.isnan(q[1].float()).all() and torch.isfinite(q[[0, 2]].float()).all()


def test_parts_with_row_strides_and_a_transposed_part() -> None:
    """Column slices of one buffer (a fused projection's output) are read in place; a part
    whose columns are strided is copied first. Same values either way."""
    buf = torch.randn(5, 3 * 64 + 8, device=DEVICE, dtype=torch.bfloat16)
    a, b = buf[:, 8:72], buf[:, 72:]
    t = torch.randn(200, 5, device=DEVICE, dtype=torch.bfloat16).t()
    for parts in ([a, b], [t, a]):
        assert parts[0].stride(0) != parts[0].shape[1] or parts[0].stride(1) != 1
        got = quantize_cat_rows_triton(parts, [False, True])
        want = quantize_cat_rows([p.contiguous() for p in parts], [False, True])
        assert_same_quantization(got, want)


def test_no_rows() -> None:
    q, scale = quantize_cat_rows_triton([torch.randn(0, 16, device=DEVICE)], [True])
    assert q.shape == (0, 16) and scale.shape == (0,)


def test_rejects_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one or two parts"):
        quantize_cat_rows_triton([x, x, x], [True, True, True])
    with pytest.raises(ValueError, match="one or two parts"):
        quantize_cat_rows_triton([x], [True, False])
    with pytest.raises(ValueError, match="2-D"):
        quantize_cat_rows_triton([x[0]], [True])
    with pytest.raises(ValueError, match="share rows, dtype and device"):
        quantize_cat_rows_triton([x, x[:3]], [True, True])
    with pytest.raises(ValueError, match="share rows, dtype and device"):
        quantize_cat_rows_triton([x, x.half()], [True, True])
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        quantize_cat_rows_triton([x.to(torch.int32)], [False])
    if DEVICE == "cpu":
        monkeypatch.setattr(mod, "_interpreting", lambda: False)
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            quantize_cat_rows_triton([x], [True])


def test_op_opcheck_and_fake() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.difforge.fp8_quantize_cat_rows_triton.default
    parts = [torch.randn(3, 40, device=DEVICE), torch.randn(3, 24, device=DEVICE)]
    # torch's schema check compares outputs with allclose, which the CPU lacks for fp8.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    if DEVICE != "cpu":
        utils = ("test_schema", *utils)
    torch.library.opcheck(op, (parts, [False, True]), test_utils=utils)
    with FakeTensorMode():
        fake = [torch.empty(7, 40, dtype=torch.bfloat16), torch.empty(7, 100, dtype=torch.bfloat16)]
        q, scale = op(fake, [False, True])
        assert q.shape == (7, 140) and q.dtype == torch.float8_e4m3fn
        assert scale.shape == (7,) and scale.dtype == torch.float32
    op = torch.ops.difforge.fp8_quantize_layer_norm_rows_triton.default
    x, mod = torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    torch.library.opcheck(op, (x, mod, mod, 1e-6), test_utils=utils)
    with FakeTensorMode():
        q, scale = op(torch.empty(2, 5, 48), torch.empty(2, 48), torch.empty(2, 48), 1e-6)
        assert q.shape == (10, 48) and q.dtype == torch.float8_e4m3fn and scale.shape == (10,)


#: The GPU kernel sums mean and variance in another order than ATen's LayerNorm, with
#: Triton's fast square root and division: on an H200 the row scales came out up to 4.6e-7 apart
#: (about 4 float32 ulps) on 0.6-0.9% of rows; 1e-6 leaves twice that.
LAYER_NORM_SCALE_RTOL = 1e-6


def layer_norm_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm quantizer's function in float32, then the torch row quantizer."""
    d = x.shape[-1]
    y = F.layer_norm(x.float(), (d,), eps=eps) * (1 + scale.float()[:, None])
    return quantize_rows((y + shift.float()[:, None]).reshape(-1, d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 64), (1, 3, 1152), (3, 2, 100), (1, 1, 3072)])
def test_layer_norm_quantizer_matches_the_reference(
    dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    b, _, d = shape
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3 + 1
    scale, shift = (0.5 * torch.randn(b, d, dtype=dtype, device=DEVICE) for _ in range(2))
    got = quantize_layer_norm_rows_triton(x, scale, shift)
    assert_same_quantization(got, layer_norm_reference(x, scale, shift))


def residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + gate[:, None] * y`` in float32, rounded once to x's dtype."""
    gated = y.float() if gate is None else gate.float()[:, None] * y.float()
    return (x.float() + gated).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_residual_layer_norm_quantizer(dtype: torch.dtype, gated: bool) -> None:
    """h = x + gate * y is written (the residual stream) and the norm quantizes h as
    stored; y a column slice of a wider buffer (an attention output projection's rows)."""
    b, s, d = 2, 5, 96
    x = torch.randn(b, s, d, dtype=dtype, device=DEVICE) * 3 + 1
    y = torch.randn(b, s, d + 32, dtype=dtype, device=DEVICE)[..., 16 : 16 + d]
    gate = torch.randn(b, d, dtype=dtype, device=DEVICE) if gated else None
    scale, shift = (0.5 * torch.randn(b, d, dtype=dtype, device=DEVICE) for _ in range(2))
    h, q, row_scale = quantize_residual_layer_norm_rows_triton(x, y, gate, scale, shift)
    assert h.is_contiguous() and h.dtype == dtype
    # Rounded once to the dtype: exactly the reference on a GPU; Triton's interpreter
    # casts float32 to bfloat16 by truncation, one bf16 step off where the GPU rounds up.
    step = 2**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.0
    torch.testing.assert_close(h, residual_reference(x, y, gate), rtol=step, atol=0)
    assert_same_quantization((q, row_scale), layer_norm_reference(h, scale, shift))


def test_residual_layer_norm_quantizer_bad_inputs_and_op() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, mod = torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="the residual's y must be x's shape"):
        quantize_residual_layer_norm_rows_triton(x, x[:, :2], None, mod, mod)
    with pytest.raises(ValueError, match=r"the gate must be \[B, D\]"):
        quantize_residual_layer_norm_rows_triton(x, x, mod[:1], mod, mod)
    with pytest.raises(ValueError, match="share a dtype"):
        quantize_residual_layer_norm_rows_triton(x, x.double(), None, mod, mod)
    op = torch.ops.difforge.fp8_quantize_residual_layer_norm_rows_triton.default
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(op, (x, torch.randn_like(x), mod, mod, mod, 1e-6), test_utils=utils)
    torch.library.opcheck(op, (x, torch.randn_like(x), None, mod, mod, 1e-6), test_utils=utils)
    with FakeTensorMode():
        big = torch.empty(2, 5, 48)
        h, q, scale = op(big, big, None, torch.empty(2, 48), torch.empty(2, 48), 1e-6)
        assert h.shape == (2, 5, 48) and h.is_contiguous() and q.shape == (10, 48)
        assert scale.shape == (10,)


def test_layer_norm_quantizer_reads_strided_inputs() -> None:
    """As DiT blocks hand them over: the modulation as chunks of one [B, 6 D] table (batch
    stride 6 D), x a token slice of a longer sequence; and a transposed x (copied)."""
    b, s, d = 2, 7, 96
    table = torch.randn(b, 6 * d, device=DEVICE)
    shift, scale = table[:, :d], table[:, d : 2 * d]
    long = torch.randn(b, s + 3, d, device=DEVICE)
    x = long[:, 3:]
    xt = torch.randn(b, d, s, device=DEVICE).transpose(1, 2)
    for xs in (x, xt):
        got = quantize_layer_norm_rows_triton(xs, scale, shift, eps=1e-5)
        assert_same_quantization(got, layer_norm_reference(xs, scale, shift, eps=1e-5))


def test_layer_norm_quantizer_constant_row_and_bad_inputs() -> None:
    """A constant row normalises to zeros: the output is the shift alone."""
    x = torch.full((1, 2, 32), 5.0, device=DEVICE)
    scale, shift = torch.zeros(1, 32, device=DEVICE), torch.linspace(-1, 1, 32, device=DEVICE)[None]
    q, row_scale = quantize_layer_norm_rows_triton(x, scale, shift)
    assert_same_quantization((q, row_scale), layer_norm_reference(x, scale, shift))
    assert float(row_scale[0]) == pytest.approx(1 / FP8_MAX)
    with pytest.raises(ValueError, match=r"x \[B, S, D\] and scale, shift \[B, D\]"):
        quantize_layer_norm_rows_triton(x[0], scale, shift)
    with pytest.raises(ValueError, match=r"x \[B, S, D\] and scale, shift \[B, D\]"):
        quantize_layer_norm_rows_triton(x, scale[:, :16], shift)
    wide = torch.zeros(1, 1, 8200, device=DEVICE)
    with pytest.raises(ValueError, match="rows up to 8192 wide"):
        quantize_layer_norm_rows_triton(wide, wide[0], wide[0])


_COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import difforge.kernels.fp8_row_quant as m

    kernel = m._quantize_cat_rows_kernel
    consts = {"GELU_A": False, "GELU_B": True, "HAS_B": True, "BLOCK": m._BLOCK,
              "INTERPRET": False}
    types = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    aligned = ("a_ptr", "b_ptr", "out_ptr", "stride_a", "stride_b", "stride_out", "KA", "KB")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": m._NUM_WARPS}).asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, "fp8 must round to nearest, two at a time"
    assert re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", ptx), "bf16 loads must be 16 bytes"
    assert not re.search(r"ld\\.global(\\.\\w+)*\\.b16 ", ptx), "2-byte loads"
    # the GELU: fast exp and division, no libdevice tanh; IEEE division only per row
    assert "ex2.approx" in ptx and "tanh" not in ptx
    assert len(re.findall(r"div\\.rn\\.f32", ptx)) <= 2, "per-element IEEE division"
    assert "max.NaN.f32" in ptx and "min.NaN.f32" in ptx, "NaN must reach the scale and codes"

    kernel = m._layer_norm_quant_kernel
    consts = {"BLOCK_D": 4096, "RESIDUAL": True, "HAS_GATE": True, "INTERPRET": False}
    types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "gate_ptr": "*bf16", "h_ptr": "*bf16",
             "scale_ptr": "*bf16", "shift_ptr": "*bf16", "out_ptr": "*fp8e4nv",
             "row_scale_ptr": "*fp32", "eps": "fp32"}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    aligned = ("x_ptr", "y_ptr", "gate_ptr", "h_ptr", "scale_ptr", "shift_ptr", "out_ptr",
               "stride_xb", "stride_xs", "stride_yb", "stride_ys", "stride_gb", "stride_mb",
               "stride_sb", "stride_out", "D")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 8}).asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", ptx), "bf16 loads must be 16 bytes"
    assert "max.NaN.f32" in ptx and "min.NaN.f32" in ptx, "NaN must reach the scale and codes"
    print("sm90 ok")
    """
)


def test_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """Lowering and ptxas for an H100, with the instructions that keep it memory-bound."""
    compile_for_sm90(_COMPILE_FOR_SM90)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "m,widths,gelu",
    [
        (4608, (3072, 12288), (False, True)),  # FLUX.1 single block, 1024²
        (8192, (4608,), (True,)),  # PixArt-XL FF1 output, batch 2
        (333, (72, 1000), (False, True)),  # odd sizes
    ],
    ids=["flux-single", "pixart-ff1", "odd"],
)
def test_gpu_matches_the_reference(
    dtype: torch.dtype, m: int, widths: tuple[int, ...], gelu: tuple[bool, ...]
) -> None:
    parts = [torch.randn(m, w, device="cuda", dtype=dtype) for w in widths]
    got = quantize_cat_rows_triton(parts, list(gelu))
    assert_same_quantization(got, quantize_cat_rows(parts, list(gelu)))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 4608, 3072), (2, 4096, 1152), (2, 4096, 1536), (3, 77, 200)],
    ids=["flux", "pixart", "sd3", "odd"],
)  # fmt: skip
def test_gpu_layer_norm_quantizer_matches_the_reference(
    dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    b, _, d = shape
    x = torch.randn(shape, device="cuda", dtype=dtype)
    scale, shift = (0.5 * torch.randn(b, d, device="cuda", dtype=dtype) for _ in range(2))
    got = quantize_layer_norm_rows_triton(x, scale, shift)
    assert_same_quantization(got, layer_norm_reference(x, scale, shift), LAYER_NORM_SCALE_RTOL)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4608, 3072), (2, 4096, 1152)], ids=["flux", "pixart"])
def test_gpu_residual_layer_norm_quantizer(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    b, _, d = shape
    x, y = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
    gate, scale, shift = (0.5 * torch.randn(b, d, device="cuda", dtype=dtype) for _ in range(3))
    h, q, row_scale = quantize_residual_layer_norm_rows_triton(x, y, gate, scale, shift)
    want_h = residual_reference(x, y, gate)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    assert_same_quantization(
        (q, row_scale), layer_norm_reference(want_h, scale, shift), LAYER_NORM_SCALE_RTOL
    )
