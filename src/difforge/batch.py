"""The batch axis under dynamic shapes: no recompilation between batch 1 and larger batches.

Dynamo gives every dynamic size a *backed* symbol, one that carries the example value, and
it never makes a symbol for a size of 0 or 1: a call at batch 1 compiles a graph where the
batch is the constant 1, and the first call at batch 2 recompiles (and a graph traced at
batch 2 guards ``batch >= 2``, so batch 1 recompiles after it). Models called with
classifier-free guidance never see a denoiser batch of 1; FLUX (guidance distilled, no CFG),
CFG-free runs of the others, the VAE and the text encoders do. ``shapes.batch`` (only with
``dynamic: true``) picks what happens:

``"upward"`` (the default for diffusers and transformers models): batch 1 brings batch >= 2
    A first call at batch 1 also compiles the graph for every batch >= 2, as ``"warmup"``
    does (below). A first call at batch 2 or more compiles only its own graph: a later call
    at batch 1 compiles then, reported as a recompile. The reason is the CFG denoiser
    (SDXL, PixArt, SD3 with a guidance scale above 1): its batch is twice the number of
    images, never 1, so a batch-1 graph made for it ahead of use is a second full compile
    that no call needs (measured: one dynamic SDXL UNet graph took 486 s to compile on an
    H100). What starts at batch 1 (FLUX's denoiser, the VAE, CFG-free runs) gets both
    graphs at its first call. A pipeline warmed up with CFG and later run without it
    (guidance scale 1) recompiles its denoiser once; ``"warmup"`` avoids that.
``"warmup"``: two graphs, both compiled at the first call
    The first call runs as usual; then the module is called once more at the other batch
    class (batch 1 if the first call had 2 or more, else 2; the batch-sized inputs sliced
    or repeated), so the graph for batch 1 and the one for every batch >= 2 both exist
    before any later call. That call's output is dropped, and its compilation is not
    reported as a recompile; a failure there is a warning, never the caller's error. Each
    graph is the ordinary (backed) one, so no step gets slower and batch 1 is not padded;
    the price is the second compilation, at the first call (one forward more too: a
    module with side effects in ``forward`` sees them twice).
``"unbacked"``: one graph for every batch, 1 included (opt-in)
    At each call, the leading dimension of every batch-sized tensor input is marked
    *unbacked* (``torch._dynamo.decorators.mark_unbacked``): a symbol without an example
    value, which Dynamo never specialises to 1. All of them share one symbol
    (``shape_id``), bounded below by 1 (``min=1``: without it PixArt's ``b < 2*b`` mask
    check breaks the graph) and hinted with the first call's batch (``hint_override``:
    Inductor's size heuristics and autotuning see a real batch, not their 8192 fallback).
    The marks are removed after the call: the caller's tensors keep no Dynamo state. Why it
    is not the default:

    * it is slower. H100, torch 2.11 (marking without ``min``, which 2.11 lacks), FLUX.1-dev
      cut to 2 + 4 blocks, bf16, 1024x1024: 31.76 ms a step at batch 2 against 28.74 ms for
      the backed graph (+10.5%), 16.52 against 14.47 ms at batch 1. GEMMs and cuDNN
      attention took the same time; Inductor's fused elementwise and norm kernels ran
      longer with an unbacked batch (a profile: 30.4 vs 26.8 ms of kernels per step);
    * torch 2.11 has no ``min`` (this mode is refused there), and its Inductor failed to
      lower PixArt-XL's resolution micro-condition (``reshape(batch, -1)`` then ``cat``)
      with an unbacked batch;
    * conv nets cannot take it (refused for modules with ``nn.GroupNorm``):
      ``F.group_norm`` checks its batch in Python and fails to trace, diffusers'
      ``Upsample2D``/``ResnetBlock2D`` branch on ``batch >= 64`` (SDXL's UNet broke into
      16 graphs), and a conv with an unbacked batch loses channels_last (the fake conv
      cannot pick a layout without a hint, so Inductor makes input and weight contiguous).

    Measured working on torch 2.13 (CPU): tiny PixArt, SD3 and FLUX, batches 1 to 8, every
    size of the sweep on one graph (``tests/diffusers/test_dynamic_batch.py``).
``"dynamo"``: Dynamo's own behaviour (batch 1 specialised, compiled on first use); no
    second compilation, for callers that never change between batch 1 and more (a
    denoiser always run with CFG). The default for plain functions and for modules built
    of no diffusers or transformers class: their leading dimension need not be a batch.

Batch-sized inputs: the batch is the leading size of the first tensor among the positional
then keyword arguments (``hidden_states``, ``sample``, latents), and a tensor input (in
nested lists, tuples and dicts too) is batch-sized when its leading size equals it. With
``"unbacked"`` the set of batch-sized inputs is fixed at the first call: a later call where
one of them is not batch-sized raises a clear error instead of failing the compiled graph's
runtime check.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from difforge.entry import wrap_entry
from difforge.errors import DifforgeError, OptionsError, warn
from difforge.options import BATCH_MODES, CompileConfig

KEY = "shapes.batch"
MODES: tuple[str, ...] = BATCH_MODES
#: The ``shape_id`` all batch dimensions share (one unbacked symbol for the batch).
SHAPE_ID = "difforge_batch"

#: ``mark_unbacked`` keyword arguments the ``"unbacked"`` mode needs.
_NEEDED = ("shape_id", "min", "hint_override")

Path = tuple[Any, ...]


def _mark_unbacked() -> Callable[..., None] | None:
    decorators = getattr(torch._dynamo, "decorators", None)
    return getattr(decorators, "mark_unbacked", None)


@functools.cache
def unbacked_support() -> str | None:
    """None when this torch can mark an unbacked batch; otherwise why not."""
    mark = _mark_unbacked()
    if mark is None:
        return "this torch has no torch._dynamo.decorators.mark_unbacked"
    try:
        params = inspect.signature(mark).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "mark_unbacked's signature cannot be read"
    missing = [name for name in _NEEDED if name not in params]
    if missing:
        return (
            f"this torch's mark_unbacked has no {', '.join(missing)} argument "
            f"(torch {torch.__version__}; 2.13 has them)"
        )
    return None


def has_group_norm(module: Any) -> bool:
    """Whether ``module`` has an ``nn.GroupNorm`` (a UNet, a VAE): no unbacked batch."""
    return isinstance(module, nn.Module) and any(
        isinstance(m, nn.GroupNorm) for m in module.modules()
    )


def batch_first_library(module: Any) -> bool:
    """Whether ``module`` is built of diffusers or transformers classes, whose inputs put
    the batch first (matched by module name: no import of either library)."""
    if not isinstance(module, nn.Module):
        return False
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__module__.startswith(("diffusers.", "transformers.")):
                return True
    return False


def resolve_batch_mode(config: CompileConfig, module: Any = None) -> str | None:
    """The batch mode ``config`` asks for on ``module``; None when ``dynamic`` is not true.

    Raises :class:`OptionsError` for a value that is not one of :data:`MODES`, for
    ``shapes.batch`` without ``dynamic: true``, and for ``"unbacked"`` on a torch or a
    module (with ``nn.GroupNorm``) that cannot take it.
    """
    value = config.settings.get(KEY)
    if value is not None and value not in MODES:
        raise OptionsError(
            f"option {KEY!r} must be one of {', '.join(MODES)} or null, got {value!r}"
        )
    if config.dynamic is not True:
        if value is not None and value != "dynamo":
            raise OptionsError(
                f"option {KEY!r}={value!r} needs 'dynamic': true (the batch of a static or "
                "automatic-dynamic graph is a constant until Dynamo recompiles)"
            )
        return None
    if value == "unbacked":
        why_not = unbacked_support()
        if why_not is None and has_group_norm(module):
            why_not = (
                "the module has nn.GroupNorm, whose batch check cannot trace an unbacked "
                "batch (a conv net: use 'warmup')"
            )
        if why_not is not None:
            raise OptionsError(f"option {KEY!r}='unbacked' is not available: {why_not}")
    if value is not None:
        return value
    return "upward" if batch_first_library(module) else "dynamo"


# --------------------------------------------------------------------------------------------
# Batch-sized inputs
# --------------------------------------------------------------------------------------------


def _tensors(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, tensor) for every tensor in nested lists, tuples and dicts, in order."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, (*path, key))


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Path, torch.Tensor]]:
    return [(p, t) for p, t in _tensors((args, kwargs)) if t.dim() >= 1]


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The leading size of the first tensor input (positional first), if any."""
    inputs = _inputs(args, kwargs)
    return int(inputs[0][1].shape[0]) if inputs else None


