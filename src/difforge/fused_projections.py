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

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.quant.fp8 import ALIGNMENT, Fp8Linear
from difforge.quant.select import ModuleFilter, QuantizeReport, quantize_linears

log = logging.getLogger(__name__)

__all__ = [
    "FUSED_GROUPS",
    "FusedGroup",
    "fp8_converter",
    "fuse_qkv_projections",
    "quantize_fused",
    "share_fused_rows",
    "unfused_twins",
]

#: (fused attribute, the attributes it concatenates in order), as diffusers' attention
#: modules (``Attention.fuse_projections``, ``AttentionModuleMixin``) build them.
FUSED_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_kv", ("to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
    ("to_added_kv", ("add_k_proj", "add_v_proj")),  # Wan's image-conditioning k/v
)

#: The attention processors diffusers' ``fuse_qkv_projections()`` replaces by their fused
#: kind (older modules) or keeps (newer ones). Any other processor (IP-Adapter's, a user's
#: own) would be replaced silently, so a model holding one is not fused.
STOCK_PROCESSORS: frozenset[str] = frozenset(
    {
        "AttnProcessor",
        "AttnProcessor2_0",
        "FusedAttnProcessor2_0",
        "JointAttnProcessor2_0",
        "FusedJointAttnProcessor2_0",
        "FluxAttnProcessor",
        "FluxAttnProcessor2_0",
        "FusedFluxAttnProcessor2_0",
    }
)


@dataclass(frozen=True)
class FusedGroup:
    """One fused projection made by this fusion: ``<owner>.<fused>`` holds the rows of
    ``<owner>.<parts...>`` concatenated in order."""

    owner: str
    fused: str
    parts: tuple[str, ...]

    def name(self, attr: str) -> str:
        """The dotted name of ``attr`` of the owner."""
        return f"{self.owner}.{attr}" if self.owner else attr


def _rows_match(fused: nn.Linear, parts: list[nn.Module | None]) -> bool:
    """Whether ``fused`` is exactly ``parts`` (plain ``nn.Linear``s, else False)
    concatenated by rows (weights and biases)."""
    if any(type(p) is not nn.Linear or p.in_features != fused.in_features for p in parts):
        return False
    tensors = [t for m in (fused, *parts) for t in m.parameters()]
    if any(t.is_meta or t.device != fused.weight.device for t in tensors):
        return False  # no values to compare (meta) or parts elsewhere (offloaded)
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


def _share_rows(owner: nn.Module, group: FusedGroup) -> int:
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
        view.__dict__[_ROW_VIEW] = True  # before the assignment: _on_part_replaced skips it
        if isinstance(part, nn.Linear) and not _same_memory(part, fused):
            freed += sum(t.numel() * t.element_size() for t in part.parameters())
        setattr(owner, attr, view)
        start = stop
    _hook_owner(owner)
    viewed = owner.__dict__.setdefault(_VIEWED, [])
    if (group.fused, group.parts) not in viewed:
        viewed.append((group.fused, group.parts))
    return freed


#: Set on an attention module once its state-dict hooks and ``_apply`` are in place.
_HOOKED = "_difforge_row_view_hooks"
#: On an attention module: the (fused attribute, parts) whose parts were made row views.
_VIEWED = "_difforge_row_view_groups"
#: On a part module this fusion made (a row view).
_ROW_VIEW = "_difforge_row_view"
#: On an older diffusers attention: the processor it had before the fusion replaced it.
_UNFUSED_PROCESSOR = "_difforge_unfused_processor"
_watch_installed = False


