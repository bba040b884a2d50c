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

``fp8_layer_norm_quant_kernel``: the fp8 row quantizations of an adaLN-modulated LayerNorm
(``layer_norm(x) * (1 + scale) + shift``, a DiT block's input to its q/k/v or FF) as one
Triton kernel with the row in registers. Alone the kernel is 2-5x Inductor's composite
(``probe_ops.py --probes lnquant``), but in O3 steps on an H200 it paid nowhere (PixArt-XL
28.68 -> 28.89 ms, SD3 32.37 -> 32.34, FLUX.1-dev 95.96 -> 97.51;
``benchmarks/results/2026-11-28_h200_step_*quant*_s22.json``): in the model Inductor's
kernel also took the residual update before the norm (``x + gate * y``), which the pass
left on its own. So where the norm reads such an update, the kernel now takes it in and
writes ``h`` for its other readers. Off until a step measures that
(``benchmarks/gpu_batch.sh lnresdit``); ``passes.fp8_layer_norm_quant_kernel`` turns it on.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

# Importing the module also registers the Triton quantizers' ops.
from difforge.kernels.fp8_row_quant import KERNEL_DTYPES
from difforge.passes.activation import gelu_tanh_as_sigmoid
from difforge.passes.registry import (
    ADDS,
    MULS,
    binary_operands,
    counters,
    fill_example_values,
    node_arg,
    node_tensor,
    register_pass,
    same_size,
)

_GELU = torch._C._nn.gelu
#: Shape-only steps Fp8Linear's traced forward puts between an activation and its
#: quantization (flattening leading dims, detaching).
_VIEW_METHODS = frozenset({"reshape", "view", "detach", "contiguous"})
_VIEW_FUNCTIONS = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.detach)


def _is_difforge_op(node: torch.fx.Node, name: str) -> bool:
    """Whether ``node`` calls ``torch.ops.difforge.<name>`` (the packet or its overload)."""
    op = getattr(torch.ops.difforge, name, None)
    return node.op == "call_function" and op is not None and node.target in (op, op.default)


def _is_quantize_rows(node: torch.fx.Node) -> bool:
    return _is_difforge_op(node, "fp8_quantize_rows")


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
        fill_example_values(flat)  # later passes read the parts' dtype and device
        fused.meta.update(quant.meta)
        quant.replace_all_uses_with(fused)
        graph.erase_node(quant)  # the view chain, the cat and the GELUs are dead code now
        made += 1
    return made


def _triton_runs_on(device: torch.device) -> bool:
    """Triton's float8 e4m3 needs cc >= 8.9 (or the CPU under the interpreter)."""
    from difforge.kernels import triton_runs_on

    return triton_runs_on(device, (8, 9))


@register_pass("fp8_cat_quant_kernel", stage="fx", tier="low-precision")
def fp8_cat_quant_kernel(graph: torch.fx.Graph) -> int:
    """fp8_quantize_cat_rows on CUDA -> difforge's one-kernel Triton quantizer."""
    made = 0
    for node in list(graph.nodes):
        if not _is_difforge_op(node, "fp8_quantize_cat_rows"):
            continue
        parts, gelu = node_arg(node, 0, "parts"), node_arg(node, 1, "gelu")
        if not isinstance(parts, (list, tuple)) or not 1 <= len(parts) <= 2:
            continue  # the kernel takes one or two parts
        values = [node_tensor(p) for p in parts]
        if any(v is None or not _triton_runs_on(v.device) for v in values):
            continue  # elsewhere the composite stays
        dtypes = {v.dtype for v in values if v is not None}
        if len(dtypes) != 1 or dtypes.pop() not in KERNEL_DTYPES:
            continue  # torch.cat promotes mixed parts; the kernel takes one float dtype
        node.target = torch.ops.difforge.fp8_quantize_cat_rows_triton.default
        node.args, node.kwargs = (list(parts), list(gelu)), {}
        made += 1
    return made


