"""Gradients through difforge's inference-only rewrites fail loudly instead of vanishing.

The fp8 linears, the Triton fp8 quantizers and the RMSNorm + RoPE kernel have no backward.
Saying "no gradient" (``None``) lets AOTAutograd trace a model whose parameters require
grad (a diffusers model fresh from ``from_pretrained``, called outside ``torch.no_grad``),
but then ``loss.backward()`` silently skips every path through them: wrong gradients and
no error. Raising inside the backward formula instead breaks the compile itself, because
AOTAutograd traces the backward (with fake tensors) whenever an input requires grad.

So the backward formula returns, for each input that requires grad, the output of
``difforge::inference_only_grad``: a graph node whose fake implementation is a tensor of
the input's shape (the trace goes through) and whose real implementation raises a
``RuntimeError`` naming the rewrite and the way out. A forward call never runs it; a
``backward()`` through the rewrite does, in eager and compiled code alike. Under
``torch.no_grad``/``inference_mode`` none of this is in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: What the error suggests for the low-precision (O3) rewrites.
LOW_PRECISION_HINT = (
    "run the model under torch.no_grad() (or torch.inference_mode()), or compile without "
    "`low-precision` (O2 instead of O3) to differentiate it"
)


class InferenceOnlyError(RuntimeError):
    """A backward pass reached an inference-only difforge rewrite."""


@torch.library.custom_op("difforge::inference_only_grad", mutates_args=())
def inference_only_grad(
    grad: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, what: str, hint: str
) -> torch.Tensor:
    """Raises: a backward pass reached ``what``, which has no gradient."""
    raise InferenceOnlyError(
        f"difforge: {what} is inference-only: no gradient flows through it; {hint}"
    )


@inference_only_grad.register_fake
def _(
    grad: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, what: str, hint: str
) -> torch.Tensor:
    return grad.new_empty(shape, dtype=dtype)


def _input_specs(inputs: Sequence[Any]) -> list[Any]:
    """Per input: (shape, dtype) of a tensor that requires grad, None for one that does not
    or for a non-tensor; a list of those for a tensor-list input."""
    specs: list[Any] = []
    for value in inputs:
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            specs.append([_spec(v) for v in value])
        else:
            specs.append(_spec(value))
    return specs


def _spec(value: object) -> tuple[torch.Size, torch.dtype] | None:
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.shape, value.dtype
    return None


def register_inference_only(op: Any, what: str, hint: str = LOW_PRECISION_HINT) -> None:
    """Give the ``torch.library.custom_op`` ``op`` a backward that raises
    :class:`InferenceOnlyError` when it runs (and traces like any other)."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: object) -> None:
        ctx.difforge_specs = _input_specs(inputs)
        # An output no gradient reaches must come in as None, not as materialized zeros:
        # a raising node fed only by zeros depends on no tangent, so AOTAutograd's
        # partitioner moves it into the *forward* graph, which then raises on every call.
        ctx.set_materialize_grads(False)

    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        # The first gradient that really arrives (a tensor; tensor-list outputs flattened).
        flat = torch.utils._pytree.tree_leaves(grads)
        grad = next((g for g in flat if isinstance(g, torch.Tensor)), None)

        def raising(spec: Any) -> torch.Tensor | None:
            if spec is None or grad is None:
                return None
            return torch.ops.difforge.inference_only_grad(grad, spec[0], spec[1], what, hint)

        return tuple(
            [raising(s) for s in spec] if isinstance(spec, list) else raising(spec)
            for spec in ctx.difforge_specs
        )

    op.register_autograd(backward, setup_context=setup_context)


class _DetachedInputs(torch.autograd.Function):
    """``out`` unchanged; a gradient reaching any of the inputs through it raises."""

    @staticmethod
    def forward(
        ctx: Any, out: torch.Tensor, what: str, hint: str, *xs: torch.Tensor
    ) -> torch.Tensor:
        ctx.specs = [(x.shape, x.dtype) for x in xs]
        ctx.what, ctx.hint = what, hint
        ctx.set_materialize_grads(False)  # see register_inference_only
        # A copy, not a view: a caller's in-place update of a Function's view output raises
        # in the forward. Only graphs that need an input's gradient pay it (see the guard).
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[Any, ...]:
        if grad is None:
            return (None, None, None, *(None for _ in ctx.specs))
        x_grads = [
            torch.ops.difforge.inference_only_grad(grad, shape, dtype, ctx.what, ctx.hint)
            if ctx.needs_input_grad[3 + i]
            else None
            for i, (shape, dtype) in enumerate(ctx.specs)
        ]
        return (None, None, None, *x_grads)


def guard_detached_input(
    out: torch.Tensor,
    x: torch.Tensor | Sequence[torch.Tensor],
    what: str,
    hint: str = LOW_PRECISION_HINT,
) -> torch.Tensor:
    """``out``, computed from a detached ``x`` (or from something computed from ``x``;
    ``x`` may be several tensors): where one of them needs a gradient (grad mode on), a
    backward through ``out`` to it raises instead of leaving it without one. Compiled
    backwards compute every input's gradient at once, so there a backward raises even for
    a gradient whose path avoids ``out``."""
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    if not torch.is_grad_enabled():
        return out
    needing = [t for t in xs if t.requires_grad]
    if not needing:
        return out
    return _DetachedInputs.apply(out, what, hint, *needing)
