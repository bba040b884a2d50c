"""Wrapping a diffusers pipeline's own methods, on the instance, for compiled components.

``compile_pipe`` puts torch's ``OptimizedModule`` in a component's slot (or, under
``compile.regional: 'blocks'``, in its repeated blocks' slots); diffusers methods that pick
components by class (``ModelMixin``, ``PreTrainedModel``) skip it, PEFT would see the
wrappers' ``_orig_mod`` in module names, and methods that change a component's weights
behind attributes leave difforge's CUDA graphs stale. The LoRA
(:mod:`difforge.diffusers.lora`) and offloading (:mod:`difforge.diffusers.offload`)
families wrap such methods here: once per pipeline instance, never on the class. Not
thread-safe: while a wrapped method runs, the pipeline's slots hold the eager modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from difforge.graph_pool import reset_graphs
from difforge.regional import compiled_blocks

__all__ = ["PipeMethod", "component", "originals_in_place", "reset_component_graphs", "wrap_once"]

_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


def component(pipe: Any, name: str) -> Any:
    """The object in slot ``name`` (``"transformer"``, or ``"vae.decoder"`` inside the VAE)."""
    head, _, attr = name.partition(".")
    found = getattr(pipe, head, None)
    return getattr(found, attr, None) if attr and found is not None else found


def reset_component_graphs(pipe: Any, names: tuple[str, ...]) -> None:
    """Drop the CUDA graphs of every component among ``names`` (after a change that a
    replay cannot see); components without a graph pool are left alone."""
    for name in names:
        found = component(pipe, name)
        if isinstance(found, nn.Module):
            reset_graphs(found)


@contextmanager
def originals_in_place(
    pipe: Any, names: tuple[str, ...], changes: bool = True
) -> Iterator[list[str]]:
    """Put the original module of every compiled top-level component among ``names`` in
    its slot (the instance dict: no config change), and the original of every block
    compiled in place, for the duration; yields the component names swapped. ``changes``:
    the caller may change the modules, so their CUDA graphs go after."""
    swapped = {
        name: module
        for name in names
        if "." not in name and isinstance(module := pipe.__dict__.get(name), _OptimizedModule)
    }
    for name, compiled in swapped.items():
        pipe.__dict__[name] = compiled._orig_mod
    blocks = [
        found
        for name in names
        if "." not in name and isinstance(module := pipe.__dict__.get(name), nn.Module)
        for found in compiled_blocks(module)
    ]
    for parent, attr, block in blocks:
        parent._modules[attr] = block._orig_mod
    try:
        yield list(swapped)
    finally:
        for parent, attr, block in blocks:
            if parent._modules.get(attr) is block._orig_mod:
                parent._modules[attr] = block
        for name, compiled in swapped.items():
            if pipe.__dict__.get(name) is compiled._orig_mod:  # unless the method replaced it
                pipe.__dict__[name] = compiled
        if changes:
            reset_component_graphs(pipe, names)


#: How a family runs a wrapped method: ``around(pipe, name, method, names, args, kwargs)``
#: with ``method`` the class's method bound to ``pipe``. A module-level function, so that
#: a wrapper pickles and deep-copies with its pipeline.
Around = Callable[
    [Any, str, Callable[..., Any], tuple[str, ...], tuple[Any, ...], dict[str, Any]], Any
]


class PipeMethod:
    """One pipeline method wrapped by difforge, stored on the instance under its name.

    It holds the pipeline, the method's name, the components it concerns and its family's
    ``around``, and finds the class's method at each call: a ``deepcopy`` or a pickle of
    the pipeline carries wrappers that act on the copy (a closure would act on the
    original, or not pickle at all)."""

    def __init__(self, pipe: Any, name: str, names: tuple[str, ...], around: Around) -> None:
        self.pipe = pipe
        self.name = name
        self.names = names
        self.around = around

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The class's method, bound to the pipeline."""
        return getattr(type(self.pipe), self.name).__get__(self.pipe)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.around(self.pipe, self.name, self.__wrapped__, self.names, args, kwargs)

    def __repr__(self) -> str:
        return f"<difforge-wrapped {type(self.pipe).__name__}.{self.name}>"


def wrap_once(
    pipe: Any, method_names: tuple[str, ...], names: tuple[str, ...], around: Around
) -> list[str]:
    """Put a :class:`PipeMethod` for each of ``pipe``'s methods ``method_names`` (those its
    class has) on the instance, unless one is there; returns the names wrapped now."""
    wrapped = []
    for method_name in method_names:
        if not callable(getattr(type(pipe), method_name, None)):
            continue
        if isinstance(pipe.__dict__.get(method_name), PipeMethod):
            continue
        # object.__setattr__: diffusers' pipeline __setattr__ would touch its config.
        object.__setattr__(pipe, method_name, PipeMethod(pipe, method_name, names, around))
        wrapped.append(method_name)
    return wrapped
