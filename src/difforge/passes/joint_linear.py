"""Joint attention's projections without the copies into and out of the joint sequence.

SD3's MM-DiT blocks project image and text tokens with separate weights, attend over both
at once, then project each part of the output with its own weights again::

    q = cat([view(linear(x_img, Wq)), view(linear(x_txt, Wq')) ], dim=tokens)  # k, v alike
    o = sdpa(q, k, v).transpose(1, 2).reshape(B, S, C)
    y_img, y_txt = linear(o[:, :S_img], Wo), linear(o[:, S_img:], Wo')

Inductor copies each concatenation (cuBLAS outputs cannot be written into a slice of a
shared buffer) and, with a batch above one, each output slice before its GEMM (a slice of
the token axis is no ``[rows, C]`` matrix). In SD3-medium's O2 step on an H100 those copies
are 1.41 ms (q, k, v) and 0.38 ms per step (``benchmarks/results/2026-11-26_h100_step_o2_dit.json``).

- ``joint_linear``: the concatenations of one attention become views of one buffer that
  ``difforge::joint_linear`` fills: each stream's GEMM writes its rows of ``[B, S_img +
  S_txt, N]`` directly (one cuBLAS call per sample and stream, bias in cuBLASLt's
  epilogue). It fires where every tensor of a token-axis ``cat`` is a chain of views (a split
  of the features, ``view``/``reshape`` that keep the token axis, ``transpose``/``permute``)
  of a linear's output, the chains agree stream by stream, and nothing else reads those
  linears. The attention then gets q/k/v as strided views, and cuDNN writes its output in
  the same token-major order, so the ``reshape`` after it is free too.
- ``sliced_rows_linear``: ``linear(x[:, a:b], W, bias)`` on a batch above one becomes
  ``bmm(x[:, a:b], Wᵀ expanded over the batch) + bias``: cuBLAS's strided-batched GEMM reads
  each sample's rows where they lie, and the bias joins the pointwise kernel after it.

Both are skipped below :data:`MIN_ELEMENTS` (a copy that small costs about a launch).
Exactness: the same products; ``joint_linear`` splits the GEMM's rows by sample (the same
float32 accumulation per output), and ``sliced_rows_linear`` rounds the product before
adding the bias (one rounding more), so it is in the ``optimize`` tier.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from difforge.passes.registry import (
    cacheable_target,
    fill_example_values,
    node_arg,
    node_tensor,
    register_pass,
    replace_with_call,
    size_hint,
)

_LINEAR = torch._C._nn.linear

#: Below this many elements (8 MiB in 16-bit) a copy costs about what a kernel launch does.
MIN_ELEMENTS = 1 << 22

_CATS = (torch.cat, torch.concat, torch.concatenate)
_SPLIT_FUNCTIONS = (torch.split, torch.functional.split, torch.chunk)
_SPLIT_METHODS = ("split", "chunk")
_VIEW_FUNCTIONS = (torch.reshape, torch.transpose, torch.permute)
_VIEW_METHODS = ("view", "reshape", "transpose", "permute")


# --------------------------------------------------------------------------------------
# The op: several streams' linears written into the token rows of one buffer
# --------------------------------------------------------------------------------------


def _joint_out(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    if not xs or len(xs) != len(weights):
        raise ValueError("joint_linear needs one weight per input, at least one input")
    if any(x.dim() != 3 for x in xs) or any(w.dim() != 2 for w in weights):
        raise ValueError("joint_linear takes [batch, tokens, features] inputs, 2-D weights")
    batch, n_out = xs[0].shape[0], weights[0].shape[0]
    for x, w in zip(xs, weights, strict=True):
        if x.shape[0] != batch or w.shape[0] != n_out or x.shape[2] != w.shape[1]:
            raise ValueError(
                f"joint_linear: input {tuple(x.shape)} and weight {tuple(w.shape)} do not "
                f"fit a batch of {batch} and {n_out} outputs"
            )
        if x.dtype != xs[0].dtype or w.dtype != xs[0].dtype:
            raise ValueError("joint_linear: inputs and weights must share one dtype")
    tokens = sum(x.shape[1] for x in xs)
    return xs[0].new_empty((batch, tokens, n_out))


@torch.library.custom_op("difforge::joint_linear", mutates_args=())
def joint_linear(
    xs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> torch.Tensor:
    """``cat([linear(x, w, b) for x, w, b in zip(xs, weights, biases)], dim=1)`` without the
    concatenation: each stream's GEMM writes its own rows of the result."""
    out = _joint_out(xs, weights)
    start = 0
    for x, w, b in zip(xs, weights, biases, strict=True):
        stop = start + x.shape[1]
        for i in range(x.shape[0]):
            # One sample's rows of one stream: a contiguous [tokens, N] matrix of `out`.
            rows = out[i, start:stop]
            if b is None:
                torch.mm(x[i], w.t(), out=rows)
            else:
                torch.addmm(b, x[i], w.t(), out=rows)
        start = stop
    return out


