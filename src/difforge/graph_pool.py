"""CUDA graphs of a whole compiled call, one per input signature, sharing one memory pool.

The ``cudagraphs`` mode with dynamic shapes uses this instead of Inductor's cudagraph
trees (``cudagraphs.impl``). The trees record one graph per distinct size and keep every
one for the life of the process; a server that sees many resolutions needs a bound. Here:

- each distinct signature (tensor shapes, strides, dtypes, devices and the non-tensor
  arguments) gets one graph of the *whole* call: Dynamo's guards, graph breaks and the
  Python between compiled regions are replayed as part of it, so a replay costs one input
  copy, one ``cudaGraphLaunch`` and one output copy;
- every graph is captured into one memory pool per device, shared by every pool of the
  process (a pipeline's denoiser and VAE included), so memory is bounded by the largest
  graph's working set plus what the kept graphs hold (their static inputs and outputs), not
  by the sum of every graph ever captured;
- at most ``max_graphs`` graphs are kept; the least recently used one is evicted (and its
  memory returned to the pool) before a new one is captured.

Sharing one pool is safe because nothing a replay leaves behind in the pool is read later:
inputs are copied into static buffers allocated outside the pool, and outputs are copied
out right after each replay, before another graph can reuse that memory for its scratch.
It assumes replays do not overlap: one thread (one stream) drives the compiled modules of
a device at a time, as a diffusers pipeline does.

A pool that evicts ``2 * max_graphs`` never-replayed graphs with no replay in between
(every call brings a new signature, e.g. a non-tensor argument that changes per call)
stops capturing, with one warning: capturing every call costs more than it saves. So does
a pool whose module changed twice with no replay in between (its weights get new memory
at every call, e.g. a diffusers SDXL pipeline casting its fp16 VAE to fp32 around each
decode): every graph would be dropped before its first replay.

A new signature costs one ordinary call (which compiles if Dynamo must, and warms up
lazy state: cuBLAS handles, autotuning, lazily built caches) plus one capture; its result
is that ordinary call's. Calls that cannot be replayed run the compiled call directly:
inputs on the CPU, gradients wanted, non-tensor arguments that are not plain values,
outputs torch's pytree cannot take apart, or a capture that failed (each warned once).

What a graph cannot see: state outside its arguments. Parameters updated in place are
fine (same memory), except where the ``freezing`` mode folded them into constants or
``fuse_qkv.cached_weights`` concatenated them: what the call's compiled graphs do on every
call (the frozen-weight check raises, a stale concatenation is recomputed in place;
:mod:`difforge.replay_checks`) runs before each of its replays. Replacing a module's
parameters, buffers or sub-modules (a LoRA load, fused projections) drops every graph
before the next call, which then captures afresh
(:mod:`difforge.module_watch`; diffusers' attention-processor and attention-backend
switches too). Changes it does not show (``param.data = other``, a LoRA scale set on a
PEFT layer by hand) need :meth:`GraphPool.reset` (``difforge.reset_graphs``); hooks set up
after a capture are asked about when they come or go (``hooks_stamp``)."""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree
from torch import nn

from difforge import replay_checks
from difforge.entry import wrap_entry
from difforge.errors import warn
from difforge.module_watch import ModuleWatch
from difforge.passes import counters

log = logging.getLogger(__name__)

_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)

#: Module changes in a row, each dropping graphs that were never replayed, after which a
#: pool stops capturing. Two, so that one change between a warm-up and serving (a LoRA
#: loaded after the first call) keeps the graphs.
VOLATILE_INVALIDATIONS = 2

#: Calls in a row under hooks that came after a capture, through which the graphs are kept
#: for when the hooks go (a guider's layer-skip pass is one a step); past it the hooks look
#: lasting (offloading, a block cache) and the graphs' memory goes back to the pool.
HOOKED_CALLS_KEPT = 3


