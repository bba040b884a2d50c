"""Cheaper forms of activation functions that Inductor generates as Triton code.

``gelu(x, approximate="tanh")`` lowers to ``libdevice.tanh``, a precise software tanh
of a few dozen instructions per element. Where the GELU is not folded into a GEMM
epilogue (after an fp8 ``_scaled_mm``, which has no GELU epilogue, or a linear without
bias), its kernel is compute-bound rather than memory-bound, and the fp8 activation
quantization that follows it reads the row twice (absmax, then scale), so it pays the
tanh twice: 160 us per PixArt-XL FF1 output (8192x4608) on an H200, against 17 us to
read it once (2026-11-26; ``benchmarks/probe_ops.py --probes ffblock`` repeats it).

The identity ``0.5 * (1 + tanh(z)) = sigmoid(2z)`` turns the GELU into
``x * sigmoid(2·sqrt(2/pi)·(x + 0.044715·x³))``, which Inductor emits as ``tl.sigmoid``
(one fast exponential and a division). It is computed in float32 and cast back once,
as Inductor computes the tanh form, so the two differ by float32 rounding only; for
large negative ``x`` the sigmoid form is the more accurate of the two (no ``1 + tanh``
cancellation).
"""

from __future__ import annotations

import math

import torch
import torch.fx

from difforge.passes.registry import (
    cacheable_target,
    node_arg,
    node_tensor,
    register_pass,
    replace_with_call,
)

_GELU = torch._C._nn.gelu
_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh_float(x: torch.Tensor) -> torch.Tensor:
    """``gelu(x, approximate="tanh")`` in its sigmoid form, as a float32 tensor."""
    xf = x.float()
    return xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * (xf * xf * xf)))


@cacheable_target
def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``gelu(x, approximate="tanh")`` written with a sigmoid, in float32, cast back."""
    return gelu_tanh_float(x).to(x.dtype)


@register_pass("gelu_tanh_sigmoid", stage="fx", tier="optimize")
def gelu_tanh_sigmoid(graph: torch.fx.Graph) -> int:
    """gelu(x, approximate="tanh") -> x * sigmoid(2·sqrt(2/pi)·(x + 0.044715·x³))."""
    made = 0
    for gelu in list(graph.nodes):
        if gelu.op != "call_function" or gelu.target is not _GELU:
            continue
        if node_arg(gelu, 1, "approximate", "none") != "tanh":
            continue
        x = node_arg(gelu, 0, "input")
        out = node_tensor(gelu)
        if not isinstance(x, torch.fx.Node) or out is None or not out.is_floating_point():
            continue
        if out.dtype == torch.float64:  # float32 math would lose precision there
            continue
        replace_with_call(graph, gelu, gelu_tanh_as_sigmoid, (x,))
        made += 1
    return made
