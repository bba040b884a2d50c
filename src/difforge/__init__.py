"""difforge: a torch.compile backend for diffusion models.

import difforge
model = difforge.compile(model, options={"mode": "O2"})
model = torch.compile(model, backend="difforge", options={"mode": "O3"})
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import torch
from torch import nn

from difforge import regional
from difforge._version import __version__
from difforge.backend import DifforgeBackend, compile_records, difforge_backend
from difforge.batch import BatchAxis, resolve_batch_mode, with_batch_axis
from difforge.dynamic import apply_shape_adapters
from difforge.entry import wrap_entry
from difforge.errors import DifforgeError, OptionsError, PassError
from difforge.fused_projections import fuse_qkv_projections
from difforge.graph_pool import GraphPool, graphs_of, requires_grad, reset_graphs, with_graph_pool
from difforge.memory_format import (
    convert_conv_weights,
    converting_inputs,
    install_input_hook,
    remove_input_hook,
)
from difforge.module_hooks import hooks_reason, hooks_stamp
from difforge.module_watch import ModuleWatch, weight_addresses
from difforge.options import MODES, PRESETS, CompileConfig, load_options, parse_options
from difforge.passes import counters
from difforge.precompile import (
    advance_unique_ids,
    module_of_globals,
    precompiling,
    with_precompile,
)
from difforge.precompile import enabled as precompile_enabled
from difforge.precompile import folder as precompile_folder
from difforge.quant.auto import swap_fp8_linears
from difforge.tracing import with_tracing_settings

__all__ = [
    "MODES",
    "PRESETS",
    "CompileConfig",
    "DifforgeBackend",
    "DifforgeError",
    "OptionsError",
    "PassError",
    "__version__",
    "compile",
    "compile_records",
    "counters",
    "graphs_of",
    "parse_options",
    "reset_graphs",
]

OUR_BACKENDS = ("difforge", "nexfort")  # "nexfort": the seed's examples run unchanged

T = TypeVar("T", bound=Callable[..., Any])


def _register_with_dynamo() -> None:
    from torch._dynamo.backends import registry

    # When torch found us through the entry point it is importing us right now and
    # registers the name itself afterwards; registering here too would be a duplicate.
    if "difforge" not in registry._BACKENDS and "difforge" not in registry._COMPILER_FNS:
        registry.register_backend(difforge_backend, name="difforge")


_register_with_dynamo()


@overload
def compile(
    module: None = None,
    *,
    backend: str | Callable[..., Any] = ...,
    options: Mapping[str, Any] | str | None = ...,
    dynamic: bool | None = ...,
    fullgraph: bool | None = ...,
) -> Callable[[T], T]: ...


@overload
def compile(
    module: T,
    *,
    backend: str | Callable[..., Any] = ...,
    options: Mapping[str, Any] | str | None = ...,
    dynamic: bool | None = ...,
    fullgraph: bool | None = ...,
) -> T: ...


def compile(
    module: Any = None,
    *,
    backend: str | Callable[..., Any] = "difforge",
    options: Mapping[str, Any] | str | None = None,
    dynamic: bool | None = None,
    fullgraph: bool | None = None,
) -> Any:
    """Compile ``module`` (an ``nn.Module`` or a function) with difforge.

    Options are validated now, not at the first forward. Under ``low-precision``/``O3``
    (``quant.fp8_linear``) the module's eligible ``nn.Linear`` children are replaced in
    place by fp8 linears before tracing, where the GPU has fp8 GEMMs: the module you pass
    is changed, irreversibly (see :mod:`difforge.quant.auto`). The result shares parameters
    and buffers with ``module``: in-place weight updates show up in its outputs without
    recompiling, except under the ``freezing`` mode, which folds weights into the graph.
    With no ``module`` this returns a decorator. ``backend="nexfort"`` is an alias of
    ``"difforge"``; any other backend is handed to ``torch.compile`` unchanged, with
    ``options`` as that backend's own options.
    """
    if module is None:
        return lambda fn: compile(
            fn, backend=backend, options=options, dynamic=dynamic, fullgraph=fullgraph
        )
    if not isinstance(module, nn.Module) and not callable(module):
        raise TypeError(
            f"difforge.compile expects an nn.Module or a callable, got {type(module).__name__}"
        )
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        raise DifforgeError(
            "this module is already compiled (torch.compile/difforge.compile returned it); "
            "compile the original module instead (its `_orig_mod`)"
        )

    if not (isinstance(backend, str) and backend in OUR_BACKENDS):
        return torch.compile(
            module,
            backend=backend,
            dynamic=dynamic,
            fullgraph=bool(fullgraph),
            options=load_options(options) or None,
        )

    config = parse_options(options, dynamic=dynamic, fullgraph=fullgraph)
    if config.disable:
        return module
    # How batch 1 shares the graph of larger batches under dynamic shapes (difforge.batch).
    batch_mode = resolve_batch_mode(config, module)
    if config.memory_format != "preserve":
        if not isinstance(module, nn.Module):
            raise OptionsError(
                f"memory_format={config.memory_format!r} needs an nn.Module (it re-lays conv "
                "weights); for a plain function use 'preserve'"
            )
        # Weights now; the inputs once the regional style is known (below).
        remove_input_hook(module)
        convert_conv_weights(module, config.memory_format)
    if isinstance(module, nn.Module) and config.settings["fuse_qkv.modules"]:
        # Module-level q/k/v fusion, before the fp8 swap so that it quantizes fused weights.
        fuse_qkv_projections(module)
    # low-precision / quant.fp8_linear: nn.Linear -> Fp8Linear, in place, weights quantized
    # once here (difforge.quant.auto says why here and not in the backend).
    swap_fp8_linears(module, config.settings)
    if (
        isinstance(module, nn.Module)
        and config.dynamic is True
        and config.settings["shapes.adapters"]
    ):
        # Exact rewrites of diffusers' size branches, so one graph serves every size.
        apply_shape_adapters(module)
    name = getattr(module, "__qualname__", None) or type(module).__name__
    # cudagraphs with dynamic shapes: difforge records whole calls into one bounded pool
    # (difforge.graph_pool), so Inductor must not record its own graphs inside them.
    pooled = config.cudagraph_impl() == "pooled"
    backend_fn = DifforgeBackend(
        config.without_inductor_cudagraphs() if pooled else config,
        name=name,
        hooked=functools.partial(hooks_reason, module) if isinstance(module, nn.Module) else None,
    )
    style = _apply_regional(module, config)

    # Blocks style compiles many frames of one block class: one stored entry cannot serve them.
    precompile = precompile_enabled(config) and style != "blocks"

    def compile_one(target: Any) -> Any:
        # With cache.precompile, torch.compile itself loads a stored entry (difforge.precompile).
        loads = torch._dynamo.utils.counters["dynamo_cache"]
        hits = loads["dynamo_cache_hit"]
        store = precompile_folder(config, target) if precompile else None
        with (
            precompiling(config, store) if precompile else contextlib.nullcontext(),
            module_of_globals(target) if precompile else contextlib.nullcontext(),
        ):
            compiled = torch.compile(
                target, backend=backend_fn, dynamic=config.dynamic, fullgraph=config.fullgraph
            )
        if precompile:
            if loads["dynamo_cache_hit"] != hits:
                advance_unique_ids()  # else the next recompile clashes with loaded names
            compiled = with_precompile(compiled, config, target, store)
        # Dynamic shapes: floats traced as constants (difforge.tracing says why).
        compiled = with_tracing_settings(compiled, config, specialize_floats=config.dynamic is True)
        if batch_mode is None:
            return compiled
        axis = BatchAxis(batch_mode, name, expected_compiles=backend_fn.recompiles.expected)
        return with_batch_axis(compiled, axis)

    if style == "blocks":
        # Each block becomes its own compiled frame; the model around them stays eager.
        regional.compile_blocks(module, regional.find_repeated_blocks(module), compile_one)
        compiled = module
        if config.memory_format != "preserve":
            install_input_hook(module, config.memory_format)  # the module runs eagerly
    else:
        compiled = compile_one(module)
        if style == "nested":
            compiled = regional.with_region_fallback(compiled, module)
        if config.memory_format != "preserve":
            # Before Dynamo sees the call (a hook would be traced), inside the graph pool
            # (so a recorded call captures the layout copy too).
            compiled = wrap_entry(
                compiled, lambda call: converting_inputs(call, config.memory_format)
            )
    if not pooled:
        return compiled
    grad_sensitive = requires_grad(module)
    is_module = isinstance(module, nn.Module)
    # The wrapper too: hooks put on it (diffusers offloading a compiled component) run
    # outside the graph but move the weights it recorded.
    hooked_root = compiled if isinstance(compiled, nn.Module) else module
    return with_graph_pool(
        compiled,
        lambda call: GraphPool(
            call,
            max_graphs=int(config.settings["cudagraphs.max_graphs"]),
            name=name,
            grad_sensitive=grad_sensitive,
            watch=ModuleWatch(module) if is_module else None,
            hooked=functools.partial(hooks_reason, hooked_root) if is_module else None,
            hooks_stamp=functools.partial(hooks_stamp, hooked_root) if is_module else None,
            weights=functools.partial(weight_addresses, module) if is_module else None,
        ),
    )


def _apply_regional(module: Any, config: CompileConfig) -> str | None:
    """Mark (or unmark) ``module``'s repeated blocks per ``compile.regional``; returns the
    style in force, None when off or when nothing repeats (after a warning)."""
    style = regional.resolve_style(config.settings.get("compile.regional"))
    if not isinstance(module, nn.Module):
        if style is not None:
            raise OptionsError(
                "'compile.regional' needs an nn.Module (it looks for repeated sub-modules); "
                "for a plain function leave it off"
            )
        return None
    # A previous regional compile of this module must not leak into this one.
    regional.unmark_regions(module)
    if style is None:
        return None
    groups = regional.find_repeated_blocks(module)
    if not groups:
        regional.no_blocks_warning(module)
        return None
    if style == "nested":
        regional.mark_regions(module, groups)
    return style