@joint_linear.register_fake
def _joint_linear_fake(
    xs: list[torch.Tensor], weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> torch.Tensor:
    return _joint_out(xs, weights)


@cacheable_target
def linear_sliced_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``linear(x, weight, bias)`` for a ``[batch, tokens, K]`` view whose samples lie apart:
    one strided-batched GEMM over the rows where they lie."""
    out = torch.bmm(x, weight.t().expand(x.shape[0], -1, -1))
    return out if bias is None else out + bias


# --------------------------------------------------------------------------------------
# Matching: chains of views from a linear to a concatenation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chain:
    """One tensor of a concatenation: ``views(getitem(split(linear), index))`` (or the
    views of the linear itself), the views listed from the linear outwards."""

    linear: torch.fx.Node
    split: torch.fx.Node | None
    index: int | None
    views: tuple[torch.fx.Node, ...]


def _is_view(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _is_split(node: object) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _SPLIT_METHODS
    return node.op == "call_function" and node.target in _SPLIT_FUNCTIONS


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(tensor: object) -> _Chain | None:
    if not isinstance(tensor, torch.fx.Node):
        return None
    views: list[torch.fx.Node] = []
    node = tensor
    while _is_view(node):
        if len(node.users) != 1:
            return None
        views.append(node)
        parent = node.args[0] if node.args else None
        if not isinstance(parent, torch.fx.Node):
            return None
        node = parent
    split = index = None
    if node.op == "call_function" and node.target is operator.getitem and _is_split(node.args[0]):
        if len(node.users) != 1 or not isinstance(node.args[1], int):
            return None
        split, index = node.args[0], node.args[1]
        node = split.args[0]  # type: ignore[union-attr,assignment]
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is not _LINEAR:
        return None
    return _Chain(node, split, index, tuple(reversed(views)))  # type: ignore[arg-type]


def _same(a: object, b: object) -> bool:
    """Equal arguments (nodes by identity, sizes without guards)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a is b if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) else a == b


def _same_op(a: torch.fx.Node | None, b: torch.fx.Node | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.op == b.op
        and a.target == b.target
        and _same(a.args[1:], b.args[1:])
        and _same(dict(a.kwargs), dict(b.kwargs))
    )


def _dim(dim: object, rank: int) -> int | None:
    return dim % rank if isinstance(dim, int) else None


def _token_axis(chain: _Chain) -> int | None:
    """Where the linear's token axis (dim 1 of ``[B, S, N]``) ends up after the chain's
    views, or None when a view moves or reshapes it (or the split is not over features)."""
    out = node_tensor(chain.linear)
    if out is None or out.dim() != 3:
        return None
    if chain.split is not None:
        dim = node_arg(chain.split, 2, "dim", 0)
        if _dim(dim, 3) != 2:
            return None
    axis = 1
    for view in chain.views:
        before, after = node_tensor(view.args[0]), node_tensor(view)  # type: ignore[arg-type]
        if before is None or after is None:
            return None
        name = view.target if view.op == "call_method" else view.target.__name__  # type: ignore[union-attr]
        if name in ("view", "reshape"):
            keep = axis + 1
            if after.dim() < keep or not _same(
                tuple(before.shape[:keep]), tuple(after.shape[:keep])
            ):
                return None
        elif name == "transpose":
            a, b = (_dim(d, before.dim()) for d in view.args[1:3])
            if a is None or b is None:
                return None
            axis = b if axis == a else a if axis == b else axis
        else:  # permute
            dims = view.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            order = [_dim(d, before.dim()) for d in dims]
            if None in order or axis not in order:
                return None
            axis = order.index(axis)
    return axis