def _data(module: nn.Module) -> torch.Tensor | None:
    """The tensor that holds a linear's weight: ``weight_fp8`` or ``weight``."""
    for key in ("weight_fp8", "weight"):
        tensor = getattr(module, key, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    return None


def _same_memory(a: nn.Module, b: nn.Module) -> bool:
    """Whether the weights of linears ``a`` and ``b`` (fp8 or not) live in one storage."""
    x, y = _data(a), _data(b)
    return (
        x is not None
        and y is not None
        and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    )


def _viewed_groups(owner: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """The (fused attribute, parts) of ``owner`` whose parts all view the fused memory."""
    found = []
    for fused_attr, attrs in FUSED_GROUPS:
        fused = getattr(owner, fused_attr, None)
        parts = [getattr(owner, a, None) for a in attrs]
        if isinstance(fused, nn.Module) and all(
            isinstance(p, nn.Module) and _same_memory(p, fused) for p in parts
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


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].element_size() == 1 and tensors[0].is_floating_point():  # fp8: as bytes
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(tensors[0].dtype)
    return torch.cat(tensors)


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
    """torch.equal, fp8 too (compared as bytes: not every device compares fp8)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.element_size() == 1 and a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


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
    for fused_attr, attrs in owner.__dict__.get(_VIEWED, []):
        group = _group_tensors(owner, fused_attr, attrs)
        if not group or not all(
            t.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
            and t.data_ptr() == rows.data_ptr()
            for _, _, _, t, rows in group
        ):
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
    for fused_attr, attrs in owner.__dict__.get(_VIEWED, []):
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
    if owner.__dict__.get(_HOOKED):
        return
    owner.register_state_dict_post_hook(_drop_fused_entries)
    owner.register_load_state_dict_pre_hook(_fill_fused_entries)
    # An instance attribute: only fused attentions convert this way. A partial, not a bound
    # method: deepcopy and pickle rebuild it around the copy.
    owner._apply = functools.partial(_apply_keeping_views, owner)  # type: ignore[method-assign]
    owner.__dict__[_HOOKED] = True
    _install_replacement_watch()


def _install_replacement_watch() -> None:
    global _watch_installed
    if not _watch_installed:
        torch.nn.modules.module.register_module_module_registration_hook(_on_part_replaced)
        _watch_installed = True


def _on_part_replaced(owner: nn.Module, name: str, value: Any) -> None:
    """Global sub-module registration hook: a fused attention's q/k/v part replaced by
    anything but our row view (a PEFT LoRA layer wrapping it, a user's own linear) would
    never run, as the attention runs its fused projection: unfuse that attention first, so
    the new part does."""
    viewed = owner.__dict__.get(_VIEWED)
    if not viewed or getattr(value, "__dict__", {}).get(_ROW_VIEW):
        return
    if not any(name in parts for _, parts in viewed) or owner._modules.get(name) is value:
        return
    if _unfuse_owner(owner):
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
    recorded = owner.__dict__.get(_UNFUSED_PROCESSOR)
    if recorded is not None:
        return recorded
    from diffusers.models import attention_processor

    unfused = getattr(attention_processor, kind.removeprefix("Fused"), None)
    return unfused() if isinstance(unfused, type) else False


def _unfuse_owner(owner: nn.Module) -> bool:
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
        for fused_attr, attrs in FUSED_GROUPS:
            present = [getattr(owner, a, None) for a in (fused_attr, *attrs)]
            if all(isinstance(m, nn.Module) for m in present):
                delattr(owner, fused_attr)
        if getattr(owner, "fused_projections", False):
            owner.fused_projections = False
    if processor is not None:
        owner.set_processor(processor)
    owner.__dict__.pop(_UNFUSED_PROCESSOR, None)
    owner.__dict__[_VIEWED] = []
    return True


def _matching_groups(
    sub: nn.Module, owner: str, skip: set[str] | frozenset[str] = frozenset()
) -> list[FusedGroup]:
    """The high-precision fused projections of ``sub`` (but those named in ``skip``) whose
    rows equal their parts; ``owner`` is ``sub``'s dotted name."""
    groups = []
    for fused_attr, attrs in FUSED_GROUPS:
        fused = getattr(sub, fused_attr, None)
        if fused_attr in skip or type(fused) is not nn.Linear:
            continue
        if _rows_match(fused, [getattr(sub, a, None) for a in attrs]):
            groups.append(FusedGroup(owner, fused_attr, attrs))
    return groups


def _fused_attrs(sub: nn.Module) -> set[str]:
    return {f for f, _ in FUSED_GROUPS if isinstance(getattr(sub, f, None), nn.Linear)}


def _runs_fused(sub: nn.Module) -> bool:
    """Whether attention ``sub`` runs its fused projections now: older diffusers processors
    (``attention_processor``) by their fused kind, newer ones by ``fused_projections``
    (older modules keep that flag, and their fused linears, after a model's unfuse)."""
    processor = getattr(sub, "processor", None)
    if type(processor).__module__.endswith("attention_processor"):
        return type(processor).__name__.startswith("Fused")
    return bool(getattr(sub, "fused_projections", False))


def _already_fused(module: nn.Module) -> str | None:
    """The first fused projection found beside its parts in an attention that runs it
    (diffusers' fusion ran and was not undone), if any; a native ``to_kv`` without
    ``to_k``/``to_v`` (a Perceiver's) does not count."""
    for name, sub in module.named_modules():
        if not _runs_fused(sub):
            continue
        for fused_attr, attrs in FUSED_GROUPS:
            present = [getattr(sub, a, None) for a in (fused_attr, *attrs)]
            if all(isinstance(m, nn.Module) for m in present):
                return f"{name}.{fused_attr}" if name else fused_attr
    return None


def _unfusable_reason(module: nn.Module) -> str | None:
    """Why diffusers' fusion must not run on ``module``, if it must not: a projection it
    would read that is not a plain ``nn.Linear`` (an adapter-wrapped or quantized one), or
    weights it could not concatenate for real (meta: offloaded or not loaded; parts on
    different devices), or offloading hooks on the attentions (accelerate's sequential
    offload, diffusers' group offloading) that a new fused linear would escape."""
    attrs = sorted({a for _, parts in FUSED_GROUPS for a in parts})
    for name, sub in module.named_modules():
        if sub is not module and getattr(sub, "_hf_hook", None) is not None:
            return f"{name} has an accelerate hook (offloading)"
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            return f"{name or type(module).__name__} has diffusers hooks (offloading, casting)"
        if not callable(getattr(sub, "fuse_projections", None)):
            continue
        devices = set()
        for attr in attrs:
            part = getattr(sub, attr, None)
            if not isinstance(part, nn.Module):
                continue
            if type(part) is not nn.Linear:
                return f"{name}.{attr} ({type(part).__name__}) is not a plain nn.Linear"
            for tensor in part.parameters():
                if tensor.is_meta:
                    return f"{name}.{attr} has meta weights"
                devices.add(tensor.device)
        if len(devices) > 1:
            return f"{name}'s projections are on several devices"
    return None


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
    found = _already_fused(module)
    if found is not None:
        # diffusers' older attention modules fuse again on a second call (new weights, and
        # the fused processors saved as the "originals" an unfuse restores): never twice.
        # What an earlier call of ours shared is still a group (the fp8 swap after
        # fuse_qkv.modules quantizes it as one).
        log.info("difforge: %s already has fused projections (%s); not fusing again", kind, found)
        return share_fused_rows(module)
    reason = _unfusable_reason(module)
    if reason is not None:
        # e.g. a PEFT LoRA layer answers .weight with its base weight only: diffusers'
        # fusion would run without the adapter, silently.
        log.info("difforge: not fusing the q/k/v of %s: %s", kind, reason)
        return []
    # Names only: a reference to a part kept here would keep its memory through the fusion.
    # (Fused linears an unfuse left behind count as new: diffusers builds them again.)
    before = {
        name: _fused_attrs(sub) if _runs_fused(sub) else set()
        for name, sub in module.named_modules()
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
            for group in _matching_groups(sub, name, before[name]):
                freed += _share_rows(sub, group)
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
    # Fusions made some other way than through fuse_projections: checked and shared now.
    for name, sub in module.named_modules():
        for group in _matching_groups(sub, name, before.get(name, set())):
            if (name, group.fused) not in shared:
                freed += _share_rows(sub, group)
                shared[(name, group.fused)] = group
    for name, sub in module.named_modules():
        if name in processors and getattr(sub, "processor", None) is not processors[name]:
            sub.__dict__[_UNFUSED_PROCESSOR] = processors[name]
        made = _fused_attrs(sub) - before.get(name, set())
        if made and not all((name, f) in shared for f in made):
            # Fused, but its rows could not be shared (they differ from the parts'): it
            # would hold q/k/v twice, unwatched for later part replacements; undo it.
            log.info("difforge: %s: fused q/k/v not its parts' rows; left unfused", name)
            _unfuse_owner(sub)
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
        for group in _matching_groups(sub, name):  # views of the right rows match too
            fused = getattr(sub, group.fused)
            if not all(_same_memory(getattr(sub, a), fused) for a in group.parts):
                freed += _share_rows(sub, group)
            groups.append(group)
    return groups, freed


def share_fused_rows(module: nn.Module) -> list[FusedGroup]:
    """For a module diffusers already fused (``compile_pipe(fuse_qkv_projections=True)``):
    the unfused q/k/v whose values are their fused rows become views of them (memory once,
    not twice); returns every such group."""
    groups, freed = _existing_groups(module)
    _log_freed(freed)
    return groups


def unfused_twins(groups: list[FusedGroup]) -> dict[str, str]:
    """The parts of ``groups`` by dotted name -> why the quantization leaves them out."""
    return {
        group.name(part): f"unfused twin of {group.fused}: shares its rows (quant.fuse_qkv)"
        for group in groups
        for part in group.parts
    }


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
            _share_rows(owner, group)
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
