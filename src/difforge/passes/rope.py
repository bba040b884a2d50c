"""Rotary position embedding rewrites.

``rms_norm_rope`` (``optimize`` tier, opt-in): the per-head RMSNorm of attention's q or k
followed by diffusers' ``apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-1)``, as
FLUX.1 runs it (its double blocks join the text tokens' normed q before the image
tokens'), becomes one ``difforge::rms_norm_rope`` Triton kernel
(:mod:`difforge.kernels.rms_norm_rope`, which says why). The matched composite is::

    y = rms_norm(x, (D,), w, eps)                  # or cat([rms_norm(a), rms_norm(b), ...], 1)
    real, imag = y.reshape(*lead, -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    out = (y.float() * cos + rotated.float() * sin).to(y.dtype)   # or .type_as(y)

Only on an NVIDIA GPU with bf16 (cc >= 8.0), or the CPU under Triton's interpreter, and
only in graphs that need no gradient through q and k (the kernel has no backward).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from difforge.passes.registry import (
    ADDS,
    MULS,
    binary_operands,
    node_arg,
    node_tensor,
    register_pass,
    replace_with_call,
    same_size,
)

_RMS_NORMS = (F.rms_norm, torch.rms_norm)
_NEGS = (operator.neg, torch.neg)


def _is_method(node: object, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == name


def _is_call(node: object, targets: tuple[object, ...]) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _cast(node: object) -> tuple[torch.fx.Node, torch.dtype] | None:
    """``(t, dtype)`` for ``t.float()``, ``t.to(dtype)``, ``t.to(dtype=dtype)`` or
    ``t.type_as(other)``."""
    if not isinstance(node, torch.fx.Node):
        return None
    args, kwargs = node.args, node.kwargs
    if _is_method(node, "float") and len(args) == 1 and not kwargs:
        source, dtype = args[0], torch.float32
    elif _is_method(node, "type_as") and len(args) == 2 and not kwargs:
        other = node_tensor(args[1])  # None for a non-node
        if other is None:
            return None
        source, dtype = args[0], other.dtype
    elif _is_method(node, "to") and len(args) == 2 and not kwargs:
        source, dtype = args
    elif _is_method(node, "to") and len(args) == 1 and set(kwargs) == {"dtype"}:
        source, dtype = args[0], kwargs["dtype"]
    else:
        return None
    if not isinstance(source, torch.fx.Node) or not isinstance(dtype, torch.dtype):
        return None
    return source, dtype


def _float_of(node: object) -> torch.fx.Node | None:
    """``t`` for ``t.float()`` or ``t.to(torch.float32)`` (dtype given either way)."""
    cast = _cast(node)
    return cast[0] if cast is not None and cast[1] == torch.float32 else None


def _product(node: object) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The readings ``(a, b)`` of ``node`` as ``a.float() * b``: either operand order, and
    ``a`` itself for a float32 ``a`` (the cleanup passes drop its no-op ``.float()``)."""
    operands = binary_operands(node, MULS)
    if operands is None:
        return []
    lhs, rhs = operands
    readings = []
    for first, second in ((lhs, rhs), (rhs, lhs)):
        if not isinstance(first, torch.fx.Node) or not isinstance(second, torch.fx.Node):
            continue
        base = _float_of(first)
        if base is None and (v := node_tensor(first)) is not None and v.dtype == torch.float32:
            base = first
        if isinstance(base, torch.fx.Node):
            readings.append((base, second))
    return readings


def _rotation(total: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node] | None:
    """``(y, cos, sin)`` for ``total = y.float() * cos + rotated(y).float() * sin``, the
    terms and each product's operands in either order."""
    operands = binary_operands(total, ADDS)
    if operands is None:
        return None
    first, second = (_product(t) for t in operands)
    for terms in ((first, second), (second, first)):
        for y, cos in terms[0]:
            for rot, sin in terms[1]:
                if _rotated_source(rot) is y:
                    return y, cos, sin
    return None


def _rotated_source(node: object) -> torch.fx.Node | None:
    """``y`` for ``stack([-imag, real], -1).flatten(3)`` (or ``flatten(-2)``) with ``real, imag`` the unbound
    pairs of ``y.reshape(..., -1, 2)``."""
    if not _is_method(node, "flatten") or node_arg(node, 1, "start_dim") not in (3, -2):  # type: ignore[arg-type]
        return None
    stack = node.args[0]  # type: ignore[union-attr]
    if not _is_call(stack, (torch.stack,)) or node_arg(stack, 1, "dim", 0) not in (-1, 4):  # type: ignore[arg-type]
        return None
    pair = node_arg(stack, 0, "tensors")  # type: ignore[arg-type]
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not _is_call(pair[0], _NEGS):
        return None
    imag, real = pair[0].args[0], pair[1]
    items = []
    for item, index in ((real, 0), (imag, 1)):
        if not _is_call(item, (operator.getitem,)) or item.args[1] != index:  # type: ignore[union-attr]
            return None
        items.append(item.args[0])  # type: ignore[union-attr]
    unbind = items[0]
    if items[1] is not unbind:
        return None
    if not (_is_method(unbind, "unbind") or _is_call(unbind, (torch.unbind,))):
        return None
    if node_arg(unbind, 1, "dim", 0) not in (-1, 4):  # type: ignore[arg-type]
        return None
    reshape = unbind.args[0]  # type: ignore[union-attr]
    if not (_is_method(reshape, "reshape") or _is_method(reshape, "view")):
        return None
    pairs, y = node_tensor(reshape), node_tensor(reshape.args[0])  # type: ignore[union-attr]
    if pairs is None or y is None or pairs.dim() != 5 or y.dim() != 4:
        return None
    # [B, S, H, D] -> [B, S, H, D / 2, 2]: each channel pair, nothing else moved
    kept = all(same_size(a, b) for a, b in zip(pairs.shape[:3], y.shape[:3], strict=True))
    if not kept or pairs.shape[-1] != 2 or not same_size(2 * pairs.shape[3], y.shape[3]):
        return None
    return reshape.args[0]  # type: ignore[union-attr,return-value]


