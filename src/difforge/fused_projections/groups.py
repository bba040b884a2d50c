"""Which q/k/v fusions an attention has, runs, and may have: the groups diffusers builds,
the checks before fusing and before sharing rows, and the markers the other modules of
:mod:`difforge.fused_projections` leave on modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difforge.module_hooks import hooks_reason

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


#: Set on an attention module once its state-dict hooks and ``_apply`` are in place.
HOOKED = "_difforge_row_view_hooks"


#: On an attention module: the (fused attribute, parts) whose parts were made row views.
VIEWED = "_difforge_row_view_groups"


#: On a part module this fusion made (a row view).
ROW_VIEW = "_difforge_row_view"


#: On an older diffusers attention: the processor it had before the fusion replaced it.
UNFUSED_PROCESSOR = "_difforge_unfused_processor"


def rows_match(fused: nn.Linear, parts: list[nn.Module | None]) -> bool:
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


def _data(module: nn.Module) -> torch.Tensor | None:
    """The tensor that holds a linear's weight: ``weight_fp8`` or ``weight``."""
    for key in ("weight_fp8", "weight"):
        tensor = getattr(module, key, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    return None


def same_memory(a: nn.Module, b: nn.Module) -> bool:
    """Whether the weights of linears ``a`` and ``b`` (fp8 or not) live in one storage."""
    x, y = _data(a), _data(b)
    return (
        x is not None
        and y is not None
        and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    )


def matching_groups(
    sub: nn.Module, owner: str, skip: set[str] | frozenset[str] = frozenset()
) -> list[FusedGroup]:
    """The high-precision fused projections of ``sub`` (but those named in ``skip``) whose
    rows equal their parts; ``owner`` is ``sub``'s dotted name."""
    groups = []
    for fused_attr, attrs in FUSED_GROUPS:
        fused = getattr(sub, fused_attr, None)
        if fused_attr in skip or type(fused) is not nn.Linear:
            continue
        if rows_match(fused, [getattr(sub, a, None) for a in attrs]):
            groups.append(FusedGroup(owner, fused_attr, attrs))
    return groups


def fused_attrs(sub: nn.Module) -> set[str]:
    return {f for f, _ in FUSED_GROUPS if isinstance(getattr(sub, f, None), nn.Linear)}


def runs_fused(sub: nn.Module) -> bool:
    """Whether attention ``sub`` runs its fused projections now: older diffusers processors
    (``attention_processor``) by their fused kind, newer ones by ``fused_projections``
    (older modules keep that flag, and their fused linears, after a model's unfuse)."""
    processor = getattr(sub, "processor", None)
    if type(processor).__module__.endswith("attention_processor"):
        return type(processor).__name__.startswith("Fused")
    return bool(getattr(sub, "fused_projections", False))


def fused_beside_parts(sub: nn.Module) -> list[str]:
    """The fused projections of ``sub`` held beside all their parts (what diffusers'
    fusion leaves); a native ``to_kv`` without ``to_k``/``to_v`` (a Perceiver's) is not one."""
    return [
        fused_attr
        for fused_attr, attrs in FUSED_GROUPS
        if all(isinstance(getattr(sub, a, None), nn.Module) for a in (fused_attr, *attrs))
    ]


def already_fused(module: nn.Module) -> str | None:
    """The first fused projection found beside its parts in an attention that runs it
    (diffusers' fusion ran and was not undone), if any."""
    for name, sub in module.named_modules():
        found = fused_beside_parts(sub) if runs_fused(sub) else []
        if found:
            return f"{name}.{found[0]}" if name else found[0]
    return None


def unfusable_reason(module: nn.Module) -> str | None:
    """Why diffusers' fusion must not run on ``module``, if it must not: a projection it
    would read that is not a plain ``nn.Linear`` (an adapter-wrapped or quantized one), or
    weights it could not concatenate for real (meta: offloaded or not loaded; parts on
    different devices), or offloading hooks on the attentions (accelerate's sequential
    offload, diffusers' group offloading) that a new fused linear would escape."""
    hooked = hooks_reason(module)
    if hooked is not None:
        return hooked
    attrs = sorted({a for _, parts in FUSED_GROUPS for a in parts})
    for name, sub in module.named_modules():
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
