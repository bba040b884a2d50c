"""diffusers' q/k/v fusion with difforge's checks, each part a row view of its fused
linear as soon as its attention fuses."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difforge.fused_projections.groups import (
    STOCK_PROCESSORS,
    UNFUSED_PROCESSOR,
    VIEWED,
    FusedGroup,
    already_fused,
    fused_attrs,
    matching_groups,
    runs_fused,
    same_memory,
    unfusable_reason,
)
from difforge.fused_projections.views import share_rows
from difforge.fused_projections.watch import unfuse_owner

log = logging.getLogger(__name__)


@torch.no_grad()
def fuse_qkv_projections(module: nn.Module) -> list[FusedGroup]:
    """Call ``module.fuse_qkv_projections()`` (diffusers); return the fused projections it
    made whose rows equal their parts, the parts now row views of them. None where the
    module has no such method, holds attention processors the fusion would replace
    (:data:`STOCK_PROCESSORS`) or cannot fuse (diffusers raises for added-KV processors).
    Each attention's parts are shared as soon as it fuses (its ``fuse_projections`` is
    wrapped for the call: not thread-safe for one module), so the fusion holds a second
    copy of one attention's weights at most."""
    kind = type(module).__name__
    fuse = getattr(module, "fuse_qkv_projections", None)
    if not callable(fuse):
        log.info("difforge: %s has no fuse_qkv_projections(); q/k/v stay separate", kind)
        return []
    processors = getattr(module, "attn_processors", None)
    custom = sorted({type(p).__name__ for p in (processors or {}).values()} - STOCK_PROCESSORS)
    if custom:
        log.info(
            "difforge: %s has attention processors %s that diffusers' fusion would replace; "
            "q/k/v stay separate",
            kind,
            ", ".join(custom),
        )
        return []
    found = already_fused(module)
    if found is not None:
        # diffusers' older attention modules fuse again on a second call (new weights, and
        # the fused processors saved as the "originals" an unfuse restores): never twice.
        # What an earlier call of ours shared is still a group (the fp8 swap after
        # fuse_qkv.modules quantizes it as one).
        log.info("difforge: %s already has fused projections (%s); not fusing again", kind, found)
        return share_fused_rows(module)
    reason = unfusable_reason(module)
    if reason is not None:
        # e.g. a PEFT LoRA layer answers .weight with its base weight only: diffusers'
        # fusion would run without the adapter, silently.
        log.info("difforge: not fusing the q/k/v of %s: %s", kind, reason)
        return []
    # Names only: a reference to a part kept here would keep its memory through the fusion.
    # (Fused linears an unfuse left behind count as new: diffusers builds them again.)
    before = {
        name: fused_attrs(sub) if runs_fused(sub) else set() for name, sub in module.named_modules()
    }
    # Older diffusers attentions get a fused processor from the model's fusion; each keeps
    # its own to come back to if a part is replaced later (_on_part_replaced).
    processors = {
        name: sub.processor
        for name, sub in module.named_modules()
        if callable(getattr(sub, "fuse_projections", None)) and hasattr(sub, "processor")
    }
    shared: dict[tuple[str, str], FusedGroup] = {}
    freed = 0

    def sharing(name: str, sub: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
        def fuse_projections(*args: Any, **kwargs: Any) -> Any:
            nonlocal freed
            result = original(*args, **kwargs)
            for group in matching_groups(sub, name, before[name]):
                freed += share_rows(sub, group)
                shared[(name, group.fused)] = group
            return result

        return fuse_projections

    wrapped = [
        (name, sub)
        for name, sub in module.named_modules()
        if callable(getattr(sub, "fuse_projections", None)) and "fuse_projections" not in vars(sub)
    ]
    for name, sub in wrapped:
        sub.fuse_projections = sharing(name, sub, sub.fuse_projections)
    try:
        fuse()
    except (ValueError, NotImplementedError, AttributeError) as err:
        # e.g. "not supported for models having added KV projections": eager stays correct;
        # whatever was fused before the error is still checked and shared below.
        log.info("difforge: %s cannot fuse its q/k/v projections (%s)", kind, err)
    finally:
        for _, sub in wrapped:
            del sub.fuse_projections
    for name, sub in module.named_modules():
        # Fusions made some other way than through fuse_projections: checked and shared now.
        for group in matching_groups(sub, name, before.get(name, set())):
            if (name, group.fused) not in shared:
                freed += share_rows(sub, group)
                shared[(name, group.fused)] = group
        if name in processors and getattr(sub, "processor", None) is not processors[name]:
            sub.__dict__[UNFUSED_PROCESSOR] = processors[name]
        made = fused_attrs(sub) - before.get(name, set())
        if made and not all((name, f) in shared for f in made):
            # Fused, but its rows could not be shared (they differ from the parts'): it
            # would hold q/k/v twice, unwatched for later part replacements; undo it.
            log.info("difforge: %s: fused q/k/v not its parts' rows; left unfused", name)
            unfuse_owner(sub)
            for fused_attr in made:
                shared.pop((name, fused_attr), None)
    _log_freed(freed)
    return sorted(shared.values(), key=lambda g: (g.owner, g.fused))


def _log_freed(freed: int) -> None:
    if freed:
        log.info(
            "difforge: the unfused q/k/v share the fused rows (%.1f MiB released)",
            freed / 2**20,
        )


def _existing_groups(module: nn.Module) -> tuple[list[FusedGroup], int]:
    """The fused projections ``module`` already has whose parts are their rows: the row
    views an earlier call left, and a plain diffusers fusion's parts (equal values, own
    memory), which become views now. Returns them and the bytes so released."""
    groups, freed = [], 0
    for name, sub in module.named_modules():
        for group in matching_groups(sub, name):  # views of the right rows match too
            fused = getattr(sub, group.fused)
            if not all(same_memory(getattr(sub, a), fused) for a in group.parts):
                freed += share_rows(sub, group)
            groups.append(group)
    return groups, freed


def share_fused_rows(module: nn.Module) -> list[FusedGroup]:
    """For a module diffusers already fused (``compile_pipe(fuse_qkv_projections=True)``):
    the unfused q/k/v whose values are their fused rows become views of them (memory once,
    not twice); returns every such group."""
    groups, freed = _existing_groups(module)
    _log_freed(freed)
    return groups


def unfuse_shared_rows(module: nn.Module) -> int:
    """Undo the fusion of every attention in ``module`` whose parts view its fused rows
    (the parts keep the rows); returns how many. For what maps weights through
    ``state_dict``, which leaves such fused linears out (accelerate's sequential offload).
    An attention whose fused processor has no known unfused form stays fused, with a
    warning naming it."""
    count = 0
    for name, sub in list(module.named_modules()):
        if not sub.__dict__.get(VIEWED):
            continue
        if unfuse_owner(sub):
            count += 1
        else:
            warnings.warn(
                f"difforge: {name or type(module).__name__} keeps its fused q/k/v: its "
                f"processor {type(getattr(sub, 'processor', None)).__name__} has no known "
                "unfused form (what maps weights through state_dict will miss them)",
                UserWarning,
                stacklevel=2,
            )
    return count