@dataclass
class _Norms:
    parts: list[torch.fx.Node]
    weights: list[torch.fx.Node | None]
    eps: float


def _rms_norm(node: object, dim: int) -> tuple[torch.fx.Node, torch.fx.Node | None, float] | None:
    """``(x, weight, eps)`` for ``rms_norm(x, (dim,), weight, eps)``."""
    if not _is_call(node, _RMS_NORMS):
        return None
    x = node_arg(node, 0, "input")  # type: ignore[arg-type]
    shape = node_arg(node, 1, "normalized_shape")  # type: ignore[arg-type]
    weight = node_arg(node, 2, "weight")  # type: ignore[arg-type]
    eps = node_arg(node, 3, "eps")  # type: ignore[arg-type]
    if not isinstance(x, torch.fx.Node) or not isinstance(shape, (list, tuple)):
        return None
    if len(shape) != 1 or not same_size(shape[0], dim):
        return None
    if weight is not None and not isinstance(weight, torch.fx.Node):
        return None
    if eps is None:  # F.rms_norm's default: float32's epsilon (the computation dtype)
        eps = torch.finfo(torch.float32).eps
    if not isinstance(eps, (int, float)):
        return None
    return x, weight, float(eps)


def _norms(y: torch.fx.Node, dim: int) -> _Norms | None:
    """The RMSNorms ``y`` is made of: one, or a token-axis ``cat`` of several (FLUX's text
    and image tokens; a third for extra conditioning tokens) with one eps."""
    if _is_call(y, (torch.cat,)):
        pieces = node_arg(y, 0, "tensors")
        if node_arg(y, 1, "dim", 0) not in (1, -3) or not isinstance(pieces, (list, tuple)):
            return None
        norms = [_rms_norm(p, dim) for p in pieces]
        if len(norms) < 2 or any(n is None for n in norms):
            return None
        if len({n[2] for n in norms}) != 1:  # type: ignore[index]
            return None
        return _Norms([n[0] for n in norms], [n[1] for n in norms], norms[0][2])  # type: ignore[index]
    norm = _rms_norm(y, dim)
    return None if norm is None else _Norms([norm[0]], [norm[1]], norm[2])


def _angles_fit(t: torch.Tensor | None, y: torch.Tensor) -> bool:
    """``cos``/``sin`` as diffusers broadcasts them onto ``y [B, S, H, D]``: ``[1|B, S, 1,
    D]`` (sizes compared without guards: a dynamic graph keeps its symbolic tokens)."""
    if t is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if t.device != y.device:
        return False
    # Only the 4-D form: a 2-D [S, D] would broadcast onto y's (heads, head dim), not its
    # (tokens, head dim).
    b, s, _, d = y.shape
    return (
        t.dim() == 4
        and (same_size(t.shape[0], 1) or same_size(t.shape[0], b))
        and same_size(t.shape[1], s)
        and same_size(t.shape[2], 1)
        and same_size(t.shape[3], d)
    )


def _triton_kernel_fits(norms: _Norms, y: torch.Tensor) -> bool:
    from difforge.kernels import triton_runs_on
    from difforge.kernels.rms_norm_rope import KERNEL_DTYPES

    d = y.shape[-1]
    if not isinstance(d, int) or d < 2 or d & (d - 1) or y.dtype not in KERNEL_DTYPES:
        return False
    if not triton_runs_on(y.device, (8, 0)):
        return False
    values = [node_tensor(p) for p in norms.parts]
    if not all(v is not None and v.dtype == y.dtype and v.dim() == 4 for v in values):
        return False
    for weight in norms.weights:
        w = node_tensor(weight) if weight is not None else None
        if weight is not None and (w is None or w.dtype != y.dtype or tuple(w.shape) != (d,)):
            return False
    return True


@register_pass("rms_norm_rope", stage="fx", tier="optimize")
def rms_norm_rope(graph: torch.fx.Graph) -> int:
    """rms_norm(q) + apply_rotary_emb(use_real_unbind_dim=-1) -> one Triton kernel."""
    made = 0
    for total in list(graph.nodes):
        match = _rotation(total)
        if match is None:
            continue
        y, cos, sin = match
        y_value = node_tensor(y)
        if y_value is None or y_value.dim() != 4:
            continue
        if y_value.requires_grad:
            continue  # the kernel has no backward: training graphs keep the composite
        # The value to replace: the cast back to y's dtype, absent (a no-op the cleanup
        # passes dropped) when y is float32.
        cast = next(iter(total.users)) if len(total.users) == 1 else None
        if _cast(cast) == (total, y_value.dtype):
            result = cast  # type: ignore[assignment]
        elif y_value.dtype == torch.float32:
            result = total
        else:
            continue
        norms = _norms(y, y_value.shape[-1])  # type: ignore[arg-type]
        if norms is None or not _triton_kernel_fits(norms, y_value):
            continue
        if not all(_angles_fit(node_tensor(t), y_value) for t in (cos, sin)):  # type: ignore[arg-type]
            continue
        import difforge.kernels.rms_norm_rope  # noqa: F401  (registers the op)

        op = torch.ops.difforge.rms_norm_rope.default
        replace_with_call(graph, result, op, (norms.parts, norms.weights, norms.eps, cos, sin))
        made += 1
    return made