class Capturer(Protocol):
    """How graphs are made and replayed; the CUDA one below, a fake in CPU tests."""

    def accepts(self, tensor: torch.Tensor) -> bool:
        """Whether a call with this tensor argument can be captured."""
        ...

    def capture(
        self, fn: Callable[[], Any], device: torch.device
    ) -> tuple[Callable[[], None], Any]:
        """Record ``fn()``, whose inputs live on ``device``; returns (replay, the outputs
        written by each replay)."""
        ...


#: One memory pool per CUDA device, shared by every GraphPool of the process: a pipeline's
#: denoiser and VAE replay one after the other, so the pool holds the larger working set,
#: not their sum (the argument that makes sharing safe is the module docstring's). Each
#: entry is (pool id, anchor graph).
_DEVICE_POOLS: dict[int, tuple[Any, Any]] = {}


def shared_memory_pool(device: int) -> Any:
    """The process's CUDA-graph memory pool for ``device`` (made at first use)."""
    if device not in _DEVICE_POOLS:
        with torch.cuda.device(device):
            pool = torch.cuda.graph_pool_handle()
            # The caching allocator frees a private pool, and forgets its id, once no graph
            # uses it; a later capture into that id then fails an internal assert (H100,
            # torch 2.11). A graph kept for the life of the process keeps the pool alive.
            anchor = torch.cuda.CUDAGraph()
            with torch.cuda.graph(anchor, pool=pool):
                torch.zeros(1, device=torch.device("cuda", device)).add_(1)
        _DEVICE_POOLS[device] = (pool, anchor)
    return _DEVICE_POOLS[device][0]


#: One side stream per device for captures: ``torch.cuda.graph``'s default capture stream
#: is made once, on whichever device was current then, and shared by every later capture.
_CAPTURE_STREAMS: dict[int, Any] = {}


