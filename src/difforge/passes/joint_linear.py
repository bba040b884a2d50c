"""Joint attention's projections written into one buffer, without concatenation copies.

SD3's MM-DiT blocks project image and text tokens with separate weights and attend over
both at once::

    q = cat([view(linear(x_img, Wq)), view(linear(x_txt, Wq'))], dim=tokens)  # k, v alike
    o = sdpa(q, k, v).transpose(1, 2).reshape(B, S, C)

Inductor copies each concatenation (a cuBLAS output cannot be written into a slice of a
shared buffer), and because the concatenations are contiguous ``[B, H, S, D]`` tensors,
cuDNN writes ``o`` in that order too, so the ``reshape`` after it copies once more. In
SD3-medium's O2 step on an H100 that is 1.41 + 0.39 ms a step
(``benchmarks/results/2026-11-26_h100_step_o2_dit.json``).

The rewrite makes the concatenations views of one ``[B, S_img + S_txt, N]`` buffer that
``difforge::joint_linear`` fills: each stream's GEMM writes its own token rows directly. A
stream is one fused GEMM (``fuse_qkv``'s, one cuBLAS call per sample, the bias in
cuBLASLt's epilogue) or one linear per part (SD3's 154 text tokens at 1024px, which
``fuse_qkv``'s cost rule leaves apart: one strided-batched GEMM per part into its columns and
one bias add for the stream). q, k and v then reach cuDNN as strided views, cuDNN writes its
output token-major, and the ``reshape`` after it is free.

It fires where every tensor of a token-axis ``cat`` is a chain of views (a split of the
features, ``view``/``reshape``/``unflatten`` that keep the token axis, ``transpose``/``permute``) of a
linear's output, the chains agree stream by stream, nothing else reads those linears, and
the buffer has at least :data:`MIN_ELEMENTS` elements (below that a copy costs about a
launch). The output side needs nothing: ``linear(o[:, :S_img])`` on a token slice is already
one strided-batched GEMM (torch's matmul does not fold a batch it cannot view as rows).

fp8 linears (``O3``'s ``Fp8Linear``, traced as a row quantization and ``torch._scaled_mm``
viewed ``[batch, tokens, N]``) get the same rewrite with ``difforge::joint_scaled_mm``: each
GEMM takes its stream's fp8 rows and scales and writes its rows of the buffer (``out=``);
the quantizations stay where Inductor fused them; a symbolic batch size is passed as the
graph's own size node.

Exactness: the same products with the same float32 accumulation; a part's bias is added
after its rounded GEMM output (one rounding more), so it is in the ``optimize`` tier.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx

from difforge.passes import layout_check
from difforge.passes.layout_check import dense_format
from difforge.passes.registry import (
    fill_example_values,
    node_arg,
    node_tensor,
    node_value,
    register_pass,
    same_size,
    size_hint,
)

_LINEAR = torch._C._nn.linear

#: Below this many elements (8 MiB in 16-bit) a copy costs about what a kernel launch does.
MIN_ELEMENTS = 1 << 22

_CATS = (torch.cat, torch.concat, torch.concatenate)
_SPLIT_FUNCTIONS = (torch.split, torch.functional.split, torch.chunk)
_SPLIT_METHODS = ("split", "chunk")
_VIEW_FUNCTIONS = (torch.reshape, torch.transpose, torch.permute, torch.unflatten)
_VIEW_METHODS = ("view", "reshape", "unflatten", "transpose", "permute")


# --------------------------------------------------------------------------------------
# The op: several streams' linears written into the token rows of one buffer
# --------------------------------------------------------------------------------------


class _Layout(NamedTuple):
    firsts: list[int]  # each stream's first row of the buffer
    tokens: list[int]  # each stream's rows
    width: int

    @property
    def rows(self) -> int:
        return self.firsts[-1] + self.tokens[-1]


def _layout(
    shapes: list[tuple[object, object]],
    widths: list[int],
    streams: list[int],
    columns: list[int],
) -> _Layout:
    """Where each stream's rows go and the buffer's width, given each entry's ``(batch,
    tokens)`` and output width, after checking that the entries tile every stream's rows
    ``[0, width)`` exactly once (no column left unwritten)."""
    batch = shapes[0][0]
    tokens: dict[int, object] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    for (b, t), n, s, c in zip(shapes, widths, streams, columns, strict=True):
        if b != batch:
            raise ValueError(f"joint_linear: an input of batch {b} does not fit a batch of {batch}")
        if tokens.setdefault(s, t) != t:
            raise ValueError(f"joint_linear: stream {s}'s inputs differ in tokens")
        spans.setdefault(s, []).append((c, c + n))
    if sorted(spans) != list(range(len(spans))):
        raise ValueError(f"joint_linear: streams must be numbered 0..n-1, got {sorted(spans)}")
    width = max(stop for s in spans.values() for _, stop in s)
    for s, parts in spans.items():
        edges = [0]
        for start, stop in sorted(parts):
            if start != edges[-1]:
                break
            edges.append(stop)
        if edges[-1] != width or len(edges) != len(parts) + 1:
            raise ValueError(
                f"joint_linear: stream {s}'s columns {sorted(parts)} do not tile [0, {width})"
            )
    firsts, row = [], 0
    for s in range(len(spans)):
        firsts.append(row)
        row = row + tokens[s]  # type: ignore[operator]
    return _Layout(firsts, [tokens[s] for s in range(len(spans))], width)  # type: ignore[misc]


def _linear_layout(
    xs: list[torch.Tensor], weights: list[torch.Tensor], streams: list[int], columns: list[int]
) -> _Layout:
    """:func:`_layout` of ``joint_linear``'s ``[batch, tokens, features]`` inputs."""
    if not xs or not len(xs) == len(weights) == len(streams) == len(columns):
        raise ValueError("joint_linear needs one weight, stream and column per input")
    if any(x.dim() != 3 for x in xs) or any(w.dim() != 2 for w in weights):
        raise ValueError("joint_linear takes [batch, tokens, features] inputs, 2-D weights")
    for x, w in zip(xs, weights, strict=True):
        if x.shape[0] != xs[0].shape[0] or x.shape[2] != w.shape[1]:
            raise ValueError(
                f"joint_linear: input {tuple(x.shape)} and weight {tuple(w.shape)} do not "
                f"fit a batch of {xs[0].shape[0]}"
            )
        if x.dtype != xs[0].dtype or w.dtype != xs[0].dtype:
            raise ValueError("joint_linear: inputs and weights must share one dtype")
    shapes = [(x.shape[0], x.shape[1]) for x in xs]
    return _layout(shapes, [w.shape[0] for w in weights], streams, columns)