def _cat_chains(cat: torch.fx.Node) -> list[_Chain] | None:
    """The chains of a token-axis concatenation whose streams agree view by view."""
    if cat.op != "call_function" or cat.target not in _CATS:
        return None
    tensors = node_arg(cat, 0, "tensors")
    out = node_tensor(cat)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or out is None:
        return None
    chains = [_chain(t) for t in tensors]
    if any(c is None for c in chains):
        return None
    first = chains[0]
    assert first is not None
    if len({c.linear for c in chains}) != len(chains):  # type: ignore[union-attr]
        return None
    for c in chains[1:]:
        assert c is not None
        if c.index != first.index or len(c.views) != len(first.views):
            return None
        if not _same_op(c.split, first.split):
            return None
        if not all(_same_op(a, b) for a, b in zip(c.views, first.views, strict=True)):
            return None
    axis = _token_axis(first)
    if axis is None or _dim(node_arg(cat, 1, "dim", 0), out.dim()) != axis:
        return None
    return chains  # type: ignore[return-value]


def _linear_args(linear: torch.fx.Node) -> tuple[object, object, object]:
    return tuple(node_arg(linear, i, n) for i, n in enumerate(("input", "weight", "bias")))  # type: ignore[return-value]


def _linears_fit(linears: tuple[torch.fx.Node, ...]) -> bool:
    """One joint buffer can hold these linears' outputs: same batch, outputs and dtype, no
    gradients, and big enough to matter."""
    outs = [node_tensor(n) for n in linears]
    if any(o is None or o.dim() != 3 or o.requires_grad for o in outs):
        return False
    first = outs[0]
    assert first is not None
    for o in outs[1:]:
        assert o is not None
        if o.dtype != first.dtype or not _same(o.shape[0], first.shape[0]):
            return False
        if not _same(o.shape[2], first.shape[2]):
            return False
    for linear in linears:
        x, weight, _ = _linear_args(linear)
        xt, wt = node_tensor(x), node_tensor(weight)
        if xt is None or wt is None or xt.dim() != 3 or xt.dtype != first.dtype:
            return False
    elements = 0
    for o in outs:
        hints = [size_hint(s) for s in o.shape]  # type: ignore[union-attr]
        if None in hints:
            return False
        elements += hints[0] * hints[1] * hints[2]  # type: ignore[operator]
    return elements >= MIN_ELEMENTS


def _covered(
    linears: tuple[torch.fx.Node, ...], members: list[tuple[torch.fx.Node, list[_Chain]]]
) -> bool:
    """Nothing but these chains reads the linears (or their splits)."""
    reached: set[torch.fx.Node] = {cat for cat, _ in members}
    for _, chains in members:
        for c in chains:
            reached.update(c.views)
            if c.split is not None:
                reached |= {c.split, _first_after_split(c)}
    for linear in linears:
        for user in linear.users:
            if user not in reached:
                return False
            if _is_split(user) and not all(u in reached for u in user.users):
                return False
    return True


def _first_after_split(chain: _Chain) -> torch.fx.Node:
    """The ``getitem`` that picks the chain's part of the split."""
    assert chain.split is not None
    for user in chain.split.users:
        if user.target is operator.getitem and user.args[1] == chain.index:
            return user
    raise AssertionError("a matched chain's getitem is missing")


def _replay(
    graph: torch.fx.Graph, chain: _Chain, root: torch.fx.Node, split: torch.fx.Node | None
) -> list[torch.fx.Node]:
    """``chain``'s views applied to ``root`` (through ``split``'s part); the new nodes."""
    created: list[torch.fx.Node] = []
    node = root
    if chain.split is not None:
        assert split is not None
        node = graph.call_function(operator.getitem, (split, chain.index))
        created.append(node)
    for view in chain.views:
        node = graph.create_node(view.op, view.target, (node, *view.args[1:]), dict(view.kwargs))
        created.append(node)
    return created


