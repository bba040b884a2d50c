"""The unfused q/k/v as row views of the fused linear, and what keeps them so: the state
dict in diffusers' unfused layout, and conversions (``.to()``) that move each row once."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difforge.fused_projections.groups import (
    FUSED_GROUPS,
    HOOKED,
    ROW_VIEW,
    VIEWED,
    FusedGroup,
    same_memory,
)
from difforge.fused_projections.watch import install_replacement_watch
from difforge.quant.fp8 import Fp8Linear

log = logging.getLogger(__name__)


def share_rows(owner: nn.Module, group: FusedGroup) -> int:
    """Make ``group``'s parts row views of ``owner``'s fused linear; the bytes they held."""
    fused = getattr(owner, group.fused)
    if type(fused) is nn.Linear:
        # diffusers builds the fused linear anew (requires_grad=True): it needs a gradient
        # only where a part did (a frozen model stays frozen, GraphPool's grad check too).
        parts = [getattr(owner, a) for a in group.parts]
        for key in ("weight", "bias"):
            tensor = getattr(fused, key)
            if tensor is not None:
                tensor.requires_grad_(any(getattr(p, key).requires_grad for p in parts))
    freed, start = 0, 0
    for attr in group.parts:
        part = getattr(owner, attr)
        stop = start + part.out_features
        if isinstance(fused, Fp8Linear):
            view: nn.Module = fused.row_view(start, stop)
        else:
            view = _row_view(fused, start, stop, part)
        view.__dict__[ROW_VIEW] = True  # before the assignment: _on_part_replaced skips it
        if isinstance(part, nn.Linear) and not same_memory(part, fused):
            freed += sum(t.numel() * t.element_size() for t in part.parameters())
        setattr(owner, attr, view)
        start = stop
    _hook_owner(owner)
    viewed = owner.__dict__.setdefault(VIEWED, [])
    if (group.fused, group.parts) not in viewed:
        viewed.append((group.fused, group.parts))
    return freed


def _row_view(fused: nn.Linear, start: int, stop: int, like: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias are rows of ``fused``'s (no copy); grad flags
    from ``like``, the part it stands for."""
    view = nn.Linear(fused.in_features, stop - start, bias=False, device="meta")
    view.weight = nn.Parameter(
        fused.weight.detach()[start:stop], requires_grad=like.weight.requires_grad
    )
    if fused.bias is not None:
        view.bias = nn.Parameter(
            fused.bias.detach()[start:stop], requires_grad=like.bias.requires_grad
        )
    return view


