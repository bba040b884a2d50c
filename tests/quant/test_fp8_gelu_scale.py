"""The GELU-then-fp8 quantization rewrite (``passes.fp8_gelu_scale``, low-precision tier):
the row bound's math, and the pass firing (and not firing) in compiled graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compile_with_grad_enabled, rel_err
from torch import nn

import difforge
from difforge.inference_only import InferenceOnlyError
from difforge.quant import Fp8Linear
from difforge.quant.fp8 import (
    FP8_MAX,
    GELU_NEGATIVE_BOUND,
    dequantize,
    quantize_cat_rows,
    quantize_gelu_rows,
    quantize_rows,
)


def test_bound_is_above_every_gelu_value_and_tight_for_real_rows() -> None:
    torch.manual_seed(0)
    y = torch.cat([torch.randn(64, 300) * 3, torch.full((1, 300), -0.7525)])  # GELU's minimum
    q, scale = quantize_gelu_rows(y)
    g = F.gelu(y, approximate="tanh")
    assert (g.abs() <= scale[:, None] * FP8_MAX * (1 + 1e-6)).all()
    _, exact = quantize_rows(g)
    # rows whose GELU reaches 0.17: the same scale as the exact absmax (float32 rounding)
    torch.testing.assert_close(scale[:64], exact[:64], rtol=1e-6, atol=0)
    # the row at GELU's minimum: its floor, a coarser scale but no saturation
    assert scale[64] == pytest.approx(GELU_NEGATIVE_BOUND / FP8_MAX)
    assert scale[64] >= exact[64]
    assert rel_err(dequantize(q, scale), g) < 0.04


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_negative_and_huge_rows(dtype: torch.dtype) -> None:
    y = torch.stack([torch.zeros(32), -torch.rand(32) * 50, torch.linspace(-1, 1e4, 32)]).to(dtype)
    q, scale = quantize_gelu_rows(y)
    assert scale.dtype == torch.float32 and q.dtype == torch.float8_e4m3fn
    deq = dequantize(q, scale)
    assert torch.isfinite(deq).all()
    assert (deq[0] == 0).all()  # GELU(0) = 0 exactly
    assert deq[2].abs().max() <= FP8_MAX * scale[2]
    torch.testing.assert_close(
        deq[2, -1], F.gelu(y[2, -1].float(), approximate="tanh"), rtol=0.07, atol=0
    )


def test_rejects_non_matrix_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_gelu_rows(torch.randn(2, 3, 4))


class _FeedForward(nn.Module):
    def __init__(self, dim: int = 64, approximate: str = "tanh", reuse: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff1 = Fp8Linear.from_linear(nn.Linear(dim, 4 * dim))
        self.ff2 = Fp8Linear.from_linear(nn.Linear(4 * dim, dim))
        self.approximate = approximate
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.ff1(self.norm(x)), approximate=self.approximate)
        out = x + self.ff2(h)
        return out + h[..., : x.shape[-1]] if self.reuse else out


def _compile_and_check(model: nn.Module, options: dict) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        eager = model(x)
        out = difforge.compile(model, options=options)(x)
    # the exact-absmax eager path and the bound agree on these rows (all reach 0.17)
    assert rel_err(out, eager) < 1e-2


def test_pass_fires_on_tanh_gelu_before_an_fp8_linear() -> None:
    torch.manual_seed(0)
    _compile_and_check(_FeedForward().eval(), {"mode": "O2", "passes.fp8_gelu_scale": True})
    assert difforge.counters["fp8_gelu_scale"] == 1
    assert difforge.counters["gelu_tanh_sigmoid"] == 1  # it matched the sigmoid form


def test_pass_matches_the_plain_tanh_gelu_too() -> None:
    torch.manual_seed(0)
    options = {"mode": "O2", "passes.fp8_gelu_scale": True, "passes.gelu_tanh_sigmoid": False}
    _compile_and_check(_FeedForward().eval(), options)
    assert difforge.counters["fp8_gelu_scale"] == 1


@pytest.mark.parametrize(
    ("kwargs", "options"),
    [
        ({"approximate": "none"}, {"mode": "O2", "passes.fp8_gelu_scale": True}),  # erf GELU
        ({"reuse": True}, {"mode": "O2", "passes.fp8_gelu_scale": True}),  # GELU read twice
        ({}, {"mode": "O2"}),  # precise tier: off
    ],
)
def test_pass_does_not_fire(kwargs: dict, options: dict) -> None:
    torch.manual_seed(0)
    _compile_and_check(_FeedForward(**kwargs).eval(), options)
    assert difforge.counters["fp8_gelu_scale"] == 0


def test_low_precision_mode_turns_it_on() -> None:
    from difforge.options import parse_options

    assert parse_options({"mode": "O3"}).settings["passes.fp8_gelu_scale"] is True
    assert parse_options({"mode": "O2"}).settings["passes.fp8_gelu_scale"] is False


def test_cat_parts_bound_each_part_and_match_the_exact_quantization() -> None:
    torch.manual_seed(2)
    attn, y = torch.randn(16, 24) * 5, torch.randn(16, 96) * 2
    q, scale = quantize_cat_rows([attn, y], [False, True])
    full = torch.cat([attn, F.gelu(y, approximate="tanh")], dim=-1)
    q_ref, exact = quantize_rows(full)
    assert (full.abs() <= scale[:, None] * FP8_MAX * (1 + 1e-6)).all()
    # every row here reaches 0.17 in its GELU part: the exact absmax, hence the same codes
    torch.testing.assert_close(scale, exact, rtol=1e-6, atol=0)
    assert (q.float() - q_ref.float()).abs().le(q_ref.float().abs() * 0.07).all()
    with pytest.raises(ValueError, match="one gelu flag per part"):
        quantize_cat_rows([attn], [False, True])


class _SingleBlock(nn.Module):
    """FLUX's single block in miniature: proj_out(cat([attention branch, gelu(mlp)]))."""

    def __init__(self, dim: int = 64, share_cat: bool = False) -> None:
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, 4 * dim)
        self.proj_out = Fp8Linear.from_linear(nn.Linear(5 * dim, dim))
        self.share_cat = share_cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.attn(x), F.gelu(self.mlp(x), approximate="tanh")], dim=2)
        out = x + self.proj_out(h)
        return out + h[..., :64] if self.share_cat else out


