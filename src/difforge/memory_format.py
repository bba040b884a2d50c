"""The ``memory_format`` option: conv weights and 4-D inputs in channels_last (or not).

cuDNN and Inductor's conv kernels run NHWC (channels_last) fastest on tensor cores;
converting weights once and inputs at the graph boundary beats converting per layer.
"""

from __future__ import annotations

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


def apply_memory_format(module: nn.Module, name: str) -> int:
    """Apply ``name`` to ``module``'s conv weights and to its 4-D floating inputs.

    Idempotent: a second call replaces the input hook rather than stacking another.
    Returns the number of conv weights converted (0 for ``preserve``).
    """
    old = getattr(module, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
        delattr(module, _HOOK_ATTR)
    if name == "preserve":
        return 0
    converted = convert_conv_weights(module, name)
    fmt = _torch_format(name)

    # Outside Dynamo: a pre-hook runs before the compiled forward, so Dynamo would trace
    # it as a frame of its own, with its own guards (argument count, sizes) that recompile
    # for every module and batch it sees; eagerly it is one layout copy per 4-D input.
    @torch.compiler.disable
    def to_format(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _convert_inputs(args, fmt), {k: _convert_inputs(v, fmt) for k, v in kwargs.items()}

    handle = module.register_forward_pre_hook(to_format, with_kwargs=True)
    object.__setattr__(module, _HOOK_ATTR, handle)
    return converted
