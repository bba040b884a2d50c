"""Fuse parallel linears that read the same input into one wider GEMM.

Attention blocks project one input three times (q, k, v; k and v in cross-attention;
FLUX's single blocks also the MLP input). One ``[M, K] x [K, N1+N2+N3]`` GEMM fills
the GPU better than three thin ones and reads the input once. The weights are
concatenated inside the graph, so in-place weight updates still take effect; under
``freezing`` Inductor folds that concatenation into a constant, so it costs nothing, and
with ``fuse_qkv.cached_weights`` it is done once and kept current outside the graph
(:mod:`difforge.fused_weights`), which costs memory instead.

Without freezing that concatenation reads and writes every weight on each call. Where the
weights outweigh the input it costs more than the fusion saves: FLUX.1-dev's O2 step was
1.1% slower than stock compile on an H100 (134.64 vs 133.19 ms,
``benchmarks/results/2026-11-26_h100_step_flux_o3.json``), with 2.87 ms of weight
concatenation per step. So a group of ``n`` linears of ``K`` inputs and ``N`` outputs in all,
on ``M`` input rows, is fused only when its weights are constants or cached, small
(``K·N < 2**20``: the copy is negligible) or when the input reads it saves are at least the
weight bytes it moves: ``(n - 1)·M·K >= 2·K·N``. PixArt's and SD3's self-attention
(``M = 8192``) fuse; FLUX's projections (``M = 4608``, ``N`` up to 21504) and cross-attention
k/v on a few hundred text tokens do not.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx

from difforge.fused_weights import FusedWeightCache, active_cache
from difforge.passes import layout_check
from difforge.passes.registry import (
    node_arg,
    node_tensor,
    register_pass,
    size_hint,
)

_LINEAR = torch._C._nn.linear


def _linear_parts(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, object] | None:
    """(input, weight, bias-or-None) when ``node`` is a fusable linear call."""
    if node.op != "call_function" or node.target is not _LINEAR:
        return None
    x, weight, bias = (node_arg(node, i, n) for i, n in enumerate(("input", "weight", "bias")))
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
    return [nodes for nodes in by_key.values() if len(nodes) >= 2 and _fusion_pays(nodes)]


#: Below this many weight elements in a group, the in-graph concatenation is negligible.
SMALL_GROUP_ELEMENTS = 2**20


def _fusion_pays(linears: list[torch.fx.Node]) -> bool:
    """The cost rule of the module docstring, on the input's current size hints."""
    parts = [_linear_parts(n) for n in linears]
    weights = [p[1] for p in parts]  # type: ignore[index]
    if all(w.op == "get_attr" for w in weights):
        return True  # constants (freezing): the concatenation is folded at compile time
    cache = active_cache()
    if cache is not None and linears and cache.covers(linears[0].graph, weights):
        return True  # fuse_qkv.cached_weights: concatenated once, outside the steps
    shapes = [node_tensor(w).shape for w in weights]  # type: ignore[union-attr]
    k = int(shapes[0][1])
    n_total = sum(int(s[0]) for s in shapes)
    if k * n_total < SMALL_GROUP_ELEMENTS:
        return True
    x = node_tensor(parts[0][0])  # type: ignore[index]
    rows = 1
    for size in x.shape[:-1] if x is not None else (None,):
        hint = size_hint(size)
        if hint is None:
            return False
        rows *= hint
    return (len(linears) - 1) * rows >= 2 * n_total


def _fuse_group(graph: torch.fx.Graph, linears: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Rewrite one group; returns the new per-linear output nodes."""
    first = linears[0]
    x = _linear_parts(first)[0]  # type: ignore[index]
    weights = [_linear_parts(n)[1] for n in linears]  # type: ignore[index]
    biases = [_linear_parts(n)[2] for n in linears]  # type: ignore[index]
    sizes = [int(node_tensor(w).shape[0]) for w in weights]  # type: ignore[union-attr]
    # Dynamo emits a get_attr weight (freezing) where it is first used, maybe after the
    # group's first linear; it reads nothing, so it can move up to where the cat goes.
    order = {node: i for i, node in enumerate(graph.nodes)}
    for attr in [*weights, *biases]:
        if isinstance(attr, torch.fx.Node) and attr.op == "get_attr" and order[attr] > order[first]:
            first.prepend(attr)
    outputs = []
    cache = active_cache()
    with graph.inserting_before(first):
        weight = _concatenation(graph, weights, cache)
        bias = _concatenation(graph, biases, cache) if biases[0] is not None else None
        fused = graph.call_function(_LINEAR, (x, weight, bias))
        split = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        for i in range(len(linears)):
            outputs.append(graph.call_function(operator.getitem, (split, i)))
    for old, new in zip(linears, outputs, strict=True):
        new.meta.update({k: v for k, v in old.meta.items() if k != "example_value"})
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    return outputs


def _concatenation(
    graph: torch.fx.Graph, parts: list[Any], cache: FusedWeightCache | None
) -> torch.fx.Node:
    """``cat(parts, 0)``: read from a buffer concatenated once when the weights can be
    cached (``fuse_qkv.cached_weights``), else computed in the graph."""
    cached = cache.concatenation(graph, parts) if cache is not None else None
    return cached if cached is not None else graph.call_function(torch.cat, (parts,), {"dim": 0})


@register_pass("fuse_qkv", stage="fx", tier="optimize")
def fuse_qkv(graph: torch.fx.Graph) -> int:
    """Fuse linears sharing one input (q/k/v, k/v, FLUX's qkv+mlp) into one GEMM + split."""
    groups = _groups(graph)
    if not groups:
        return 0
    before = set(graph.nodes)
    new_outputs = [out for group in groups for out in _fuse_group(graph, group)]
    # Where the strided slices break a model's reshape, each becomes contiguous (one copy
    # each); still one GEMM instead of several. A contiguous slice has exactly the sizes and
    # strides of the linear output it replaces, so no second check is needed.
    layout_check.copy_where_views_fail(
        graph, before, new_outputs, [torch.contiguous_format] * len(new_outputs), "fuse_qkv"
    )
    return len(groups)
