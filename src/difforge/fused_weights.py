"""Concatenated weights computed once and kept current: ``fuse_qkv.cached_weights``.

``fuse_qkv`` turns linears that read one input into one GEMM over concatenated weights.
Inside the graph that concatenation reads and writes every weight on each call, which is
why its cost rule leaves large groups apart (SDXL's 1280-wide q/k/v, every block's text
k/v); under ``freezing`` Inductor folds it into a constant, and on an H100 the SDXL UNet's
O2 step went from 32.64 to 31.58 ms (``benchmarks/results/2026-11-28_h100_step_freeze_sdxl_s17.json``),
but freezing takes in-place weight updates away.

Here the concatenation is done once, at compile time, into a buffer of the graph module
(Inductor lifts it as one more static input), and the graph reads the buffer. The weights
stay shared with the module: :class:`FusedWeights`, wrapped around the compiled graph,
compares each source's identity and version counter on every call and recomputes a stale
buffer in place (same memory, so recorded CUDA graphs stay valid). A pooled CUDA graph
replays without Python, so the pool refreshes the buffers of the calls it recorded before
each replay (:mod:`difforge.replay_checks`). The price is memory: one more copy of every
fused weight (SDXL ~1.3 GB in fp16), shared by every graph compiled over the same weights
(a recompile for another shape reuses the buffers).

Only for inference graphs: when the graph is compiled with gradients on and a weight
needs them, the concatenation stays in the graph, where autograd sees it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difforge import replay_checks
from difforge.passes.registry import counters


class Concatenation:
    """A buffer holding ``cat(sources, 0)`` and what it was computed from: the source
    tensors and their version counters. One per buffer, shared by every graph that reads
    it, so that whichever graph refreshes it, all of them see what it holds now."""

    def __init__(self, sources: Sequence[torch.Tensor]) -> None:
        self.sources = list(sources)
        # A normal tensor even when compiled under inference_mode: later refreshes may run
        # outside it, where writing into an inference tensor is refused.
        with torch.no_grad(), torch.inference_mode(False):
            self.buffer = torch.cat(self.sources, dim=0)
        self.versions = [t._version for t in self.sources]
        self.pointers = [t.data_ptr() for t in self.sources]

    def fits(self, sources: Sequence[torch.Tensor]) -> bool:
        """Whether ``cat(sources)`` can be written into this buffer (same dtype, device
        and shape: a module cast with ``.half()``/``.to()`` keeps its parameter objects)."""
        return all(
            t.dtype == self.buffer.dtype and t.device == self.buffer.device for t in sources
        ) and (
            sum(int(t.shape[0]) for t in sources),
            *sources[0].shape[1:],
        ) == tuple(self.buffer.shape)

    def holds(self, sources: Sequence[torch.Tensor]) -> bool:
        """Whether the buffer is ``cat(sources)`` as they are now. The memory address too:
        ``w.data = new`` (diffusers' LoRA fusing) keeps the parameter object and its version
        counter. (``w.data += d`` changes neither: it goes unseen, as documented.)"""
        return all(
            t is mine and t._version == version and t.data_ptr() == pointer
            for t, mine, version, pointer in zip(
                sources, self.sources, self.versions, self.pointers, strict=True
            )
        )

    def refresh(self, sources: Sequence[torch.Tensor]) -> None:
        """Recompute the buffer in place (same memory: recorded CUDA graphs stay valid)."""
        self.sources = list(sources)
        with torch.no_grad():
            torch.cat(self.sources, dim=0, out=self.buffer)
        self.versions = [t._version for t in self.sources]
        self.pointers = [t.data_ptr() for t in self.sources]
        counters["fused_weights.refresh"] += 1


@dataclass
class FusedGroup:
    """One graph's use of a :class:`Concatenation`: where its sources sit among the graph's
    arguments."""

    concatenation: Concatenation
    positions: list[int]
    """Where each source sits among the compiled graph's arguments."""
    name: str
    """The graph module's buffer attribute that holds it."""

    @property
    def buffer(self) -> torch.Tensor:
        return self.concatenation.buffer

    def update(self, args: Sequence[Any] | None = None) -> None:
        """Refresh the buffer if a source changed in place or (given the call's arguments)
        was replaced; without arguments (before a replay) from the sources it holds."""
        concat = self.concatenation
        sources = [args[i] for i in self.positions] if args is not None else concat.sources
        if not concat.holds(sources):
            concat.refresh(sources)


class FusedWeights:
    """Runs ``compiled`` after bringing every cached concatenation up to date."""

    def __init__(self, compiled: Callable[..., Any], groups: Sequence[FusedGroup]) -> None:
        self.compiled = compiled
        self.groups = list(groups)

    def before_replay(self) -> None:
        """For a replay that runs no Python: refresh what an in-place update made stale."""
        for group in self.groups:
            group.update()

    def __call__(self, *args: Any) -> Any:
        for group in self.groups:
            group.update(args)
        replay_checks.note(self, self.before_replay)
        return self.compiled(*args)


class FusedWeightCache:
    """What ``fuse_qkv`` may cache while one graph's passes run: the graph's real
    arguments, by placeholder, and the groups made so far."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        self.gm = gm
        self.groups: list[FusedGroup] = []
        self._real: dict[torch.fx.Node, tuple[int, torch.Tensor]] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            return  # not the calling convention this relies on: cache nothing
        for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
            if isinstance(value, torch.Tensor) and _is_weight(value):
                self._real[node] = (i, value)

    def covers(self, graph: torch.fx.Graph, weights: Sequence[torch.fx.Node]) -> bool:
        """Whether :meth:`concatenation` would cache ``cat(weights)`` of this graph."""
        if graph.owning_module is not self.gm or not all(w in self._real for w in weights):
            return False
        sources = [self._real[w][1] for w in weights]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return False
        if any(t.is_inference() for t in sources):
            return False  # made under inference_mode: no version counter to watch
        return len({(t.dtype, t.device) for t in sources}) == 1 and all(
            t.dim() >= 1 for t in sources
        )

    def concatenation(
        self, graph: torch.fx.Graph, weights: Sequence[torch.fx.Node]
    ) -> torch.fx.Node | None:
        """A ``get_attr`` node reading ``cat(weights, 0)`` computed now, inserted at the
        graph's current insertion point; None where these are not cacheable weights (then
        the caller concatenates inside the graph)."""
        if not self.covers(graph, weights):
            return None
        positions = [self._real[w][0] for w in weights]
        sources = [self._real[w][1] for w in weights]
        name = f"_difforge_fused_weight_{len(self.groups)}"
        if not _declare_source(self.gm, name):
            return None
        group = FusedGroup(_shared_concatenation(sources), positions, name)
        self.gm.register_buffer(name, group.buffer, persistent=False)
        self.groups.append(group)
        node = graph.get_attr(name)
        fake = next(iter(_fake_values(weights)), None)
        if fake is not None:
            node.meta["example_value"] = fake.fake_mode.from_tensor(
                group.buffer, static_shapes=True
            )
        counters["fused_weights.cached"] += 1
        return node

    def prune(self) -> list[FusedGroup]:
        """Drop the buffers the final graph does not read (a pass that failed and was rolled
        back, dead code); returns the groups kept."""
        read = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        kept = [g for g in self.groups if g.name in read]
        for group in self.groups:
            if group.name not in read and hasattr(self.gm, group.name):
                delattr(self.gm, group.name)
                getattr(self.gm, "_param_name_to_source", {}).pop(group.name, None)
        self.groups = kept
        return kept

    def nbytes(self) -> int:
        """Memory the cached concatenations hold."""
        return sum(g.buffer.numel() * g.buffer.element_size() for g in self.groups)


#: Concatenations alive in the process, by their sources' ids: another graph of the same
#: weights (a recompile for a new shape or batch) reads the same buffer instead of holding
#: a copy of its own. Weak values: a buffer lives as long as a graph reads it.
_shared: weakref.WeakValueDictionary[tuple[int, ...], Concatenation] = weakref.WeakValueDictionary()


def _shared_concatenation(sources: Sequence[torch.Tensor]) -> Concatenation:
    """The concatenation of an earlier graph over the same tensors (brought up to date),
    else a new one."""
    key = tuple(id(t) for t in sources)
    concat = _shared.get(key)
    if concat is not None and concat.fits(sources):
        # Same ids may be other tensors (ids are reused): holds() compares identities.
        if not concat.holds(sources):
            concat.refresh(sources)
        counters["fused_weights.shared"] += 1
        return concat
    concat = Concatenation(sources)
    _shared[key] = concat
    return concat


def _declare_source(gm: torch.fx.GraphModule, name: str) -> bool:
    """Tell AOTAutograd where the new buffer comes from: for a Dynamo graph it looks up
    every lifted parameter or buffer in ``gm._param_name_to_source`` (private; torch 2.11
    and 2.13) and fails on one it cannot find. False where that table is not as expected."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return "dynamo_compile_id" not in getattr(gm, "meta", {})  # not from Dynamo: no table
    try:
        from torch._dynamo.source import ConstantSource
    except ImportError:  # pragma: no cover - a torch without it
        return False
    if not isinstance(table, dict):
        return False
    # A name stable across processes: AOTAutograd's cache key includes the sources.
    table[name] = ConstantSource(f"__difforge_{name}")
    return True


def _is_weight(t: torch.Tensor) -> bool:
    """A module's parameter or buffer as Dynamo hands it to the backend."""
    return isinstance(t, torch.nn.Parameter) or bool(getattr(t, "_dynamo_static_input_type", None))


def _fake_values(nodes: Sequence[torch.fx.Node]) -> Iterator[Any]:
    for node in nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if hasattr(value, "fake_mode"):
            yield value


_active: list[FusedWeightCache] = []


def active_cache() -> FusedWeightCache | None:
    """The cache of the graph whose passes are running, if caching is on for it."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def caching_for(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], enabled: bool
) -> Iterator[FusedWeightCache | None]:
    """Let ``fuse_qkv`` cache concatenations of ``gm``'s weights while the passes run."""
    if not enabled:
        yield None
        return
    cache = FusedWeightCache(gm, example_inputs)
    _active.append(cache)
    try:
        yield cache
    finally:
        _active.pop()