class CudaCapturer:
    """``torch.cuda.CUDAGraph`` captures into the process's shared pool of the device."""

    def accepts(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda

    def capture(
        self, fn: Callable[[], Any], device: torch.device
    ) -> tuple[Callable[[], None], Any]:
        # On the inputs' device, not the current one: a model on cuda:1 while cuda:0 is
        # current would run its kernels outside a capture made on cuda:0.
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            if index not in _CAPTURE_STREAMS:
                _CAPTURE_STREAMS[index] = torch.cuda.Stream()
            graph = torch.cuda.CUDAGraph()
            pool = shared_memory_pool(index)
            with torch.cuda.graph(graph, pool=pool, stream=_CAPTURE_STREAMS[index]):
                outputs = fn()
        return graph.replay, outputs


@dataclass
class _Entry:
    replay: Callable[[], None]
    static_inputs: list[torch.Tensor]
    static_outputs: list[Any]
    out_spec: pytree.TreeSpec
    static_views: list[torch.Tensor] = field(default_factory=list)
    """The inputs' writable views (:func:`_distinct`), what each replay copies into."""
    before_replay: tuple[Callable[[], None], ...] = ()
    """What the call's compiled graphs do on every call and a replay would skip (frozen
    weight checks, cached-weight refreshes; :mod:`difforge.replay_checks`)."""
    replays: int = 0

    def __post_init__(self) -> None:
        self.static_views = [_distinct(t) for t in self.static_inputs]


@dataclass
class GraphPool:
    """An LRU of captured graphs of ``fn``, keyed by the signature of its arguments."""

    fn: Callable[..., Any]
    max_graphs: int
    name: str = "model"
    capturer: Capturer = field(default_factory=CudaCapturer)
    grad_sensitive: bool = True
    """Whether ``fn`` has parameters that need gradients (then grad mode runs eagerly)."""
    watch: ModuleWatch | None = None
    """The compiled module's changes; every graph is dropped when it reports one."""
    hooked: Callable[[], str | None] | None = None
    """Why the module has hooks that a replay would skip (offloading, weight casting,
    diffusers' block caches: :func:`difforge.module_hooks.hooks_reason`), asked before each
    capture (a walk over the module tree, small beside what offloading costs) and when
    ``hooks_stamp`` changes: then calls run without graphs while the hooks stay."""
    hooks_stamp: Callable[[], Hashable] | None = None
    """A cheap value that changes when hooks may have come or gone
    (:func:`difforge.module_hooks.hooks_stamp`), compared at every call. When it changed,
    ``hooked`` is asked: while hooks are there every call runs eagerly (a replay would skip
    them). The graphs are kept through :data:`HOOKED_CALLS_KEPT` such calls, and when the
    hooks go they replay again unless the weights moved meanwhile (``weights``): a guider's
    per-step layer skip costs no capture."""
    weights: Callable[[], Hashable] | None = None
    """Where the module's weights live (:func:`difforge.module_watch.weight_addresses`):
    hooks that offload move them by ``param.data = ...``, which ``watch`` does not see.
    Without it, graphs are not replayed after hooks went."""

    def __post_init__(self) -> None:
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {self.max_graphs}")
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._failed: set[Hashable] = set()
        self._warned: set[str] = set()
        self._unreplayed_evictions = 0
        """Never-replayed graphs evicted since the last replay; at 2 x max_graphs capturing
        stops."""
        self._unreplayed_invalidations = 0
        """Module changes that dropped only never-replayed graphs since the last replay; at
        :data:`VOLATILE_INVALIDATIONS` capturing stops."""
        self._generation = self.watch.generation if self.watch is not None else 0
        self._stamp = self.hooks_stamp() if self.hooks_stamp is not None else None
        self._hooked_since: str | None = None
        """Why calls run eagerly since hooks came (after a capture), until they go."""
        self._hooked_calls = 0
        """Calls since then."""
        self._captured_weights: Hashable | None = None
        """``weights()`` at the last capture."""

    # ------------------------------------------------------------------ public

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.watch is not None and self.watch.generation != self._generation:
            self._invalidate()
        if self.hooks_stamp is not None:
            self._check_hooks()
        if (reason := self._hooked_since) is not None:
            self._hooked_calls += 1
            if self._entries and self._hooked_calls > HOOKED_CALLS_KEPT:
                self._drop_graphs(
                    "hooks_invalidation", f"{self.name}: {reason} for {HOOKED_CALLS_KEPT} calls"
                )
                self._hooked_since = reason  # reset() clears it; the hooks are still there
            return self._run_hooked(reason, args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._signature(leaves, spec)
        entry = self._entries.get(key) if key is not None else None
        if (
            key is None
            or key in self._failed
            or (entry is None and (self._thrashing() or self._volatile()))
        ):
            counters["cudagraphs.eager_call"] += 1
            return self.fn(*args, **kwargs)
        if entry is None:
            return self._capture(key, leaves, spec)
        self._entries.move_to_end(key)
        for hook in entry.before_replay:
            hook()
            replay_checks.note(hook, hook)  # an enclosing pool recording this call needs it
        tensors = [_distinct(x) for x in leaves if isinstance(x, torch.Tensor)]
        if tensors:
            torch._foreach_copy_(entry.static_views, tensors)
        entry.replay()
        entry.replays += 1
        self._unreplayed_evictions = 0
        self._unreplayed_invalidations = 0
        counters["cudagraphs.replay"] += 1
        outputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in entry.static_outputs]
        return pytree.tree_unflatten(outputs, entry.out_spec)

    def __len__(self) -> int:
        return len(self._entries)

    def signatures(self) -> list[Hashable]:
        """The kept signatures, least recently used first."""
        return list(self._entries)

    def reset(self) -> None:
        """Drop every graph (their memory goes back to the pool); the next calls capture
        afresh, even where capturing had stopped. Needed after changing the module in ways
        its arguments do not show."""
        self._entries.clear()
        self._failed.clear()
        self._unreplayed_evictions = 0
        self._unreplayed_invalidations = 0
        self._hooked_since = None  # the next capture asks about hooks again

    # ----------------------------------------------------------------- helpers

    def _signature(self, leaves: Sequence[Any], spec: pytree.TreeSpec) -> Hashable | None:
        """What a graph is specialised to, or None when this call cannot be replayed."""
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not any(self.capturer.accepts(t) for t in tensors):
            return None  # e.g. a model on the CPU: nothing to capture, nothing to say
        grad = torch.is_grad_enabled()
        if grad and (self.grad_sensitive or any(t.requires_grad for t in tensors)):
            self._warn_once(
                "grad",
                f"difforge cudagraphs: {self.name} called with gradients enabled; running "
                "without CUDA graphs (call it under torch.no_grad() or inference_mode())",
            )
            return None
        parts: list[Hashable] = [spec]
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if not self.capturer.accepts(leaf):
                    self._warn_once(
                        f"device:{leaf.device}",
                        f"difforge cudagraphs: {self.name} got a {leaf.device} tensor "
                        "argument; such calls run without CUDA graphs",
                    )
                    return None
                if not (leaf.is_contiguous() or _writable_layout(leaf)):
                    self._warn_once(
                        "overlap",
                        f"difforge cudagraphs: {self.name} got a tensor argument whose elements "
                        "alias each other (not just a broadcast); such calls run without CUDA "
                        "graphs",
                    )
                    return None
                parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
            elif isinstance(leaf, _PLAIN_VALUES):
                parts.append((type(leaf), leaf))
            else:
                self._warn_once(
                    f"type:{type(leaf).__name__}",
                    f"difforge cudagraphs: {self.name} got a {type(leaf).__name__} argument "
                    "(not a tensor or plain value); such calls run without CUDA graphs",
                )
                return None
        parts.append(_global_state())
        return tuple(parts)

    def _capture(self, key: Hashable, leaves: list[Any], spec: pytree.TreeSpec) -> Any:
        """Run the call once for real, then record it; returns the real call's result."""
        hooked = self.hooked() if self.hooked is not None else None
        if hooked is not None:
            # Not marked failed: once the hooks are gone (a cache disabled, offloading
            # removed) the next call captures.
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            return self._run_hooked(hooked, args, kwargs)
        static_leaves = [_static_copy(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        originals = [x for x in leaves if isinstance(x, torch.Tensor)]
        statics = [x for x in static_leaves if isinstance(x, torch.Tensor)]
        versions = [t._version for t in statics]
        # The ordinary call compiles (if Dynamo must) and warms lazy state up; nothing of
        # that may happen during a capture.
        with replay_checks.collecting() as hooks:
            result = self.fn(*args, **kwargs)
        # It ran on copies: what it returns must not be those copies (the next replay
        # refills them under the caller), and what it wrote into them goes back.
        result = _detach_from(result, statics)
        mutated = [
            (orig, static)
            for orig, static, version in zip(originals, statics, versions, strict=True)
            if static._version != version
        ]
        if mutated:
            for orig, static in mutated:
                _distinct(orig).copy_(_distinct(static))
            self._failed.add(key)
            self._warn_once(
                "mutation",
                f"difforge cudagraphs: {self.name} writes into its tensor arguments; its "
                "calls run without CUDA graphs",
            )
            return result
        device = next(t.device for t in statics if self.capturer.accepts(t))
        while len(self._entries) >= self.max_graphs:
            evicted, old = self._entries.popitem(last=False)
            counters["cudagraphs.evict"] += 1
            self._unreplayed_evictions += old.replays == 0
            log.info("difforge cudagraphs: %s evicted the graph for %s", self.name, evicted)
        try:
            replay, outputs = self.capturer.capture(
                functools.partial(self.fn, *args, **kwargs), device
            )
        except Exception as exc:  # whatever broke the capture, this signature runs eagerly
            self._failed.add(key)
            counters["cudagraphs.capture_failed"] += 1
            self._warn_once(
                f"capture:{type(exc).__name__}",
                f"difforge cudagraphs: capturing {self.name} failed ({type(exc).__name__}: "
                f"{exc}); calls of this shape run without CUDA graphs",
            )
            return result
        static_outputs, out_spec = pytree.tree_flatten(outputs)
        opaque = [x for x in static_outputs if not isinstance(x, (torch.Tensor, *_PLAIN_VALUES))]
        if opaque:
            # Its tensors would live in the shared pool, uncopied: the next replay of any
            # graph could overwrite them under the caller.
            self._failed.add(key)
            self._warn_once(
                f"output:{type(opaque[0]).__name__}",
                f"difforge cudagraphs: {self.name} returns a {type(opaque[0]).__name__} (not a "
                "tensor, a plain value or a pytree of them); its calls run without CUDA graphs",
            )
            return result
        self._entries[key] = _Entry(
            replay=replay,
            static_inputs=[x for x in static_leaves if isinstance(x, torch.Tensor)],
            static_outputs=static_outputs,
            out_spec=out_spec,
            before_replay=tuple(hooks),
        )
        counters["cudagraphs.capture"] += 1
        if self.weights is not None:
            self._captured_weights = self.weights()
        log.info(
            "difforge cudagraphs: %s captured graph %d/%d", self.name, len(self), self.max_graphs
        )
        return result

    def _run_hooked(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run a call eagerly: the module has hooks whose Python moves, casts or skips
        weights at each call, which a replay would skip."""
        self._warn_once(
            "hooks",
            f"difforge cudagraphs: {self.name}: {reason}, which a graph replay would skip; "
            "its calls run without CUDA graphs while they are there",
        )
        counters["cudagraphs.eager_call"] += 1
        return self.fn(*args, **kwargs)

    def _check_hooks(self) -> None:
        """When hooks came or went since the last call (set up on a module that already ran:
        offloading, a block cache, a guider's layer skip): run eagerly while they are there;
        when they went, drop the graphs if the weights moved meanwhile."""
        assert self.hooks_stamp is not None
        stamp = self.hooks_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        reason = self.hooked() if self.hooked is not None else None
        if reason is None and self._entries:
            if self.weights is None:
                self._drop_graphs("hooks_invalidation", f"{self.name}: hooks came and went")
            elif self.weights() != self._captured_weights:
                self._drop_graphs("hooks_invalidation", f"{self.name}: its weights moved")
        # set after a drop, whose reset() clears it
        self._hooked_since = reason
        self._hooked_calls = 0

    def _invalidate(self) -> None:
        """The module changed (a weight or sub-module replaced, a dtype or device
        conversion): every graph holds the old memory, so all are dropped."""
        assert self.watch is not None
        self._generation = self.watch.generation
        self._drop_graphs("invalidated", f"{self.name} changed")

    def _drop_graphs(self, counter: str, why: str) -> None:
        """Drop every graph, counting drops that wasted all of them (never replayed)."""
        if not (self._entries or self._failed):
            return
        wasted = bool(self._entries) and all(e.replays == 0 for e in self._entries.values())
        kept = self._unreplayed_invalidations + 1 if wasted else 0
        self.reset()
        self._unreplayed_invalidations = kept
        counters[f"cudagraphs.{counter}"] += 1
        log.info("difforge cudagraphs: %s; its graphs were dropped", why)

    def _volatile(self) -> bool:
        """Whether the module changed so often that no graph of it lived to be replayed."""
        return self._stop_capturing(
            "volatile",
            self._unreplayed_invalidations >= VOLATILE_INVALIDATIONS,
            f"{self.name}'s weights changed {self._unreplayed_invalidations} times before any "
            "graph of it was replayed (e.g. a diffusers pipeline casting an fp16 VAE with "
            "force_upcast to fp32 around every decode)",
        )

    def _thrashing(self) -> bool:
        """Whether so many graphs were evicted unreplayed that capturing stops."""
        return self._stop_capturing(
            "thrashing",
            self._unreplayed_evictions >= 2 * self.max_graphs,
            f"{self.name} had {self._unreplayed_evictions} graphs evicted without a single "
            "replay (each call brings new shapes, strides or non-tensor argument values; raise "
            "cudagraphs.max_graphs or pass changing values as tensors)",
        )

    def _stop_capturing(self, why: str, stop: bool, message: str) -> bool:
        """``stop``, saying so once (a warning, counter ``cudagraphs.<why>``) when True."""
        if not stop:
            return False
        if why not in self._warned:
            counters[f"cudagraphs.{why}"] += 1
        self._warn_once(
            why,
            f"difforge cudagraphs: {message}; it now runs without CUDA graphs (call "
            "difforge.reset_graphs to try again)",
        )
        return True

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warn(message)


def _distinct(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with every broadcast (stride-0) dimension narrowed to one element: a view
    of the same memory in which no two elements alias, so it can be written."""
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
        if stride == 0 and size > 1:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


def _writable_layout(tensor: torch.Tensor) -> bool:
    """Whether a buffer with ``tensor``'s strides can be filled through :func:`_distinct`
    (no aliasing besides broadcast dimensions, e.g. a timestep ``t.expand(batch)``)."""
    overlap = getattr(torch, "_debug_has_internal_overlap", None)
    return overlap is None or overlap(_distinct(tensor)) == 0


def _static_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A buffer with ``tensor``'s layout (broadcast dimensions included, so the graph sees
    the strides Dynamo compiled for), outside any graph pool, holding its values.

    Made outside inference mode: an inference tensor could not be refilled by a later call
    under ``no_grad`` (warm-up under ``inference_mode``, serving under ``no_grad``)."""
    with torch.inference_mode(False):
        static = torch.empty_strided(
            tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device
        )
        _distinct(static).copy_(_distinct(tensor))
    return static


def _global_state() -> Hashable:
    """The global state a compiled call depends on and Dynamo guards (it recompiles when
    it changes): a graph captured without autocast must not replay under it."""
    return (
        tuple(
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in ("cuda", "cpu")
        ),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
    )


def _detach_from(result: Any, statics: Sequence[torch.Tensor]) -> Any:
    """``result`` with every tensor that shares memory with one of ``statics`` cloned."""
    owned = {t.untyped_storage().data_ptr() for t in statics}
    leaves, spec = pytree.tree_flatten(result)
    leaves = [
        x.clone() if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in owned else x
        for x in leaves
    ]
    return pytree.tree_unflatten(leaves, spec)


def with_graph_pool(compiled: Any, pool_of: Callable[[Callable[..., Any]], GraphPool]) -> Any:
    """Route every call of ``compiled`` (an OptimizedModule or function) through a pool made
    by ``pool_of(call)`` (:func:`graphs_of` finds it again)."""
    return wrap_entry(compiled, pool_of)


def graphs_of(compiled: Any) -> GraphPool | None:
    """The graph pool behind a compiled module or function, if it has one; also behind
    the ``forward`` wrappers that diffusers' and accelerate's hooks install (each keeps
    what it wraps as ``__wrapped__``)."""
    entry = compiled.forward if isinstance(compiled, nn.Module) else compiled
    for _ in range(16):
        if isinstance(entry, GraphPool):
            return entry
        entry = getattr(entry, "__wrapped__", None)
        if entry is None:
            return None
    return None


def reset_graphs(compiled: Any) -> bool:
    """Drop every CUDA graph of ``compiled`` (after changing its module); False if it has
    no difforge graph pool (e.g. ``cudagraphs.impl`` 'trees')."""
    pool = graphs_of(compiled)
    if pool is None:
        return False
    pool.reset()
    return True


def requires_grad(module: Any) -> bool:
    """Whether ``module`` (or the module behind a compiled one) has trainable parameters."""
    target = getattr(module, "_orig_mod", module)
    if not isinstance(target, nn.Module):
        return True  # a plain function: we cannot tell, so grad mode stays eager
    return any(p.requires_grad for p in target.parameters())


__all__ = [
    "Capturer",
    "CudaCapturer",
    "GraphPool",
    "graphs_of",
    "requires_grad",
    "reset_graphs",
    "with_graph_pool",
]
