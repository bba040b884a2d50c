"""Per-head RMSNorm + rotary embedding (RoPE) of attention's q or k in one Triton kernel.

FLUX.1's attention normalises q and k per head (``RMSNorm(head_dim)``), then rotates each
pair of channels ``(2i, 2i+1)`` by the token's angle (diffusers' ``apply_rotary_emb`` with
``use_real_unbind_dim=-1``); its double blocks concatenate the text tokens' q (own norm
weights) before the image tokens' first. Inductor compiles a single block's pair into a
looped reduction that passes over each head's 128 values three times: 0.084 ms a call in
the block, ~0.12 ms in a whole step's profile, where the bytes need ~0.03 ms
(H100/H200, ``benchmarks/results/2026-11-27_h100_diag_flux_single_block_s12.json``,
``2026-11-28_h200_step_catquant_flux_s22.json``). Here one program takes one token's heads
(a ``[BLOCK_H, D]`` tile): the sum of squares, the weight, the rounding to the input dtype
the graph does between the norm and the rotation, the rotation of each pair (a split of
the tile into even and odd channels), one store. Not yet measured on a GPU: the
``rms_norm_rope`` pass that inserts it is opt-in until ``probe_ops.py --probes rope`` and a
FLUX step say it pays.

The value is the composite's up to float32 rounding (``rsqrt`` and the summation order;
Inductor's kernel has the same freedom), rounded once to the input dtype at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from difforge.inference_only import InferenceOnlyError, register_inference_only
from difforge.kernels import last_dim_dense

__all__ = ["KERNEL_DTYPES", "rms_norm_rope_reference", "rms_norm_rope_triton"]

#: The dtypes the kernel reads and writes (one for every part and the output).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Heads one program takes: a 8 x 128 tile, 2 KB of bf16 in, 2 KB out.
_BLOCK_H = 8
_NUM_WARPS = 4


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xb, stride_xs, stride_xh, stride_cb, stride_cs, stride_sb, stride_ss,
    stride_ob, stride_os, stride_oh, S, H, row0, eps,
    D: tl.constexpr, BLOCK_H: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    # One token (of part x, whose tokens start at row0 of the output and of cos/sin) and
    # BLOCK_H of its heads.
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token - b * S
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    cols = tl.arange(0, D)
    mask = (heads < H)[:, None]
    x_in = tl.load(
        x_ptr + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh + cols[None, :],
        mask=mask,
        other=0.0,
    )
    x = x_in.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols).to(tl.float32)[None, :]
    # The graph rounds the norm's output to its dtype before the rotation reads it.
    y = y.to(x_in.dtype).to(tl.float32)
    joined = row0 + s  # the token's index in the joined sequence: its angle and output row
    cos = tl.load(cos_ptr + b * stride_cb + joined * stride_cs + cols).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_sb + joined * stride_ss + cols).to(tl.float32)
    y_even, y_odd = tl.split(tl.reshape(y, (BLOCK_H, D // 2, 2)))
    cos_even, cos_odd = tl.split(tl.reshape(cos, (D // 2, 2)))
    sin_even, sin_odd = tl.split(tl.reshape(sin, (D // 2, 2)))
    # out = y * cos + rotated(y) * sin, rotated = (-y_odd, y_even) per pair.
    out_even = y_even * cos_even[None, :] + (-y_odd) * sin_even[None, :]
    out_odd = y_odd * cos_odd[None, :] + y_even * sin_odd[None, :]
    out = tl.reshape(tl.join(out_even, out_odd), (BLOCK_H, D))
    dest = out_ptr + b * stride_ob + joined * stride_os + heads[:, None] * stride_oh
    tl.store(dest + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _angles(t: torch.Tensor, b: int, s: int, d: int) -> tuple[torch.Tensor, int, int]:
    """``cos`` or ``sin`` as ``(tensor, batch stride, token stride)``: ``[S, D]``, or
    ``[1 or B, S, 1, D]`` as diffusers broadcasts it; the last stride made 1."""
    if t.dim() == 2 and t.shape == (s, d):
        t = last_dim_dense(t)
        return t, 0, t.stride(0)
    if t.dim() == 4 and t.shape[0] in (1, b) and t.shape[1:] == (s, 1, d):
        t = last_dim_dense(t)
        return t, (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)
    raise ValueError(
        f"rms_norm_rope: cos and sin must be [S, D] or [1|B, S, 1, D] with S={s}, D={d}, "
        f"got {tuple(t.shape)}"
    )


def _check(parts: list[torch.Tensor], weights: list[torch.Tensor | None]) -> None:
    if not parts or len(parts) != len(weights):
        raise ValueError(
            f"rms_norm_rope: one weight (or None) per part, got {len(parts)} parts and "
            f"{len(weights)} weights"
        )
    first = parts[0]
    b, _, h, d = first.shape if first.dim() == 4 else (0, 0, 0, 0)
    for p in parts:
        if p.dim() != 4 or (p.shape[0], p.shape[2], p.shape[3]) != (b, h, d):
            raise ValueError(
                "rms_norm_rope: parts are [B, S_i, H, D] with one B, H, D, got "
                f"{[tuple(p.shape) for p in parts]}"
            )
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError("rms_norm_rope: parts must share dtype and device")
    if d < 2 or d & (d - 1):
        raise ValueError(f"rms_norm_rope: the head dim must be a power of two >= 2, got {d}")
    for w in weights:
        if w is not None and w.shape != (d,):
            raise ValueError(f"rms_norm_rope: weights are [D] = [{d}], got {tuple(w.shape)}")


def rms_norm_rope_reference(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """The composite, as diffusers writes it: ``F.rms_norm`` per part, the parts joined
    along tokens, then ``apply_rotary_emb(..., use_real_unbind_dim=-1)``."""
    normed = [F.rms_norm(p, (p.shape[-1],), w, eps) for p, w in zip(parts, weights, strict=True)]
    y = torch.cat(normed, dim=1) if len(normed) > 1 else normed[0]
    if cos.dim() == 2:
        cos, sin = cos[None, :, None], sin[None, :, None]
    real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (y.float() * cos + rotated.float() * sin).to(y.dtype)


def rms_norm_rope_triton(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """:func:`rms_norm_rope_reference` in one Triton launch per part. ``parts`` are
    ``[B, S_i, H, D]`` (any strides with the last 1, such as a fused projection's column
    slice), ``weights`` ``[D]`` or None, ``cos``/``sin`` per token of the joined sequence.
    Returns ``[B, sum S_i, H, D]``, contiguous."""
    _check(parts, weights)
    first = parts[0]
    if first.dtype not in KERNEL_DTYPES:
        raise ValueError(f"rms_norm_rope: float16/bfloat16/float32, got {first.dtype}")
    b, _, h, d = first.shape
    s_total = sum(p.shape[1] for p in parts)
    cos_t, cos_b, cos_s = _angles(cos, b, s_total, d)
    sin_t, sin_b, sin_s = _angles(sin, b, s_total, d)
    out = torch.empty((b, s_total, h, d), dtype=first.dtype, device=first.device)
    row0 = 0
    for part, weight in zip(parts, weights, strict=True):
        x = last_dim_dense(part)
        s = x.shape[1]
        if b * s:
            w = weight.contiguous() if weight is not None else x  # x: unused when HAS_W false
            grid = (b * s, triton.cdiv(h, _BLOCK_H))
            _rms_norm_rope_kernel[grid](
                x, w, cos_t, sin_t, out, x.stride(0), x.stride(1), x.stride(2), cos_b, cos_s,
                sin_b, sin_s, out.stride(0), out.stride(1), out.stride(2), s, h, row0, eps,
                D=d, BLOCK_H=_BLOCK_H, HAS_W=weight is not None, num_warps=_NUM_WARPS,
            )  # fmt: skip
        row0 += s
    return out


@torch.library.custom_op("difforge::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """``torch.ops.difforge.rms_norm_rope``: one opaque graph node."""
    _refuse_hidden_weight_grad(weights)
    return rms_norm_rope_triton(list(parts), list(weights), eps, cos, sin)


def _refuse_hidden_weight_grad(weights: list[torch.Tensor | None]) -> None:
    """Raise where autograd cannot see that a weight needs a gradient.

    torch's custom-op autograd asks ``_any_requires_grad`` of the arguments, which answers
    False for a list holding a None (``[w, None]``) whatever ``w`` is. With no other input
    needing a gradient the op then runs outside autograd: its output needs no gradient and
    a backward silently gives ``w`` none. The implementations run with grad mode on only
    on that path (the autograd path runs them under no_grad), so this fires exactly there.
    """
    if not torch.is_grad_enabled() or all(w is not None for w in weights):
        return
    if any(w is not None and w.requires_grad for w in weights):
        raise InferenceOnlyError(
            "difforge::rms_norm_rope: a weight requires grad and another weight is None: "
            "torch's custom-op autograd cannot see the first through the list, so its "
            "gradient would be silently lost; call it under torch.no_grad() (the kernel has "
            "no backward)"
        )


@_rms_norm_rope_op.register_fake
def _rms_norm_rope_fake(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor | None],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    _check(list(parts), list(weights))
    _refuse_hidden_weight_grad(weights)
    b, _, h, d = parts[0].shape
    return parts[0].new_empty((b, sum(p.shape[1] for p in parts), h, d))


# The rms_norm_rope pass declines graphs whose q/k need a gradient; a direct caller's
# backward raises instead of getting silently wrong gradients.
register_inference_only(
    _rms_norm_rope_op,
    "difforge::rms_norm_rope",
    "call it under torch.no_grad() (the `rms_norm_rope` pass leaves graphs that need "
    "gradients alone)",
)
