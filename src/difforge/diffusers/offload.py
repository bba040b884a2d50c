"""diffusers' pipeline offloading methods on a compiled pipeline.

``enable_sequential_cpu_offload`` (accelerate) maps every weight from the model's
``state_dict``, which leaves out the fused q/k/v linears whose parts view their rows
(:mod:`difforge.fused_projections`): the first call then fails with a ``KeyError`` on
``...to_qkv.weight``. ``enable_group_offload`` with ``use_stream`` swaps ``param.data``, which
no hook reports, under CUDA graphs recorded before. ``compile_pipe`` wraps both on the
instance (:mod:`difforge.diffusers.pipe_methods`): the sequential one unfuses every
component's shared q/k/v first (the VAE's too, which ``fuse_qkv_projections=True`` fuses;
the parts keep the rows), and after either every compiled component's CUDA graphs are
dropped (the VAE halves' included), so the next call finds the hooks and runs without
graphs (:mod:`difforge.graph_pool`). The compiled wrappers stay in their slots: diffusers
then offloads each as one module (block-level groups of a denoiser's blocks need
``enable_group_offload`` on the module before ``compile_pipe``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from difforge.diffusers.pipe_methods import component, reset_component_graphs, wrap_once
from difforge.fused_projections import unfuse_shared_rows

__all__ = ["OFFLOAD_METHODS", "prepare_offloading"]

log = logging.getLogger("difforge.diffusers")

#: diffusers' DiffusionPipeline methods that hook offloading into the components.
OFFLOAD_METHODS: tuple[str, ...] = ("enable_sequential_cpu_offload", "enable_group_offload")

#: Those that map weights from the state_dict (which leaves shared fused linears out).
UNFUSE_FIRST: frozenset[str] = frozenset({"enable_sequential_cpu_offload"})


def _offloading(
    pipe: Any,
    method_name: str,
    method: Callable[..., Any],
    names: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    # No swap of the originals into the slots here: accelerate keeps the forward it
    # replaces on the module it hooks, and remove_all_hooks() would later put the
    # original's eager forward on the compiled wrapper.
    for name in names if method_name in UNFUSE_FIRST else ():
        found = component(pipe, name)
        count = unfuse_shared_rows(found) if isinstance(found, nn.Module) else 0
        if count:
            log.info(
                "difforge: %s: %d attentions unfused for %s (it cannot map fused q/k/v "
                "that share their parts' rows)",
                name,
                count,
                method_name,
            )
    try:
        return method(*args, **kwargs)
    finally:
        reset_component_graphs(pipe, names)


def prepare_offloading(pipe: Any, names: tuple[str, ...]) -> list[str]:
    """Wrap ``pipe``'s offloading methods (once) for the components ``names``; returns the
    methods wrapped now."""
    return wrap_once(pipe, OFFLOAD_METHODS, names, _offloading)