def batch_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
) -> dict[Path, torch.Tensor]:
    """The tensor inputs whose leading size is ``batch``, by path."""
    return {p: t for p, t in _inputs(args, kwargs) if t.shape[0] == batch}


def _describe(path: Path) -> str:
    where, *rest = path
    head = f"argument #{rest[0]}" if where == 0 else f"keyword {rest[0]!r}"
    return head + "".join(f"[{k!r}]" for k in rest[1:])


# --------------------------------------------------------------------------------------------
# "unbacked": mark at each call, unmark after
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def unbacked_batch(tensors: list[torch.Tensor], hint: int) -> Iterator[None]:
    """Mark dim 0 of each tensor unbacked (one shared symbol, >= 1) while the body runs.

    Tensors the caller marked themselves are left alone. Afterwards every attribute the
    marking added is removed, so the tensors carry no Dynamo marks out of the call.
    """
    mark = _mark_unbacked()
    assert mark is not None
    added: list[tuple[torch.Tensor, list[str]]] = []
    try:
        seen: set[int] = set()
        for tensor in tensors:
            if id(tensor) in seen or getattr(tensor, "_has_dynamo_dim_marking", False):
                continue
            seen.add(id(tensor))
            before = set(tensor.__dict__)
            mark(tensor, 0, hint_override=hint, shape_id=SHAPE_ID, min=1)
            added.append((tensor, [k for k in tensor.__dict__ if k not in before]))
        yield
    finally:
        for tensor, names in added:
            for name in names:
                tensor.__dict__.pop(name, None)


