"""The ``low-precision`` mode's fp8 linear swap (``quant.fp8_linear``), applied by
:func:`difforge.compile` to the ``nn.Module`` it is given, before tracing.

Why in ``difforge.compile`` and not only in ``compile_pipe``: the swap is what makes
``low-precision``/``O3`` use fp8 GEMMs, and a mode must mean the same thing for a bare
module (``difforge.compile(transformer, options={"mode": "O3"})``) as for a pipeline.
Why not in the Dynamo backend (an FX rewrite): weights must be quantized once, not per
graph or per recompile, and the backend only sees weights as graph inputs; the
quantized weights must also be module state so that ``freezing`` can fold them and a
second compile does not quantize again. ``compile_pipe`` passes the swap to the denoiser
only (text encoders run once per prompt; VAEs are conv-bound), like ``quantize_pipe``.

The swap mutates the module in place (its ``nn.Linear`` children become
:class:`~difforge.quant.fp8.Fp8Linear`); the fp8 weights cannot be turned back into the
originals. A module that already holds an ``Fp8Linear`` (``quantize_pipe``,
``quantize_linears`` or an earlier swap) is left alone: no double quantization, and the
user's own quantization choices win over the options'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from difforge.errors import warn
from difforge.fused_projections import fuse_qkv_projections, quantize_fused, share_fused_rows
from difforge.quant.fp8 import Fp8Linear, scaled_mm_available
from difforge.quant.select import DEFAULT_EXCLUDE, ModuleFilter, QuantizeReport

log = logging.getLogger("difforge.quant")

__all__ = ["SWAP_ATTR", "filter_from_settings", "swap_fp8_linears", "swap_report"]

#: Attribute on the swapped module holding the :class:`QuantizeReport`.
SWAP_ATTR = "_difforge_fp8_swap"

_WARNED: set[str] = set()


def filter_from_settings(settings: Mapping[str, Any]) -> ModuleFilter:
    """The :class:`ModuleFilter` the ``quant.*`` options describe."""
    exclude = settings.get("quant.exclude")
    include = settings.get("quant.include")
    return ModuleFilter(
        min_features=settings["quant.min_features"],
        min_weight_elements=settings["quant.min_weight_elements"],
        exclude=DEFAULT_EXCLUDE if exclude is None else tuple(exclude),
        include=None if include is None else tuple(include),
        skip_edges=settings["quant.skip_edges"],
        skip_gated_outputs=settings["quant.skip_gated_outputs"],
        skip_cross_attention_kv=settings["quant.skip_cross_attention_kv"],
    )


def swap_report(module: nn.Module) -> QuantizeReport | None:
    """What the swap did to ``module`` (None if it never swapped anything there)."""
    report = getattr(module, SWAP_ATTR, None)
    return report if isinstance(report, QuantizeReport) else None


def unavailable_reason(devices: Iterable[torch.device]) -> str | None:
    """None when every device holding a linear has the fp8 GEMM, else why not."""
    devices = set(devices)
    bad = sorted({str(d) for d in devices if not scaled_mm_available(d)})
    if not bad:
        return None
    if all(d.type == "cuda" for d in devices):
        return (
            f"no fp8 GEMM on {', '.join(bad)} (needs compute capability >= 8.9, not ROCm; "
            "`difforge info` shows why)"
        )
    return (
        f"the module's linears are on {', '.join(bad)}; fp8 GEMMs need a CUDA GPU with "
        "compute capability >= 8.9 (move the module there before compiling)"
    )


def _warn_once(message: str) -> None:
    if message in _WARNED:
        log.debug("difforge: %s", message)
        return
    _WARNED.add(message)
    warn(message, RuntimeWarning)


def swap_fp8_linears(module: Any, settings: Mapping[str, Any]) -> QuantizeReport | None:
    """Apply ``quant.fp8_linear`` to ``module`` in place; the report, or None if nothing
    was swapped (off, not an ``nn.Module``, already quantized, or no fp8 GEMM here)."""
    if not settings.get("quant.fp8_linear") or not isinstance(module, nn.Module):
        return None
    previous = swap_report(module)
    if previous is not None or any(isinstance(m, Fp8Linear) for m in module.modules()):
        log.info(
            "difforge: %s already holds fp8 linears; quant.fp8_linear swaps nothing more",
            type(module).__name__,
        )
        return None
    module_filter = filter_from_settings(settings)
    plan = module_filter.plan(module)
    # Devices only: a list of the chosen modules would keep the unfused q/k/v that
    # quant.fuse_qkv replaces by views alive through the quantization (FLUX.1-dev: 4 GiB).
    devices = {module.get_submodule(n).weight.device for n, why in plan.items() if why is None}
    if not devices:
        log.info("difforge: quant.fp8_linear: no linear of %s qualifies", type(module).__name__)
        return None
    why = unavailable_reason(devices)
    if why is not None:
        _warn_once(
            f"difforge: fp8 linears not available here: {why}; the linears stay in their "
            "own precision (set 'quant.fp8_linear': false to silence this)"
        )
        return None
    # Fused already (fuse_qkv.modules, on in O2/O3, or the user): those groups whatever
    # quant.fuse_qkv says, so the parts stay row views (quantizing a part on its own would
    # unfuse its attention: difforge.fused_projections.watch).
    fuse = fuse_qkv_projections if settings.get("quant.fuse_qkv") else share_fused_rows
    groups = fuse(module)
    report = quantize_fused(module, module_filter, groups)
    setattr(module, SWAP_ATTR, report)
    log.info("difforge: quant.fp8_linear on %s: %s", type(module).__name__, report.summary())
    return report
