"""Exact cleanups: drop calls that return their input unchanged.

They make no kernel faster on their own (Inductor drops most of them too); they run
first so that the fusion passes see the real data flow (a ``dropout`` or
``contiguous`` between a shared input and its linears hides the sharing).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from difforge.passes.registry import node_arg, node_tensor, register_pass

_DROPOUTS = {
    F.dropout: ("training", 2),
    F.dropout1d: ("training", 2),
    F.dropout2d: ("training", 2),
    F.dropout3d: ("training", 2),
    F.alpha_dropout: ("training", 2),
    F.feature_alpha_dropout: ("training", 2),
    torch.dropout: ("train", 2),
    torch.alpha_dropout: ("train", 2),
    torch.feature_alpha_dropout: ("train", 2),
}

# Tensor methods that return `self` when the result would equal the input.
_SELF_RETURNING_METHODS = {"contiguous", "to", "float", "half", "bfloat16", "double", "type_as"}


@register_pass("remove_dropout", stage="fx", tier="cleanup")
def remove_dropout(graph: torch.fx.Graph) -> int:
    """Remove dropout calls that are identities (inference mode, or p == 0)."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUTS:
            continue
        training_name, training_index = _DROPOUTS[node.target]
        training = node_arg(node, training_index, training_name, True)
        p = node_arg(node, 1, "p", 0.5)
        # Only literal False / 0.0 are provably identities; a traced flag is left alone.
        if training is False or (isinstance(p, (int, float)) and p == 0):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed


def _same_tensor_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.device != b.device or a.dim() != b.dim():
        return False
    same = [sa == sb for sa, sb in zip(a.shape, b.shape, strict=True)]
    same += [sa == sb for sa, sb in zip(a.stride(), b.stride(), strict=True)]
    return all(statically_known_true(s) for s in same)


def _certainly_contiguous(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous for every value of its symbolic sizes, adding no guard;
    False when that cannot be told (an unbacked batch, difforge.batch, makes
    ``is_contiguous()`` raise a data-dependent error: it might be 1)."""
    try:
        return statically_known_true(t.is_contiguous())
    except Exception:  # GuardOnDataDependentSymNode and kin; the class moved across torch
        return False


@register_pass("remove_noop_conversions", stage="fx", tier="cleanup")
def remove_noop_conversions(graph: torch.fx.Graph) -> int:
    """Remove .contiguous()/.to()/.float()… calls whose result equals their input."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_method" or node.target not in _SELF_RETURNING_METHODS:
            continue
        if node.kwargs.get("copy") is True or (node.target == "to" and True in node.args[1:]):
            continue  # an explicit copy must stay a copy (no new aliasing)
        if node.kwargs.get("memory_format") not in (None, torch.contiguous_format):
            continue
        before, after = node_tensor(node.args[0]), node_tensor(node)
        if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
            continue
        if node.target == "contiguous" and not _certainly_contiguous(before):
            continue
        if _same_tensor_meta(before, after):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed


__all__ = ["remove_dropout", "remove_noop_conversions"]
