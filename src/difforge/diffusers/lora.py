"""diffusers' pipeline-level LoRA methods on a compiled pipeline.

diffusers' ``set_adapters``, ``unload_lora_weights``, ``fuse_lora`` and their kin act on a
component only when its class is a ``ModelMixin`` or ``PreTrainedModel``. A compiled
component is torch's ``OptimizedModule`` (stock ``torch.compile`` makes the same), so those
methods skip it: ``set_adapters`` raises that the adapter is not there,
``unload_lora_weights`` and ``fuse_lora`` leave the LoRA as it was without a word, and a
text encoder's LoRA loads under names PEFT does not find. ``compile_pipe`` therefore wraps
those methods on the pipeline instance (never the class): during each call the original
module stands in every compiled component's slot, then the compiled one goes back and its
CUDA graphs are dropped, since a LoRA scale is a plain attribute that a graph replay would
not see (:mod:`difforge.module_watch`).

A denoiser compiled with ``low-precision``/``O3`` has fp8 linears that PEFT can neither wrap
(a LoRA loaded after compiling) nor merge into (``fuse_lora``), and diffusers' FLUX loader
looks for their ``.weight``: the errors say ``KeyError: '...to_k.weight'`` or name our class
and nothing else, after part of the LoRA went in. So ``load_lora_weights``, ``fuse_lora`` and
``unfuse_lora`` raise :class:`LoraOnFp8Error` first, saying what to do instead. A LoRA loaded
before compiling works: the swap quantizes the base linear inside PEFT's layer, the LoRA's
own matrices stay in high precision, and it can be scaled, disabled and unloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difforge.errors import DifforgeError
from difforge.graph_pool import reset_graphs
from difforge.quant import Fp8Linear

__all__ = ["LORA_METHODS", "LoraOnFp8Error", "originals_in_place", "pass_lora_methods_through"]

#: diffusers' LoraBaseMixin methods that look components up on the pipeline.
LORA_METHODS: tuple[str, ...] = (
    "load_lora_weights",
    "unload_lora_weights",
    "fuse_lora",
    "unfuse_lora",
    "set_adapters",
    "disable_lora",
    "enable_lora",
    "delete_adapters",
    "get_active_adapters",
    "get_list_adapters",
    "set_lora_device",
)

#: The methods that change nothing: no graphs to drop after them.
READ_ONLY: frozenset[str] = frozenset({"get_active_adapters", "get_list_adapters"})

#: The methods that would read or write the base weights of LoRA-targeted linears.
NEEDS_HIGH_PRECISION: frozenset[str] = frozenset({"load_lora_weights", "fuse_lora", "unfuse_lora"})

_WRAPPED = "__difforge_lora_passthrough__"


class LoraOnFp8Error(DifforgeError, ValueError):
    """A LoRA method met a linear that ``low-precision``/``O3`` made fp8."""


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


def _passing_through(method: Callable[..., Any], pipe: Any, names: tuple[str, ...]) -> Any:
    checks_fp8 = method.__name__ in NEEDS_HIGH_PRECISION
    changes = method.__name__ not in READ_ONLY

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with originals_in_place(pipe, names, changes) as swapped:
            if checks_fp8 and (quantized := _with_fp8_linears(pipe, swapped)):
                raise LoraOnFp8Error(
                    f"{method.__name__}: {', '.join(quantized)} of this pipeline has fp8 "
                    "linears (difforge low-precision / O3), which PEFT cannot wrap or merge "
                    "LoRA weights into. Load LoRAs before compile_pipe (the swap then keeps "
                    "each LoRA's own weights in high precision); to merge one for good, call "
                    "fuse_lora() and unload_lora_weights() before compile_pipe."
                )
            return method(*args, **kwargs)

    setattr(call, _WRAPPED, True)
    return call


def _with_fp8_linears(pipe: Any, names: list[str]) -> list[str]:
    return [n for n in names if any(isinstance(m, Fp8Linear) for m in pipe.__dict__[n].modules())]


def pass_lora_methods_through(pipe: Any, names: tuple[str, ...]) -> list[str]:
    """Wrap ``pipe``'s LoRA methods (once) so that they reach the compiled components among
    ``names``; returns the methods wrapped now."""
    wrapped = []
    for method_name in LORA_METHODS:
        method = getattr(pipe, method_name, None)
        if not callable(method) or getattr(method, _WRAPPED, False):
            continue
        # object.__setattr__: diffusers' pipeline __setattr__ would touch its config.
        object.__setattr__(pipe, method_name, _passing_through(method, pipe, names))
        wrapped.append(method_name)
    return wrapped