@torch.library.custom_op("difforge::joint_linear", mutates_args=())
def joint_linear(
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    streams: list[int],
    columns: list[int],
) -> torch.Tensor:
    """Several streams' linears in one ``[batch, tokens, width]`` buffer, without copies:
    entry ``e`` computes ``linear(xs[e], weights[e], biases[e])`` into the token rows of
    stream ``streams[e]`` (streams stacked in order, as ``cat(..., dim=1)`` would) and the
    columns from ``columns[e]``. A stream is one fused GEMM or several side by side."""
    layout = _linear_layout(xs, weights, streams, columns)
    firsts, width, batch = layout.firsts, layout.width, xs[0].shape[0]
    out = xs[0].new_empty((batch, layout.rows, width))
    part_biases: dict[int, list[tuple[int, torch.Tensor | None, int]]] = {}
    for x, w, b, s, c in zip(xs, weights, biases, streams, columns, strict=True):
        rows = slice(firsts[s], firsts[s] + x.shape[1])
        if w.shape[0] == width:
            # The stream in one GEMM: each sample's rows are a contiguous [tokens, width]
            # matrix of `out`, and cuBLASLt adds the bias in its epilogue.
            for i in range(batch):
                if b is None:
                    torch.mm(x[i], w.t(), out=out[i, rows])
                else:
                    torch.addmm(b, x[i], w.t(), out=out[i, rows])
            continue
        # A column part: strided rows, where cuBLAS would first copy the bias into the
        # output (one small kernel per sample and part). One strided-batched GEMM for all
        # samples instead, and the stream's biases added once, below.
        torch.bmm(x, w.t().expand(batch, -1, -1), out=out[:, rows, c : c + w.shape[0]])
        part_biases.setdefault(s, []).append((c, b, w.shape[0]))
    for s, parts in part_biases.items():
        if all(b is None for _, b, _ in parts):
            continue
        bias = torch.cat(
            [out.new_zeros(n) if b is None else b for _, b, n in sorted(parts, key=lambda p: p[0])]
        )
        out[:, firsts[s] : firsts[s] + layout.tokens[s]].add_(bias)
    return out


