"""Inductor's fusion memory check with each buffer's reuse key computed once per graph.

For every candidate pair of nodes, Inductor's scheduler asks whether fusing them could
raise peak memory (``Scheduler.can_fusion_increase_peak_memory``), and each question
recomputes the reuse key of every single-use input: its storage size simplified by sympy,
then printed. With symbolic sizes that dominates fusion: a cold compile of the full SDXL
UNet with ``dynamic: true`` (CPU, torch 2.13, py-spy) spent ~12% of its time there, most
of the scheduler's fusion pass. A buffer's key does not change while its layout object is
the same, so while difforge's compile runs, the check reads each key from a memo kept per
scheduler, keyed by buffer name and layout identity.

Scope: the memo answers only inside that check, per scheduler (one graph) and per thread.
The wrapper's memory planning (which also calls ``buffer_reuse_key``) computes keys as
before, and so does every compile once difforge's are done. A compile on another thread
while one of difforge's runs gets a memo of its own scheduler too (the same keys, sooner).
Where this torch lacks either function, nothing is patched (one debug line).
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from difforge.passes import counters
from difforge.scoped_patch import ScopedPatch, Undo

log = logging.getLogger(__name__)

HIT = "fusion_memo.hit"
MISS = "fusion_memo.miss"

_active = threading.local()
"""``memo``: the running check's {buffer name: (layout, key)}, set only inside the check."""


def _targets() -> tuple[Any, Any, Any, Any] | None:
    try:
        wrapper = importlib.import_module("torch._inductor.codegen.wrapper")
        scheduler = importlib.import_module("torch._inductor.scheduler")
    except ImportError:  # pragma: no cover - every supported torch has both modules
        return None
    key_fn = getattr(wrapper, "buffer_reuse_key", None)
    cls = getattr(scheduler, "Scheduler", None)
    check = getattr(cls, "can_fusion_increase_peak_memory", None)
    if key_fn is None or check is None:
        return None
    return wrapper, key_fn, cls, check


def _memo_key(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def reuse_key(buf: Any) -> Any:
        memo = getattr(_active, "memo", None)
        if memo is None:  # memory planning, or a compile that is not inside the check
            return original(buf)
        name, layout = buf.get_name(), getattr(buf, "layout", None)
        hit = memo.get(name)
        if hit is not None and hit[0] is layout:
            counters[HIT] += 1
            return hit[1]
        counters[MISS] += 1
        key = original(buf)
        memo[name] = (layout, key)
        return key

    return reuse_key


def _memo_check(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(original)
    def check(self: Any, node1: Any, node2: Any) -> bool:
        outer = getattr(_active, "memo", None)
        _active.memo = self.__dict__.setdefault("_difforge_reuse_keys", {})
        try:
            return original(self, node1, node2)
        finally:
            _active.memo = outer

    return check


def _install() -> Undo | None:
    targets = _targets()
    if targets is None:
        log.debug("difforge: this torch has no fusion memory check to memoize")
        return None
    wrapper, key_fn, cls, check = targets
    wrapper.buffer_reuse_key = _memo_key(key_fn)
    cls.can_fusion_increase_peak_memory = _memo_check(check)

    def undo() -> None:
        wrapper.buffer_reuse_key = key_fn
        cls.can_fusion_increase_peak_memory = check

    return undo


memoized_fusion_check = ScopedPatch(_install)
"""While the body runs, Inductor's fusion memory check memoizes reuse keys. Yields
whether the patch is in place. Re-entrant and thread-safe (counted, one patch)."""


__all__ = ["HIT", "MISS", "memoized_fusion_check"]
