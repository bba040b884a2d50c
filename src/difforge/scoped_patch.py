"""A patch of torch internals that is in place only while some difforge compile runs.

difforge adjusts a few Inductor internals for its own compiles (difforge.fusion_memo,
difforge.index_join). Compiles nest (a regional compile inside another) and may run on
several threads, so each patch is counted: the first holder installs it, the last one to
leave takes it out, and a torch that lacks the patched function is left alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

Undo = Callable[[], None]


class ScopedPatch:
    """``install()`` applies the patch and returns how to undo it, or None when this torch
    has nothing to patch; calling the object gives a re-entrant, thread-safe context that
    yields whether the patch is in place."""

    def __init__(self, install: Callable[[], Undo | None]) -> None:
        self._install = install
        self._lock = threading.Lock()
        self._depth = 0
        self._undo: Undo | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[bool]:
        with self._lock:
            if self._depth == 0:
                self._undo = self._install()
            self._depth += 1
            patched = self._undo is not None
        try:
            yield patched
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._undo is not None:
                    self._undo()
                    self._undo = None


__all__ = ["ScopedPatch", "Undo"]