@pytest.mark.parametrize(("share_cat", "fires"), [(False, 1), (True, 0)])
def test_pass_takes_a_cat_with_a_gelu_part(share_cat: bool, fires: int) -> None:
    torch.manual_seed(0)
    _compile_and_check(
        _SingleBlock(share_cat=share_cat).eval(), {"mode": "O2", "passes.fp8_gelu_scale": True}
    )
    assert difforge.counters["fp8_gelu_scale"] == fires


@pytest.mark.parametrize("model", [_FeedForward, _SingleBlock])
def test_triton_quantizer_pass_replaces_the_composite(model: type[nn.Module]) -> None:
    """``passes.fp8_cat_quant_kernel`` hands the quantization to the one-kernel Triton op
    (here in Triton's interpreter, the CPU tests' stand-in for CUDA): same output."""
    torch.manual_seed(0)
    options = {"mode": "O2", "passes.fp8_gelu_scale": True, "passes.fp8_cat_quant_kernel": True}
    _compile_and_check(model().eval(), options)
    assert difforge.counters["fp8_gelu_scale"] == 1
    assert difforge.counters["fp8_cat_quant_kernel"] == 1


def test_triton_quantizer_pass_is_on_in_low_precision_and_needs_its_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On with the fp8 linears (low-precision, O3), off in the precise tier; on, it leaves
    the composite where Triton cannot run (a CPU without the interpreter)."""
    from difforge.options import parse_options
    from difforge.passes import quant_fusion

    for mode, on in (("O2", False), ("max-optimize", False), ("O3", True), ("low-precision", True)):
        assert parse_options({"mode": mode}).settings["passes.fp8_cat_quant_kernel"] is on
    torch.manual_seed(0)
    _compile_and_check(_SingleBlock().eval(), {"mode": "O3", "passes.fp8_cat_quant_kernel": False})
    assert difforge.counters["fp8_gelu_scale"] == 1
    assert difforge.counters["fp8_cat_quant_kernel"] == 0
    torch._dynamo.reset()
    difforge.counters.clear()
    monkeypatch.setattr(quant_fusion, "_triton_runs_on", lambda device: False)
    _compile_and_check(_SingleBlock().eval(), {"mode": "O3"})
    assert difforge.counters["fp8_gelu_scale"] == 1
    assert difforge.counters["fp8_cat_quant_kernel"] == 0


class _AdaLNBlock(nn.Module):
    """A DiT block's adaLN halves in miniature: ``norm(x) * (1 + scale) + shift`` (per
    sample, from a ``[B, 6, D]`` table) feeding fp8 q/k/v, then the same before an fp8 FF.
    ``variant`` breaks one condition of the LayerNorm quantization rewrite."""

    def __init__(self, dim: int = 64, variant: str = "") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=variant == "affine", eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q, self.k, self.v = (Fp8Linear.from_linear(nn.Linear(dim, dim)) for _ in range(3))
        self.ff = Fp8Linear.from_linear(nn.Linear(dim, dim))
        self.variant = variant

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = table.chunk(6, dim=1)  # [B, 1, D]
        if self.variant == "per_token":
            scale1 = scale1 + x  # [B, S, D]: not one modulation row per sample
        h = self.norm1(x) * (1 + scale1) + shift1
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), dim=-1) @ self.v(h)
        x = x + attn if self.variant == "ungated" else x + gate1 * attn
        h2 = shift2 + (scale2 + 1) * self.norm2(x)  # operands the other way round
        out = x + gate2 * self.ff(h2)
        return out + h if self.variant == "read_twice" else out


def _adaln_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 9, 64, generator=g) * 2 + 1, 0.3 * torch.randn(2, 6, 64, generator=g)


@pytest.mark.parametrize(
    ("variant", "fires"),
    [("", 2), ("ungated", 2), ("affine", 1), ("per_token", 1), ("read_twice", 1)],
    ids=[
        "both-halves",
        "ungated-residual",
        "layer-norm-with-affine",
        "per-token-modulation",
        "read-elsewhere",
    ],
)
def test_layer_norm_quantizer_pass(variant: str, fires: int) -> None:
    """``passes.fp8_layer_norm_quant_kernel`` fires on both halves of the block, and not on
    a half whose LayerNorm has weights, whose modulation is per token or whose modulated
    activation is read by something other than fp8 quantizations; the output equals the
    compile without it (the same quantization up to rounding boundaries). The second
    half's norm reads the residual update ``x + gate * attn`` (or ``x + attn``), which the
    kernel takes in and writes out for the block's last add."""
    torch.manual_seed(0)
    model = _AdaLNBlock(variant=variant).eval()
    x, table = _adaln_inputs()
    options = {"mode": "O2", "passes.fp8_layer_norm_quant_kernel": False}
    with torch.no_grad():
        eager = model(x, table)
        base = difforge.compile(model, options=options)(x, table)
        assert difforge.counters["fp8_layer_norm_quant_kernel"] == 0
        torch._dynamo.reset()
        options["passes.fp8_layer_norm_quant_kernel"] = True
        out = difforge.compile(model, options=options)(x, table)
    assert difforge.counters["fp8_layer_norm_quant_kernel"] == fires
    assert difforge.counters["fp8_layer_norm_quant_kernel.residual"] == 1
    assert rel_err(out, base) < 1e-3
    assert rel_err(out, eager) < 2e-2