def _plain_layer_norm(node: object) -> tuple[torch.fx.Node, float] | None:
    """``(x, eps)`` of ``layer_norm(x, (D,), None, None, eps)`` on a 3-D ``x``."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is not torch.nn.functional.layer_norm:
        return None
    x, shape = node_arg(node, 0, "input"), node_arg(node, 1, "normalized_shape")
    eps = node_arg(node, 4, "eps", 1e-5)
    if node_arg(node, 2, "weight") is not None or node_arg(node, 3, "bias") is not None:
        return None
    value = node_tensor(x) if isinstance(x, torch.fx.Node) else None
    if value is None or value.dim() != 3 or not isinstance(eps, float):
        return None
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return None
    width = value.shape[-1]
    if not isinstance(width, int) or shape[0] != width:
        return None
    assert isinstance(x, torch.fx.Node)
    return x, eps


def _modulation(
    node: torch.fx.Node,
) -> tuple[torch.fx.Node, float, torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """``(x, eps, scale, shift, norm)`` of ``norm = layer_norm(x, eps=eps)`` in
    ``norm * (1 + scale) + shift`` (operands in either order), each intermediate read only
    by the next step."""
    add = binary_operands(node, ADDS)
    if add is None:
        return None
    for prod, shift in (add, add[::-1]):
        mul = binary_operands(prod, MULS)
        if mul is None or not isinstance(shift, torch.fx.Node):
            continue
        for norm, one_plus in (mul, mul[::-1]):
            operands = binary_operands(one_plus, ADDS)
            layer_norm = _plain_layer_norm(norm)
            if operands is None or layer_norm is None:
                continue
            scale = next((o for o, c in (operands, operands[::-1]) if c == 1), None)
            steps = (prod, one_plus, norm)
            if not isinstance(scale, torch.fx.Node) or not all(
                isinstance(n, torch.fx.Node) and len(n.users) == 1 for n in steps
            ):
                continue
            return layer_norm[0], layer_norm[1], scale, shift, norm  # type: ignore[return-value]
    return None


def _row_modulation(value: torch.Tensor | None, x: torch.Tensor) -> bool:
    """A per-sample ``[B, 1, D]`` modulation of ``x [B, S, D]``."""
    return (
        value is not None
        and value.dim() == 3
        and same_size(value.shape[0], x.shape[0])
        and same_size(value.shape[1], 1)
        and same_size(value.shape[2], x.shape[2])
    )


def _quantizations(node: torch.fx.Node, width: int) -> list[torch.fx.Node] | None:
    """The fp8 row quantizations of ``[rows, width]`` views of ``node``, when they are all
    its readers (each chain read only by the next step)."""
    quants = []
    for user in node.users:
        step = user
        while _is_view(step) and len(step.users) == 1:
            step = next(iter(step.users))
        if not _is_quantize_rows(step):
            return None
        flat = node_tensor(node_arg(step, 0, "x"))  # type: ignore[arg-type]
        if flat is None or flat.dim() != 2 or flat.shape[1] != width:
            return None
        quants.append(step)
    return quants or None


def _residual(
    x: torch.fx.Node, x_value: torch.Tensor
) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None] | None:
    """``(r, y, gate)`` when ``x = r + gate * y`` (``gate`` a ``[B, 1, D]`` modulation; or
    ``x = r + y``, gate None): the residual update a DiT block makes before its norm, with
    ``r`` and ``y`` of x's own shape and dtype and the product read only by the add."""
    operands = binary_operands(x, ADDS)
    if operands is None or not all(isinstance(n, torch.fx.Node) for n in operands):
        return None
    kind = [_same_tensor_kind(node_tensor(n), x_value) for n in operands]  # type: ignore[arg-type]
    for (r, other), r_kind in zip((operands, operands[::-1]), kind, strict=True):
        prod = binary_operands(other, MULS) if len(other.users) == 1 else None  # type: ignore[union-attr]
        for gate, y in (prod, prod[::-1]) if prod is not None and r_kind else ():
            if (
                isinstance(gate, torch.fx.Node)
                and isinstance(y, torch.fx.Node)
                and _row_modulation(node_tensor(gate), x_value)
                and _same_tensor_kind(node_tensor(y), x_value)
            ):
                return r, y, gate  # type: ignore[return-value]
    if all(kind):
        return operands[0], operands[1], None  # type: ignore[return-value]
    return None


