"""difforge's overrides of Inductor's code-generation heuristics (``InductorChoices``).

Inductor decides per reduction whether to keep a whole row in registers ("persistent":
one read of the row) or loop over it in chunks (a Welford pass, then a second pass that
reads the row again to normalise). Its limit is a row of 1024 elements, so the
LayerNorm + adaLN kernels of PixArt (1152 channels), SD3 (1536) and FLUX (3072) all
loop. ``heuristics.persistent_reduction_max`` raises that limit for inner (row-wise)
reductions whose length is known at compile time.

The override is installed only while difforge's Inductor call runs
(:func:`choices_for`), and its :meth:`DifforgeChoices.cache_salt` goes into the cache
key through our post-grad hook, so graphs compiled with and without it never share an
FX-graph cache entry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from difforge.options import CompileConfig

log = logging.getLogger("difforge")

try:  # private Inductor API: present in torch 2.6 through 2.13, guarded for the rest
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    _AVAILABLE = hasattr(InductorChoices, "should_use_persistent_reduction") and hasattr(
        V, "set_choices_handler"
    )
except ImportError:  # pragma: no cover - depends on the torch build
    InductorChoices = object  # type: ignore[assignment,misc]
    _AVAILABLE = False


class DifforgeChoices(InductorChoices):  # type: ignore[misc,valid-type]
    """Inductor's default choices, with a larger persistent-reduction limit."""

    def __init__(self, persistent_reduction_max: int) -> None:
        super().__init__()
        self.persistent_reduction_max = persistent_reduction_max

    def should_use_persistent_reduction(  # type: ignore[override]
        self, features: Any, cooperative_reduction: bool
    ) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        import torch._inductor.config as inductor_config

        if (
            cooperative_reduction
            or not inductor_config.triton.persistent_reductions
            or features.get_reduction_hint() != ReductionHint.INNER
        ):
            return False
        return bool(
            V.graph.sizevars.statically_known_leq(
                features.reduction_numel, self.persistent_reduction_max
            )
        )

    def cache_salt(self) -> bytes:
        return f"persistent_reduction_max={self.persistent_reduction_max}".encode()

    def uuid(self) -> str:  # what torch's own inductor_choices_class keys use
        return self.cache_salt().decode()


def choices_for(config: CompileConfig) -> DifforgeChoices | None:
    """The choices object ``config`` asks for, or None to keep Inductor's defaults."""
    limit = config.settings.get("heuristics.persistent_reduction_max")
    if limit is None:
        return None
    if not _AVAILABLE:
        log.warning(
            "difforge: this torch has no InductorChoices hook; "
            "heuristics.persistent_reduction_max is ignored"
        )
        return None
    return DifforgeChoices(int(limit))


@contextlib.contextmanager
def installed(choices: DifforgeChoices | None) -> Iterator[None]:
    """Make ``choices`` Inductor's heuristics handler for the duration (no-op for None)."""
    if choices is None:
        yield
        return
    with V.set_choices_handler(choices):
        yield