def _rewrite(
    graph: torch.fx.Graph,
    linears: tuple[torch.fx.Node, ...],
    groups: list[tuple[torch.fx.Node, list[_Chain]]],
) -> bool:
    cats = [cat for cat, _ in groups]
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_cat = min(cats, key=order.__getitem__)
    args = [_linear_args(n) for n in linears]
    created: list[torch.fx.Node] = []
    replacements: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    with graph.inserting_before(first_cat):
        joint = graph.call_function(
            torch.ops.difforge.joint_linear.default,
            ([a[0] for a in args], [a[1] for a in args], [a[2] for a in args]),
        )
        created.append(joint)
        splits: dict[int, torch.fx.Node] = {}
        for cat, chains in groups:
            chain = chains[0]
            split = None
            if chain.split is not None:
                key = id(chain.split)
                if key not in splits:
                    s = chain.split
                    splits[key] = graph.create_node(
                        s.op, s.target, (joint, *s.args[1:]), dict(s.kwargs)
                    )
                    created.append(splits[key])
                split = splits[key]
            nodes = _replay(graph, chain, joint, split)
            created += nodes
            replacements.append((cat, nodes[-1] if nodes else joint))
    ok = fill_example_values(created)
    if ok:
        for cat, new in replacements:
            want, got = node_tensor(cat), node_tensor(new)
            if want is None or got is None or not _same(tuple(want.shape), tuple(got.shape)):
                ok = False
    if not ok:
        for node in reversed(created):
            graph.erase_node(node)
        return False
    for cat, new in replacements:
        cat.replace_all_uses_with(new)
        graph.erase_node(cat)
    return True


@register_pass("joint_linear", stage="fx", tier="optimize")
def fuse_joint_projections(graph: torch.fx.Graph) -> int:
    """cat(per-stream linears' views, tokens) -> views of one buffer the GEMMs write into."""
    groups: dict[tuple[torch.fx.Node, ...], list[tuple[torch.fx.Node, list[_Chain]]]] = {}
    for node in graph.nodes:
        chains = _cat_chains(node)
        if chains is not None:
            groups.setdefault(tuple(c.linear for c in chains), []).append((node, chains))
    made = 0
    for linears, members in groups.items():
        if (
            _linears_fit(linears)
            and _covered(linears, members)
            and _rewrite(graph, linears, members)
        ):
            made += 1
    return made


def _token_slice(x: object) -> bool:
    """``x`` is ``base[:, a:b]`` (or ``narrow(base, 1, ...)``) of a 3-D ``base``."""
    if not isinstance(x, torch.fx.Node) or x.op != "call_function":
        return False
    base = node_tensor(x.args[0]) if x.args else None
    if base is None or base.dim() != 3:
        return False
    if x.target is torch.narrow:
        return _dim(node_arg(x, 1, "dim"), 3) == 1
    if x.target is not operator.getitem or not isinstance(x.args[1], tuple):
        return False
    index = x.args[1]
    full = slice(None, None, None)
    return (
        len(index) in (2, 3)
        and index[0] == full
        and isinstance(index[1], slice)
        and index[1] != full
        and all(i == full or i is Ellipsis for i in index[2:])
    )


@register_pass("sliced_rows_linear", stage="fx", tier="optimize")
def sliced_rows_linear(graph: torch.fx.Graph) -> int:
    """linear(x[:, a:b]) over a batch -> one strided-batched GEMM on the rows where they lie."""
    made = 0
    for linear in list(graph.nodes):
        if linear.op != "call_function" or linear.target is not _LINEAR:
            continue
        x, weight, bias = _linear_args(linear)
        xt, wt, out = node_tensor(x), node_tensor(weight), node_tensor(linear)
        if not _token_slice(x) or xt is None or wt is None or out is None:
            continue
        if wt.dim() != 2 or out.requires_grad or xt.dtype != wt.dtype:
            continue
        hints = [size_hint(s) for s in xt.shape]
        if None in hints or hints[0] == 1:  # one sample's rows are a matrix already
            continue
        if hints[0] * hints[1] * hints[2] < MIN_ELEMENTS:  # type: ignore[operator]
            continue
        replace_with_call(graph, linear, linear_sliced_rows, (x, weight, bias))
        made += 1
    return made
