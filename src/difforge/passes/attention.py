"""Rewrites of ``scaled_dot_product_attention`` calls.

``attention_wide_heads`` (``optimize`` tier, O2/O3): on CUDA, a call whose head dim is above
256 has no flash or cuDNN kernel; SDPA runs PyTorch's memory-efficient kernel, which reached
~120 TFLOP/s on an H100 for the SD/SDXL VAE's mid-block attention (one head of 512 over
128x128 = 16384 latent pixels at a 1024² decode: 4.6 ms of a 39 ms decode). Where the score
matrix of one sample is small enough (``attention.wide_max_score_bytes``) the call becomes two
GEMMs around a float32 softmax, as diffusers' classic ``AttnProcessor`` computes it: scores in
the input dtype (fp32 accumulation), softmax in float32, probabilities cast back for the second
GEMM.
With symbolic sizes (``dynamic: true``) the rewritten call checks the cap itself, which the
trace turns into a guard: a resolution past it recompiles to SDPA (an H100 SDXL VAE decode
at 1024², dynamic, without this: 4.5 ms in the memory-efficient kernel).

``attention_int8`` (``low-precision`` tier, opt-in with ``passes.attention_int8: true``;
O3 leaves it off: on an H100 the kernel alone beats cuDNN at PixArt's head dim 72 (1.29x)
and FLUX's 128 (1.10x) and ties at 64, and forced into PixArt-XL's O3 step the quantization
cost more than the kernel saved, 30.88 vs 30.26 ms,
``benchmarks/results/2026-11-27_h100_step_attn_always_pixart_s13.json``; measuring also
costs compile time): a call with no mask, no dropout, not causal, half-precision 4-D
q/k/v with one head dim (a multiple of 8, at most 128) and no
gradient becomes :func:`difforge.kernels.attention_int8.attention_int8_fused` (the
quantization in torch ops, which Inductor fuses into the producers of q, k and v, then
``torch.ops.difforge.attention_int8_prepared``) in the tile that
:func:`difforge.kernels.attention_select.choose` picks, measured on this GPU against SDPA
(the ``attention.*`` options); where SDPA is faster the call is left alone. Calls with a
mask (PixArt's cross-attention to padded prompts) always stay SDPA.

``attention_hopper`` (``optimize`` tier, opt-in with ``passes.attention_hopper: true``; no
preset enables it until a whole step is measured with it): on a Hopper GPU, a plain SDPA
call (as above) of self-attention whose q/k/v TMA can read in place becomes
``torch.ops.difforge.attention_hopper``, the exact warp-specialized Gluon attention
(:mod:`difforge.kernels.attention_hopper_ws`), where
:func:`difforge.kernels.attention_hopper_select.choose` times it faster than SDPA on this GPU
(H200: 1.19x cuDNN at PixArt-XL's head dim 72, slower at 64 and 128; PixArt-XL-2's O2
step 30.78 -> 28.72 ms, ``benchmarks/results/2026-11-29_h200_step_hopper_pixart_s30.json``).
"""

from __future__ import annotations

import torch
import torch.fx

from difforge.kernels import token_major_empty

# Importing the kernel module registers the ops this pass inserts (torch.ops.difforge.*), so
# a graph stored with one of them (the compile cache, cache.precompile) loads in a new process.
from difforge.kernels.attention_hopper_ws import _attention_hopper_op  # noqa: F401 (registers)
from difforge.kernels.attention_int8 import attention_int8_fused
from difforge.passes.registry import (
    cacheable_target,
    node_arg,
    node_tensor,
    register_pass,
    replace_with_call,
    size_hint,
)

_SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
)
_HALF = (torch.float16, torch.bfloat16)