def _viewed_groups(owner: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """The (fused attribute, parts) of ``owner`` whose parts all view the fused memory."""
    found = []
    for fused_attr, attrs in FUSED_GROUPS:
        fused = getattr(owner, fused_attr, None)
        parts = [getattr(owner, a, None) for a in attrs]
        if isinstance(fused, nn.Module) and all(
            isinstance(p, nn.Module) and same_memory(p, fused) for p in parts
        ):
            found.append((fused_attr, attrs))
    return found


def _drop_fused_entries(
    owner: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: leave out fused linears whose parts view them."""
    for fused_attr, _ in _viewed_groups(owner):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{fused_attr}.")]:
            del state_dict[key]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes (not every device concatenates or compares fp8)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_as_bytes(t) for t in tensors]).view(tensors[0].dtype)


def _fill_fused_entries(
    owner: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: where the fused linear's entries are missing but its parts'
    are there (a checkpoint in the unfused layout), build them from the parts'."""
    for fused_attr, attrs in _viewed_groups(owner):
        fused = getattr(owner, fused_attr)
        names = [n for n, _ in fused.named_parameters(recurse=False)]
        names += [n for n, _ in fused.named_buffers(recurse=False)]
        for name in names:
            key = f"{prefix}{fused_attr}.{name}"
            parts = [state_dict.get(f"{prefix}{a}.{name}") for a in attrs]
            if key not in state_dict and all(isinstance(t, torch.Tensor) for t in parts):
                state_dict[key] = _cat_rows(parts)  # type: ignore[arg-type]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, fp8 too."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return torch.equal(_as_bytes(a), _as_bytes(b))


#: One tensor of a part: (the part, its attribute name, whether a parameter, the tensor).
_PartTensor = tuple[nn.Module, str, bool, torch.Tensor]


def _group_tensors(owner: nn.Module, fused_attr: str, attrs: tuple[str, ...]) -> list[Any]:
    """Each part tensor of one recorded group with its rows of the fused linear's tensor of
    the same name, as (part, name, is_param, tensor, rows); [] where the group no longer
    has that form (a part or the fused linear replaced, other row counts)."""
    fused = getattr(owner, fused_attr, None)
    parts = [getattr(owner, a, None) for a in attrs]
    if not isinstance(fused, nn.Module) or not all(isinstance(p, nn.Module) for p in parts):
        return []
    counts = [getattr(p, "out_features", 0) for p in parts]
    if sum(counts) != getattr(fused, "out_features", -1):
        return []
    found, start = [], 0
    for part, count in zip(parts, counts, strict=True):
        own = [(n, t, True) for n, t in part.named_parameters(recurse=False)]
        own += [(n, t, False) for n, t in part.named_buffers(recurse=False)]
        for name, tensor, is_param in own:
            source = getattr(fused, name, None)
            if not isinstance(source, torch.Tensor) or source.dim() == 0:
                return []
            found.append((part, name, is_param, tensor, source.detach()[start : start + count]))
        start += count
    return found


def _set_tensor(part: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    """Give a part's parameter (same Parameter object) or buffer new data."""
    if is_param:
        getattr(part, name).data = value
    else:
        part._buffers[name] = value


def _park_views(owner: nn.Module) -> list[_PartTensor]:
    """Before a conversion: the part tensors that are views of their fused rows now become
    empty (so the conversion moves each row once, in the fused linear); returns them, to
    put back if the conversion fails."""
    parked: list[_PartTensor] = []
    for fused_attr, attrs in owner.__dict__.get(VIEWED, []):
        group = _group_tensors(owner, fused_attr, attrs)
        if not group or not all(t.data_ptr() == rows.data_ptr() for _, _, _, t, rows in group):
            continue  # copies already (a deepcopy, a pickle): _view_rows_again compares
        for part, name, is_param, tensor, _ in group:
            parked.append((part, name, is_param, tensor.detach()))
            _set_tensor(part, name, is_param, tensor.new_empty(0))
    return parked


def _view_rows_again(owner: nn.Module, parked: list[_PartTensor]) -> None:
    """After a conversion: each recorded group's parts become views of the converted fused
    rows again (same Parameter objects). Parked parts take their rows as they are (they
    were views of them); parts that were copies only where they still equal their rows."""
    parked_parts = {id(part) for part, _, _, _ in parked}
    for fused_attr, attrs in owner.__dict__.get(VIEWED, []):
        group = _group_tensors(owner, fused_attr, attrs)
        fits = all(
            id(part) in parked_parts or _same_bytes(rows, tensor.detach())
            for part, _, _, tensor, rows in group
        )
        if not fits:
            log.info("difforge: %s no longer equals its fused rows; kept as a copy", fused_attr)
            continue
        for part, name, is_param, _, rows in group:
            _set_tensor(part, name, is_param, rows)


def _apply_keeping_views(self: nn.Module, fn: Callable[..., Any], recurse: bool = True) -> Any:
    """``nn.Module._apply`` (what ``.to()``, ``.half()``, ``.cuda()`` run) for a fused
    attention: the parts' rows move once, inside the fused linear, and are views of it
    again afterwards; otherwise each part would be copied on its own and kept twice."""
    parked = _park_views(self)
    try:
        result = type(self)._apply(self, fn, recurse)
    except BaseException:
        for part, name, is_param, tensor in parked:
            _set_tensor(part, name, is_param, tensor)
        raise
    with torch.no_grad():
        _view_rows_again(self, parked)
    return result


def _hook_owner(owner: nn.Module) -> None:
    """Once per attention module whose parts view a fused linear: its state_dict leaves
    the fused linear out (the parts hold the same values, safetensors refuses shared
    memory, and the checkpoint keeps diffusers' unfused layout, which a fresh model
    loads), loading such a state dict builds the fused entries from the parts', and a
    conversion (``.to()``) makes the parts views again."""
    if owner.__dict__.get(HOOKED):
        return
    owner.register_state_dict_post_hook(_drop_fused_entries)
    owner.register_load_state_dict_pre_hook(_fill_fused_entries)
    # An instance attribute: only fused attentions convert this way. A partial, not a bound
    # method: deepcopy and pickle rebuild it around the copy.
    owner._apply = functools.partial(_apply_keeping_views, owner)  # type: ignore[method-assign]
    owner.__dict__[HOOKED] = True
    install_replacement_watch()