def test_layer_norm_quantizer_pass_is_opt_in() -> None:
    from difforge.options import parse_options

    for mode in ("O2", "O3", "max-autotune:cudagraphs:low-precision"):
        assert parse_options({"mode": mode}).settings["passes.fp8_layer_norm_quant_kernel"] is False


def test_triton_quantizer_pass_compiles_with_grad_enabled() -> None:
    """Outside torch.no_grad, with parameters that require grad (a model fresh from
    from_pretrained), AOTAutograd traces a backward through the Triton quantizers' ops:
    the compile and the forward go through (the kernels still take the quantizations), and
    running that backward raises (difforge.inference_only) instead of missing them."""
    torch.manual_seed(0)
    model = _SingleBlock().eval()
    x = torch.randn(2, 9, 64)
    options = {"mode": "O2", "passes.fp8_gelu_scale": True, "passes.fp8_cat_quant_kernel": True}
    out = compile_with_grad_enabled(model, (x,), options, "fp8_cat_quant_kernel", 1, 1e-2)
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        out.sum().backward()
    assert model.mlp.weight.grad is None
    torch._dynamo.reset()
    options = {"mode": "O2", "passes.fp8_layer_norm_quant_kernel": True}
    counter = "fp8_layer_norm_quant_kernel"
    compile_with_grad_enabled(_AdaLNBlock().eval(), _adaln_inputs(), options, counter, 2, 2e-2)


