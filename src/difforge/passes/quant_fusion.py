"""Rewrites of the fp8 activation quantization that ``Fp8Linear`` traces.

``fp8_gelu_scale``: the FF2 input of a DiT block is ``gelu(FF1(x))``, and its row
quantization (``difforge::fp8_quantize_rows``) needs each row's absmax before it can
scale. Inductor fuses GELU, absmax and cast into one kernel that loops over the row
twice and evaluates the GELU in both loops; on an H200 at PixArt-XL's FF1 output
(8192x4608) it took 120 us, compute-bound, against ~35 us of memory traffic. The rewrite
quantizes ``y`` (the GELU's input) with ``difforge::fp8_quantize_cat_rows``, whose GELU
parts take their scale bound from the row max of ``y`` alone (see
:func:`difforge.quant.fp8.quantize_cat_rows` for the bound and when it differs from the
exact absmax). It also takes a last-dim ``torch.cat`` of GELU and other parts (FLUX's
single blocks quantize ``cat([attention, gelu(mlp)])`` for ``proj_out``). Only in the
``low-precision`` tier: the scale is an upper bound, exact except for rows whose GELU
stays below 0.17.

``fp8_cat_quant_kernel``: the same quantization on CUDA as difforge's one-kernel Triton
quantizer (:mod:`difforge.kernels.fp8_row_quant`) instead of the two kernels Inductor
makes of the composite (``low-precision``): H200, 1.10-1.82x at FLUX/PixArt/SD3 shapes
(``benchmarks/probe_ops.py --probes catquant``), PixArt-XL's O3 step 30.07 -> 28.94 ms.
"""

from __future__ import annotations

import torch
import torch.fx

import difforge.kernels.fp8_row_quant  # noqa: F401  (registers the Triton quantizer's op)
from difforge.passes.activation import gelu_tanh_as_sigmoid
from difforge.passes.registry import node_arg, node_tensor, register_pass

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


def _static_width(node: torch.fx.Node) -> int | None:
    """The last dimension of ``node``'s value, when it is a plain int."""
    value = node_tensor(node)
    if value is None or value.dim() < 1:
        return None
    width = value.shape[-1]
    return width if isinstance(width, int) else None


def _parts(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The pieces whose last-dim concatenation ``node`` is: ``[node]`` itself, or the
    inputs of a ``torch.cat`` along the last dimension."""
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node_arg(node, 0, "tensors")
        dim = node_arg(node, 1, "dim", 0)
        value = node_tensor(node)
        if not isinstance(tensors, (list, tuple)) or value is None:
            return None
        if dim not in (-1, value.dim() - 1):
            return None
        return list(tensors) if all(isinstance(t, torch.fx.Node) for t in tensors) else None
    return [node]


@register_pass("fp8_gelu_scale", stage="fx", tier="low-precision")
def fp8_gelu_scale(graph: torch.fx.Graph) -> int:
    """fp8 row quantization of gelu_tanh(y) (or of a cat with one) -> one GELU per element."""
    made = 0
    for quant in list(graph.nodes):
        if not _is_quantize_rows(quant):
            continue
        # Walk back through single-user view steps to the producer of the activation.
        node = node_arg(quant, 0, "x")
        while isinstance(node, torch.fx.Node) and _is_view(node) and len(node.users) == 1:
            node = node.args[0]
        if not isinstance(node, torch.fx.Node):
            continue
        parts = _parts(node)
        if parts is None or (len(parts) > 1 and len(node.users) != 1):
            continue  # a cat read elsewhere too would keep its GELUs alive: no gain
        # A GELU part is folded only if the quantization is its one reader.
        gelu = [_is_tanh_gelu(p) and len(p.users) == 1 for p in parts]
        widths = [_static_width(p) for p in parts]
        if not any(gelu) or any(w is None for w in widths):
            continue
        with graph.inserting_before(quant):
            flat = []
            for part, is_gelu, width in zip(parts, gelu, widths, strict=True):
                source = (
                    node_arg(part, 0, "input" if part.target is _GELU else "x") if is_gelu else part
                )
                flat.append(graph.call_function(torch.reshape, (source, (-1, width))))
            fused = graph.call_function(
                torch.ops.difforge.fp8_quantize_cat_rows.default, (flat, gelu)
            )
        fused.meta.update(quant.meta)
        quant.replace_all_uses_with(fused)
        graph.erase_node(quant)  # the view chain, the cat and the GELUs are dead code now
        made += 1
    return made


def _is_quantize_cat_rows(node: torch.fx.Node) -> bool:
    op = torch.ops.difforge.fp8_quantize_cat_rows
    return node.op == "call_function" and node.target in (op, op.default)


def _device_of(node: object) -> torch.device | None:
    """The device of a part, looking through the reshapes fp8_gelu_scale adds (they carry
    no example value)."""
    while isinstance(node, torch.fx.Node):
        value = node_tensor(node)
        if value is not None:
            return value.device
        if node.target is not torch.reshape:
            return None
        node = node.args[0]
    return None


def _triton_runs_on(device: torch.device) -> bool:
    """CUDA, or the CPU under Triton's interpreter (the CPU tests)."""
    from difforge.kernels import interpreting

    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@register_pass("fp8_cat_quant_kernel", stage="fx", tier="low-precision")
def fp8_cat_quant_kernel(graph: torch.fx.Graph) -> int:
    """fp8_quantize_cat_rows on CUDA -> difforge's one-kernel Triton quantizer."""
    made = 0
    for node in list(graph.nodes):
        if not _is_quantize_cat_rows(node):
            continue
        parts, gelu = node_arg(node, 0, "parts"), node_arg(node, 1, "gelu")
        if not isinstance(parts, (list, tuple)) or not 1 <= len(parts) <= 2:
            continue  # the kernel takes one or two parts
        devices = [_device_of(p) for p in parts]
        if any(d is None or not _triton_runs_on(d) for d in devices):
            continue  # elsewhere the composite stays
        node.target = torch.ops.difforge.fp8_quantize_cat_rows_triton.default
        node.args, node.kwargs = (list(parts), list(gelu)), {}
        made += 1
    return made
