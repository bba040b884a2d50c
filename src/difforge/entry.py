"""The one way difforge puts a wrapper around a compiled module's or function's calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def wrap_entry(compiled: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """Route every call of ``compiled`` (an OptimizedModule, a plain module or a function)
    through ``wrap(call)``; returns the object to hand to the user."""
    if isinstance(compiled, nn.Module):
        # OptimizedModule.__call__ ends in self.forward, the Dynamo-wrapped entry.
        compiled.forward = wrap(compiled.forward)
        return compiled
    return wrap(compiled)


__all__ = ["wrap_entry"]
