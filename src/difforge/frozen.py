"""The ``freezing`` mode's promise: a frozen graph never runs on weights changed since.

Freezing turns parameters and buffers into constants and folds what depends on them
(transposes, casts, the fused-QKV concatenation); weights that were not folded stay shared.
An in-place update would then reach some layers and not others. Each tensor's version
counter shows the update, so a :class:`FrozenWeightGuard` wrapped around the compiled graph
fails loudly instead.

A pooled CUDA graph (:mod:`difforge.graph_pool`) replays the whole call without running
any Python, guards included. The pool therefore collects the checks of the guards that
ran while it recorded a call (:mod:`difforge.replay_checks`) and runs them before every
replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difforge import replay_checks
from difforge.errors import DifforgeError


def frozen_weights(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
) -> list[tuple[str, str, torch.Tensor]]:
    """The weights freezing may fold, as ``(kind, name, tensor)``: the graph's tensor
    attributes (how Dynamo hands over a module's parameters when it traces with Inductor's
    ``freezing`` on, which :mod:`difforge.tracing` arranges) and any parameter or static
    input left among the graph inputs."""
    found: list[tuple[str, str, torch.Tensor]] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor):
            found.append(("attribute", str(node.target), value))
    for i, t in enumerate(example_inputs):
        if isinstance(t, torch.Tensor) and (
            isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None)
        ):
            found.append(("input", f"#{i}", t))
    return found


class FrozenWeightGuard:
    """Runs ``compiled`` after checking that none of ``weights`` changed in place since."""

    def __init__(
        self, compiled: Callable[..., Any], weights: Sequence[tuple[str, str, torch.Tensor]]
    ) -> None:
        self.compiled = compiled
        # Inference tensors (a model loaded or moved under torch.inference_mode()) have no
        # version counter: they are left unwatched. They can be changed in place only inside
        # inference mode, and such a change goes unnoticed (documented under 'freezing').
        self._watched = [
            (kind, name, t, t._version) for kind, name, t in weights if not t.is_inference()
        ]
        self.unwatched = sum(1 for _, _, t in weights if t.is_inference())
        """How many of the weights are inference tensors, which cannot be watched."""

    def __len__(self) -> int:
        return len(self._watched)

    def check(self) -> None:
        """Raise :class:`DifforgeError` naming the first weight updated since compiling."""
        for kind, name, tensor, version in self._watched:
            if tensor._version != version:
                raise DifforgeError(
                    "a weight was changed in place after this graph was compiled with the "
                    "'freezing' mode, which folded the old values into constants; recompile "
                    "(torch._dynamo.reset() and call again) or drop 'freezing' from the mode "
                    f"({kind} {name}, shape {tuple(tensor.shape)})"
                )

    def __call__(self, *args: Any) -> Any:
        self.check()
        replay_checks.note(self, self.check)
        return self.compiled(*args)