@joint_linear.register_fake
def _joint_linear_fake(
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    streams: list[int],
    columns: list[int],
) -> torch.Tensor:
    layout = _linear_layout(xs, weights, streams, columns)
    return xs[0].new_empty((xs[0].shape[0], layout.rows, layout.width))


def _scaled_mm_layout(
    xs: list[torch.Tensor],
    mat2s: list[torch.Tensor],
    streams: list[int],
    columns: list[int],
    batch: int,
) -> _Layout:
    """:func:`_layout` of ``joint_scaled_mm``'s ``[batch * tokens, K]`` fp8 inputs."""
    if not xs or not len(xs) == len(mat2s) == len(streams) == len(columns):
        raise ValueError("joint_scaled_mm needs one weight, stream and column per input")
    if any(x.dim() != 2 for x in xs) or any(w.dim() != 2 for w in mat2s):
        raise ValueError("joint_scaled_mm takes [batch * tokens, K] inputs, [K, N] weights")
    for x, w in zip(xs, mat2s, strict=True):
        if x.shape[1] != w.shape[0] or x.shape[0] % batch != 0:
            raise ValueError(
                f"joint_scaled_mm: input {tuple(x.shape)} and weight {tuple(w.shape)} do not "
                f"fit a batch of {batch}"
            )
    shapes = [(batch, x.shape[0] // batch) for x in xs]
    return _layout(shapes, [w.shape[1] for w in mat2s], streams, columns)


#: cuBLASLt's row-wise fp8 GEMM wants its scale vectors 16-byte aligned: a sample's slice of
#: a stream's float32 scales starting at row 333 (SD3's text tokens, batch 2) was rejected
#: with CUBLAS_STATUS_NOT_SUPPORTED on an H100.
_SCALE_ALIGNMENT = 16


def _scales_aligned(scales: torch.Tensor, tokens: int, batch: int) -> bool:
    """Whether every sample's slice of ``scales`` ([batch * tokens, 1]) starts aligned."""
    if batch == 1:
        return True
    step = tokens * scales.stride(0) * scales.element_size()
    return scales.data_ptr() % _SCALE_ALIGNMENT == 0 and step % _SCALE_ALIGNMENT == 0


@torch.library.custom_op("difforge::joint_scaled_mm", mutates_args=())
def joint_scaled_mm(
    xs: list[torch.Tensor],
    x_scales: list[torch.Tensor],
    mat2s: list[torch.Tensor],
    w_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    streams: list[int],
    columns: list[int],
    batch: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``joint_linear`` for fp8 linears (``quant.fp8``'s traced form): entry ``e`` computes
    ``torch._scaled_mm(xs[e], mat2s[e], x_scales[e], w_scales[e], biases[e])`` (row-wise
    scales, ``xs[e]`` the ``[batch * tokens, K]`` rows of its stream) into the stream's token
    rows and the columns from ``columns[e]`` of one ``[batch, tokens, width]`` buffer."""
    layout = _scaled_mm_layout(xs, mat2s, streams, columns, batch)
    out = xs[0].new_empty((batch, layout.rows, layout.width), dtype=out_dtype)
    for x, sx, w, sw, b, s, c in zip(
        xs, x_scales, mat2s, w_scales, biases, streams, columns, strict=True
    ):
        tokens = x.shape[0] // batch
        first = layout.firsts[s]
        if w.shape[1] == layout.width and _scales_aligned(sx, tokens, batch):
            # A whole stream: each sample's rows are one contiguous [tokens, width] matrix of
            # `out`, written by the GEMM itself (bias in its epilogue).
            for i in range(batch):
                rows = slice(i * tokens, (i + 1) * tokens)
                torch._scaled_mm(
                    x[rows], w, scale_a=sx[rows], scale_b=sw, bias=b, out_dtype=out_dtype,
                    out=out[i, first : first + tokens],
                )  # fmt: skip
            continue
        # A column part (a stream projected by one linear per part), or a stream whose
        # samples' scales are misaligned: the GEMM cannot write strided rows, so its output
        # is copied in (only small streams are left unfused; SD3's 333 text tokens).
        part = torch._scaled_mm(x, w, scale_a=sx, scale_b=sw, bias=b, out_dtype=out_dtype)
        out[:, first : first + tokens, c : c + w.shape[1]] = part.view(batch, tokens, -1)
    return out


@joint_scaled_mm.register_fake
def _joint_scaled_mm_fake(
    xs: list[torch.Tensor],
    x_scales: list[torch.Tensor],
    mat2s: list[torch.Tensor],
    w_scales: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    streams: list[int],
    columns: list[int],
    batch: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    layout = _scaled_mm_layout(xs, mat2s, streams, columns, batch)
    return xs[0].new_empty((batch, layout.rows, layout.width), dtype=out_dtype)


# --------------------------------------------------------------------------------------
# Matching: chains of views from a linear to a concatenation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chain:
    """One tensor of a concatenation: ``views(getitem(split(linear), index))`` (a part of
    a fused projection) or ``views(linear)``, the views listed from the linear outwards."""

    linear: torch.fx.Node
    split: torch.fx.Node | None
    index: int | None
    views: tuple[torch.fx.Node, ...]

    @property
    def root(self) -> torch.fx.Node:
        """The node the views start from: the split's getitem, or the linear."""
        return self.views[0].args[0] if self.views else self.tensor  # type: ignore[return-value]

    @property
    def tensor(self) -> torch.fx.Node:
        """The concatenated node itself."""
        if self.views:
            return self.views[-1]
        return _getitem_of(self) if self.split is not None else self.linear


def _getitem_of(chain: _Chain) -> torch.fx.Node:
    assert chain.split is not None
    for user in chain.split.users:
        if user.target is operator.getitem and user.args[1] == chain.index:
            return user
    raise AssertionError("a matched chain's getitem is missing")


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


def _batch_of(view: torch.fx.Node) -> object:
    """The batch size ``view`` (a ``[batch, tokens, N]`` view of a flat GEMM output) was given:
    an int, or the graph node of a symbolic size; None when it is neither."""
    out = node_tensor(view)
    if out is None or out.dim() != 3:
        return None
    if isinstance(out.shape[0], int):
        return out.shape[0]
    sizes = view.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    batch = sizes[0] if len(sizes) == 3 else None
    value = node_value(batch) if isinstance(batch, torch.fx.Node) else None
    if isinstance(value, torch.SymInt) and same_size(value, out.shape[0]):
        return batch
    return None


def _scaled_mm_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``torch._scaled_mm`` whose ``[batch * tokens, N]`` output ``node`` views as
    ``[batch, tokens, N]`` (``Fp8Linear``'s traced forward), with row-wise scales, the bias
    in its epilogue and nothing else reading it; else None."""
    if not _is_view(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    mm = node.args[0]
    if mm.op != "call_function" or mm.target is not torch._scaled_mm or len(mm.users) != 1:
        return None
    if node_arg(mm, 5, "scale_result") is not None or node_arg(mm, 7, "use_fast_accum", False):
        return None
    if not isinstance(node_arg(mm, 6, "out_dtype"), torch.dtype):
        return None
    flat, out = node_tensor(mm), node_tensor(node)
    if flat is None or out is None or flat.dim() != 2 or out.dim() != 3:
        return None
    scales = [node_tensor(node_arg(mm, i, n)) for i, n in ((2, "scale_a"), (3, "scale_b"))]  # type: ignore[arg-type]
    if any(t is None or t.dim() != 2 for t in scales):
        return None  # tensor-wise scales: not the row-wise recipe
    if _batch_of(node) is None or not _same(out.shape[2], flat.shape[1]):
        return None
    return mm


def _is_projection(node: torch.fx.Node) -> bool:
    """A linear, or the ``[batch, tokens, N]`` view of an fp8 linear's ``_scaled_mm``."""
    if node.op == "call_function" and node.target is _LINEAR:
        return True
    return _scaled_mm_of(node) is not None


def _chain(tensor: object) -> _Chain | None:
    if not isinstance(tensor, torch.fx.Node):
        return None
    views: list[torch.fx.Node] = []
    node = tensor
    while _is_view(node) and _scaled_mm_of(node) is None:
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
        if _dim(node_arg(split, 2, "dim", 0), 3) != 2:  # type: ignore[arg-type]
            return None  # a split of the tokens, not of the features
        node = split.args[0]  # type: ignore[union-attr,assignment]
    if not isinstance(node, torch.fx.Node) or not _is_projection(node):
        return None
    out = node_tensor(node)
    if out is None or out.dim() != 3 or out.requires_grad:
        return None
    return _Chain(node, split, index, tuple(reversed(views)))  # type: ignore[arg-type]


def _same(a: object, b: object) -> bool:
    """Equal arguments (nodes by identity, sizes without guards)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return same_size(a, b)
    return a is b if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) else a == b


def _same_view(a: torch.fx.Node, b: torch.fx.Node) -> bool:
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
    views, or None when a view moves it into other dims."""
    axis = 1
    for view in chain.views:
        before, after = node_tensor(view.args[0]), node_tensor(view)  # type: ignore[arg-type]
        if before is None or after is None:
            return None
        name = view.target if view.op == "call_method" else view.target.__name__  # type: ignore[union-attr]
        if name in ("view", "reshape", "unflatten"):
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
    """The chains of a token-axis concatenation of same-width parts, viewed alike."""
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
    width = node_tensor(first.root).shape[-1]  # type: ignore[union-attr]
    for c in chains[1:]:
        assert c is not None
        if len(c.views) != len(first.views) or not all(
            _same_view(a, b) for a, b in zip(c.views, first.views, strict=True)
        ):
            return None
        if not _same(node_tensor(c.root).shape[-1], width):  # type: ignore[union-attr]
            return None
    axis = _token_axis(first)
    if axis is None or _dim(node_arg(cat, 1, "dim", 0), out.dim()) != axis:
        return None
    return chains  # type: ignore[return-value]


class _Entry(NamedTuple):
    """One GEMM of a joint buffer: its operands (``joint_linear``'s or, for an fp8 linear,
    ``joint_scaled_mm``'s per-entry arguments), stream and first column."""

    operands: tuple[object, ...]
    stream: int
    column: int
    fp8: bool


def _operands(projection: torch.fx.Node) -> tuple[object, ...]:
    """(input, weight, bias) of a linear; (x_fp8, scale_a, mat2, scale_b, bias) of an fp8
    linear's ``_scaled_mm``."""
    mm = _scaled_mm_of(projection)
    if mm is None:
        return tuple(node_arg(projection, i, n) for i, n in enumerate(("input", "weight", "bias")))
    names = ("self", "mat2", "scale_a", "scale_b", "bias")
    x, mat2, scale_a, scale_b, bias = (node_arg(mm, i, n) for i, n in enumerate(names))
    return x, scale_a, mat2, scale_b, bias


@dataclass
class _Group:
    """Concatenations that share projections (q, k, v of one attention), and how their
    streams are projected: per stream, one fused linear split into parts, or one linear
    per part."""

    members: list[tuple[torch.fx.Node, list[_Chain]]]
    widths: list[int]  # the parts' widths, in column order
    part_of: dict[torch.fx.Node, int]  # cat -> its part (columns) in the joint buffer


def _groups(graph: torch.fx.Graph) -> list[list[tuple[torch.fx.Node, list[_Chain]]]]:
    """Token-axis concatenations of projections, grouped where they share a linear."""
    found = [(n, c) for n in graph.nodes if (c := _cat_chains(n)) is not None]
    owner: dict[torch.fx.Node, int] = {}
    parent = list(range(len(found)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, (_, chains) in enumerate(found):
        for c in chains:
            if c.linear in owner:
                parent[root(i)] = root(owner[c.linear])
            owner[c.linear] = i
    groups: dict[int, list[tuple[torch.fx.Node, list[_Chain]]]] = {}
    for i, member in enumerate(found):
        groups.setdefault(root(i), []).append(member)
    return list(groups.values())


def _static_width(value: object) -> int | None:
    """The last size of a node's tensor (or of a tensor), when it is a plain int."""
    if isinstance(value, torch.fx.Node):
        value = node_tensor(value)
    size = value.shape[-1] if isinstance(value, torch.Tensor) else None
    return size if isinstance(size, int) else None


def _plan(members: list[tuple[torch.fx.Node, list[_Chain]]]) -> _Group | None:
    """The joint buffer's column parts for one group, or None when its streams do not
    line up (a stream fused differently across the group, parts of unequal widths)."""
    n = len(members[0][1])
    if any(len(chains) != n for _, chains in members):
        return None
    fused_widths: list[int] | None = None
    part_of: dict[torch.fx.Node, int] = {}
    for s in range(n):
        at = [chains[s] for _, chains in members]
        if all(c.split is not None for c in at):
            if len({c.split for c in at}) != 1 or len({c.index for c in at}) != len(at):
                return None
            parts = node_value(at[0].split)  # type: ignore[arg-type]
            if not isinstance(parts, (list, tuple)):
                return None
            widths = [_static_width(t) for t in parts]
            if None in widths:
                return None
            if fused_widths is not None and widths != fused_widths:
                return None
            fused_widths = widths  # type: ignore[assignment]
            for (cat, _), c in zip(members, at, strict=True):
                if part_of.setdefault(cat, c.index) != c.index:  # type: ignore[arg-type]
                    return None
        elif not all(c.split is None for c in at) or len({c.linear for c in at}) != len(at):
            return None
    if fused_widths is None:  # no stream fused: one part per concatenation
        if len(members) != 1:
            return None
        cat, chains = members[0]
        width = _static_width(chains[0].root)
        return None if width is None else _Group(members, [width], {cat: 0})
    if sorted(part_of.values()) != list(range(len(fused_widths))):
        return None  # a part of a fused projection that no concatenation takes
    for cat, chains in members:
        if any(_static_width(c.root) != fused_widths[part_of[cat]] for c in chains):
            return None
    return _Group(members, fused_widths, part_of)


def _entries(group: _Group) -> list[_Entry] | None:
    """The joint buffer's GEMMs, or None when they mix fp8 and other linears, or dtypes."""
    offsets = [sum(group.widths[:i]) for i in range(len(group.widths))]
    entries: list[_Entry] = []
    seen: set[torch.fx.Node] = set()
    for cat, chains in group.members:
        for s, c in enumerate(chains):
            if c.linear in seen:
                continue
            seen.add(c.linear)
            column = 0 if c.split is not None else offsets[group.part_of[cat]]
            fp8 = _scaled_mm_of(c.linear) is not None
            entries.append(_Entry(_operands(c.linear), s, column, fp8))
    kinds = {e.fp8 for e in entries}
    if len(kinds) != 1:
        return None
    if kinds == {True}:  # one output dtype, every bias in it (as cuBLASLt's epilogue adds)
        mms = [_scaled_mm_of(c.linear) for _, chains in group.members for c in chains]
        dtypes = {node_arg(mm, 6, "out_dtype") for mm in mms if mm is not None}
        biases = [node_tensor(e.operands[4]) for e in entries if e.operands[4] is not None]
        ok = len(dtypes) == 1 and all(b is not None and b.dtype in dtypes for b in biases)
        return entries if ok else None
    dtypes = set()
    for e in entries:
        for t in e.operands:
            if t is not None:
                value = node_tensor(t)
                if value is None:
                    return None
                dtypes.add(value.dtype)
    return entries if len(dtypes) == 1 else None


def _big_enough(group: _Group) -> bool:
    elements = 0
    for _, chains in group.members:
        for c in chains:
            hints = [size_hint(d) for d in node_tensor(c.root).shape]  # type: ignore[union-attr]
            if None in hints:
                return False
            elements += hints[0] * hints[1] * hints[2]  # type: ignore[operator]
    return elements >= MIN_ELEMENTS


def _covered(group: _Group) -> bool:
    """Nothing but the group's chains reads its linears (or their splits)."""
    reached: set[torch.fx.Node] = {cat for cat, _ in group.members}
    linears: set[torch.fx.Node] = set()
    for _, chains in group.members:
        for c in chains:
            linears.add(c.linear)
            reached.update(c.views)
            if c.split is not None:
                reached |= {c.split, _getitem_of(c)}
    for linear in linears:
        for user in linear.users:
            if user not in reached:
                return False
            if _is_split(user) and not all(u in reached for u in user.users):
                return False
    return True


def _rewrite(
    graph: torch.fx.Graph, group: _Group
) -> list[tuple[torch.fx.Node, torch.memory_format]] | None:
    """Rewrite one group; returns the nodes that replaced its concatenations with the
    layouts Dynamo recorded for those (None: left alone)."""
    entries = _entries(group)
    if entries is None:
        return None
    # A copy in the recorded layout is the fallback for a later view (layout_check): a
    # concatenation recorded in no dense layout could not get one.
    formats = [dense_format(node_tensor(cat)) for cat, _ in group.members]
    if any(f is None for f in formats):
        return None
    # The joint op goes before the first concatenation: every GEMM input must exist there
    # (a later stream may read a tensor computed after it).
    first = group.members[0][0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    for e in entries:
        for operand in e.operands:
            if isinstance(operand, torch.fx.Node) and order[operand] > order[first]:
                return None
    created: list[torch.fx.Node] = []
    replacements: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    # _groups lists each group's concatenations in graph order: the first is the earliest.
    per_operand = [list(column) for column in zip(*(e.operands for e in entries), strict=True)]
    streams, columns = [e.stream for e in entries], [e.column for e in entries]
    with graph.inserting_before(group.members[0][0]):
        if entries[0].fp8:
            first = group.members[0][1][0].linear
            mm = _scaled_mm_of(first)
            joint = graph.call_function(
                torch.ops.difforge.joint_scaled_mm.default,
                (
                    *per_operand, streams, columns,
                    _batch_of(first), node_arg(mm, 6, "out_dtype"),  # type: ignore[arg-type]
                ),
            )  # fmt: skip
        else:
            joint = graph.call_function(
                torch.ops.difforge.joint_linear.default, (*per_operand, streams, columns)
            )
        created.append(joint)
        split = None
        if len(group.widths) > 1:
            split = graph.call_function(torch.split, (joint, group.widths), {"dim": -1})
            created.append(split)
        for cat, chains in group.members:
            node = joint
            if split is not None:
                node = graph.call_function(operator.getitem, (split, group.part_of[cat]))
                created.append(node)
            for view in chains[0].views:
                node = graph.create_node(
                    view.op, view.target, (node, *view.args[1:]), dict(view.kwargs)
                )
                created.append(node)
            replacements.append((cat, node))
    ok = fill_example_values(created)
    for cat, new in replacements if ok else ():
        want, got = node_tensor(cat), node_tensor(new)
        ok = (
            ok
            and want is not None
            and got is not None
            and _same(tuple(want.shape), tuple(got.shape))
        )
    if not ok:
        for node in reversed(created):
            graph.erase_node(node)
        return None
    for cat, new in replacements:
        cat.replace_all_uses_with(new)
        graph.erase_node(cat)
    return [(new, fmt) for (_, new), fmt in zip(replacements, formats, strict=True)]


@register_pass("joint_linear", stage="fx", tier="optimize")
def fuse_joint_projections(graph: torch.fx.Graph) -> int:
    """cat(per-stream linears' views, tokens) -> views of one buffer the GEMMs write into."""
    made = 0
    for members in _groups(graph):
        group = _plan(members)
        if group is None or not _big_enough(group) or not _covered(group):
            continue
        before = set(graph.nodes)
        new = _rewrite(graph, group)
        if new is None:
            continue
        made += 1
        # Checked per group, so one attention that views q as dense (`q.view(B * H, S, D)`)
        # does not cost the others their copies; the GEMMs still write one buffer.
        outputs, formats = zip(*new, strict=True)
        layout_check.copy_where_views_fail(
            graph, before, list(outputs), list(formats), "joint_linear"
        )
    return made
