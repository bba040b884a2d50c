"""The fp8 swap of a fused model: fused linears quantized once, their parts fp8 row views
of them, never quantized on their own."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from difforge.fused_projections.groups import FusedGroup
from difforge.fused_projections.views import share_rows
from difforge.quant.fp8 import ALIGNMENT, Fp8Linear
from difforge.quant.select import ModuleFilter, QuantizeReport, quantize_linears


def unfused_twins(groups: list[FusedGroup]) -> dict[str, str]:
    """The parts of ``groups`` by dotted name -> why the quantization leaves them out."""
    return {
        group.name(part): f"unfused twin of {group.fused}: shares its rows (quant.fuse_qkv)"
        for group in groups
        for part in group.parts
    }


def fp8_converter(module: nn.Module, groups: list[FusedGroup]) -> Callable[[nn.Linear], nn.Module]:
    """``Fp8Linear.from_linear``, except that converting a fused linear of ``groups`` also
    makes its parts fp8 row views of the result, so the high-precision fused weight is
    freed with it (for :func:`~difforge.quant.select.quantize_linears`)."""
    # Keyed by id, not holding the fused linear: it must be freed once converted (the
    # entry is popped then, before its id can be reused).
    owners: dict[int, tuple[nn.Module, FusedGroup]] = {}
    for group in groups:
        owner = module.get_submodule(group.owner)
        owners[id(getattr(owner, group.fused))] = (owner, group)

    def convert(linear: nn.Linear) -> nn.Module:
        new = Fp8Linear.from_linear(linear)
        if id(linear) in owners:
            owner, group = owners.pop(id(linear))
            setattr(owner, group.fused, new)
            share_rows(owner, group)
        return new

    return convert


def quantize_fused(
    module: nn.Module, module_filter: ModuleFilter, groups: list[FusedGroup]
) -> QuantizeReport:
    """:func:`~difforge.quant.select.quantize_linears` for a module fused by
    :func:`fuse_qkv_projections`: the parts of ``groups`` are left out (reported as such)
    and become fp8 row views of their fused linear as it is converted. A fused linear whose
    parts are off the 16-row grid stays in high precision: an fp8 row view of it could not
    run ``_scaled_mm`` (16-multiples only)."""
    keep = unfused_twins(groups)
    aligned = []
    for group in groups:
        owner = module.get_submodule(group.owner)
        if any(getattr(owner, a).out_features % ALIGNMENT for a in group.parts):
            keep[group.name(group.fused)] = f"parts off the {ALIGNMENT}-row grid of fp8 GEMMs"
        else:
            aligned.append(group)
    return quantize_linears(
        module, module_filter, keep=keep, converter=fp8_converter(module, aligned)
    )
