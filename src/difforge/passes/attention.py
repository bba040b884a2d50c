"""Route eligible ``scaled_dot_product_attention`` calls to difforge's 8-bit attention.

``attention_int8`` (``low-precision`` tier, opt-in with ``passes.attention_int8: true``;
O3 leaves it off because on an H100 the kernel lost to cuDNN at every DiT shape, 0.6x to
0.82x with its quantization, ``benchmarks/results/2026-11-26_h100_probe_int8attn.json``,
and measuring costs compile time): a call with no mask, no dropout, not
causal, half-precision 4-D q/k/v with one head dim (a multiple of 8, at most 128) and no
gradient becomes ``torch.ops.difforge.attention_int8`` in the tile that
:func:`difforge.kernels.attention_select.choose` picks, measured on this GPU against SDPA
(the ``attention.*`` options); where SDPA is faster the call is left alone. Calls with a
mask (PixArt's cross-attention to padded prompts) always stay SDPA.
"""

from __future__ import annotations

import torch
import torch.fx

from difforge.passes.registry import node_arg, node_tensor, register_pass, size_hint

_SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
)
_HALF = (torch.float16, torch.bfloat16)


def _eligible_shape(node: torch.fx.Node) -> object | None:
    """The call's :class:`AttentionShape`, or None when the 8-bit kernel must not take it."""
    from difforge.kernels.attention_select import AttentionShape

    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    if node_arg(node, 3, "attn_mask") is not None:
        return None
    dropout = node_arg(node, 4, "dropout_p", 0.0)
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return None
    if node_arg(node, 5, "is_causal", False) is not False:
        return None
    if node.kwargs.get("enable_gqa", False) is not False:
        return None
    scale = node_arg(node, 6, "scale")
    if scale is not None and not isinstance(scale, (int, float)):
        return None
    values = [node_tensor(a) for a in node.args[:3]]
    if len(values) != 3 or any(t is None for t in values):
        return None
    q, k, v = values
    if any(t.dim() != 4 or t.dtype != q.dtype or t.requires_grad for t in values):
        return None
    if q.dtype not in _HALF or q.device != k.device or k.device != v.device:
        return None
    d = q.shape[-1]
    if not isinstance(d, int) or d % 8 or d > 128 or k.shape[-1] != d or v.shape[-1] != d:
        return None
    sizes = [size_hint(s) for s in (*q.shape[:3], k.shape[2], *k.shape[:2], *v.shape[:3])]
    if any(s is None for s in sizes):
        return None
    b, h, sq, skv, kb, kh, vb, vh, vs = sizes
    if (kb, kh) != (b, h) or (vb, vh, vs) != (b, h, skv) or min(sq, skv) == 0:
        return None
    return AttentionShape(b, h, sq, skv, d, q.dtype, str(q.device))


@register_pass("attention_int8", stage="fx", tier="low-precision")
def attention_int8(graph: torch.fx.Graph) -> int:
    """SDPA -> difforge's 8-bit attention where measured faster on this GPU (attention.*)."""
    from difforge.kernels.attention_select import choose, current_policy, kernel_available

    calls = [(n, s) for n in list(graph.nodes) if (s := _eligible_shape(n)) is not None]
    calls = [(n, s) for n, s in calls if kernel_available(s.device)]  # type: ignore[attr-defined]
    if not calls:
        return 0
    from difforge.kernels.attention_int8 import _empty_out  # imports Triton, registers the op

    policy = current_policy()
    op = torch.ops.difforge.attention_int8.default
    made = 0
    for node, shape in calls:
        choice = choose(shape, policy)  # type: ignore[arg-type]
        if choice is None:
            continue
        q, k, v = node.args[:3]
        scale = node_arg(node, 6, "scale")
        with graph.inserting_before(node):
            new = graph.call_function(op, (q, k, v, scale, *choice.op_args()))
        fake_q = node_tensor(q)
        mode = getattr(fake_q, "fake_mode", None)
        if mode is not None:
            with mode:
                new.meta["example_value"] = _empty_out(fake_q)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        made += 1
    return made
