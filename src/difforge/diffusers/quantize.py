"""``quantize_pipe``: fp8 dynamic quantization of a diffusers pipeline's denoiser.

>>> pipe = quantize_pipe(pipe)            # before compile_pipe
>>> print(quant_report(pipe).summary())
>>> pipe = compile_pipe(pipe, options={"mode": "O3"})

Only the denoiser (``transformer`` or ``unet``) is quantized: it runs every step and holds
the large GEMMs; text encoders run once and the VAE is conv-bound. Returns the pipe, like
``compile_pipe`` (the benchmark chains ``quantize_pipe(pipe) or pipe``); what was done is
recorded on the pipe and read back with :func:`quant_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.errors import DifforgeError, warn
from difforge.fused_projections import FusedGroup, quantize_fused
from difforge.fused_projections import fuse_qkv_projections as fuse_projections_of
from difforge.quant.select import (
    DEFAULT_EXCLUDE,
    DEFAULT_MIN_FEATURES,
    DEFAULT_MIN_WEIGHT_ELEMENTS,
    ModuleFilter,
    QuantizeReport,
)

log = logging.getLogger("difforge.diffusers")

__all__ = ["QUANT_ATTR", "PipeQuantReport", "QuantizeOrderError", "quant_report", "quantize_pipe"]

QUANT_ATTR = "_difforge_quant"
DTYPES: tuple[str, ...] = ("fp8",)
_DENOISERS: tuple[str, ...] = ("transformer", "unet")
_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


class QuantizeOrderError(DifforgeError, RuntimeError):
    """quantize_pipe was called on a pipeline that is already compiled."""


@dataclass
class PipeQuantReport(QuantizeReport):
    """A :class:`QuantizeReport` plus which component it covers and the call's settings."""

    component: str = ""
    dtype: str = "fp8"
    settings: tuple[Any, ...] = ()
    """(dtype, min_features, exclude, include, fuse_qkv_projections, min_weight_elements,
    skip_edges, skip_gated_outputs, skip_cross_attention_kv) as normalised; a repeat call
    compares them."""


def quant_report(pipe: Any) -> PipeQuantReport | None:
    """What :func:`quantize_pipe` did to ``pipe`` (None if it never ran on it)."""
    report = getattr(pipe, QUANT_ATTR, None)
    return report if isinstance(report, PipeQuantReport) else None


def _compiled_components(pipe: Any) -> list[str]:
    from difforge.diffusers.pipe import COMPONENTS, pipe_state

    state = pipe_state(pipe)
    names = set(state.compiled) if state is not None else set()
    for name in COMPONENTS:
        owner = getattr(pipe, "vae", None) if name.startswith("vae.") else pipe
        attr = name.split(".", 1)[-1]
        if isinstance(getattr(owner, attr, None), _OptimizedModule):
            names.add(name)
    return sorted(names)


def _fp8_gemm_reason() -> str | None:
    """None when fp8 GEMMs run natively on this machine, else why not."""
    from difforge.info import fp8_gemm

    feature = fp8_gemm()
    return None if feature.available else feature.reason