class BatchAxis:
    """Call-time handling of the batch axis for one compiled callable (see module doc)."""

    def __init__(self, mode: str, name: str, expected_compiles: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown batch mode {mode!r}")
        self.mode = mode
        self.name = name
        self.expected_compiles = expected_compiles
        """A context manager factory under which compiles are not recompiles (warm-up)."""
        self.paths: frozenset[Path] | None = None
        """``"unbacked"``: the batch-sized inputs of the first call."""
        self.hint: int | None = None
        self.warmed = False

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        if self.mode == "dynamo":
            return call

        @functools.wraps(call)
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.mode == "unbacked":
                return self._call_unbacked(call, args, kwargs)
            out = call(*args, **kwargs)
            if not self.warmed:
                self.warmed = True
                batch = batch_size(args, kwargs)
                if batch and (self.mode == "warmup" or batch == 1):
                    self._warm_up(call, args, kwargs, batch)
            return out

        return run

    # "unbacked"
    def _call_unbacked(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        batch = batch_size(args, kwargs)
        if not batch:  # no tensor input, or an empty batch (min=1 would reject it)
            return call(*args, **kwargs)
        found = batch_inputs(args, kwargs, batch)
        if self.paths is None:
            self.paths, self.hint = frozenset(found), batch
        tensors = []
        for path in sorted(self.paths, key=repr):
            tensor = found.get(path)
            if tensor is None:
                inputs = dict(_inputs(args, kwargs))
                shape = tuple(inputs[path].shape) if path in inputs else "no tensor"
                raise DifforgeError(
                    f"{self.name}: {_describe(path)} had the batch size at the first call "
                    f"(graph compiled with 'shapes.batch': 'unbacked', one batch symbol for "
                    f"every batch-sized input) but is {shape} now, at batch {batch}; pass "
                    "batch-sized inputs, or compile with 'shapes.batch': 'dynamo'"
                )
            tensors.append(tensor)
        assert self.hint is not None
        with unbacked_batch(tensors, self.hint):
            return call(*args, **kwargs)

    # "warmup" and "upward"
    def _warm_up(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
    ) -> None:
        other = 2 if batch == 1 else 1
        found = {id(t) for t in batch_inputs(args, kwargs, batch).values()}

        def resize(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if id(value) not in found:
                    return value
                # New tensors, not views (Dynamo guards a view's base), in the same memory
                # format (cat and clone keep channels_last).
                return value[:1].clone() if other == 1 else torch.cat([value, value])
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
                return type(value)(*(resize(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(resize(v) for v in value)
            if isinstance(value, dict):
                return {k: resize(v) for k, v in value.items()}
            return value

        expected = self.expected_compiles or contextlib.nullcontext
        try:
            with expected():
                call(*resize(args), **resize(kwargs))
        except Exception as exc:  # a warm-up must never fail the user's call
            warn(
                f"difforge: {self.name}: could not compile batch {other} ahead of use "
                f"('shapes.batch': {self.mode!r}); it will compile at its first call "
                f"({type(exc).__name__}: {exc})",
            )


def with_batch_axis(compiled: Any, axis: BatchAxis) -> Any:
    """Make every call of ``compiled`` (an OptimizedModule or function) go through ``axis``."""
    if axis.mode == "dynamo":
        return compiled
    return wrap_entry(compiled, axis.wrap)


__all__ = [
    "KEY",
    "MODES",
    "BatchAxis",
    "batch_first_library",
    "batch_inputs",
    "batch_size",
    "has_group_norm",
    "resolve_batch_mode",
    "unbacked_batch",
    "unbacked_support",
    "with_batch_axis",
]
