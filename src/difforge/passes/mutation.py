"""Which nodes of a Dynamo graph write into a tensor in place.

A Dynamo graph is not functional: ``x.mul_(2)`` is a node with no users whose effect later
reads of ``x`` see through the same ``x`` node. Rewrites that move a computation (fusing
linears, recomputing a linear at its GELU) or dead-code elimination would then read the
wrong values or drop the write (a reviewer's repro: diffusers' LTX-2 RoPE
``first_out.addcmul_(...)`` lost its sine terms, error 1.8). So the fx stage runs only its
cleanup passes on graphs that mutate, and its dead-code elimination keeps these nodes.
"""

from __future__ import annotations

import contextlib
import operator

import torch.fx

#: In-place Python operators (``x += y`` on a tensor writes into ``x``).
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip

#: Trailing-underscore methods that do not write tensor data.
_NOT_WRITES = {"requires_grad_", "retain_grad_", "share_memory_"}


def mutates(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its tensor arguments: an in-place method
    (``mul_``), an in-place function (``torch.relu_``, ``inplace=True``), an ``out=``
    argument, or an augmented assignment operator."""
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    schema = getattr(node.target, "_schema", None)  # an OpOverload
    if schema is not None:
        return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def graph_mutates(graph: torch.fx.Graph) -> bool:
    """Whether any node of ``graph`` writes into a tensor in place."""
    return any(mutates(node) for node in graph.nodes)


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """FX's dead-code elimination, keeping in-place writes (they have no users)."""
    # An FX without is_impure_node raises TypeError: the dead nodes are left to Inductor.
    with contextlib.suppress(TypeError):
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
