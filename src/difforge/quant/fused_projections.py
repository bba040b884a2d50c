"""diffusers' q/k/v fusion before the fp8 swap, without keeping every weight twice.

``fuse_qkv_projections()`` adds ``to_qkv`` (``to_kv``, ``to_added_qkv``) beside ``to_q`` /
``to_k`` / ``to_v`` and keeps those: they serve again after ``unfuse_qkv_projections()``.
Quantized as they were, each projection's weight then lived twice: on an H200 with
``quant.fuse_qkv`` (``benchmarks/results/2026-11-29_h200_step_fq_*_s26.json``) PixArt-XL's
peak memory went 1.5 -> 2.0 GiB and the SDXL UNet's 5.7 -> 7.3 GiB. Here the unfused
linears are left out of the quantization (:func:`unfused_twins`) and afterwards become
views of their rows of the fused linear (:func:`share_fused_rows`): an ``Fp8Linear``
where the fused one was converted (per-output-channel scales make a row slice of the
quantized concatenation equal to each part quantized alone), else an ``nn.Linear`` whose
weight and bias are row views. An unfuse then runs the same numbers, in fp8 where the
fused linear is. The views share storage until something copies parameters one by one
(``.to(device)``, offloading), which makes each a copy again: correct, as large as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from difforge.quant.fp8 import Fp8Linear

log = logging.getLogger("difforge.quant")

__all__ = [
    "FUSED_GROUPS",
    "FusedGroup",
    "fuse_qkv_projections",
    "share_fused_rows",
    "unfused_twins",
]

#: (fused attribute, the attributes it concatenates in order), as diffusers' attention
#: modules (``Attention.fuse_projections``, ``AttentionModuleMixin``) build them.
FUSED_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_kv", ("to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)


@dataclass(frozen=True)
class FusedGroup:
    """One fused projection made by this fusion: ``<owner>.<fused>`` holds the rows of
    ``<owner>.<parts...>`` concatenated in order."""

    owner: str
    fused: str
    parts: tuple[str, ...]

    def name(self, attr: str) -> str:
        return f"{self.owner}.{attr}" if self.owner else attr


def _present(module: nn.Module) -> set[tuple[str, str]]:
    return {
        (name, fused)
        for name, sub in module.named_modules()
        for fused, _ in FUSED_GROUPS
        if isinstance(getattr(sub, fused, None), nn.Linear)
    }


def _rows_match(fused: nn.Linear, parts: list[nn.Linear]) -> bool:
    """Whether ``fused`` is exactly ``parts`` concatenated by rows (weights and biases)."""
    if any(type(p) is not nn.Linear or p.in_features != fused.in_features for p in parts):
        return False
    if sum(p.out_features for p in parts) != fused.out_features:
        return False
    if any((p.bias is None) != (fused.bias is None) for p in parts):
        return False
    start = 0
    for part in parts:
        stop = start + part.out_features
        if not torch.equal(fused.weight[start:stop], part.weight):
            return False
        if part.bias is not None and not torch.equal(fused.bias[start:stop], part.bias):
            return False
        start = stop
    return True


@torch.no_grad()
def fuse_qkv_projections(module: nn.Module) -> list[FusedGroup]:
    """Call ``module.fuse_qkv_projections()`` (diffusers) and return the fused projections
    it made whose rows equal their parts (none where the module has no such method)."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    if not callable(fuse):
        log.info(
            "difforge: quant.fuse_qkv: %s has no fuse_qkv_projections(); q/k/v stay separate",
            type(module).__name__,
        )
        return []
    before = _present(module)
    fuse()
    groups = []
    for owner, fused_attr in sorted(_present(module) - before):
        sub = module.get_submodule(owner)
        attrs = dict(FUSED_GROUPS)[fused_attr]
        parts = [getattr(sub, a, None) for a in attrs]
        fused = getattr(sub, fused_attr)
        if all(isinstance(p, nn.Linear) for p in parts) and _rows_match(fused, parts):
            groups.append(FusedGroup(owner, fused_attr, attrs))
    return groups


def unfused_twins(groups: list[FusedGroup]) -> dict[str, str]:
    """The parts of ``groups`` by dotted name -> why the quantization leaves them out."""
    return {
        group.name(part): f"unfused twin of {group.fused}: shares its rows (quant.fuse_qkv)"
        for group in groups
        for part in group.parts
    }


def _row_view(fused: nn.Linear, start: int, stop: int, like: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias are rows of ``fused``'s (no copy); grad flags
    from ``like``, the part it stands for."""
    view = nn.Linear(fused.in_features, stop - start, bias=False, device="meta")
    view.weight = nn.Parameter(
        fused.weight.detach()[start:stop], requires_grad=like.weight.requires_grad
    )
    if fused.bias is not None:
        assert like.bias is not None  # checked by _rows_match
        view.bias = nn.Parameter(
            fused.bias.detach()[start:stop], requires_grad=like.bias.requires_grad
        )
    return view


def share_fused_rows(module: nn.Module, groups: list[FusedGroup]) -> int:
    """After quantizing: each part of ``groups`` becomes a view of its rows of the fused
    linear (fp8 where that one is). Returns the bytes the parts no longer hold."""
    freed = 0
    for group in groups:
        owner = module.get_submodule(group.owner)
        fused = getattr(owner, group.fused)
        start = 0
        for attr in group.parts:
            part = getattr(owner, attr)
            stop = start + part.out_features
            if isinstance(fused, Fp8Linear):
                new: nn.Module = fused.row_view(start, stop)
            elif type(fused) is nn.Linear:
                new = _row_view(fused, start, stop, part)
            else:  # converted to something else since: leave this group as it is
                log.info(
                    "difforge: %s is a %s: its parts keep their own weights",
                    group.name(group.fused),
                    type(fused).__name__,
                )
                break
            freed += sum(t.numel() * t.element_size() for t in part.parameters())
            setattr(owner, attr, new)
            start = stop
    if freed:
        log.info(
            "difforge: quant.fuse_qkv: unfused q/k/v share the fused rows (%.1f MiB)", freed / 2**20
        )
    return freed
