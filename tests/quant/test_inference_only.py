"""A backward through difforge's inference-only rewrites (fp8 linears, the Triton fp8
quantizers, the RMSNorm + RoPE kernel) raises a clear error instead of silently leaving
gradients out; the forward, with or without grad mode, is unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import compile_with_grad_enabled, rel_err
from torch import nn

import difforge
from difforge.inference_only import InferenceOnlyError, guard_detached_input
from difforge.quant import Fp8Linear


class _Block(nn.Module):
    """LayerNorm (parameters that require grad, as from_pretrained leaves them) -> fp8 FF."""

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1 = Fp8Linear.from_linear(nn.Linear(64, 128))
        self.fc2 = Fp8Linear.from_linear(nn.Linear(128, 64))
        for lin in (self.fc1, self.fc2):
            lin.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


@pytest.mark.parametrize("impl", ["op", "traceable"])
def test_eager_backward_through_an_fp8_linear_raises(impl: str) -> None:
    model = _Block(impl)
    x = torch.randn(2, 9, 64, requires_grad=True)
    out = model(x)
    assert out.requires_grad
    with pytest.raises(InferenceOnlyError, match=r"fp8 linear.*inference-only.*O2 instead"):
        out.sum().backward()


def test_compiled_backward_through_an_fp8_linear_raises_and_the_forward_is_unchanged() -> None:
    """The compile traces a backward (the norm's parameters require grad) without failing;
    the forward matches eager; only running the backward raises."""
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 9, 64)
    out = difforge.compile(model, options={"mode": "O2"})(x)
    with torch.no_grad():
        assert rel_err(out.detach(), model(x)) < 1e-5
    with pytest.raises(InferenceOnlyError, match="fp8 linear"):
        out.sum().backward()
    assert model.norm.weight.grad is None  # nothing half-written


def test_gradients_that_do_not_cross_an_fp8_linear_still_flow() -> None:
    """The residual path alone: x's gradient from `x + ...` is exact when the fp8 branch is
    cut by the user (here: its output detached), so the guard only fires on the fp8 path."""
    model = _Block()
    x = torch.randn(2, 9, 64, requires_grad=True)
    out = x + model(x).detach()
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_no_guard_without_grad() -> None:
    out, x = torch.randn(3, 4), torch.randn(3, 5)
    assert guard_detached_input(out, x, "w") is out
    x.requires_grad_()
    with torch.no_grad():
        assert guard_detached_input(out, x, "w") is out
    guarded = guard_detached_input(out, x, "w")
    assert guarded is not out and guarded.requires_grad and torch.equal(guarded, out)


def test_compiled_no_grad_graph_has_no_guard() -> None:
    """Under torch.no_grad the traced graph carries nothing for the backward; with grad
    on (the control) Dynamo records the guard as an autograd.Function application."""

    def traced(x: torch.Tensor) -> list[str]:
        torch._dynamo.reset()
        seen: list[str] = []

        def spy(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
            seen.extend(str(n.target) for n in gm.graph.nodes)
            return gm.forward

        torch.compile(_Block(), backend=spy, fullgraph=True)(x)
        return seen

    def guarded(targets: list[str]) -> bool:
        return any("autograd_function_apply" in t or "inference_only" in t for t in targets)

    assert guarded(traced(torch.randn(2, 9, 64, requires_grad=True)))
    with torch.no_grad():
        seen = traced(torch.randn(2, 9, 64, requires_grad=True))
    assert seen and not guarded(seen)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_in_place_update_of_a_guarded_output_runs(compiled: bool) -> None:
    """The guard hands back a tensor of its own, not a view: a caller may update it in place
    (a view made by an autograd.Function refuses that, in the forward)."""
    layer = Fp8Linear.from_linear(nn.Linear(64, 32))
    layer.impl = "traceable"
    x = torch.randn(4, 64, requires_grad=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        y = layer(x)
        y += 1.0
        return y

    run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
    out = run(x)
    with torch.no_grad():
        assert torch.allclose(out, layer(x) + 1.0)
    with pytest.raises(InferenceOnlyError, match="fp8 linear"):
        out.sum().backward()


def test_backward_through_the_triton_quantizers_raises() -> None:
    import difforge.kernels.fp8_row_quant  # noqa: F401  (registers the ops)

    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(4, 16)
    q, scale = torch.ops.difforge.fp8_quantize_cat_rows_triton([a, b], [False, True])
    assert q.requires_grad
    with pytest.raises(InferenceOnlyError, match="GELU \\(\\+ cat\\) quantizer"):
        (q.float() * scale[:, None]).sum().backward()
    x = torch.randn(2, 3, 32, requires_grad=True)
    mod = torch.randn(2, 32)
    q, scale = torch.ops.difforge.fp8_quantize_layer_norm_rows_triton(x, mod, mod, 1e-6)
    with pytest.raises(InferenceOnlyError, match="LayerNorm quantizer"):
        q.float().sum().backward()
    y = torch.randn(2, 3, 32)
    h, q, scale = torch.ops.difforge.fp8_quantize_residual_layer_norm_rows_triton(
        x, y, None, mod, mod, 1e-6
    )
    with pytest.raises(InferenceOnlyError, match="LayerNorm quantizer"):
        h.sum().backward()


def test_compiled_gelu_quantizer_between_fp8_linears_runs_forward_with_grad() -> None:
    """LayerNorm -> fp8 linear -> GELU -> (quantizer kernel) fp8 linear, outside no_grad:
    the quantizer op's fp8 output gets no gradient (the GEMM reads it detached). Were that
    gradient materialized as zeros, the raising node would depend on no tangent and
    AOTAutograd would partition it into the forward, which then raised on every call (an
    H200 gpu test caught it, 04a5987). Now: the forward runs, the backward raises."""
    torch.manual_seed(0)
    model = _Block()
    x = torch.randn(2, 9, 64)
    options = {"mode": "O2", "passes.fp8_gelu_scale": True, "passes.fp8_cat_quant_kernel": True}
    out = compile_with_grad_enabled(model, (x,), options, "fp8_cat_quant_kernel", 1, 1e-2)
    with pytest.raises(InferenceOnlyError, match="inference-only"):
        out.sum().backward()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("impl", ["op", "traceable"])
@pytest.mark.parametrize("trainable", ["weight", "bias"])
def test_a_trainable_weight_or_bias_is_not_left_without_a_gradient(
    trainable: str, impl: str, compiled: bool
) -> None:
    """x needs no gradient, the source linear's weight (or its bias alone) does: the output
    needs one and a backward through it raises. Before, from_linear dropped requires_grad,
    so the backward ran and silently gave the linear nothing."""
    source = nn.Linear(64, 32)
    if trainable == "bias":
        source.weight.requires_grad_(False)
    layer = Fp8Linear.from_linear(source)
    layer.impl = impl
    assert layer.weight_scale.requires_grad == (trainable == "weight")
    other = torch.ones((), requires_grad=True)  # so that a backward runs at all
    run = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer
    x = torch.randn(4, 64)
    out = run(x)
    assert out.requires_grad
    with torch.no_grad():
        assert torch.allclose(out, layer(x))
    with pytest.raises(InferenceOnlyError, match="fp8 linear"):
        (out.sum() * other).backward()


def test_requires_grad_false_on_the_model_drops_the_guard() -> None:
    """`model.requires_grad_(False)`, the usual way to say "inference", reaches the fp8
    weight's stand-in: no guard, no gradient asked; the state dict keeps its keys."""
    model = nn.Sequential(Fp8Linear.from_linear(nn.Linear(64, 32)))
    assert set(model.state_dict()) == {"0.weight_fp8", "0.weight_scale", "0.bias"}
    model.requires_grad_(False)
    out = model(torch.randn(4, 64))
    assert not out.requires_grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rms_norm_rope_weight_next_to_a_missing_one_is_not_silently_skipped(
    compiled: bool,
) -> None:
    """torch's custom-op autograd cannot see requires_grad through a list holding a None
    (`[None, w]`): with nothing else needing a gradient the op used to run outside autograd
    and a backward gave w nothing. It raises instead; under no_grad it runs."""
    import difforge.kernels.rms_norm_rope  # noqa: F401  (registers the op)

    parts = [torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8)]
    w = torch.ones(8, requires_grad=True)
    cos, sin = torch.ones(7, 8), torch.zeros(7, 8)

    def call(weights: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.ops.difforge.rms_norm_rope(parts, weights, 1e-6, cos, sin)

    run = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
    with pytest.raises(Exception, match="weight requires grad and another weight is None"):
        run([None, w])
    with torch.no_grad():
        assert run([None, w]).shape == (1, 7, 2, 8)
