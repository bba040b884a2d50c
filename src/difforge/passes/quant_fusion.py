"""Rewrites of the fp8 activation quantization that ``Fp8Linear`` traces.

``fp8_gelu_scale``: the FF2 input of a DiT block is ``gelu(FF1(x))``, and its row
quantization (``difforge::fp8_quantize_rows``) needs each row's absmax before it can
scale. Inductor fuses GELU, absmax and cast into one kernel that loops over the row
twice and evaluates the GELU in both loops; on an H200 at PixArt-XL's FF1 output
(8192x4608) it took 120 us, compute-bound, against ~35 us of memory traffic. The rewrite
quantizes ``y`` (the GELU's input) with ``difforge::fp8_quantize_gelu_rows``, whose
scale comes from the row max of ``y`` alone (see :func:`difforge.quant.fp8.quantize_gelu_rows`
for the bound and when it differs from the exact absmax). Only in the ``low-precision``
tier: the scale is an upper bound, exact except for rows whose GELU stays below 0.17.
"""

from __future__ import annotations

import torch
import torch.fx

from difforge.passes.activation import gelu_tanh_as_sigmoid
from difforge.passes.registry import node_arg, register_pass

_GELU = torch._C._nn.gelu
#: Shape-only steps Fp8Linear's traced forward puts between an activation and its
#: quantization (flattening leading dims, detaching).
_VIEW_METHODS = frozenset({"reshape", "view", "detach", "contiguous"})
_VIEW_FUNCTIONS = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.detach)


def _is_quantize_rows(node: torch.fx.Node) -> bool:
    target = node.target
    op = getattr(torch.ops.difforge, "fp8_quantize_rows", None)
    return node.op == "call_function" and op is not None and target in (op, op.default)


def _is_view(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _is_tanh_gelu(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is gelu_tanh_as_sigmoid:
        return True
    return node.target is _GELU and node_arg(node, 1, "approximate", "none") == "tanh"


@register_pass("fp8_gelu_scale", stage="fx", tier="low-precision")
def fp8_gelu_scale(graph: torch.fx.Graph) -> int:
    """fp8 row quantization of gelu_tanh(y) -> scale bound from max(y), one GELU per element."""
    made = 0
    for quant in list(graph.nodes):
        if not _is_quantize_rows(quant):
            continue
        # Walk back through single-user view steps to the producer of the activation.
        chain: list[torch.fx.Node] = []
        node = node_arg(quant, 0, "x")
        while isinstance(node, torch.fx.Node) and _is_view(node) and len(node.users) == 1:
            chain.append(node)
            node = node.args[0]
        if not isinstance(node, torch.fx.Node) or not _is_tanh_gelu(node):
            continue
        if len(node.users) != 1:  # the GELU output is read elsewhere: it must stay
            continue
        pre_activation = node_arg(node, 0, "input" if node.target is _GELU else "x")
        if not isinstance(pre_activation, torch.fx.Node):
            continue
        # Same shapes and dtype (GELU is elementwise): re-point the view chain to y.
        head = chain[-1] if chain else quant
        head.replace_input_with(node, pre_activation)
        graph.erase_node(node)
        quant.target = torch.ops.difforge.fp8_quantize_gelu_rows.default
        quant.args, quant.kwargs = (quant.args[0] if quant.args else quant.kwargs["x"],), {}
        made += 1
    return made
