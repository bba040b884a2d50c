"""diffusers' pipeline-level LoRA methods on a compiled pipeline.

diffusers' ``set_adapters``, ``unload_lora_weights``, ``fuse_lora`` and their kin act on a
component only when its class is a ``ModelMixin`` or ``PreTrainedModel``. A compiled
component is torch's ``OptimizedModule`` (stock ``torch.compile`` makes the same), so those
methods skip it: ``set_adapters`` raises that the adapter is not there,
``unload_lora_weights`` and ``fuse_lora`` leave the LoRA as it was without a word, and a
text encoder's LoRA loads under names PEFT does not find. ``compile_pipe`` therefore wraps
those methods on the pipeline instance (:mod:`difforge.diffusers.pipe_methods`): during each
call the original module stands in every compiled component's slot, then the compiled one
goes back and its CUDA graphs are dropped, since a LoRA scale is a plain attribute that a
graph replay would not see (:mod:`difforge.module_watch`).

A denoiser compiled with ``low-precision``/``O3`` has fp8 linears that PEFT can neither wrap
(a LoRA loaded after compiling) nor merge into (``fuse_lora``), and diffusers' FLUX loader
looks for their ``.weight``: the errors say ``KeyError: '...to_k.weight'`` or name our class
and nothing else, after part of the LoRA went in. So ``load_lora_weights``, ``fuse_lora`` and
``unfuse_lora`` raise :class:`LoraOnFp8Error` first, saying what to do instead, unless the
call says it touches only components without fp8 linears: ``fuse_lora``/``unfuse_lora``
through ``components``, ``load_lora_weights`` through a state dict whose keys all name a
text encoder (a path is refused: what it holds is known only once loaded). A LoRA loaded
before compiling works: the swap quantizes the base linear inside PEFT's layer, the LoRA's
own matrices stay in high precision, and it can be scaled, disabled and unloaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from difforge.diffusers.pipe_methods import component, originals_in_place, wrap_once
from difforge.errors import DifforgeError
from difforge.quant import Fp8Linear

__all__ = ["LORA_METHODS", "LoraOnFp8Error", "pass_lora_methods_through"]

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


class LoraOnFp8Error(DifforgeError, ValueError):
    """A LoRA method met a linear that ``low-precision``/``O3`` made fp8."""


def _passing_through(
    pipe: Any,
    method_name: str,
    method: Callable[..., Any],
    names: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    if method_name in NEEDS_HIGH_PRECISION:
        quantized = _with_fp8_linears(pipe, names)
        targets = _targets(method_name, method, args, kwargs)
        if targets is not None:
            quantized = [name for name in quantized if name in targets]
        if quantized:
            raise LoraOnFp8Error(
                f"{method_name}: {', '.join(quantized)} of this pipeline has fp8 linears "
                "(difforge low-precision / O3), which PEFT cannot wrap or merge LoRA weights "
                "into. Load LoRAs before compile_pipe (the swap then keeps each LoRA's own "
                "weights in high precision); to merge one for good, call fuse_lora() and "
                "unload_lora_weights() before compile_pipe. A LoRA of the text encoders "
                "alone loads as a state dict whose keys all start with 'text_encoder'; "
                "fuse_lora/unfuse_lora take components=[...] without the denoiser."
            )
    with originals_in_place(pipe, names, changes=method_name not in READ_ONLY):
        return method(*args, **kwargs)


def _targets(
    method_name: str, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> set[str] | None:
    """The components a call of ``method_name`` will touch, where the call says so; None
    when it may touch any (or its arguments do not fit: the method raises its own error)."""
    try:
        bound = inspect.signature(method).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    if method_name in ("fuse_lora", "unfuse_lora"):
        components = bound.arguments.get("components")
        return set(components) if isinstance(components, list | tuple) else None
    source = bound.arguments.get("pretrained_model_name_or_path_or_dict")
    if not isinstance(source, Mapping) or not source:
        return None
    # diffusers' own format names each key's component first; any other format (kohya's
    # "lora_unet_...", a bare model's keys) may reach the denoiser.
    prefixes = {str(key).split(".", 1)[0] for key in source}
    return prefixes if all(p.startswith("text_encoder") for p in prefixes) else None


def _with_fp8_linears(pipe: Any, names: tuple[str, ...]) -> list[str]:
    """The top-level components among ``names`` that hold fp8 linears."""
    return [
        name
        for name in names
        if "." not in name
        and isinstance(found := component(pipe, name), nn.Module)
        and any(isinstance(m, Fp8Linear) for m in found.modules())
    ]


def pass_lora_methods_through(pipe: Any, names: tuple[str, ...]) -> list[str]:
    """Wrap ``pipe``'s LoRA methods (once) so that they reach the compiled components among
    ``names``; returns the methods wrapped now."""
    return wrap_once(pipe, LORA_METHODS, names, _passing_through)
