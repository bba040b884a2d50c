"""difforge's graph passes: one module per rewrite family, run by stage.

``run_fx_passes`` runs the ``fx`` stage on the Dynamo graph; :class:`PostGradPasses`
is what the backend installs as Inductor's ``post_grad_custom_pre_pass`` /
``post_grad_custom_post_pass``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx

from difforge.passes.mutation import eliminate_dead_code, graph_mutates
from difforge.passes.registry import (
    STAGES,
    GraphPass,
    Stage,
    all_passes,
    cacheable_targets,
    counters,
    register_pass,
    run_pass,
)

try:  # torch >= 2.6
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - older torch has no custom-pass cache hook
    CustomGraphPass = object  # type: ignore[assignment,misc]

__all__ = [
    "STAGES",
    "GraphPass",
    "PostGradPasses",
    "Stage",
    "all_passes",
    "cacheable_targets",
    "counters",
    "enabled_passes",
    "register_pass",
    "run_fx_passes",
]


def enabled_passes(stage: Stage, is_enabled: Callable[[str], bool]) -> list[GraphPass]:
    """The passes of ``stage`` that ``is_enabled(name)`` accepts, in execution order."""
    return [p for p in all_passes().values() if p.stage == stage and is_enabled(p.name)]


def run_fx_passes(gm: torch.fx.GraphModule, passes: Iterable[GraphPass]) -> dict[str, int]:
    """Run the fx-stage passes on a Dynamo graph module; returns rewrites per pass."""
    made: dict[str, int] = {}
    passes = list(passes)
    # A graph that writes into tensors in place gets only the cleanup passes: the others
    # move computations past reads and writes that the graph does not order (mutation.py).
    mutating = graph_mutates(gm.graph)
    for graph_pass in passes:
        if mutating and graph_pass.tier != "cleanup":
            counters["fx_pass_skipped_mutation"] += 1
            continue
        # Re-read gm.graph each time: a pass may swap in a restored graph.
        made[graph_pass.name] = run_pass(graph_pass, gm.graph)
    if any(made.values()):
        eliminate_dead_code(gm.graph)
        gm.recompile()
    # Bodies of nested compile regions (invoke_subgraph, see difforge.regional) are
    # GraphModule children of the Dynamo graph: the blocks' code lives there.
    for _, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            for name, count in run_fx_passes(sub, passes).items():
                made[name] = made.get(name, 0) + count
    return made


def _hash_files(paths: Iterable[str]) -> bytes:
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.digest()


class PostGradPasses(CustomGraphPass):  # type: ignore[misc,valid-type]
    """The enabled ATen-level passes of one stage, as one Inductor custom pass.

    ``uuid()`` hashes the source files of the passes (and of this pipeline) plus which
    passes are on, so Inductor's FX-graph cache keys change whenever our rewrites could
    change the graph, and never serve a graph built by other rewrites. A pass the user
    had installed before (``inductor.post_grad_custom_*_pass``) still runs, after ours.
    """

    def __init__(
        self, stage: Stage, passes: list[GraphPass], chained: Any = None, salt: bytes = b""
    ) -> None:
        self.stage = stage
        self.passes = passes
        self.chained = chained
        # Anything else that changes the compiled code but not Inductor's own config
        # (difforge's heuristics overrides): hashed into uuid() so cache keys differ.
        self.salt = salt
        self.made: dict[str, int] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            self.made[graph_pass.name] = self.made.get(graph_pass.name, 0) + run_pass(
                graph_pass, graph
            )
        if any(self.made.values()):
            graph.eliminate_dead_code()
        if self.chained is not None:
            self.chained(graph)

    def uuid(self) -> bytes | None:
        files = [__file__, *(str(p.source_file) for p in self.passes)]
        parts = [_hash_files(files), ",".join(p.name for p in self.passes).encode(), self.salt]
        if self.chained is not None:
            chained_uuid = getattr(self.chained, "uuid", lambda: None)()
            if chained_uuid is None:
                return None  # the user's pass opted out of caching; so must we
            parts.append(repr(chained_uuid).encode())
        return hashlib.sha256(b"|".join(parts)).digest()

    def __bool__(self) -> bool:
        return bool(self.passes) or self.chained is not None or bool(self.salt)