def _plain_sdpa(node: torch.fx.Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The fake (q, k, v) of an SDPA call with no mask, no dropout, not causal, no GQA, a
    constant scale and half-precision 4-D inputs of one dtype on one device; else None."""
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
    if any(t.dim() != 4 or t.dtype != q.dtype for t in values):
        return None
    if q.dtype not in _HALF or q.device != k.device or k.device != v.device:
        return None
    return q, k, v


def _eligible_shape(node: torch.fx.Node) -> object | None:
    """The call's :class:`AttentionShape` (sizes judged by their hints), or None when neither
    of difforge's attention kernels may take it."""
    from difforge.kernels.attention_select import AttentionShape

    tensors = _plain_sdpa(node)
    if tensors is None or any(t.requires_grad for t in tensors):
        return None
    q, k, v = tensors
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


#: Head dims above this have no flash or cuDNN SDPA kernel (PyTorch 2.9-2.13 on sm80/sm90).
WIDE_HEAD_DIM = 256
#: Devices where SDPA falls back to the memory-efficient kernel for wide heads. Not the CPU:
#: its flash kernel takes any head dim.
WIDE_DEVICES: tuple[str, ...] = ("cuda",)


@cacheable_target
def attention_by_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v``: two GEMMs in the inputs' dtype, the softmax in float32."""
    scores = torch.matmul(q, k.transpose(-2, -1))
    probs = torch.softmax(scores.float() * scale, dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


@cacheable_target
def attention_by_matmul_within(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_score_bytes: int
) -> torch.Tensor:
    """:func:`attention_by_matmul` while one sample's score matrix fits ``max_score_bytes``,
    else SDPA. For symbolic sizes (``dynamic: true``): tracing decides the branch at the
    traced size and guards on it, so a resolution past the cap recompiles (reported)
    instead of allocating an unbounded score matrix. The batch is not part of the test, so
    a batch change never recompiles here."""
    _, h, sq, _ = q.shape
    if h * sq * k.shape[2] * q.element_size() <= max_score_bytes:
        return attention_by_matmul(q, k, v, scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


def _wide_heads_call(node: torch.fx.Node, max_score_bytes: int) -> tuple[float, bool] | None:
    """(softmax scale, whether the sizes are static) when ``node`` is an SDPA call to
    rewrite into GEMMs, else None."""
    tensors = _plain_sdpa(node)
    if tensors is None:
        return None
    q, k, v = tensors
    if q.device.type not in WIDE_DEVICES:
        return None
    d = q.shape[-1]
    if not isinstance(d, int) or d <= WIDE_HEAD_DIM or k.shape[-1] != d:
        return None
    if tuple(v.shape[:3]) != tuple(k.shape[:3]) or tuple(q.shape[:2]) != tuple(k.shape[:2]):
        return None  # broadcast batch/heads: leave it to SDPA
    # A symbolic size is judged by its hint here; the call then checks the bound itself
    # (attention_by_matmul_within), so sizes past the cap get SDPA, never a huge matrix.
    shape = (*q.shape[:3], k.shape[2])
    sizes = [size_hint(s) for s in shape]
    if any(s is None for s in sizes):
        return None
    _, h, sq, skv = sizes
    if h * sq * skv * q.element_size() > max_score_bytes:  # per sample (see the option)
        return None
    scale = node_arg(node, 6, "scale")
    static = all(isinstance(s, int) for s in shape)
    return (float(scale) if scale is not None else d**-0.5), static


@register_pass("attention_wide_heads", stage="fx", tier="optimize")
def attention_wide_heads(graph: torch.fx.Graph) -> int:
    """SDPA with head dim > 256 (no flash/cuDNN kernel) -> GEMM, float32 softmax, GEMM."""
    from difforge.kernels.attention_select import current_policy

    max_bytes = current_policy().wide_max_score_bytes
    made = 0
    for node in list(graph.nodes):
        call = _wide_heads_call(node, max_bytes)
        if call is None:
            continue
        scale, static = call
        if static:
            replace_with_call(graph, node, attention_by_matmul, (*node.args[:3], scale))
        else:
            args = (*node.args[:3], scale, max_bytes)
            replace_with_call(graph, node, attention_by_matmul_within, args)
        made += 1
    return made


@register_pass("attention_int8", stage="fx", tier="low-precision")
def attention_int8(graph: torch.fx.Graph) -> int:
    """SDPA -> difforge's 8-bit attention where measured faster on this GPU (attention.*)."""
    from difforge.kernels.attention_select import choose, current_policy, kernel_available

    calls = [(n, s) for n in list(graph.nodes) if (s := _eligible_shape(n)) is not None]
    calls = [(n, s) for n, s in calls if kernel_available(s.device)]  # type: ignore[attr-defined]
    if not calls:
        return 0
    policy = current_policy()
    made = 0
    for node, shape in calls:
        choice = choose(shape, policy)  # type: ignore[arg-type]
        if choice is None:
            continue
        scale = node_arg(node, 6, "scale")
        _swap_attention(graph, node, attention_int8_fused, (scale, *choice.op_args()))
        made += 1
    return made


def _swap_attention(
    graph: torch.fx.Graph, node: torch.fx.Node, target: object, extra: tuple[object, ...]
) -> None:
    """Replace the SDPA ``node`` by ``target(q, k, v, *extra)``, whose output (fake value
    included) is laid out as ``[B, Sq, H, D]`` like SDPA's flash kernels'."""
    q, k, v = node.args[:3]
    with graph.inserting_before(node):
        new = graph.call_function(target, (q, k, v, *extra))  # type: ignore[arg-type]
    fake_q = node_tensor(q)
    mode = getattr(fake_q, "fake_mode", None)
    if mode is not None:
        with mode:
            new.meta["example_value"] = token_major_empty(fake_q)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _static_tma_operands(node: torch.fx.Node) -> bool:
    """Whether the call's fake q/k/v have static sizes and strides (no dynamic-shape
    graph: the kernel's block multiples would need guards) that TMA can read in place."""
    from difforge.kernels.attention_hopper import tma_readable

    for a in node.args[:3]:
        t = node_tensor(a)
        if t is None:
            return False
        dims = (*t.shape, *t.stride(), t.storage_offset())
        if not all(isinstance(x, int) for x in dims):
            return False
        if not tma_readable(tuple(t.shape), t.stride(), t.storage_offset(), t.element_size()):
            return False
    return True


@register_pass("attention_hopper", stage="fx", tier="optimize")
def attention_hopper(graph: torch.fx.Graph) -> int:
    """SDPA -> difforge's Gluon attention on Hopper where measured faster (opt-in)."""
    from difforge.kernels.attention_hopper_select import available, choose
    from difforge.kernels.attention_select import current_policy

    policy = current_policy()
    made = 0
    for node in list(graph.nodes):
        shape = _eligible_shape(node)
        if shape is None or not available(shape.device):  # type: ignore[attr-defined]
            continue
        scale = node_arg(node, 6, "scale")
        if scale is not None and not scale > 0:  # the kernels take a positive scale only
            continue
        if not _static_tma_operands(node):
            continue
        tile = choose(shape, policy)  # type: ignore[arg-type]
        if tile is None:
            continue
        _swap_attention(graph, node, torch.ops.difforge.attention_hopper.default, (scale, *tile))
        made += 1
    return made
