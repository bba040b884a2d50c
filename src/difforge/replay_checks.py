"""What must run before a replay that runs no Python.

A pooled CUDA graph (:mod:`difforge.graph_pool`) replays a whole call, Dynamo and the
compiled graphs' Python wrappers included, with one ``cudaGraphLaunch``. Some wrappers
do work on every call that a replay would skip: the ``freezing`` mode's weight check
(:mod:`difforge.frozen`) and the refresh of cached concatenated weights
(:mod:`difforge.fused_weights`). Each such wrapper notes its hook here when it runs; the
pool collects the hooks noted while it records a call and runs them before each replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

#: Open :func:`collecting` scopes, innermost last; each maps an owner's id to its hook.
_scopes: list[dict[int, Callable[[], None]]] = []


def note(owner: object, hook: Callable[[], None]) -> None:
    """Called by a wrapper as it runs: ``hook`` must run before any replay of this call."""
    if _scopes:
        _scopes[-1].setdefault(id(owner), hook)


@contextlib.contextmanager
def collecting() -> Iterator[list[Callable[[], None]]]:
    """Collect the hooks noted inside the scope (one per owner, in the order they first
    ran); the list is filled when the scope closes, and an enclosing scope gets them too."""
    found: dict[int, Callable[[], None]] = {}
    collected: list[Callable[[], None]] = []
    _scopes.append(found)
    try:
        yield collected
    finally:
        _scopes.pop()
        collected.extend(found.values())
        if _scopes:
            for key, hook in found.items():
                _scopes[-1].setdefault(key, hook)
