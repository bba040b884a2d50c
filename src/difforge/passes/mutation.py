"""Which nodes of a Dynamo graph write into a tensor in place.

A Dynamo graph is not functional: ``x.mul_(2)`` is a node with no users whose effect later
reads of ``x`` see through the same ``x`` node. Rewrites that move a computation (fusing
linears, recomputing a linear at its GELU) or dead-code elimination would then read the
wrong values or drop the write (a reviewer's repro: diffusers' LTX-2 RoPE
``first_out.addcmul_(...)`` lost its sine terms, error 1.8). So the fx stage runs only its
cleanup passes on graphs with a write another node could see, and its dead-code elimination
keeps every writing node.

A write no other node can see is left alone: ``omega = torch.arange(n); omega /= n`` (in
diffusers' sin-cos position embedding, so in every PixArt and SD3 graph) writes a tensor
that only the writer reads, and later reads go through the writer's result, which the graph
orders. Treating it as a hazard turned off every O2 rewrite on PixArt.
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


#: Calls whose result may share storage with an argument (views, or ``self`` returned as
#: is); a write into such a result reaches whoever reads the argument.
_MAY_ALIAS = {
    "getitem", "__getitem__", "getattr", "view", "view_as", "reshape", "reshape_as",
    "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "swapaxes", "swapdims",
    "permute", "movedim", "moveaxis", "t", "T", "mT", "H", "mH", "expand", "expand_as",
    "broadcast_to", "broadcast_tensors", "narrow", "select", "split", "split_with_sizes",
    "tensor_split", "hsplit", "vsplit", "dsplit", "chunk", "unbind", "diagonal", "unfold",
    "as_strided", "alias", "detach", "real", "imag", "view_as_real", "view_as_complex",
    "contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "cuda",
    "cpu", "atleast_1d", "atleast_2d", "atleast_3d", "meshgrid", "positive", "conj",
}  # fmt: skip


def written(node: torch.fx.Node) -> list[object]:
    """The arguments ``node`` writes into (empty when it writes nothing)."""
    if not mutates(node):
        return []
    out = node.kwargs.get("out")
    if out is not None:
        return list(out) if isinstance(out, (tuple, list)) else [out]
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and schema is not None:
        targets = []
        for index, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if arg.name in node.kwargs:
                    targets.append(node.kwargs[arg.name])
                elif index < len(node.args):
                    targets.append(node.args[index])
        return targets
    # In-place methods, operators, functions and ``inplace=True`` write their first input.
    return [node.args[0] if node.args else node.kwargs.get("input")]


def _name(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def write_is_visible(node: torch.fx.Node) -> bool:
    """Whether a node other than ``node`` could read what ``node`` writes: the written tensor
    is an input, a parameter or buffer, a possible alias of another tensor, or has other
    readers. Readers of ``node``'s own result come after it in any order the graph allows."""
    for target in written(node):
        if not isinstance(target, torch.fx.Node):
            return True
        if target.op not in ("call_function", "call_method") or _name(target) in _MAY_ALIAS:
            return True
        if set(target.users) != {node}:
            return True
    return False


def graph_mutates(graph: torch.fx.Graph) -> bool:
    """Whether a node of ``graph`` writes in place into a tensor another node could read."""
    return any(write_is_visible(node) for node in graph.nodes)


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """FX's dead-code elimination, keeping in-place writes (they have no users)."""
    # An FX without is_impure_node raises TypeError: the dead nodes are left to Inductor.
    with contextlib.suppress(TypeError):
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
