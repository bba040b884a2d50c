"""Fuse parallel linears that read the same input into one wider GEMM.

Attention blocks project one input three times (q, k, v; k and v in cross-attention;
FLUX's single blocks also the MLP input). One ``[M, K] x [K, N1+N2+N3]`` GEMM fills
the GPU better than three thin ones and reads the input once. The weights are
concatenated inside the graph, so in-place weight updates still take effect; under
``freezing`` Inductor folds that concatenation into a constant, so it costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections import defaultdict

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from difforge.passes.registry import node_tensor, register_pass

log = logging.getLogger("difforge.passes")

_LINEAR = torch._C._nn.linear


def _linear_parts(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, object] | None:
    """(input, weight, bias-or-None) when ``node`` is a fusable linear call."""
    if node.op != "call_function" or node.target is not _LINEAR:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    # Weights must exist before the first linear runs: graph inputs or attributes.
    for t in (weight, bias):
        if t is not None and not (
            isinstance(t, torch.fx.Node) and t.op in ("placeholder", "get_attr")
        ):
            return None
    w = node_tensor(weight)
    if not isinstance(x, torch.fx.Node) or w is None or w.dim() != 2:
        return None
    if isinstance(w.shape[0], torch.SymInt) or isinstance(w.shape[1], torch.SymInt):
        return None
    return x, weight, bias


def _groups(graph: torch.fx.Graph) -> list[list[torch.fx.Node]]:
    by_key: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        parts = _linear_parts(node)
        if parts is None:
            continue
        x, weight, bias = parts
        w = node_tensor(weight)
        assert w is not None
        b = node_tensor(bias)
        if bias is not None and (b is None or b.dtype != w.dtype):
            continue
        key = (x, w.dtype, w.device, int(w.shape[1]), bias is not None)
        by_key[key].append(node)
    return [nodes for nodes in by_key.values() if len(nodes) >= 2]


def _fuse_group(graph: torch.fx.Graph, linears: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Rewrite one group; returns the new per-linear output nodes."""
    first = linears[0]
    x = _linear_parts(first)[0]  # type: ignore[index]
    weights = [_linear_parts(n)[1] for n in linears]  # type: ignore[index]
    biases = [_linear_parts(n)[2] for n in linears]  # type: ignore[index]
    sizes = [int(node_tensor(w).shape[0]) for w in weights]  # type: ignore[union-attr]
    outputs = []
    with graph.inserting_before(first):
        weight = graph.call_function(torch.cat, (weights,), {"dim": 0})
        bias = (
            graph.call_function(torch.cat, (biases,), {"dim": 0}) if biases[0] is not None else None
        )
        fused = graph.call_function(_LINEAR, (x, weight, bias))
        split = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        for i in range(len(linears)):
            outputs.append(graph.call_function(operator.getitem, (split, i)))
    for old, new in zip(linears, outputs, strict=True):
        new.meta.update({k: v for k, v in old.meta.items() if k != "example_value"})
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    return outputs


_MISSING = object()


def _shapes_check(gm: torch.fx.GraphModule, new_nodes: list[torch.fx.Node]) -> Exception | None:
    """Re-run fake-tensor shape propagation; the split outputs are strided views, and a
    later ``.view`` that needs contiguity would fail only here, not at run time.

    The propagation runs with the ShapeEnv's guards suppressed and leaves every node's
    metadata as it was: it re-executes Python-level ops (``F.interpolate`` computes its
    output size with ``int()``), which would otherwise specialise symbolic sizes and turn
    a ``dynamic`` graph into one compiled per resolution. ``new_nodes`` get their
    ``example_value`` from their own inputs instead, symbolic sizes intact.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    modes = {id(i.fake_mode): i.fake_mode for i in inputs if hasattr(i, "fake_mode")}
    if len(modes) != 1 or any(i is None for i in inputs):
        return None  # no single fake mode to check with; AOT's own trace will check
    (fake_mode,) = modes.values()
    shape_env = fake_mode.shape_env
    no_guards = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
    saved = {n: n.meta.get("val", _MISSING) for n in gm.graph.nodes}
    try:
        with fake_mode, no_guards:
            FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
    except Exception as exc:
        return exc
    finally:
        for node, val in saved.items():
            if val is _MISSING:
                node.meta.pop("val", None)
            else:
                node.meta["val"] = val
    with fake_mode:
        for node in new_nodes:  # in graph order: each one's inputs already have values
            args, kwargs = torch.fx.node.map_arg(
                (node.args, node.kwargs), lambda n: n.meta.get("example_value", n.meta.get("val"))
            )
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = node.target(*args, **kwargs)
            node.meta["example_value"] = value
    return None


@register_pass("fuse_qkv", stage="fx", tier="optimize")
def fuse_qkv(graph: torch.fx.Graph) -> int:
    """Fuse linears sharing one input (q/k/v, k/v, FLUX's qkv+mlp) into one GEMM + split."""
    groups = _groups(graph)
    if not groups:
        return 0
    gm = graph.owning_module
    before = set(graph.nodes)
    new_outputs = [out for group in groups for out in _fuse_group(graph, group)]
    if not isinstance(gm, torch.fx.GraphModule):
        return len(groups)
    problem = _shapes_check(gm, [n for n in graph.nodes if n not in before])
    if problem is not None:
        log.info("fuse_qkv: strided slices rejected (%s); making them contiguous", problem)
        # Make each slice contiguous (one copy each) so strided views cannot break
        # the model's reshapes; still one GEMM instead of several.
        for out in new_outputs:
            users = list(out.users)
            with graph.inserting_after(out):
                contiguous = graph.call_method("contiguous", (out,))
            for user in users:
                user.replace_input_with(out, contiguous)
        problem = _shapes_check(gm, [n for n in graph.nodes if n not in before])
    if problem is not None:
        # Contiguous slices equal the original outputs exactly, so this is our bug.
        raise RuntimeError(f"shapes do not check after fusion: {problem}") from problem
    return len(groups)