def quantize_pipe(
    pipe: Any,
    *,
    dtype: str = "fp8",
    min_features: int = DEFAULT_MIN_FEATURES,
    exclude: Sequence[str] | str | None = None,
    include: Sequence[str] | str | None = None,
    fuse_qkv_projections: bool = True,
    min_weight_elements: int = DEFAULT_MIN_WEIGHT_ELEMENTS,
    skip_edges: bool = True,
    skip_gated_outputs: bool = True,
    skip_cross_attention_kv: bool = True,
) -> Any:
    """Quantize the denoiser's linears to fp8 in place; call it before ``compile_pipe``.

    ``dtype``: only ``"fp8"`` (e4m3fn weights per output channel, activations per token).
    Risk: ~2-4 % relative error per quantized linear on random data; image-level PSNR
    depends on the model and must be checked per model.
    ``min_features``, ``min_weight_elements``, ``exclude`` (default
    :data:`~difforge.quant.select.DEFAULT_EXCLUDE`), ``include``, ``skip_edges``,
    ``skip_gated_outputs``, ``skip_cross_attention_kv``: see
    :class:`~difforge.quant.select.ModuleFilter`; the defaults are those of the
    ``low-precision`` mode's swap (``quant.*`` options), so ``quantize_pipe(pipe)`` then
    ``compile_pipe(pipe, options={"mode": "O3"})`` converts what ``O3`` alone would, and
    the compile swaps nothing more (a denoiser holding fp8 linears is left as it is).
    ``fuse_qkv_projections`` (default on, as ``quant.fuse_qkv`` in ``low-precision``): call
    the denoiser's diffusers ``fuse_qkv_projections()`` first, so the fused
    ``to_qkv``/``to_kv`` linears are what gets quantized (fp8 weights cannot be
    concatenated afterwards); the unfused ones become views of the fused rows
    (:mod:`difforge.fused_projections`). Off, ``compile_pipe(fuse_qkv_projections=True)``
    on the quantized pipe logs that it cannot fuse and leaves attention unfused.

    Raises :class:`QuantizeOrderError` on a compiled pipe (compiled graphs captured the
    high-precision weights). A second call does nothing (with other settings it raises:
    quantization is lossy and cannot be redone from the quantized weights). Without an fp8
    GEMM on this machine it still works, through a slow float32 reference path, and warns.
    Returns ``pipe``; the report is :func:`quant_report(pipe) <quant_report>`.
    """
    if isinstance(pipe, nn.Module):
        raise TypeError(
            f"quantize_pipe expects a diffusers pipeline, got {type(pipe).__name__}; "
            "quantize a single module with difforge.quant.quantize_linears()"
        )
    if dtype not in DTYPES:
        raise ValueError(f"quantize_pipe: dtype {dtype!r} is not supported; valid: {DTYPES}")
    module_filter = ModuleFilter(
        min_features=min_features,
        exclude=DEFAULT_EXCLUDE if exclude is None else exclude,  # type: ignore[arg-type]
        include=include,  # type: ignore[arg-type]
        min_weight_elements=min_weight_elements,
        skip_edges=skip_edges,
        skip_gated_outputs=skip_gated_outputs,
        skip_cross_attention_kv=skip_cross_attention_kv,
    )
    settings = (
        dtype,
        module_filter.min_features,
        module_filter.exclude,
        module_filter.include,
        bool(fuse_qkv_projections),
        module_filter.min_weight_elements,
        module_filter.skip_edges,
        module_filter.skip_gated_outputs,
        module_filter.skip_cross_attention_kv,
    )

    previous = quant_report(pipe)
    if previous is not None:
        if previous.settings != settings:
            raise ValueError(
                f"quantize_pipe: this pipe was already quantized with settings "
                f"{previous.settings}; fp8 weights cannot be requantized with {settings}. "
                "Quantize a freshly loaded pipeline instead."
            )
        log.debug("difforge: pipe already quantized; nothing to do")
        return pipe

    compiled = _compiled_components(pipe)
    if compiled:
        raise QuantizeOrderError(
            f"quantize before compile: {', '.join(compiled)} already compiled. "
            "Call quantize_pipe(pipe) on the uncompiled pipeline, then compile_pipe(pipe)."
        )
    found = [(n, getattr(pipe, n, None)) for n in _DENOISERS]
    found = [(n, m) for n, m in found if isinstance(m, nn.Module)]
    if not found:
        raise TypeError(
            f"quantize_pipe: {type(pipe).__name__} has no denoiser "
            f"({' or '.join(_DENOISERS)}) to quantize"
        )
    name, denoiser = found[0]

    groups: list[FusedGroup] = []
    if fuse_qkv_projections:
        # The user's own fusion as far as compile_pipe is concerned: it keeps it. Where the
        # denoiser cannot fuse (no method, custom processors, added KV), it logs why and
        # the q/k/v are quantized apart.
        groups = fuse_projections_of(denoiser)

    why_slow = _fp8_gemm_reason()
    if why_slow is not None:
        warn(
            f"fp8 GEMM not available: {why_slow}; quantized linears run through the float32 "
            "reference path, which is slow here",
            RuntimeWarning,
        )
    base = quantize_fused(denoiser, module_filter, groups)
    report = PipeQuantReport(
        converted=base.converted,
        skipped=base.skipped,
        bytes_before=base.bytes_before,
        bytes_after=base.bytes_after,
        component=name,
        dtype=dtype,
        settings=settings,
    )
    setattr(pipe, QUANT_ATTR, report)
    log.info("difforge: quantize_pipe(%s): %s", name, report.summary())
    return pipe