def _same_tensor_kind(value: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Same dtype, device and (provably) shape as ``x``: no broadcasting, no promotion."""
    return (
        value is not None
        and value.dtype == x.dtype
        and value.device == x.device
        and value.dim() == x.dim()
        and all(same_size(a, b) for a, b in zip(value.shape, x.shape, strict=True))
    )


def _row_major(value: torch.Tensor | None) -> bool:
    """Dense row-major strides (provably, without a guard; size-1 dims take any stride)."""
    if value is None:
        return False
    expected = 1
    for size, stride in zip(reversed(value.shape), reversed(value.stride()), strict=True):
        if not same_size(size, 1) and not same_size(stride, expected):
            return False
        expected = expected * size
    return True


def _quantization_getitems(quants: list[torch.fx.Node]) -> list[tuple[torch.fx.Node, int]] | None:
    """Every reader of the quantizations as ``(getitem node, index)``, or None if one
    reads the (q, scale) pair some other way."""
    items = []
    for quant in quants:
        for user in quant.users:
            if not (user.op == "call_function" and user.target is operator.getitem):
                return None
            if user.args[1] not in (0, 1):
                return None
            items.append((user, int(user.args[1])))  # type: ignore[call-overload]
    return items


def _fuse_with_residual(
    graph: torch.fx.Graph,
    x: torch.fx.Node,
    residual: tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None],
    norm_match: tuple[float, torch.fx.Node, torch.fx.Node, torch.fx.Node],
    quants: list[torch.fx.Node],
) -> bool:
    """Replace the residual add ``x``, its norm (``norm_match``: eps, scale, shift and the
    LayerNorm node) and quantizations by one ``fp8_quantize_residual_layer_norm_rows_triton``:
    x's other readers take the ``h`` it writes. False (graph unchanged) where an operand is
    computed after one of those readers."""
    items = _quantization_getitems(quants)
    if items is None or not _row_major(node_tensor(x)):
        return False  # h comes out row-major: x's readers must have seen that layout
    r, y, gate = residual
    eps, scale, shift, norm = norm_match
    order = {node: i for i, node in enumerate(graph.nodes)}
    inputs = [n for n in (r, y, gate, scale, shift) if n is not None]
    last = max(inputs, key=order.__getitem__)
    # The norm goes away with the rewrite (diffusers indexes scale[:, None] after it).
    readers = [order[u] for u in x.users if u is not norm]
    first_reader = min(readers, default=len(order))
    if order[last] >= first_reader:
        return False  # an operand is computed after x is first read: keep the graph
    with graph.inserting_before(last.next):  # in order, after the last operand
        rows = [graph.call_function(torch.flatten, (t, 0, 1)) for t in (gate, scale, shift) if t]
        gate_row = rows.pop(0) if gate is not None else None
        fused = graph.call_function(
            torch.ops.difforge.fp8_quantize_residual_layer_norm_rows_triton.default,
            (r, y, gate_row, rows[0], rows[1], eps),
        )
        parts = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):  # for error messages
        if key in quants[0].meta:
            fused.meta[key] = quants[0].meta[key]
    fill_example_values([*rows, *([gate_row] if gate_row is not None else []), fused, *parts])
    for item, index in items:
        item.replace_all_uses_with(parts[1 + index])
        graph.erase_node(item)
    for quant in quants:
        graph.erase_node(quant)
    # The residual stream reads h; the norm chain (dead code now) keeps reading x.
    x.replace_all_uses_with(parts[0], delete_user_cb=lambda user: user is not norm)
    return True


@register_pass("fp8_layer_norm_quant_kernel", stage="fx", tier="low-precision")
def fp8_layer_norm_quant_kernel(graph: torch.fx.Graph) -> int:
    """fp8 row quantization of layer_norm(x) * (1 + scale) + shift -> one Triton kernel."""
    made = 0
    for mod in list(graph.nodes):
        if getattr(mod, "_erased", False):
            continue  # erased by an earlier rewrite of this loop
        match = _modulation(mod)
        if match is None:
            continue
        x, eps, scale, shift, norm = match
        x_value = node_tensor(x)
        if x_value is None or not _triton_runs_on(x_value.device):
            continue
        if x_value.dtype not in KERNEL_DTYPES:
            continue
        if not all(_row_modulation(node_tensor(t), x_value) for t in (scale, shift)):
            continue
        quants = _quantizations(mod, x_value.shape[-1])
        if quants is None:
            continue
        # The residual update before the norm goes into the kernel too: Inductor fuses it
        # with the norm, and a norm kernel without it leaves that add a kernel of its own.
        # Not in graphs that need x's gradient: the kernel has none, and h is no
        # quantization (whose gradient O3 drops anyway) but the residual stream itself.
        residual = _residual(x, x_value) if not x_value.requires_grad else None
        if residual is not None and _fuse_with_residual(
            graph, x, residual, (eps, scale, shift, norm), quants
        ):
            counters["fp8_layer_norm_quant_kernel.residual"] += 1
            made += 1
            continue
        with graph.inserting_before(mod.next):  # after x, scale and shift, before every reader
            rows = [graph.call_function(torch.flatten, (t, 0, 1)) for t in (scale, shift)]
            fused = graph.call_function(
                torch.ops.difforge.fp8_quantize_layer_norm_rows_triton.default,
                (x, rows[0], rows[1], eps),
            )
        fused.meta.update(quants[0].meta)
        for quant in quants:
            quant.replace_all_uses_with(fused)
            graph.erase_node(quant)  # the views, modulation and LayerNorm are dead code now
        made += 1
    return made
