"""Wrapping a diffusers pipeline's own methods, on the instance, for compiled components.

``compile_pipe`` puts torch's ``OptimizedModule`` in a component's slot; diffusers methods
that pick components by class (``ModelMixin``, ``PreTrainedModel``) skip it, and methods that
change a component's weights behind attributes leave difforge's CUDA graphs stale. The
LoRA (:mod:`difforge.diffusers.lora`) and offloading (:mod:`difforge.diffusers.offload`)
families wrap such methods here: once per pipeline instance, never on the class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difforge.graph_pool import reset_graphs

__all__ = ["originals_in_place", "wrap_once"]

_WRAPPED = "__difforge_pipe_method__"
_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


@contextmanager
def originals_in_place(
    pipe: Any, names: tuple[str, ...], changes: bool = True
) -> Iterator[list[str]]:
    """Put the original module of every compiled component among ``names`` in its slot
    (the instance dict: no config change) for the duration; yields the names swapped.
    ``changes``: the caller may change the modules, so their CUDA graphs go after."""
    swapped = {
        name: module
        for name in names
        if isinstance(module := pipe.__dict__.get(name), _OptimizedModule)
    }
    for name, compiled in swapped.items():
        pipe.__dict__[name] = compiled._orig_mod
    try:
        yield list(swapped)
    finally:
        for name, compiled in swapped.items():
            if pipe.__dict__.get(name) is compiled._orig_mod:  # unless the method replaced it
                pipe.__dict__[name] = compiled
            if changes:
                reset_graphs(compiled)


def wrap_once(
    pipe: Any, method_names: tuple[str, ...], wrap: Callable[[str, Callable[..., Any]], Any]
) -> list[str]:
    """Replace each of ``pipe``'s bound methods ``method_names`` (those it has) by
    ``wrap(name, method)``, unless an earlier call did; returns the names wrapped now."""
    wrapped = []
    for method_name in method_names:
        method = getattr(pipe, method_name, None)
        if not callable(method) or getattr(method, _WRAPPED, False):
            continue
        wrapper = wrap(method_name, method)
        setattr(wrapper, _WRAPPED, True)
        # object.__setattr__: diffusers' pipeline __setattr__ would touch its config.
        object.__setattr__(pipe, method_name, wrapper)
        wrapped.append(method_name)
    return wrapped
