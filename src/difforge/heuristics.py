"""difforge's overrides of Inductor's code-generation heuristics (``InductorChoices``).

Inductor decides per reduction whether to keep a whole row in registers ("persistent":
one read of the row) or loop over it in chunks (a Welford pass, then a second pass that
reads the row again to normalise). Its limit is a row of 1024 elements, so the
LayerNorm + adaLN kernels of PixArt (1152 channels), SD3 (1536) and FLUX (3072) all
loop. ``heuristics.persistent_reduction_max`` raises that limit for inner (row-wise)
LayerNorm reductions whose length is known at compile time (see
:meth:`DifforgeChoices.should_use_persistent_reduction` for why only LayerNorms).

The override is installed only while difforge's Inductor call runs
(:func:`choices_for`), and its :meth:`DifforgeChoices.cache_salt` goes into the cache
key through our post-grad hook, so graphs compiled with and without it never share an
FX-graph cache entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
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


#: Hash of this file, read once: part of every cache salt.
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class DifforgeChoices(InductorChoices):  # type: ignore[misc,valid-type]
    """Inductor's default choices, with larger persistent-reduction limits for LayerNorm
    rows and (optionally) fp8 row quantizations."""

    def __init__(
        self, persistent_reduction_max: int | None, fp8_quant_max: int | None = None
    ) -> None:
        super().__init__()
        self.persistent_reduction_max = persistent_reduction_max
        self.fp8_quant_max = fp8_quant_max

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
        rnumel = features.reduction_numel
        if not getattr(rnumel, "is_number", isinstance(rnumel, int)):
            return False  # a symbolic row length: leave it to Inductor
        # LayerNorm rows: the DiT LayerNorms (1152/1536 wide) gained on an H200, while
        # the pieces of a channels-last GroupNorm got slower as persistent reductions (SDXL
        # VAE decode 38.9 -> 43.6 ms on an H100), so other reductions keep Inductor's
        # choice unless they are fp8 row quantizations and that limit is set.
        length = int(rnumel)
        limit = self.persistent_reduction_max
        if limit and length <= limit and _only_layer_norm(features):
            return True
        if self.fp8_quant_max and length <= self.fp8_quant_max:
            return _writes_fp8(features) and not _has_group_norm(features)
        return False

    def cache_salt(self) -> bytes:
        # The rule's source is part of the key: a changed heuristic must not be served
        # kernels the old one generated (seen: an FX-graph cache hit on a warm GPU
        # machine returned the previous rule's kernels).
        return (
            f"persistent_reduction_max={self.persistent_reduction_max};"
            f"fp8_quant_max={self.fp8_quant_max};{_SOURCE}"
        ).encode()


def _reduction_origins(features: Any) -> list[str] | None:
    """The ATen op names the kernel's reductions come from, or None when the private
    scheduler structures look unexpected (callers then decide "not sure")."""
    try:
        names = []
        for node in features.reduction_nodes():
            for origin in node.node.get_origins() if node.node is not None else ():
                aten = origin.meta.get("original_aten")
                names.append(str(getattr(aten, "_overloadpacket", aten) or origin.target))
    except Exception:
        return None
    return names


def _only_layer_norm(features: Any) -> bool:
    """Whether the kernel's reductions include a LayerNorm and no GroupNorm (by ATen origin)."""
    names = _reduction_origins(features)
    if names is None:  # not sure means no
        return False
    return any("layer_norm" in n for n in names) and not any("group_norm" in n for n in names)


def _writes_fp8(features: Any) -> bool:
    """Whether the kernel stores a float8 buffer (an fp8 activation quantization)."""
    import torch

    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    try:
        return any(
            node.node is not None and node.node.get_dtype() in fp8
            for node in features.scheduler_nodes()
        )
    except Exception:  # private scheduler structures: not sure means no
        return False


def _has_group_norm(features: Any) -> bool:
    """Whether a reduction of the kernel comes from a GroupNorm (not sure counts as yes)."""
    names = _reduction_origins(features)
    return names is None or any("group_norm" in n for n in names)


def choices_for(config: CompileConfig) -> DifforgeChoices | None:
    """The choices object ``config`` asks for, or None to keep Inductor's defaults."""
    limit = config.settings.get("heuristics.persistent_reduction_max")
    fp8_limit = config.settings.get("heuristics.persistent_fp8_quant_max")
    if limit is None and fp8_limit is None:
        return None
    if not _AVAILABLE:
        log.warning(
            "difforge: this torch has no InductorChoices hook; "
            "heuristics.persistent_reduction_max is ignored"
        )
        return None
    return DifforgeChoices(
        None if limit is None else int(limit), None if fp8_limit is None else int(fp8_limit)
    )


@contextlib.contextmanager
def installed(choices: DifforgeChoices | None) -> Iterator[None]:
    """Make ``choices`` Inductor's heuristics handler for the duration (no-op for None)."""
    if choices is None:
        yield
        return
    with V.set_choices_handler(choices):
        yield
