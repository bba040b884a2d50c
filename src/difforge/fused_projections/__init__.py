"""diffusers' q/k/v fusion before the fp8 swap, without keeping every weight twice.

``fuse_qkv_projections()`` adds ``to_qkv`` (``to_kv``, ``to_added_qkv``) beside ``to_q`` /
``to_k`` / ``to_v`` and keeps those: they serve again after ``unfuse_qkv_projections()``.
Quantized as they were, each projection's weight lived twice: on an H200
(``benchmarks/results/2026-11-29_h200_step_fq_*_s26.json``) PixArt-XL's peak memory went
1.5 -> 2.0 GiB and the SDXL UNet's 5.7 -> 7.3 GiB. Here each unfused linear becomes a view
of its rows of the fused one: as each attention fuses (an ``nn.Linear`` whose weight and
bias are row views, so the originals' memory goes at once), then as the fused linear is
quantized (:func:`quantize_fused`: an ``Fp8Linear`` view; per-output-channel scales make a
row slice of the quantized concatenation equal each part quantized alone). An unfuse then
runs the same numbers, in fp8 where the fused linear is. The quantization leaves the parts
alone. A module conversion (``.to(device)``, ``.half()``, a model CPU offload's moves)
copies each tensor on its own; each fused attention's ``_apply`` then makes its parts views
again (where their values are still the fused rows), so they do not stay twice in memory.
While the parts view it, an attention's ``state_dict`` leaves the fused linear out
(safetensors refuses shared memory; the checkpoint keeps diffusers' unfused layout) and
loading fills the fused entries from the parts'. Parts that are not plain ``nn.Linear``s
(a PEFT LoRA layer: diffusers would concatenate its base weight only) stop the fusion; a
part replaced after it (a LoRA loaded after compiling) unfuses its attention, with a
warning, so that the new part runs (a global sub-module registration hook).
"""

from difforge.fused_projections.fusion import (
    fuse_qkv_projections,
    share_fused_rows,
    unfuse_shared_rows,
)
from difforge.fused_projections.groups import FUSED_GROUPS, STOCK_PROCESSORS, FusedGroup
from difforge.fused_projections.quantize import fp8_converter, quantize_fused, unfused_twins

__all__ = [
    "FUSED_GROUPS",
    "STOCK_PROCESSORS",
    "FusedGroup",
    "fp8_converter",
    "fuse_qkv_projections",
    "quantize_fused",
    "share_fused_rows",
    "unfuse_shared_rows",
    "unfused_twins",
]