def test_residual_layer_norm_quantizer_keeps_a_residual_stream_that_needs_grad() -> None:
    """An input that requires grad makes the residual update need it too: the kernel has
    no backward, so that add stays outside it (the norm's quantization still goes in)."""
    torch.manual_seed(0)
    model = _AdaLNBlock().eval()
    x, table = _adaln_inputs()
    options = {"mode": "O2", "passes.fp8_layer_norm_quant_kernel": True}
    out = difforge.compile(model, options=options)(x.requires_grad_(), table)
    assert difforge.counters["fp8_layer_norm_quant_kernel"] == 2
    assert difforge.counters["fp8_layer_norm_quant_kernel.residual"] == 0
    with torch.no_grad():
        assert rel_err(out.detach(), model(x, table)) < 2e-2


class _TokenMajorStream(nn.Module):
    """A residual stream kept ``[S, B, D]`` in memory and read back through a view that
    only its own layout allows: the kernel writes h row-major, so that update stays out."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.q = Fp8Linear.from_linear(nn.Linear(dim, dim))

    def forward(self, r_sbd: torch.Tensor, y: torch.Tensor, table: torch.Tensor):
        shift, scale, gate = table.chunk(3, dim=1)
        x = r_sbd.transpose(0, 1) + gate * y  # [B, S, D] with [S, B, D] strides
        h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift
        return self.q(h), x.transpose(0, 1).view(-1, x.shape[-1])


def test_residual_layer_norm_quantizer_keeps_a_stream_that_is_not_row_major() -> None:
    torch.manual_seed(0)
    model = _TokenMajorStream().eval()
    args = (torch.randn(9, 2, 64), torch.randn(2, 9, 64), 0.3 * torch.randn(2, 3, 64))
    options = {"mode": "O2", "passes.fp8_layer_norm_quant_kernel": True}
    with torch.no_grad():
        eager = model(*args)
        out = difforge.compile(model, options=options)(*args)
    assert difforge.counters["fp8_layer_norm_quant_kernel"] == 1
    assert difforge.counters["fp8_layer_norm_quant_kernel.residual"] == 0
    assert rel_err(out[0], eager[0]) < 2e-2 and torch.equal(out[1], eager[1])


class _MixedSingleBlock(_SingleBlock):
    """The attention branch cast to bfloat16 before the cat: torch.cat promotes the parts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(x).to(torch.bfloat16)
        h = torch.cat([attn, F.gelu(self.mlp(x), approximate="tanh")], dim=2)
        return x + self.proj_out(h)


def test_triton_quantizer_pass_declines_parts_of_two_dtypes() -> None:
    torch.manual_seed(0)
    options = {"mode": "O2", "passes.fp8_gelu_scale": True, "passes.fp8_cat_quant_kernel": True}
    _compile_and_check(_MixedSingleBlock().eval(), options)
    assert difforge.counters["fp8_gelu_scale"] == 1
    assert difforge.counters["fp8_cat_quant_kernel"] == 0


@pytest.mark.parametrize(
    ("hip", "capability", "runs"),
    [(None, (9, 0), True), (None, (8, 9), True), (None, (8, 0), False), ("6.2", (9, 0), False)],
    ids=["h100", "ada", "a100", "rocm"],
)
def test_triton_quantizers_need_an_fp8_nvidia_gpu(
    monkeypatch: pytest.MonkeyPatch, hip: str | None, capability: tuple[int, int], runs: bool
) -> None:
    """Triton has no float8 e4m3 below cc 8.9 (an A100 with hand-made Fp8Linears runs the
    reference GEMM and keeps the composite quantization)."""
    from difforge.passes import quant_fusion

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert quant_fusion._triton_runs_on(torch.device("cuda", 0)) is runs
