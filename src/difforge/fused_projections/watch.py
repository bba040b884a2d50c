"""A fused attention's q/k/v part replaced after the fusion (a LoRA loaded after
compiling): that attention is unfused, so the new part runs instead of being skipped."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from difforge.fused_projections.groups import (
    ROW_VIEW,
    UNFUSED_PROCESSOR,
    VIEWED,
    fused_beside_parts,
)

_watch_installed = False


def install_replacement_watch() -> None:
    """Register :func:`_on_part_replaced` with torch, once per process."""
    global _watch_installed
    if not _watch_installed:
        torch.nn.modules.module.register_module_module_registration_hook(_on_part_replaced)
        _watch_installed = True


def _on_part_replaced(owner: nn.Module, name: str, value: Any) -> None:
    """Global sub-module registration hook: a fused attention's q/k/v part replaced by
    anything but our row view (a PEFT LoRA layer wrapping it, a user's own linear) would
    never run, as the attention runs its fused projection: unfuse that attention first, so
    the new part does."""
    viewed = owner.__dict__.get(VIEWED)
    if not viewed or getattr(value, "__dict__", {}).get(ROW_VIEW):
        return
    if not any(name in parts for _, parts in viewed) or owner._modules.get(name) is value:
        return
    if unfuse_owner(owner):
        warnings.warn(
            "difforge: a fused q/k/v projection's part was replaced (an adapter such as a "
            "LoRA loaded after compiling?); that attention runs unfused from now on, so the "
            "new part is used. Load adapters before compiling to keep the fusion.",
            UserWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"difforge: {name} of a fused {type(owner).__name__} was replaced, but its "
            f"processor {type(getattr(owner, 'processor', None)).__name__} has no known "
            "unfused form: the attention still runs its fused projection, without the new "
            "part. Unfuse the model (unfuse_qkv_projections()) before replacing parts.",
            UserWarning,
            stacklevel=3,
        )


def _unfused_processor(owner: nn.Module) -> Any:
    """The processor an older diffusers attention runs unfused, while it holds a fused one:
    the one it had before our fusion, else the fused one's unfused class by name (a fusion
    made by diffusers alone); None where the processor stays (newer modules read
    ``fused_projections``; a processor set since the fusion), False where none is known."""
    kind = type(getattr(owner, "processor", None)).__name__
    if not kind.startswith("Fused"):
        return None  # a processor set since the fusion (the user's): left as it is
    recorded = owner.__dict__.get(UNFUSED_PROCESSOR)
    if recorded is not None:
        return recorded
    from diffusers.models import attention_processor

    unfused = getattr(attention_processor, kind.removeprefix("Fused"), None)
    return unfused() if isinstance(unfused, type) else False


def unfuse_owner(owner: nn.Module) -> bool:
    """Undo the fusion of one attention: its fused linears go (the parts, views, keep the
    rows), its unfused processor comes back (older modules). False, and nothing changed,
    where the fused processor has no unfused form to go back to."""
    processor = _unfused_processor(owner)
    if processor is False:
        return False
    unfuse = getattr(owner, "unfuse_projections", None)
    if callable(unfuse):
        unfuse()  # diffusers' AttentionModuleMixin: drops the fused linears, flag off
    else:
        for fused_attr in fused_beside_parts(owner):
            delattr(owner, fused_attr)
        if getattr(owner, "fused_projections", False):
            owner.fused_projections = False
    if processor is not None:
        owner.set_processor(processor)
    owner.__dict__.pop(UNFUSED_PROCESSOR, None)
    owner.__dict__[VIEWED] = []
    return True
