"""fp8 (e4m3fn) dynamic quantization of linear layers: scales, the GEMM op, ``Fp8Linear``.

Recipe ("rowwise", as torchao's float8 rowwise): weights get one float32 scale per output
channel, computed once; activations get one float32 scale per row (token), computed on
every call. ``y = (x_fp8 * sx[:, None]) @ (w_fp8 * sw[:, None]).T + bias``.

Numerics, stated once: e4m3fn keeps 3 mantissa bits, so each element carries a relative
rounding error of at most 2**-4 (6.25 %); a dot product averages these, giving an output
relative error of roughly 2-4 % against float32 for random data (measured in
``tests/quant/test_fp8.py``). Absmax scaling maps each row's largest magnitude to 448
(the e4m3fn maximum) so nothing saturates; values below ``448 * 2**-9`` of a row's
absmax fall into subnormals or flush to zero.

Two implementations of the same function:

* ``traceable`` (:func:`fp8_linear_traceable`, what :class:`Fp8Linear` runs under
  ``torch.compile``): plain torch ops only, row absmax in float32, divide, clamp ±448,
  cast to e4m3fn, then ``torch._scaled_mm`` with row-wise scales (or, where there is no
  fp8 GEMM, the float32 dequantize-then-matmul reference). Inductor sees every step, so
  it fuses the activation quantization into the kernel that produced the activation
  (LayerNorm + modulation, GELU): the measured reason this exists is that a separate
  quantization kernel costs 0.05-0.08 ms per PixArt GEMM on an H200 and turns the fp8
  GEMM's 1.24-1.6x into 0.66-0.91x (``benchmarks/results/2026-11-26_h200_probe_ops.json``).
* ``op`` (:func:`fp8_linear`, what :class:`Fp8Linear` runs eagerly): the GEMM is the
  opaque custom op ``difforge::fp8_linear``, which also handles stacks whose rowwise
  kernel rejects an output dtype at run time.

Both compute ``bias + (x_fp8 * sx) @ (w_fp8 * sw).T`` with float32 accumulation: the same
numbers up to accumulation order (the reference is slow: for tests and old GPUs).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from difforge.inference_only import guard_detached_input, register_inference_only
from difforge.passes.activation import gelu_tanh_float

log = logging.getLogger("difforge.quant")

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_EPS",
    "Fp8Linear",
    "dequantize",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_linear_traceable",
    "quantize_cat_rows",
    "quantize_gelu_rows",
    "quantize_rows",
    "quantize_weight",
    "scaled_mm_available",
]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn magnitude. e4m3fn has no infinity: a cast of anything larger is
#: NaN on some backends (CUDA) and saturates on others (the 2.13 CPU build), so we clamp.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
#: Floor of a row's absmax before it becomes a scale. An all-zero row then gets scale
#: ``SCALE_EPS / FP8_MAX`` (not 0), so ``0 / scale`` is an exact 0, never NaN; rows whose
#: absmax is below it are quantized relative to 1e-12 (they are noise against any real
#: activation, and their relative precision is what we give up).
SCALE_EPS = 1e-12
#: _scaled_mm on CUDA needs K and N to be multiples of 16 (cuBLASLt / CUTLASS alignment).
ALIGNMENT = 16


def _absmax_scale(t: torch.Tensor) -> torch.Tensor:
    """Per-row scale ``max(|row|, eps) / 448`` in float32, shape ``[rows]``."""
    amax = t.float().abs().amax(dim=-1)
    return amax.clamp_min(SCALE_EPS) / FP8_MAX


def _to_fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * (1 / scale)[:, None]`` in float32, clamped to ±448, cast (round to nearest even)."""
    # One division per row, then a multiply per element: the per-element float32 division
    # is a multi-instruction sequence on the GPU, and the quantization kernels Inductor
    # fuses (LayerNorm or GELU + row absmax + cast) are compute-bound on an H100/H200. The
    # clamp only bites on rounding (|t| <= amax by construction), but it makes the cast
    # saturating on every backend, whatever its own out-of-range rule.
    return (t.float() * scale.reciprocal()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an ``[out, in]`` weight per output channel: ``(w_fp8, scale)``.

    ``w_fp8`` is ``[out, in]`` float8_e4m3fn (row-major, so ``w_fp8.t()`` is the
    column-major second operand ``_scaled_mm`` wants), ``scale`` is ``[out]`` float32 with
    ``weight ≈ w_fp8.float() * scale[:, None]``. Risk: 3 mantissa bits per element; one
    outlier channel costs only its own row's precision.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D [out, in] weight, got {weight.shape}")
    scale = _absmax_scale(weight)
    return _to_fp8(weight, scale), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per row (token) dynamically: ``(x_fp8, scale)``.

    ``x`` is ``[M, K]`` of any float dtype; the absmax and the division run in float32
    (an fp16 absmax / 448 could underflow for small rows). ``scale`` is ``[M]`` float32.
    Risk: a row with one huge outlier coarsens the rest of that row only.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D [M, K] tensor, got {x.shape}")
    scale = _absmax_scale(x)
    return _to_fp8(x, scale), scale


#: A little above the largest magnitude the tanh GELU takes for negative inputs
#: (0.170041 at x = -0.7525): the floor of :func:`quantize_cat_rows`' GELU bound.
GELU_NEGATIVE_BOUND = 0.1701


def quantize_cat_rows(
    parts: list[torch.Tensor], gelu: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``cat([gelu(p) if g else p for p, g in ...], dim=-1)``,
    evaluating each GELU once per element.

    A row's absmax of ``gelu(y)`` (tanh form) is bounded by ``max(gelu(max(y)), 0.1701)``:
    the GELU rises monotonically above -0.75 and never drops below -0.17004. That bound
    needs only the row max of ``y`` (one cheap pass), where the exact absmax computes the
    GELU in the absmax pass and again when scaling, which made the fused kernel
    compute-bound (H200, PixArt FF1 output: 120 us against ~35 us to read the data twice).
    Parts without GELU contribute their exact absmax (FLUX's single blocks quantize
    ``cat([attention, gelu(mlp)])``). The bound is the exact absmax whenever a GELU part
    reaches 0.1701 (every FF activation we measured); a row that stays below it gets a
    coarser scale, never saturation. ``parts`` are 2-D ``[M, K_i]``.
    """
    if len(parts) != len(gelu) or not parts:
        raise ValueError("quantize_cat_rows: one gelu flag per part, at least one part")
    if any(p.dim() != 2 for p in parts):
        raise ValueError(
            f"quantize_cat_rows expects 2-D [M, K] parts, got {[p.shape for p in parts]}"
        )
    bounds = [
        gelu_tanh_float(p.amax(dim=-1)).clamp_min(GELU_NEGATIVE_BOUND)
        if g
        else p.float().abs().amax(dim=-1)
        for p, g in zip(parts, gelu, strict=True)
    ]
    bound = bounds[0]
    for other in bounds[1:]:
        bound = torch.maximum(bound, other)
    scale = bound.clamp_min(SCALE_EPS) / FP8_MAX
    values = [gelu_tanh_float(p) if g else p.float() for p, g in zip(parts, gelu, strict=True)]
    return _to_fp8(values[0] if len(values) == 1 else torch.cat(values, dim=-1), scale), scale


def quantize_gelu_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``gelu(y, approximate="tanh")`` with the GELU evaluated once
    per element (the one-part case of :func:`quantize_cat_rows`, which says how)."""
    if y.dim() != 2:
        raise ValueError(f"quantize_gelu_rows expects a 2-D [M, K] tensor, got {y.shape}")
    return quantize_cat_rows([y], [True])


# The row quantizers as CompositeImplicitAutograd ops: one node each in the Dynamo graph
# (so difforge.passes.quant_fusion can find the quantization of a GELU output), and plain
# ATen ops again once AOTAutograd decomposes them, so Inductor still fuses them into the
# producing kernel. (`torch.library.custom_op` would make them opaque to Inductor.)
_LIB = torch.library.Library("difforge", "FRAGMENT")
_LIB.define("fp8_quantize_rows(Tensor x) -> (Tensor, Tensor)")
_LIB.define("fp8_quantize_cat_rows(Tensor[] parts, bool[] gelu) -> (Tensor, Tensor)")
_LIB.impl("fp8_quantize_rows", quantize_rows, "CompositeImplicitAutograd")
_LIB.impl("fp8_quantize_cat_rows", quantize_cat_rows, "CompositeImplicitAutograd")


def dequantize(t_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``t_fp8 * scale[:, None]``: the inverse of the two quantizers above."""
    return t_fp8.float() * scale[:, None]


def fp8_linear_reference(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The op in plain torch: dequantize both sides, float32 matmul and bias, then cast."""
    out = dequantize(x_fp8, x_scale) @ dequantize(w_fp8, w_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@functools.cache
def _capability_ok(device_index: int) -> bool:
    if torch.version.hip is not None:  # ROCm uses the fnuz fp8 variants: not supported
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def scaled_mm_available(device: torch.device) -> bool:
    """Whether the op takes the ``torch._scaled_mm`` path on ``device``."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_ok(index)


#: Output dtypes the rowwise kernel rejected on this process's CUDA stack (older torch's
#: CUTLASS rowwise kernel only writes bf16; cuBLAS on sm90 also writes fp16 and fp32).
_REJECTED_OUT_DTYPES: set[torch.dtype] = set()


def _scaled_mm_linear(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``torch._scaled_mm`` with row-wise scales: ``[M, 1]`` and ``[1, N]`` float32,
    contiguous; the second operand column-major (``w_fp8.t()`` of a row-major weight)."""
    scale_a = x_scale.float().reshape(-1, 1).contiguous()
    scale_b = w_scale.float().reshape(1, -1).contiguous()
    if bias is not None:
        bias = bias.to(out_dtype)
    if out_dtype not in _REJECTED_OUT_DTYPES:
        try:
            return torch._scaled_mm(
                x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype
            )
        except (RuntimeError, ValueError) as err:
            if "row-wise" not in str(err) or out_dtype == torch.bfloat16:
                raise
            _REJECTED_OUT_DTYPES.add(out_dtype)
            log.warning(
                "difforge: rowwise fp8 GEMM cannot write %s on this stack (%s); "
                "computing in bfloat16 and casting",
                out_dtype,
                err,
            )
    # bf16 output carries 8 mantissa bits, far finer than fp8's 3: the extra rounding is
    # negligible next to the quantization error. The bias is added after the cast.
    out = torch._scaled_mm(
        x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
    ).to(out_dtype)
    return out if bias is None else out + bias


@torch.library.custom_op("difforge::fp8_linear", mutates_args=())
def fp8_linear_op(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``[M, K] fp8 x [N, K] fp8 -> [M, N] out_dtype`` with row-wise scales (opaque to
    Dynamo/Inductor: one node, no graph break)."""
    if scaled_mm_available(x_fp8.device):
        return _scaled_mm_linear(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    return fp8_linear_reference(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)


@fp8_linear_op.register_fake
def _(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    torch._check(x_fp8.dim() == 2 and w_fp8.dim() == 2, lambda: "fp8_linear: 2-D operands")
    torch._check(x_fp8.shape[1] == w_fp8.shape[1], lambda: "fp8_linear: K mismatch")
    return x_fp8.new_empty((x_fp8.shape[0], w_fp8.shape[0]), dtype=out_dtype)


# Inference only: a model whose parameters require grad still traces, and a backward
# through the op raises (difforge.inference_only says why not "no gradient").
register_inference_only(fp8_linear_op, "an fp8 linear (`quant.fp8_linear`)")


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with an fp8 weight: quantizes ``x`` per row, then the fp8 GEMM.

    ``x`` is ``[..., K]``; the result is ``[..., N]`` in ``x.dtype``. Leading dimensions
    are flattened into rows (each token gets its own scale).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_fp8, x_scale = quantize_rows(x2)
    out = torch.ops.difforge.fp8_linear(x_fp8, x_scale, w_fp8, w_scale, bias, x.dtype)
    return out.reshape(*lead, w_fp8.shape[0])


def rowwise_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the rowwise ``_scaled_mm`` writes ``dtype`` directly on ``device``.

    Probed once per (device, dtype) with a 16x16 GEMM, eagerly (never inside a trace):
    :class:`Fp8Linear` asks at construction/move time and stores the answer, so its
    compiled forward branches on a Python constant.
    """
    if not scaled_mm_available(device) or dtype == torch.bfloat16:
        return True
    if dtype in _REJECTED_OUT_DTYPES:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_out_dtype(index, dtype)


@functools.cache
def _probe_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    device = torch.device("cuda", device_index)
    a = torch.ones(16, 16, device=device).to(FP8_DTYPE)
    ones = torch.ones(16, device=device)
    _scaled_mm_linear(a, ones, a, ones, None, dtype)  # adds dtype to the set if rejected
    return dtype not in _REJECTED_OUT_DTYPES


def fp8_linear_traceable(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaled_mm: bool,
    direct_out_dtype: bool = True,
) -> torch.Tensor:
    """:func:`fp8_linear` in plain torch ops, so Inductor can fuse the quantization.

    ``scaled_mm``: use ``torch._scaled_mm`` (the caller checked :func:`scaled_mm_available`
    eagerly; this function must not, it runs inside traces); otherwise the float32
    reference, numerically the same function. ``direct_out_dtype``: False where the
    rowwise kernel cannot write ``x.dtype`` (:func:`rowwise_out_dtype_ok`): bfloat16 out,
    then cast and add the bias. Inference only: the quantized operands are detached, so
    a module whose parameters require grad still traces (``_scaled_mm`` has no gradient),
    and a backward that reaches ``x`` through it raises (:mod:`difforge.inference_only`).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # Where x needs a gradient, the quantization keeps it (so x_scale does) and the GEMM
    # takes detached operands: the guard at the end raises on a backward that reaches x.
    # The guard reads x_scale, not x: the rewrites of the quantization that want to be
    # x's only reader still see it so (difforge.passes.quant_fusion).
    grad_on = torch.is_grad_enabled()
    guarded = grad_on and x.requires_grad
    x_fp8, x_scale = torch.ops.difforge.fp8_quantize_rows(x2 if guarded else x2.detach())
    # What the guard watches: x (through its scale), and the weight (its scale stands for
    # it: Fp8Linear.from_linear keeps the source weight's requires_grad there) and bias
    # where they need a gradient, which the detached GEMM would silently not give them.
    sources = [x_scale] if guarded else []
    if guarded:
        x_fp8, x_scale = x_fp8.detach(), x_scale.detach()
    if grad_on and w_scale.requires_grad:
        sources.append(w_scale)
        w_scale = w_scale.detach()
    if bias is not None:
        if grad_on and bias.requires_grad:
            sources.append(bias)
        bias = bias.detach()
    if not scaled_mm:
        out = fp8_linear_reference(x_fp8, x_scale, w_fp8, w_scale, bias, x.dtype)
    else:
        scale_a = x_scale.reshape(-1, 1)
        scale_b = w_scale.float().reshape(1, -1)
        if direct_out_dtype:
            # The bias rides in the GEMM's epilogue (cuBLASLt): no extra pass over the
            # output; an activation after it is one pointwise kernel either way.
            out = torch._scaled_mm(
                x_fp8,
                w_fp8.t(),
                scale_a=scale_a,
                scale_b=scale_b,
                bias=None if bias is None else bias.to(x.dtype),
                out_dtype=x.dtype,
            )
        else:
            out = torch._scaled_mm(
                x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
            ).to(x.dtype)
            if bias is not None:
                out = out + bias.to(x.dtype)
    out = out.reshape(*lead, w_fp8.shape[0])
    return guard_detached_input(out, sources, "an fp8 linear (`quant.fp8_linear`)")


#: Fp8Linear implementations: "auto" = traceable under torch.compile, the op eagerly.
IMPLS: tuple[str, ...] = ("auto", "traceable", "op")


class Fp8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding a per-channel fp8 weight (inference only).

    ``weight_fp8`` ``[out, in]`` float8_e4m3fn (a buffer) and ``weight_scale`` ``[out]``
    float32, quantized once in :meth:`from_linear`; ``bias`` stays a parameter in the
    original dtype. ``weight_scale`` is a parameter, not a buffer, so that it carries the
    source weight's ``requires_grad`` (and ``model.requires_grad_(False)`` clears it): with
    grad mode on, a backward that would owe the weight or the bias a gradient raises
    (:mod:`difforge.inference_only`) instead of leaving them without one. The output dtype is the input's. ``impl`` (:data:`IMPLS`): ``"auto"``
    (default) runs :func:`fp8_linear_traceable` while ``torch.compile`` traces (so the
    activation quantization fuses into its producer) and the custom op eagerly;
    ``"traceable"``/``"op"`` force one. Whether ``_scaled_mm`` is used is decided when the
    module is built or moved (``.to``/``.cuda``), not per call. ``.to(dtype)`` / ``.half()`` move
    these buffers between devices but never change their dtypes (a float16 copy of an fp8
    weight would double its memory and break ``_scaled_mm``).
    """

    weight_fp8: torch.Tensor
    weight_scale: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device)
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), False)
            if bias
            else None
        )
        self.impl = "auto"
        #: The high-precision dtype the weight had; the rowwise out-dtype probe uses it.
        self.orig_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._refresh_gemm_flags()

    def _refresh_gemm_flags(self) -> None:
        """Decide, eagerly, how the traceable forward runs on the weight's device."""
        device = self.weight_fp8.device
        self.use_scaled_mm = scaled_mm_available(device)
        #: Output dtypes the traceable forward asks the rowwise GEMM for directly; others
        #: go through a bfloat16 output and a cast. Probed for the weight's original dtype
        #: (bfloat16 always works); without ``_scaled_mm`` the question does not arise.
        if not self.use_scaled_mm:
            self.direct_out_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        elif rowwise_out_dtype_ok(device, self.orig_dtype):
            self.direct_out_dtypes = tuple(dict.fromkeys((torch.bfloat16, self.orig_dtype)))
        else:
            self.direct_out_dtypes = (torch.bfloat16,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize ``linear``'s weight (once) into a new module on the same device."""
        w = linear.weight.detach()
        new = cls(
            linear.in_features, linear.out_features, bias=False, device=w.device, dtype=w.dtype
        )
        w_fp8, scale = quantize_weight(w)
        new.weight_fp8 = w_fp8
        new.weight_scale = nn.Parameter(scale, requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            new.bias = nn.Parameter(
                linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad
            )
        return new

    def row_view(self, start: int, stop: int) -> Fp8Linear:
        """Output rows ``[start, stop)`` of this linear as a module sharing its tensors
        (views, no copy): what an unfused q/k/v projection is of a fused one."""
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) outside 0..{self.out_features}")
        if start % ALIGNMENT or stop % ALIGNMENT:
            raise ValueError(f"rows [{start}, {stop}) not on {ALIGNMENT}-row bounds (_scaled_mm)")
        new = type(self)(
            self.in_features, stop - start, bias=False, device="meta", dtype=self.orig_dtype
        )
        new.weight_fp8 = self.weight_fp8[start:stop]
        new.weight_scale = nn.Parameter(
            self.weight_scale.detach()[start:stop], requires_grad=self.weight_scale.requires_grad
        )
        if self.bias is not None:
            new.bias = nn.Parameter(
                self.bias.detach()[start:stop], requires_grad=self.bias.requires_grad
            )
        new.impl = self.impl
        new._refresh_gemm_flags()
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this module actually multiplies by, as ``dtype``."""
        return dequantize(self.weight_fp8, self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            # As nn.Linear under autocast: the output in autocast's dtype (the output dtype
            # here follows the input's).
            x = x.to(torch.get_autocast_dtype(device_type))
        impl = self.impl
        if impl == "auto":
            impl = "traceable" if torch.compiler.is_compiling() else "op"
        if impl == "op":
            return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias)
        return fp8_linear_traceable(
            x,
            self.weight_fp8,
            self.weight_scale,
            self.bias,
            scaled_mm=self.use_scaled_mm,
            direct_out_dtype=x.dtype in self.direct_out_dtypes,
        )

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # nn.Module.to(dtype) converts every floating buffer, fp8 included; keep ours.
        # The tensors, not the attributes: _apply may swap a parameter's data in place.
        originals = {"weight_fp8": self.weight_fp8, "weight_scale": self.weight_scale.data}
        super()._apply(fn, recurse)
        for key, before in originals.items():
            after = getattr(self, key)
            if after.dtype != before.dtype:  # re-move the original: the cast was lossy
                if isinstance(after, nn.Parameter):
                    after.data = before.to(after.device)
                else:
                    setattr(self, key, before.to(after.device))
        self._refresh_gemm_flags()  # a device move can change the GEMM path
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel, impl={self.impl}"
        )
