"""Split a linear over a concatenation into one GEMM per part, summed.

FLUX's single-stream blocks run attention and an MLP side by side and project both at once:
``proj_out(cat([attn, mlp], -1))``. Both parts come out of cuDNN and cuBLAS kernels, whose
outputs Inductor cannot write into a slice of a shared buffer, so it copies both into the
concatenation first: one ``[tokens, 15360]`` read and write per block, a bandwidth-bound
Triton kernel of 3.5 ms in FLUX.1-dev's 129 ms O2 step on an H100
(``benchmarks/results/2026-11-26_h100_step_o2_flux.json``, ``triton_poi_fused_cat_permute_view``).

``linear(cat([a, b], -1), W, bias)`` equals ``linear(a, W[:, :Ka]) + linear(b, W[:, Ka:], bias)``:
each GEMM reads its part where it lies and a column slice of the weight (a strided view, no
copy), and the sum fuses into the pointwise kernel that consumes the projection (FLUX: the
gate and the residual add). What it costs instead of the copy: each extra part's
``[tokens, N]`` output is written and read once, so the split is made only where the copy
moves more, ``K >= 2 (n - 1) N`` for ``n`` parts of ``K`` features in all and ``N`` outputs
(FLUX.1-dev: K = 15360, N = 3072), and only where the copy is large enough to matter next
to a kernel launch (:data:`MIN_COPY_ELEMENTS`; FLUX's timestep embedding, ``linear(cat([cos,
sin]))`` on one row, stays one GEMM).

Exactness: the same products, summed in another order; each part's GEMM output is rounded
to the model's dtype before the sum (one rounding more than a single GEMM's float32
accumulation), so it is exact up to floating-point reassociation, the ``optimize`` tier.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from difforge.passes.registry import (
    fill_example_values,
    node_arg,
    node_tensor,
    register_pass,
    size_hint,
)

_LINEAR = torch._C._nn.linear

#: Below this many elements (8 MiB in 16-bit; ~3 µs at an H100's bandwidth) the
#: concatenation's copy costs about what one more GEMM launch does: left alone.
MIN_COPY_ELEMENTS = 1 << 22


def _parts(cat: object) -> list[torch.fx.Node] | None:
    """The concatenated tensors when ``cat`` joins them along the last dim for ``linear``
    alone (anything else reads the concatenation: it is built anyway)."""
    if not isinstance(cat, torch.fx.Node) or cat.op != "call_function":
        return None
    if cat.target not in (torch.cat, torch.concat, torch.concatenate):
        return None
    if len(cat.users) != 1:
        return None
    tensors = node_arg(cat, 0, "tensors")
    out = node_tensor(cat)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or out is None:
        return None
    if node_arg(cat, 1, "dim", 0) not in (-1, out.dim() - 1):
        return None
    if not all(isinstance(t, torch.fx.Node) and node_tensor(t) is not None for t in tensors):
        return None
    return list(tensors)


def _static_width(node: torch.fx.Node) -> int | None:
    size = node_tensor(node).shape[-1]  # type: ignore[union-attr]
    return size if isinstance(size, int) else None


def _match(linear: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node, object] | None:
    """(parts, weight, bias) when ``linear`` projects a concatenation it pays to split."""
    if linear.op != "call_function" or linear.target is not _LINEAR:
        return None
    x, weight, bias = (node_arg(linear, i, n) for i, n in enumerate(("input", "weight", "bias")))
    parts = _parts(x)
    w = node_tensor(weight)
    if parts is None or w is None or w.dim() != 2:
        return None
    if any(node_tensor(p).dtype != w.dtype for p in parts):  # type: ignore[union-attr]
        return None  # the concatenation promoted a part: keep its single conversion
    widths = [_static_width(p) for p in parts]
    n_out, k = w.shape
    if any(width is None for width in widths) or not isinstance(k, int):
        return None
    if not isinstance(n_out, int) or sum(widths) != k:  # type: ignore[arg-type]
        return None
    if k < 2 * (len(parts) - 1) * n_out:  # the extra outputs would move more than the copy
        return None
    rows = 1
    for size in node_tensor(parts[0]).shape[:-1]:  # type: ignore[union-attr]
        hint = size_hint(size)
        if hint is None:
            return None
        rows *= hint
    if rows * k < MIN_COPY_ELEMENTS:
        return None
    return parts, weight, bias  # type: ignore[return-value]


@register_pass("split_cat_linear", stage="fx", tier="optimize")
def split_cat_linear(graph: torch.fx.Graph) -> int:
    """linear(cat([a, b], -1)) -> linear(a, W[:, :Ka]) + linear(b, W[:, Ka:], bias)."""
    made = 0
    for linear in list(graph.nodes):
        match = _match(linear)
        if match is None:
            continue
        parts, weight, bias = match
        cat = node_arg(linear, 0, "input")
        total: torch.fx.Node | None = None
        created: list[torch.fx.Node] = []
        start = 0
        with graph.inserting_before(linear):
            for i, part in enumerate(parts):
                width = _static_width(part)
                assert width is not None
                w_part = graph.call_function(torch.narrow, (weight, 1, start, width))
                # The bias goes with the last GEMM (cuBLAS adds it in the epilogue).
                b_part = bias if i == len(parts) - 1 else None
                out = graph.call_function(_LINEAR, (part, w_part, b_part))
                created += [w_part, out]
                if total is not None:
                    out = graph.call_function(operator.add, (total, out))
                    created.append(out)
                total = out
                start += width
        assert total is not None
        fill_example_values(created[:-1])
        total.meta.update(linear.meta)
        linear.replace_all_uses_with(total)
        graph.erase_node(linear)
        graph.erase_node(cat)  # type: ignore[arg-type]
        made += 1
    return made
