"""The traceable fp8 linear (what Fp8Linear runs under torch.compile): the same function
as the reference op, zero rows and saturation, and the fusion it exists for (the
activation quantization inside the kernel that computes the preceding LayerNorm)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import difforge
from difforge.quant import Fp8Linear
from difforge.quant.fp8 import fp8_linear_reference, fp8_linear_traceable, quantize_rows


def _cpu_scaled_mm_rowwise() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (2.13 does)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


CPU_SCALED_MM = _cpu_scaled_mm_rowwise()
needs_cpu_scaled_mm = pytest.mark.skipif(
    not CPU_SCALED_MM, reason="this torch's CPU _scaled_mm has no row-wise scales"
)


def _linear(k: int, n: int, dtype: torch.dtype = torch.float32, bias: bool = True) -> Fp8Linear:
    return Fp8Linear.from_linear(nn.Linear(k, n, bias=bias).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_traceable_reference_path_equals_the_op(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    lin = _linear(48, 80, dtype, bias)
    x = torch.randn(3, 7, 48).to(dtype)
    assert not lin.use_scaled_mm  # CPU: the float32 reference inside both
    lin.impl = "op"
    via_op = lin(x)
    lin.impl = "traceable"
    traced = lin(x)
    assert traced.dtype == dtype and traced.shape == (3, 7, 80)
    torch.testing.assert_close(traced, via_op, rtol=0, atol=0)


@needs_cpu_scaled_mm
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_path_is_the_reference_function_on_cpu(bias: bool) -> None:
    """torch._scaled_mm (CPU) and the dequantize-then-matmul reference compute the same
    function: equal up to float32 accumulation order."""
    torch.manual_seed(1)
    lin = _linear(64, 96, bias=bias)
    x = torch.randn(33, 64)
    b = lin.bias
    direct = fp8_linear_traceable(x, lin.weight_fp8, lin.weight_scale, b, scaled_mm=True)
    reference = fp8_linear_traceable(x, lin.weight_fp8, lin.weight_scale, b, scaled_mm=False)
    torch.testing.assert_close(direct, reference, rtol=1e-5, atol=1e-5)
    # The bf16-output fallback (stacks whose rowwise kernel rejects x.dtype) is the same
    # function up to bf16 rounding of the product.
    fallback = fp8_linear_traceable(
        x, lin.weight_fp8, lin.weight_scale, b, scaled_mm=True, direct_out_dtype=False
    )
    torch.testing.assert_close(fallback, reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scaled_mm", [False, pytest.param(True, marks=needs_cpu_scaled_mm)])
def test_zero_rows_give_the_bias_and_large_rows_saturate_without_nan(scaled_mm: bool) -> None:
    torch.manual_seed(2)
    lin = _linear(32, 48)
    x = torch.randn(4, 32)
    x[1] = 0.0  # an all-zero row: scale floor, exact zeros, output = bias
    x[2] *= 1e30  # huge but finite: absmax scaling maps it into range
    x[3, 5] = 3e38  # one near-float32-max outlier in a row
    out = fp8_linear_traceable(x, lin.weight_fp8, lin.weight_scale, lin.bias, scaled_mm=scaled_mm)
    assert torch.isfinite(out[[0, 1]]).all() and not out.isnan().any()
    torch.testing.assert_close(out[1], lin.bias.detach(), rtol=0, atol=0)
    x_fp8, x_scale = quantize_rows(x)
    assert x_fp8.float().abs().max() <= 448.0 and x_fp8.float()[1].eq(0).all()
    ref = fp8_linear_reference(x_fp8, x_scale, lin.weight_fp8, lin.weight_scale, lin.bias, x.dtype)
    torch.testing.assert_close(out[:2], ref[:2], rtol=1e-5, atol=1e-5)


class _NormLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.lin = Fp8Linear.from_linear(nn.Linear(64, 96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.norm(x))


def _o2_cpp_kernels(m: nn.Module, x: torch.Tensor, tolerance: float) -> tuple[str, set[str]]:
    """Compile ``m`` at O2 on the CPU, check it against eager: (its generated code, the
    names of its C++ kernels)."""
    with torch.no_grad():
        eager = m(x)
        torch._dynamo.reset()
        out, codes = run_and_get_code(difforge.compile(m, options={"mode": "O2"}), x)
    torch.testing.assert_close(out, eager, rtol=tolerance, atol=tolerance)
    code = "\n".join(codes)
    return code, set(re.findall(r"\b(cpp_fused_\w+)\(", code))


@pytest.mark.parametrize("scaled_mm", [False, pytest.param(True, marks=needs_cpu_scaled_mm)])
def test_quantization_fuses_into_the_layer_norm_kernel(scaled_mm: bool) -> None:
    """The point of the traceable path: Inductor computes the row absmax, the scale and the
    e4m3 cast in the same generated kernel as the LayerNorm that produces the activation,
    so the activation is never written in high precision and read again."""
    torch.manual_seed(3)
    m = _NormLinear().eval()
    m.lin.use_scaled_mm = scaled_mm  # CPU _scaled_mm (2.13) stands in for the CUDA GEMM
    code, kernels = _o2_cpp_kernels(m, torch.randn(2, 8, 64), tolerance=1e-5)
    with_norm = [k for k in kernels if "native_layer_norm" in k]
    assert with_norm, kernels
    fused = [k for k in with_norm if "amax" in k and "_to_copy" in k]
    assert fused, f"quantization not fused with the LayerNorm: {sorted(kernels)}"
    # The kernel stores fp8: its source converts to Float8_e4m3fn.
    name = fused[0]
    source = code[code.index(f"{name} = async_compile") :]
    source = source[: source.index("''')")]
    assert "Float8_e4m3fn" in source
    # No other kernel recomputes the row absmax (no separate quantization pass).
    assert all("amax" not in k for k in kernels if k not in fused)
    if scaled_mm:
        assert "extern_kernels._scaled_mm(" in code
    else:
        assert "_scaled_mm" not in code


class _SharedInput(nn.Module):
    """q/k/v read one LayerNorm output; an MLP whose second linear reads a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q, self.k, self.v = (Fp8Linear.from_linear(nn.Linear(64, 64)) for _ in range(3))
        self.ff1 = Fp8Linear.from_linear(nn.Linear(64, 128))
        self.ff2 = Fp8Linear.from_linear(nn.Linear(128, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.q(h) * self.k(h) + self.v(h)
        return self.ff2(nn.functional.gelu(self.ff1(y)))


def test_shared_input_is_quantized_once_and_gelu_fuses_with_the_next_quantization() -> None:
    """Three linears reading one activation quantize it once (common subexpression), and
    the GELU between ff1 and ff2 shares a kernel with ff2's activation quantization."""
    torch.manual_seed(4)
    m = _SharedInput().eval()
    _, kernels = _o2_cpp_kernels(m, torch.randn(2, 8, 64), tolerance=1e-4)
    with_amax = sorted(k for k in kernels if "amax" in k)
    # One quantization with the LayerNorm (q/k/v share it), one with ff1's output (y),
    # one with the GELU: three row-absmax reductions for five linears.
    assert len(with_amax) == 3, with_amax
    assert sum("native_layer_norm" in k for k in with_amax) == 1
    assert sum("gelu" in k for k in with_amax) == 1, with_amax
