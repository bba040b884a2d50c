"""The attention_int8 pass: eligible SDPA calls become difforge's 8-bit attention.

On a CPU-only machine the kernel runs in Triton's interpreter (this folder's conftest), so
``attention.select: always`` makes the pass fire here; ``measured`` needs a GPU to time on
and keeps SDPA on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difforge
from difforge.kernels import attention_select
from difforge.kernels.attention_select import AttentionPolicy, AttentionShape, choose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INT8_TOL = 3e-2
FP8_PV_TOL = 5e-2


class Attention(nn.Module):
    """q/k/v projections, SDPA in diffusers' [B, H, S, D] view, output projection."""

    def __init__(self, dim: int = 64, heads: int = 2, **sdpa_kwargs: object) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (
            t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def run(module: nn.Module, options: dict, *args: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Compiled output and its error against the float32 eager module."""
    with torch.no_grad():
        ref = module.float()(*(a.float() if a.is_floating_point() else a for a in args))
        module = module.half()
        out = difforge.compile(module, options=options)(*args)
    return out, rel_err(out, ref)


ALWAYS = {"passes.attention_int8": True, "attention.select": "always"}


def inputs(s: int = 40, dim: int = 64) -> torch.Tensor:
    return torch.randn(2, s, dim, device=DEVICE, dtype=torch.float16)


@pytest.mark.parametrize("pv_fp8", [False, True], ids=["pv-fp16", "pv-fp8"])
def test_pass_fires_and_matches_eager(pv_fp8: bool) -> None:
    torch.manual_seed(0)
    module = Attention().to(DEVICE).eval()
    _, err = run(module, {**ALWAYS, "attention.pv_fp8": pv_fp8}, inputs())
    assert difforge.counters["attention_int8"] == 1
    assert err < (FP8_PV_TOL if pv_fp8 else INT8_TOL), err
    # The 8-bit kernel really ran: fp16 SDPA alone is ~1e-3 off float32.
    assert err > 2e-3


def test_quantization_runs_in_inductor_kernels() -> None:
    """The pass emits the quantization as torch ops: Inductor's code computes the int8
    copies itself and calls only the prepared-operand kernel, not the eager op (whose
    standalone Triton pre-passes would read q, k, v again)."""
    from difforge.bench.output_code import logged_code

    torch.manual_seed(0)
    module = Attention(dim=144, heads=2).to(DEVICE).eval()
    with logged_code() as code:
        _, err = run(module, {**ALWAYS, "attention.pv_fp8": True}, inputs(dim=144))
    assert difforge.counters["attention_int8"] == 1 and err < FP8_PV_TOL
    text = "\n".join(code.records)
    assert "attention_int8_prepared" in text
    assert "difforge.attention_int8.default" not in text
    assert "float8_e4m3fn" in text and "int8" in text  # the 8-bit copies are Inductor's


def test_prepared_operands_equal_the_triton_prepass() -> None:
    """The torch-op quantization the pass emits and the Triton pre-pass of the eager op
    give the same operands, bit for bit (so the kernel's tests cover the compiled path)."""
    from difforge.kernels import attention_int8 as k8

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, s, 72, device=DEVICE, dtype=torch.float16) for s in (37, 50, 50))
    k = k + 2.0
    for pv_fp8 in (False, True):
        fused = k8.prepare_operands_torch(q, k, v, 16, 32, pv_fp8)
        triton_ops = k8.prepare_operands(q, k, v, 16, 32, pv_fp8)
        for name, a, b in zip(fused._fields, fused, triton_ops, strict=True):
            if a is None or b is None:
                assert a is None and b is None, name
                continue
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0, msg=name)


def test_head_dim_72_and_explicit_scale() -> None:
    torch.manual_seed(0)
    module = Attention(dim=144, heads=2, scale=0.05).to(DEVICE).eval()
    _, err = run(module, ALWAYS, inputs(dim=144))
    assert difforge.counters["attention_int8"] == 1 and err < INT8_TOL


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"is_causal": True}, "causal"),
        ({"dropout_p": 0.1}, "dropout"),
    ],
)
def test_pass_skips_what_the_kernel_does_not_do(kwargs: dict, why: str) -> None:
    module = Attention(**kwargs).to(DEVICE).eval().half()
    with torch.no_grad():
        difforge.compile(module, options=ALWAYS)(inputs())
    assert difforge.counters["attention_int8"] == 0, why


def test_pass_skips_masked_float32_and_odd_head_dims() -> None:
    module = Attention().to(DEVICE).eval().half()
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():
        difforge.compile(module, options=ALWAYS)(inputs(), mask)
        difforge.compile(Attention().to(DEVICE).eval(), options=ALWAYS)(inputs().float())
        odd = Attention(dim=40, heads=2).to(DEVICE).eval().half()  # head dim 20
        difforge.compile(odd, options=ALWAYS)(inputs(dim=40))
    assert difforge.counters["attention_int8"] == 0


@pytest.mark.parametrize("mode", ["O2", "O3"])
def test_pass_is_opt_in(mode: str) -> None:
    """Off in every preset: on an H100 the kernel lost to cuDNN at every DiT shape."""
    module = Attention().to(DEVICE).eval().half()
    options = {"mode": mode, "attention.select": "always", "quant.fp8_linear": False}
    with torch.no_grad():
        difforge.compile(module, options=options)(inputs())
    assert difforge.counters["attention_int8"] == 0


@pytest.mark.skipif(DEVICE != "cpu", reason="about machines without a GPU")
def test_measured_policy_keeps_sdpa_without_a_gpu() -> None:
    module = Attention().to(DEVICE).eval().half()
    with torch.no_grad():
        difforge.compile(module, options={"passes.attention_int8": True})(inputs())
    assert difforge.counters["attention_int8"] == 0
    shape = AttentionShape(2, 2, 40, 40, 32, torch.float16, "cpu")
    assert choose(shape, AttentionPolicy(select="measured")) is None


def test_candidates_follow_the_policy() -> None:
    fp16_only = attention_select.allowed_candidates(AttentionPolicy(pv_fp8=False), "cpu")
    both = attention_select.allowed_candidates(AttentionPolicy(pv_fp8=True), "cpu")
    assert fp16_only and not any(c.pv_fp8 for c in fp16_only)
    assert any(c.pv_fp8 for c in both) and len(both) > len(fp16_only)
    shape = AttentionShape(2, 2, 40, 40, 32, torch.float16, "cpu")
    assert choose(shape, AttentionPolicy(select="always", pv_fp8=True)).pv_fp8


def test_bad_attention_options_raise() -> None:
    with pytest.raises(difforge.OptionsError, match="attention.select"):
        difforge.compile(nn.Linear(2, 2), options={"attention.select": "sometimes"})
    with pytest.raises(difforge.OptionsError, match="positive"):
        difforge.compile(nn.Linear(2, 2), options={"attention.min_speedup": 0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_measured_choice_is_recorded() -> None:
    """On a GPU the measured policy times SDPA and the tiles and records what it chose."""
    attention_select.measurements.clear()
    shape = AttentionShape(2, 16, 4096, 4096, 72, torch.float16, "cuda")
    choice = choose(shape, AttentionPolicy(pv_fp8=True))
    (m,) = attention_select.measurements.values()
    assert m.sdpa_ms > 0 and m.best_ms is not None and m.rel_err < attention_select.MAX_REL_ERR
    assert (choice is not None) == (m.sdpa_ms / m.best_ms >= 1.03)
