"""Hooks around a module's sub-module calls that rewrites and CUDA graphs would bypass.

accelerate's sequential CPU offload hooks every sub-module that holds weights (a model CPU
offload hooks the root alone, and its moves are module conversions that
:mod:`difforge.module_watch` sees); diffusers' hook registry carries group offloading,
layerwise casting and its block caches. Each of them runs Python around a sub-module's
call that moves, casts or skips weights: a fused q/k/v linear made beside hooked parts
would escape the offloading, and a CUDA graph replay runs none of that Python while the
weights it recorded move away (:mod:`difforge.graph_pool`).
"""

from __future__ import annotations

from torch import nn

__all__ = ["hooks_reason"]


def hooks_reason(module: nn.Module) -> str | None:
    """Where ``module``'s tree has such hooks, in words; None when it has none."""
    for name, sub in module.named_modules():
        if sub is not module and getattr(sub, "_hf_hook", None) is not None:
            return f"{name} has an accelerate hook (offloading)"
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and getattr(registry, "hooks", None):
            return f"{name or type(module).__name__} has diffusers hooks (offloading, casting)"
    return None
