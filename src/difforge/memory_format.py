"""The ``memory_format`` option: conv weights and 4-D inputs in channels_last (or not).

cuDNN and Inductor's conv kernels run NHWC (channels_last) fastest on tensor cores;
converting weights once and inputs at the graph boundary beats converting per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_HOOK_ATTR = "_difforge_memory_format_hook"
_CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def _torch_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def convert_conv_weights(module: nn.Module, name: str) -> int:
    """Re-lay the 4-D conv weights in place (same Parameter objects); returns how many."""
    fmt = _torch_format(name)
    converted = 0
    for sub in module.modules():
        if isinstance(sub, _CONV_TYPES) and sub.weight.dim() == 4:
            # .data assignment keeps the Parameter identity, so optimizers, tied
            # weights and the compiled module all keep seeing the same tensor.
            sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)
            converted += 1
    return converted


def _convert_inputs(value: Any, fmt: torch.memory_format) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=fmt)
    if isinstance(value, (list, tuple)):
        return type(value)(_convert_inputs(v, fmt) for v in value)
    return value


def _convert_call(
    args: tuple, kwargs: dict[str, Any], fmt: torch.memory_format
) -> tuple[tuple, dict[str, Any]]:
    """A call's positional and keyword arguments with their 4-D floating tensors in ``fmt``
    (the input hook's and :func:`converting_inputs`' one conversion)."""
    return _convert_inputs(args, fmt), {k: _convert_inputs(v, fmt) for k, v in kwargs.items()}


def remove_input_hook(module: nn.Module) -> None:
    """Drop the input-layout hook :func:`install_input_hook` put on ``module``, if any."""
    old = getattr(module, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
        delattr(module, _HOOK_ATTR)


def install_input_hook(module: nn.Module, name: str) -> None:
    """Lay ``module``'s 4-D floating inputs out as ``name`` on every (eager) call.

    For modules that run eagerly around compiled parts (``compile.regional: blocks``). A
    compiled module gets :func:`converting_inputs` around its call instead: Dynamo traces a
    module's hooks, as a frame of their own with its own guards or, under ``fullgraph``,
    inside the graph, where this disabled function is an error."""
    remove_input_hook(module)
    fmt = _torch_format(name)

    @torch.compiler.disable
    def to_format(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _convert_call(args, kwargs, fmt)

    handle = module.register_forward_pre_hook(to_format, with_kwargs=True)
    object.__setattr__(module, _HOOK_ATTR, handle)


def converting_inputs(call: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``call`` with its 4-D floating inputs laid out as ``name`` first, outside Dynamo
    (wrapped around a compiled module's entry; see :func:`install_input_hook`)."""
    fmt = _torch_format(name)

    @functools.wraps(call)
    def converted(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _convert_call(args, kwargs, fmt)
        return call(*args, **kwargs)

    return converted


def apply_memory_format(module: nn.Module, name: str) -> int:
    """Apply ``name`` to ``module``'s conv weights and, by a hook, to its 4-D floating
    inputs (for eager use; ``difforge.compile`` converts a compiled module's inputs
    outside the graph instead).

    Idempotent: a second call replaces the input hook rather than stacking another.
    Returns the number of conv weights converted (0 for ``preserve``, which only removes
    the hook).
    """
    remove_input_hook(module)
    if name == "preserve":
        return 0
    converted = convert_conv_weights(module, name)
    install_input_hook(module, name)
    return converted
