"""Hooks around a module's sub-module calls that rewrites and CUDA graphs would bypass.

accelerate's sequential CPU offload hooks every sub-module that holds weights with an
``AlignDevicesHook`` that offloads (a model CPU offload hooks the root alone, and its moves
are module conversions that :mod:`difforge.module_watch` sees; a ``device_map`` dispatch
onto one device hooks sub-modules only to move inputs there, which changes nothing).
diffusers' hook registry carries group offloading, layerwise casting, its block caches and
context-parallel splits. Such hooks run Python around a sub-module's call that moves, casts
or skips weights (or splits the work across devices): a fused q/k/v linear made beside
hooked parts would escape the offloading, and a CUDA graph replay runs none of that Python
while the weights it recorded move away (:mod:`difforge.graph_pool`).

:func:`hooks_reason` walks the whole tree, too slow for every replay. :func:`hooks_stamp` is
the cheap part a pool compares at each call: a count of the hooks registered or removed
through diffusers' ``HookRegistry`` anywhere (its two methods are wrapped once per process,
as every diffusers hook, model-level ``enable_group_offload``, ``enable_cache``, a guider's
per-step layer skip, goes through them) and the accelerate hooks on the module's roots
(``accelerate.cpu_offload`` and ``dispatch_model`` hook the root along with the parts).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["hooks_reason", "hooks_stamp"]

_lock = threading.Lock()
_registrations = 0
"""Hooks registered or removed through diffusers' ``HookRegistry`` since counting began."""
_counting = False


def _accelerate_hooks(hook: Any) -> list[Any]:
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def _moves_weights(hook: Any) -> bool:
    """Whether an accelerate hook may move weights: an AlignDevicesHook that offloads (or
    maps weights), or a kind we do not know."""
    if type(hook).__name__ != "AlignDevicesHook":
        return True
    return bool(getattr(hook, "offload", False)) or getattr(hook, "weights_map", None) is not None


def hooks_reason(module: nn.Module) -> str | None:
    """Where ``module``'s tree has such hooks, in words; None when it has none. A compiled
    module (``OptimizedModule``) counts with the module it wraps: hooks put on the wrapper
    (diffusers offloading a compiled component) count, an accelerate hook on either root
    (a model CPU offload) does not."""
    roots = {id(module), id(getattr(module, "_orig_mod", module))}
    devices: set[str] = set()
    # modules(), not named_modules(): a name is built only for the one reported (this walk
    # runs whenever hooks may have come or gone, e.g. twice a step under a guider).
    for sub in module.modules():
        hook = sub.__dict__.get("_hf_hook")
        if id(sub) not in roots and hook is not None:
            hooks = _accelerate_hooks(hook)
            if any(_moves_weights(h) for h in hooks):
                return f"{_name_in(module, sub)} has an accelerate hook (offloading)"
            devices.update(
                str(h.execution_device)
                for h in hooks
                if getattr(h, "execution_device", None) is not None
            )
        registry = sub.__dict__.get("_diffusers_hook")
        if registry is not None and getattr(registry, "hooks", None):
            kinds = ", ".join(sorted(registry.hooks))
            return f"{_name_in(module, sub)} has diffusers hooks ({kinds})"
    if len(devices) > 1:
        return f"accelerate hooks spread it over {', '.join(sorted(devices))}"
    return None


def _name_in(root: nn.Module, sub: nn.Module) -> str:
    """``sub``'s dotted name in the model (its class name for the model itself); a compiled
    wrapper's ``_orig_mod.`` left out."""
    model = getattr(root, "_orig_mod", root)
    for name, candidate in model.named_modules():
        if candidate is sub:
            return name or type(model).__name__
    return type(model).__name__  # the wrapper itself


def _counted(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:
        global _registrations
        try:
            return method(*args, **kwargs)
        finally:
            with _lock:
                _registrations += 1

    counted.__difforge_counted__ = True  # type: ignore[attr-defined]
    return counted


def _count_diffusers_hooks() -> bool:
    """Wrap ``HookRegistry.register_hook``/``remove_hook`` once diffusers' hooks module is
    loaded (a module of diffusers' models imports it); False while it is not. Wrapping
    counts as a registration: hooks may have been registered, uncounted, since diffusers
    was imported after an earlier stamp."""
    global _registrations
    registry = getattr(sys.modules.get("diffusers.hooks.hooks"), "HookRegistry", None)
    if registry is None:
        return False
    with _lock:
        for name in ("register_hook", "remove_hook"):
            method = getattr(registry, name, None)
            if callable(method) and not getattr(method, "__difforge_counted__", False):
                setattr(registry, name, _counted(method))
        _registrations += 1
    return True


def _ref(hook: Any) -> Any:
    """``hook``'s identity without holding it: its id (two live hooks never share one, and
    an equal-valued replacement is still another hook) and a weak reference (a dead one
    equals no new hook that reuses the freed address), so a stamp keeps no removed hook,
    nor what it holds, alive."""
    if hook is None:
        return None
    try:
        return (id(hook), weakref.ref(hook))
    except TypeError:  # a hook type without weak references: hold it
        return (id(hook), hook)


def hooks_stamp(module: nn.Module) -> tuple[Any, ...]:
    """A cheap value that changes whenever ``module``'s hooks may have changed (then ask
    :func:`hooks_reason` again). Hooks put by hand on a part, other than through diffusers'
    registry, do not change it: after those, ``difforge.reset_graphs``."""
    global _counting
    if not _counting:
        _counting = _count_diffusers_hooks()
    inner = getattr(module, "_orig_mod", module)
    root_hooks = (getattr(module, "_hf_hook", None), getattr(inner, "_hf_hook", None))
    return (_registrations, *(_ref(hook) for hook in root_hooks))
