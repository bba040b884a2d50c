"""Notice when a compiled module's parameters, buffers or sub-modules are replaced.

A CUDA graph bakes in the memory of every weight it read. Dynamo would recompile when a
module changes (its guards see a new parameter or sub-module), but a graph replay never
asks Dynamo, so :mod:`difforge.graph_pool` must learn of such changes another way. A
:class:`ModuleWatch` counts, in its module's tree:

- assignments: torch calls global registration hooks whenever a parameter, buffer or
  sub-module is assigned to any module (``m.weight = nn.Parameter(...)``,
  ``register_buffer``, a LoRA layer swapped in, ``fuse_qkv_projections`` adding a fused
  linear);
- conversions: ``Module._apply``, behind ``.to()``, ``.half()``, ``.float()``, ``.cuda()``
  and the like, which gives every parameter new memory (``param.data = converted``) with no
  registration. A diffusers SDXL pipeline does this around every VAE decode when the VAE is
  fp16 and ``force_upcast`` is set; a graph replayed after it read freed memory (an illegal
  memory access on an H100). torch has no hook for it, so ``_apply`` is wrapped once per
  process.

- diffusers' switches: ``set_processor`` (behind ``set_attn_processor``),
  ``set_attention_backend``/``reset_attention_backend`` and a model's own LoRA methods
  (``set_adapters``, ``disable_lora``, ``fuse_lora`` ...) change what a module computes
  through plain attributes or ``param.data = ...``; those methods
  (:data:`DIFFUSERS_SWITCHES`) are wrapped once, when diffusers' modules are loaded, to
  count as a change of the module they act on.

Not seen: in-place updates, which graphs see anyway (same memory); ``param.data = other``
written by hand; other plain attributes, such as a LoRA scale set on a PEFT layer
directly (not through the model's methods). After those, call ``difforge.reset_graphs(compiled)``.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

_lock = threading.Lock()
_watches: weakref.WeakSet[ModuleWatch] = weakref.WeakSet()
_installed = False


class ModuleWatch:
    """A generation number of ``root``'s tree that grows at each parameter, buffer or
    sub-module assignment inside it."""

    def __init__(self, root: nn.Module) -> None:
        self.generation = 0
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._add(root)
        with _lock:
            _install_hooks()
            _watches.add(self)

    def _add(self, module: nn.Module) -> None:
        for sub in module.modules():
            try:
                self._modules.add(sub)
            except TypeError:  # a module class without identity hashing: cannot be watched
                continue

    def _saw(self, module: nn.Module, value: Any) -> None:
        if module in self._modules:
            self.generation += 1
            if isinstance(value, nn.Module):
                self._add(value)  # its own later changes count too


def _on_registration(module: nn.Module, name: str, value: Any) -> None:
    # Runs for every assignment to any module in the process (model construction too):
    # a membership test per live watch, and None so the assigned value is unchanged.
    if torch.compiler.is_compiling():
        # An assignment inside a compiled forward (a model that registers a buffer per
        # call): Dynamo would trace this hook, guard on the watches' generations and
        # recompile at every call. Such a model re-registers at every call anyway.
        return None
    for watch in list(_watches):
        try:
            watch._saw(module, value)
        except TypeError:
            continue
    return None


def _address(tensor: torch.Tensor) -> int | None:
    """The tensor's data address, or None for one without plain storage (a sparse tensor,
    a wrapper subclass such as a quantized weight): identity, dtype and device must do."""
    try:
        return tensor.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def weight_addresses(module: nn.Module) -> tuple[tuple[Any, ...], ...]:
    """Where every parameter and buffer of ``module``'s tree lives now (address, dtype,
    device): hooks that move weights by ``param.data = ...`` (diffusers' streamed group
    offloading, accelerate's offload to meta) change it, which no registration hook or
    ``_apply`` shows. Read from each module's own tensors (no names built)."""
    return tuple(
        (_address(t), t.dtype, t.device) for sub in module.modules() for t in _own_tensors(sub)
    )


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s own parameters and buffers (not its children's)."""
    tensors = [*module._parameters.values(), *module._buffers.values()]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _own_memory(module: nn.Module) -> list[tuple[int, int | None, torch.dtype, torch.device]]:
    """Identity, address, dtype and device of ``module``'s own parameters and buffers."""
    return [(id(t), _address(t), t.dtype, t.device) for t in _own_tensors(module)]


def _watching_apply(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Module._apply`` that reports each module whose own weights it moved (it recurses
    into children itself, so each module of a converted tree reports for itself). A no-op
    conversion (``.to()`` to the dtype and device a module already has) reports nothing."""

    @functools.wraps(original)
    def _apply(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or not _watches:
            return original(self, *args, **kwargs)
        before = _own_memory(self)
        result = original(self, *args, **kwargs)
        if _own_memory(self) != before:
            _on_registration(self, "_apply", None)
        return result

    _apply.__difforge_watch__ = True  # type: ignore[attr-defined]
    return _apply


#: diffusers' methods that change what a module computes through plain attributes (an
#: attention processor or backend, FreeU's factors, SD3's feed-forward chunking, a LoRA's
#: scale or on/off switch) or by ``param.data = ...`` (fusing a LoRA into its base
#: weights): (module, class, method).
DIFFUSERS_SWITCHES: tuple[tuple[str, str, str], ...] = (
    ("diffusers.models.attention_processor", "Attention", "set_processor"),
    ("diffusers.models.attention", "AttentionModuleMixin", "set_processor"),
    ("diffusers.models.attention", "AttentionModuleMixin", "set_attention_backend"),
    ("diffusers.models.modeling_utils", "ModelMixin", "set_attention_backend"),
    ("diffusers.models.modeling_utils", "ModelMixin", "reset_attention_backend"),
    ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel", "enable_freeu"),
    ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel", "disable_freeu"),
    (
        "diffusers.models.transformers.transformer_sd3",
        "SD3Transformer2DModel",
        "enable_forward_chunking",
    ),
    (
        "diffusers.models.transformers.transformer_sd3",
        "SD3Transformer2DModel",
        "disable_forward_chunking",
    ),
    *(
        ("diffusers.loaders.peft", "PeftAdapterMixin", name)
        for name in (
            "set_adapters",
            "set_adapter",
            "enable_adapters",
            "disable_adapters",
            "enable_lora",
            "disable_lora",
            "fuse_lora",
            "unfuse_lora",
            "unload_lora",
            "delete_adapters",
        )
    ),
)


def _reporting(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` that reports its module as changed (as an assignment would)."""

    @functools.wraps(method)
    def switch(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        _on_registration(self, method.__name__, None)
        return result

    switch.__difforge_watch__ = True  # type: ignore[attr-defined]
    return switch


def _watch_diffusers_switches() -> None:
    """Wrap :data:`DIFFUSERS_SWITCHES` whose classes are loaded (each once)."""
    for module_name, class_name, method_name in DIFFUSERS_SWITCHES:
        owner = getattr(sys.modules.get(module_name), class_name, None)
        method = owner.__dict__.get(method_name) if owner is not None else None
        if callable(method) and not getattr(method, "__difforge_watch__", False):
            setattr(owner, method_name, _reporting(method))


def _install_hooks() -> None:
    global _installed
    _watch_diffusers_switches()  # diffusers may have been loaded since the last watch
    if _installed:
        return
    module_hooks.register_module_parameter_registration_hook(_on_registration)
    module_hooks.register_module_buffer_registration_hook(_on_registration)
    module_hooks.register_module_module_registration_hook(_on_registration)
    original = getattr(nn.Module, "_apply", None)
    if callable(original) and not getattr(original, "__difforge_watch__", False):
        nn.Module._apply = _watching_apply(original)  # type: ignore[method-assign]
    _installed = True


__all__ = ["ModuleWatch", "weight_addresses"]
