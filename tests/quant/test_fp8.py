"""fp8 (e4m3fn) quantization math, the difforge::fp8_linear op and Fp8Linear.

Error metric everywhere: ‖out − ref‖ / ‖ref‖ against a float32/float64 reference. Stated
bound for a full fp8 linear (weights per channel + activations per row) on Gaussian data:
< 6e-2 (measured ~3.7e-2 at K=256: 3 mantissa bits on both operands).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difforge.quant import fp8 as F8
from difforge.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Linear,
    dequantize,
    fp8_linear,
    fp8_linear_reference,
    quantize_rows,
    quantize_weight,
)
from difforge.quant.select import DEFAULT_EXCLUDE, ModuleFilter, quantize_linears

LINEAR_BOUND = 6e-2


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def all_fp8_values() -> torch.Tensor:
    """Every finite e4m3fn value, sorted, as float64 (bit patterns 0x7f/0xff are NaN)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = bits.view(FP8_DTYPE).double()
    return torch.unique(vals[~vals.isnan()])  # unique also merges +0 and -0


def nearest_even_reference(t: torch.Tensor) -> torch.Tensor:
    """Round float64 values to e4m3fn by search: nearest value, ties to the even mantissa
    (the bit pattern with a 0 last bit), saturating at ±448. Independent of torch's cast."""
    grid = all_fp8_values()
    t = t.double().clamp(-FP8_MAX, FP8_MAX)
    dist = (t[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    grid_bits = grid.to(FP8_DTYPE).view(torch.uint8).to(torch.int32)
    even = (grid_bits & 1) == 0
    # Prefer an even candidate among the tied ones, else the (single) nearest.
    pick = torch.where((ties & even[None, :]).any(1), (ties & even[None, :]).int().argmax(1), -1)
    pick = torch.where(pick < 0, ties.int().argmax(1), pick)
    return grid[pick]


# --------------------------------------------------------------------------------------------
# Scales, rounding, saturation, zeros
# --------------------------------------------------------------------------------------------


def test_weight_scale_is_per_output_channel_absmax_over_448() -> None:
    w = torch.randn(32, 64) * torch.rand(32, 1) * 5
    w_fp8, scale = quantize_weight(w)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == (32, 64) and w_fp8.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (32,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 448)
    # Each row's absmax lands exactly on ±448.
    assert torch.equal(w_fp8.float().abs().amax(1), torch.full((32,), 448.0))


def test_rounding_matches_a_nearest_even_reference() -> None:
    x = torch.randn(8, 257) * 3
    x[0, :9] = torch.tensor([0.0, 1.0625, 1.1875, -1.0625, 300.0, 304.0, 1e-3, 2**-9, 2**-10])
    x_fp8, scale = quantize_rows(x)
    scaled = (x.double() / scale[:, None].double()).flatten()
    expected = nearest_even_reference(scaled).reshape(x.shape)
    assert torch.equal(x_fp8.double(), expected)


def test_saturates_at_448_and_never_nan() -> None:
    t = torch.tensor([[1000.0, -1000.0, 448.0, 464.0, -480.0, 1.0, 0.0, 1e30]])
    out = F8._to_fp8(t, torch.ones(1))  # scale 1: values beyond 448 must saturate
    assert torch.equal(
        out.float(), torch.tensor([[448.0, -448.0, 448.0, 448.0, -448.0, 1.0, 0.0, 448.0]])
    )


def test_installed_torch_cast_behaviour_is_recorded() -> None:
    """What the raw cast does here; our quantizers clamp first, so it never matters."""
    raw = torch.tensor([500.0, -1000.0]).to(FP8_DTYPE).float()
    # torch 2.13 CPU saturates; CUDA casts have produced NaN. Either is accepted here.
    assert all(v in (448.0, -448.0) or v != v for v in raw.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_rows_quantize_to_exact_zeros(dtype: torch.dtype) -> None:
    w = torch.randn(16, 32, dtype=dtype)
    w[[0, 5]] = 0
    w_fp8, w_scale = quantize_weight(w)
    assert torch.isfinite(w_scale).all() and (w_scale > 0).all()
    assert torch.equal(w_fp8[[0, 5]].float(), torch.zeros(2, 32))
    x = torch.randn(4, 32, dtype=dtype)
    x[2] = 0
    x[3] = 1e-30 if dtype != torch.float16 else 0  # a denormal-ish row must not blow up
    x_fp8, _ = quantize_rows(x)
    assert torch.isfinite(x_fp8.float()).all() and torch.equal(x_fp8[2].float(), torch.zeros(32))
    out = fp8_linear(x, w_fp8, w_scale, None)
    assert torch.isfinite(out).all() and torch.equal(out[2].float(), torch.zeros(16))
    assert torch.equal(out[:, [0, 5]].float(), torch.zeros(4, 2))


def test_activation_scales_are_per_row_in_float32() -> None:
    magnitudes = torch.tensor([1e-3, 1, 10, 100, 1e3, 1e4])[:, None]
    x = (torch.randn(6, 48).clamp(-3, 3) * magnitudes).half()  # stays below fp16's 65504
    x_fp8, scale = quantize_rows(x)
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.float().abs().amax(1) / 448)
    # Rows are independent: a huge row does not coarsen its neighbours.
    y = x.clone()
    y[0] *= 1000
    y_fp8, _ = quantize_rows(y)
    assert torch.equal(y_fp8[1:].float(), x_fp8[1:].float())
    # Each row's relative error is fp8's, whatever its magnitude.
    for i in range(6):
        assert rel(dequantize(x_fp8[i : i + 1], scale[i : i + 1]), x[i : i + 1].float()) < 4e-2


# --------------------------------------------------------------------------------------------
# The linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_module_vs_nn_linear(dtype: torch.dtype) -> None:
    lin = nn.Linear(256, 320).to(dtype)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 37, 256, dtype=dtype)  # 3-D, odd token count
    out = q(x)
    assert out.shape == (2, 37, 320) and out.dtype == dtype
    ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert rel(out, ref) < LINEAR_BOUND
    assert q.bias is not None and q.bias.dtype == dtype


def test_fp8_linear_follows_autocast_like_nn_linear() -> None:
    """A drop-in for nn.Linear: under autocast the output has autocast's dtype."""
    lin = nn.Linear(64, 32)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = q(x), lin(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel(out, nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())) < 0.05
    assert q(x).dtype == torch.float32  # outside autocast: the input's dtype


def test_op_matches_the_dequantize_reference_exactly_on_cpu() -> None:
    w_fp8, w_scale = quantize_weight(torch.randn(48, 32))
    x_fp8, x_scale = quantize_rows(torch.randn(5, 32))
    bias = torch.randn(48)
    out = torch.ops.difforge.fp8_linear(x_fp8, x_scale, w_fp8, w_scale, bias, torch.float32)
    ref = (x_fp8.double() * x_scale[:, None].double()) @ (
        w_fp8.double() * w_scale[:, None].double()
    ).t() + bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_scaled_mm_call_convention_on_cpu() -> None:
    """The exact _scaled_mm call the CUDA path makes, run on the CPU kernel (torch 2.13
    CPU has one): same numbers as the reference up to accumulation order."""
    w_fp8, w_scale = quantize_weight(torch.randn(80, 48))
    x_fp8, x_scale = quantize_rows(torch.randn(7, 48))
    bias = torch.randn(80, dtype=torch.bfloat16)
    try:
        out = F8._scaled_mm_linear(x_fp8, x_scale, w_fp8, w_scale, bias, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU _scaled_mm for e4m3fn: {err}")
    ref = fp8_linear_reference(x_fp8, x_scale, w_fp8, w_scale, bias, torch.float32)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 1e-2  # bf16 output rounding only


def test_to_dtype_keeps_fp8_buffers() -> None:
    q = Fp8Linear.from_linear(nn.Linear(32, 16))
    scale = q.weight_scale.detach().clone()
    q.half()
    assert q.weight_fp8.dtype == FP8_DTYPE and q.weight_scale.dtype == torch.float32
    assert isinstance(q.weight_scale, nn.Parameter) and torch.equal(q.weight_scale, scale)
    assert q.bias is not None and q.bias.dtype == torch.float16
    assert q(torch.randn(3, 32, dtype=torch.float16)).dtype == torch.float16


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1 = Fp8Linear.from_linear(nn.Linear(64, 128))
        self.fc2 = Fp8Linear.from_linear(nn.Linear(128, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("impl", ["op", "auto"])
@pytest.mark.parametrize("backend", ["inductor", "difforge"])
def test_compiles_fullgraph_and_matches_eager(backend: str, impl: str) -> None:
    import difforge  # noqa: F401  (registers the backend)

    m = _Block()  # LayerNorm parameters require grad: the op's no-grad formula is needed
    for lin in (m.fc1, m.fc2):
        lin.impl = impl
    x = torch.randn(2, 9, 64)
    seen: list[str] = []

    def spy(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend(backend)(gm, inputs)

    out = torch.compile(m, backend=spy, fullgraph=True)(x)
    # "op": one opaque node per linear; "auto" traces the plain-torch path instead.
    assert sum("fp8_linear" in t for t in seen) == (2 if impl == "op" else 0)
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Planted outliers
# --------------------------------------------------------------------------------------------


def _outlier_errors(factor: float) -> tuple[float, float, float, float]:
    """(per-channel total, per-channel worst normal channel, per-tensor total, per-tensor
    worst normal channel) output errors
    of x @ W.T with 3 of 256 output channels scaled by ``factor``."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g) * 0.02
    outliers = torch.tensor([3, 77, 190])
    w[outliers] *= factor
    x = torch.randn(64, 512, generator=g)
    ref = x.double() @ w.double().t()
    x_fp8, x_scale = quantize_rows(x)
    xq = dequantize(x_fp8, x_scale).double()
    w_fp8, w_scale = quantize_weight(w)
    per_channel = xq @ dequantize(w_fp8, w_scale).double().t()
    s = w.abs().amax() / FP8_MAX  # one scale for the whole tensor
    per_tensor = xq @ ((w / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).double() * s).t()
    normal = torch.ones(256, dtype=torch.bool)
    normal[outliers] = False

    def worst(out: torch.Tensor) -> float:
        col = (out - ref).norm(dim=0) / ref.norm(dim=0)
        return float(col[normal].max())

    return rel(per_channel, ref), worst(per_channel), rel(per_tensor, ref), worst(per_tensor)


@pytest.mark.parametrize("factor", [20.0, 50.0])
def test_planted_outlier_channels_stay_within_bound(factor: float) -> None:
    total, worst_pc, total_pt, worst_pt = _outlier_errors(factor)
    # Stated bound: total < 5e-2, every normal channel < 6e-2 (measured ~3.7e-2 / ~5e-2).
    assert total < 5e-2 and worst_pc < 6e-2
    # Finding: e4m3fn is a float format, so 20-50x outliers only shift the normal channels
    # down the exponent range; a per-tensor scale costs them little (within 25 %) until
    # they reach the subnormals. Per-channel scales stay our default because they cost
    # nothing at run time and remove that cliff.
    assert total_pt < 1.25 * total and worst_pt < 1.25 * worst_pc


def test_per_tensor_scale_breaks_down_at_extreme_outliers() -> None:
    """At 1e5x the normal channels land in the subnormals under a per-tensor scale: its
    error there is several times the per-channel one, which does not move."""
    total, worst_pc, _, worst_pt = _outlier_errors(1e5)
    assert total < 5e-2 and worst_pc < 6e-2
    assert worst_pt > 3 * worst_pc


# --------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------


def test_filter_reasons() -> None:
    f = ModuleFilter(min_features=64, min_weight_elements=0)
    assert f.reason("blocks.0.ff", nn.Linear(64, 128)) is None
    assert "multiples of 16" in (f.reason("blocks.0.ff", nn.Linear(72 + 1, 128)) or "")
    assert "min_features" in (f.reason("blocks.0.ff", nn.Linear(32, 128)) or "")
    assert "'caption_projection'" in (
        f.reason("caption_projection.linear_1", nn.Linear(64, 64)) or ""
    )
    assert f.reason("single_transformer_blocks.0.proj_out", nn.Linear(64, 64)) is None  # FLUX
    assert "not an nn.Linear" in (f.reason("x", nn.Conv2d(64, 64, 1)) or "")
    only = ModuleFilter(min_features=0, min_weight_elements=0, include=("attn*",), exclude=())
    assert only("attn1.to_q", nn.Linear(16, 16)) and not only("ff.net.2", nn.Linear(16, 16))
    assert ModuleFilter(exclude="to_q").exclude == ("to_q",)
    with pytest.raises(ValueError, match="min_features"):
        ModuleFilter(min_features=-1)
    assert "emb" in DEFAULT_EXCLUDE and not any("proj_out" in p for p in DEFAULT_EXCLUDE)


def test_quantize_linears_reports_and_replaces() -> None:
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 24), nn.Linear(24, 64))
    every = ModuleFilter(min_features=0, min_weight_elements=0, exclude=(), skip_edges=False)
    report = quantize_linears(m, every)
    assert report.converted == ["0"] and set(report.skipped) == {"2", "3"}
    assert isinstance(m[0], Fp8Linear) and type(m[2]) is nn.Linear
    assert report.bytes_before == 64 * 64 * 4 and report.bytes_after == 64 * 64 + 64 * 4
    assert report.bytes_saved > 0


# --------------------------------------------------------------------------------------------
# GPU: the _scaled_mm path against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mkn", [(1, 16, 16), (17, 48, 80), (77, 1152, 4608), (300, 4608, 1152)])
def test_gpu_scaled_mm_matches_reference(dtype: torch.dtype, mkn: tuple[int, int, int]) -> None:
    dev = torch.device("cuda")
    if not F8.scaled_mm_available(dev):
        pytest.skip("fp8 GEMM needs compute capability >= 8.9")
    m, k, n = mkn
    w_fp8, w_scale = quantize_weight(torch.randn(n, k, device=dev, dtype=dtype))
    x = torch.randn(m, k, device=dev, dtype=dtype)
    bias = torch.randn(n, device=dev, dtype=dtype)
    out = fp8_linear(x, w_fp8, w_scale, bias)
    x_fp8, x_scale = quantize_rows(x)
    ref = fp8_linear_reference(x_fp8, x_scale, w_fp8, w_scale, bias, torch.float32)
    assert out.dtype == dtype and out.shape == (m, n)
    # Same quantized operands: only accumulation order and the output rounding differ.
    assert rel(out, ref) < 1e-2
    full = nn.functional.linear(x.double(), dequantize(w_fp8, w_scale).double(), bias.double())
    assert rel(out, full) < LINEAR_BOUND


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_fp8_block_matches_eager() -> None:
    if not F8.scaled_mm_available(torch.device("cuda")):
        pytest.skip("fp8 GEMM needs compute capability >= 8.9")
    m = _Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(m, backend="difforge", fullgraph=True)(x)
    assert rel(out, m(x)) < 2e-2  # fused activation quantization may round differently
