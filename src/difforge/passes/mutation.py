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
import functools
import inspect
import operator
from collections.abc import Callable

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

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
    (``mul_``), an in-place function (``torch.relu_``, ``inplace=True`` by keyword or by
    position as ``nn.LeakyReLU`` passes it), an ``out=`` argument, an item assignment
    (``h[:, :4] = 0``) or an augmented assignment operator."""
    if node.kwargs.get("out") is not None or _inplace_flag(node):
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_OPERATORS or node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)  # an OpOverload
    if schema is not None:
        return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


@functools.cache
def _signature(target: Callable[..., object]) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without one
        return None


def _inplace_flag(node: torch.fx.Node) -> bool:
    """``inplace=True``, by keyword or bound by position (``F.leaky_relu(h, 0.2, True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or not callable(node.target):
        return False
    try:
        signature = _signature(node.target)
    except TypeError:  # an unhashable callable
        signature = None
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind_partial(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


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
    # eval-mode dropout returns its input, but its fake kernel makes a new tensor
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
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
    # In-place methods, operators, item assignment and ``inplace=True`` write their first
    # input.
    return [node.args[0] if node.args else node.kwargs.get("input")]


def _name(node: torch.fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")


def _storage(node: torch.fx.Node) -> StorageWeakRef | None:
    """The storage of ``node``'s fake value (Dynamo's ``example_value``), when a tensor."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):  # e.g. a tensor subclass without one
        return None


class _Aliases:
    """Per graph: the nodes of each fake storage, and each node's position (built once, so
    a graph's check stays linear in its size with many writes)."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.order: dict[torch.fx.Node, int] = {}
        self.by_storage: dict[StorageWeakRef, list[torch.fx.Node]] = {}
        for position, node in enumerate(graph.nodes):
            self.order[node] = position
            storage = _storage(node)
            if storage is not None:
                self.by_storage.setdefault(storage, []).append(node)

    def reads_after(self, writer: torch.fx.Node, node: torch.fx.Node) -> bool:
        """Whether ``node`` reads ``writer``'s result, directly or through others: a walk
        back from ``node`` that stops at nodes placed before ``writer``."""
        start = self.order[writer]
        seen: set[torch.fx.Node] = set()
        todo = [node]
        while todo:
            for source in todo.pop().all_input_nodes:
                if source is writer:
                    return True
                if source not in seen and self.order.get(source, -1) > start:
                    seen.add(source)
                    todo.append(source)
        return False


def _write_chain(node: torch.fx.Node) -> set[torch.fx.Node]:
    """``node`` and the tensors before it that in-place writes turned into it, each read by
    the next write alone (``h.mul_(2).add_(1)``: ``mul_`` and ``h`` share ``add_``'s
    storage, and nothing else reads them)."""
    chain = {node}
    while mutates(node):
        targets = written(node)
        if len(targets) != 1 or not isinstance(targets[0], torch.fx.Node):
            break
        if set(targets[0].users) != {node}:
            break
        node = targets[0]
        chain.add(node)
    return chain


def write_is_visible(node: torch.fx.Node, aliases: _Aliases | None = None) -> bool:
    """Whether a node other than ``node`` could read what ``node`` writes: the written tensor
    is an input, a parameter or buffer, has other readers, or may share storage with another
    tensor (by the call that made it, or by its fake value's storage: ``ravel``, ``.data``,
    ``einsum`` and ``.long()`` of a long tensor return views or ``self``). Readers of
    ``node``'s own result come after it in any order the graph allows."""
    for target in written(node):
        if not isinstance(target, torch.fx.Node):
            return True
        if target.op not in ("call_function", "call_method") or _name(target) in _MAY_ALIAS:
            return True
        if set(target.users) != {node}:
            return True
        storage = _storage(target)
        if storage is None:
            return True  # no fake value: an alias cannot be ruled out
        aliases = aliases or _Aliases(node.graph)
        chain = _write_chain(target)
        for other in aliases.by_storage.get(storage, ()):
            if other is node or other in chain or aliases.reads_after(node, other):
                continue
            return True
    return False


def graph_mutates(graph: torch.fx.Graph) -> bool:
    """Whether a node of ``graph`` writes in place into a tensor another node could read."""
    writers = [node for node in graph.nodes if mutates(node)]
    if not writers:
        return False
    aliases = _Aliases(graph)
    return any(write_is_visible(node, aliases) for node in writers)


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """FX's dead-code elimination, keeping in-place writes (they have no users)."""
    # An FX without is_impure_node raises TypeError: the dead nodes are left to Inductor.
    with contextlib.suppress(TypeError):
        graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
