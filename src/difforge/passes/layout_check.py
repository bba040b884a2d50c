"""Does a graph still trace after a rewrite replaced tensors with strided views?

Rewrites that make one buffer and hand out views of it (``fuse_qkv``'s split of a fused
GEMM, ``joint_linear``'s slices of one joint buffer), or that return another layout than
the op they replace (``group_norm_channels_last``: NHWC where CUDA's GroupNorm returns
NCHW), change the strides the rest of the graph sees. A model's later ``.view`` that relied
on the old layout then fails; this module finds that at rewrite time, and the rewrite's
outputs become dense copies in the layout Dynamo recorded instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

from difforge.passes.registry import counters, guardless, node_value

log = logging.getLogger("difforge.passes")


def same_layout(a: object, b: object) -> bool:
    """Whether two fake values certainly have the same sizes and strides (symbolically)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_layout(x, y) for x, y in zip(a, b, strict=True))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)
    if a.dim() != b.dim():
        return False
    pairs = [*zip(a.shape, b.shape, strict=True), *zip(a.stride(), b.stride(), strict=True)]
    return all(statically_known_true(x == y) for x, y in pairs)


def run_node(gm: torch.fx.GraphModule, node: torch.fx.Node, value_of: Any) -> object:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value_of)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":  # a cached concatenation: its fake value was set with it
        return node_value(node)
    raise NotImplementedError(node.op)


def retrace(gm: torch.fx.GraphModule, new_nodes: list[torch.fx.Node]) -> Exception | None:
    """The error re-tracing ``gm`` past ``new_nodes`` raises, or None: a rewrite whose outputs
    are strided views (a split of a fused GEMM, a slice of a joint buffer) breaks a later
    ``.view`` that needs contiguity, which would otherwise fail in AOT's trace, not here.

    Local and symbolic: the new nodes get their ``example_value`` from their inputs, then
    only the nodes whose inputs now have another layout than Dynamo recorded are re-run on
    fake tensors, until the layouts agree again (usually right after the attention's
    reshapes). The ShapeEnv's guards are suppressed meanwhile, so a ``dynamic`` graph stays
    dynamic; re-running the whole graph would re-execute Python-level ops such as
    ``F.interpolate``, which specialise sizes or refuse symbolic ones.
    """
    inputs = [node_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {id(i.fake_mode): i.fake_mode for i in inputs if hasattr(i, "fake_mode")}
    if len(modes) != 1 or any(i is None for i in inputs):
        return None  # no single fake mode to check with; AOT's own trace will check
    (fake_mode,) = modes.values()
    new = set(new_nodes)
    changed: dict[torch.fx.Node, object] = {}

    def value_of(n: torch.fx.Node) -> object:
        return changed[n] if n in changed else node_value(n)

    with guardless(fake_mode):
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            if node in new:
                try:
                    node.meta["example_value"] = changed[node] = run_node(gm, node, value_of)
                except Exception as exc:  # e.g. CUDA fake kernels refusing symbolic sizes
                    return exc
                continue
            if not any(i in changed for i in node.all_input_nodes):
                continue
            try:
                value = run_node(gm, node, value_of)
            except Exception as exc:
                return exc
            if not same_layout(value, node.meta.get("example_value")):
                changed[node] = value
    return None


def dense_format(value: object) -> torch.memory_format | None:
    """``torch.contiguous_format`` or ``channels_last(_3d)`` when ``value``'s strides are
    certainly those (symbolically), else None: the layouts a copy can reproduce."""
    from torch._prims_common import (
        make_channels_last_strides_for,
        make_contiguous_strides_for,
    )
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if not isinstance(value, torch.Tensor):
        return None
    shape, strides = tuple(value.shape), tuple(value.stride())
    candidates = [(torch.contiguous_format, make_contiguous_strides_for(shape))]
    if value.dim() in (4, 5):
        fmt = torch.channels_last if value.dim() == 4 else torch.channels_last_3d
        candidates.append((fmt, make_channels_last_strides_for(shape)))
    for fmt, want in candidates:
        # size-1 dims may carry any stride: they never move the address
        pairs = [(a, b) for a, b, n in zip(strides, want, shape, strict=True) if n != 1]
        if all(statically_known_true(a == b) for a, b in pairs):
            return fmt
    return None


def make_contiguous(
    graph: torch.fx.Graph,
    outputs: list[torch.fx.Node],
    pass_name: str,
    formats: list[torch.memory_format] | None = None,
) -> None:
    """Give each of ``outputs``' readers a dense copy in ``formats`` (contiguous where not
    given): the layout Dynamo recorded for the tensor the rewrite replaced, so every later
    op sees what it saw. Counted as ``counters["<pass_name>.contiguous"]``."""
    counters[f"{pass_name}.contiguous"] += len(outputs)
    formats = formats or [torch.contiguous_format] * len(outputs)
    for out, fmt in zip(outputs, formats, strict=True):
        users = list(out.users)
        kwargs = {} if fmt == torch.contiguous_format else {"memory_format": fmt}
        with graph.inserting_after(out):
            copy = graph.call_method("contiguous", (out,), kwargs)
        value = node_value(out)
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            # later checks (another group's retrace) read it
            with guardless(value.fake_mode):
                copy.meta["example_value"] = value.contiguous(memory_format=fmt)
        for user in users:
            user.replace_input_with(out, copy)


def copy_where_views_fail(
    graph: torch.fx.Graph,
    before: set[torch.fx.Node],
    outputs: list[torch.fx.Node],
    formats: list[torch.memory_format],
    pass_name: str,
) -> bool:
    """After a rewrite that added the nodes not in ``before``: re-trace past them and, where
    a later op (a model's ``.view``) fails on the new layouts, give ``outputs`` dense copies
    in ``formats``. Returns whether it copied."""
    gm = graph.owning_module
    if not isinstance(gm, torch.fx.GraphModule):
        return False
    problem = retrace(gm, [n for n in graph.nodes if n not in before])
    if problem is None:
        return False
    log.info("%s: new layouts rejected downstream (%s); copying", pass_name, problem)
    make_contiguous(graph, outputs, pass_name, formats)
    return True
