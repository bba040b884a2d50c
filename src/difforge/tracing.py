"""Settings that must be in force while Dynamo *traces* (at call time, not compile time).

With ``dynamic: true`` difforge traces with ``specialize_float=True``: Python floats
(``LayerNorm.eps``, attention scales, a scheduler's constants) are constants guarded by value,
as in every static compile, while sizes stay symbolic. Dynamo's own default under
``dynamic=True`` makes them ``SymFloat`` inputs, which every diffusers denoiser tried (tiny
PixArt, SD3, FLUX, SDXL on torch 2.13) cannot keep: AOT's ``tensorify_python_scalars`` pass
gives up and Dynamo restarts the whole analysis, tracing the model twice per compile. Nested
regions cannot take a ``SymFloat`` at all (:mod:`difforge.regional`). The cost: a float
passed *as an argument* that changes value recompiles (reported, difforge.recompiles).

``torch.compile`` traces at the first call and at each recompile, so switches that
shape the traced graph (duck sizing; float specialisation for nested regions with dynamic
shapes, see :mod:`difforge.regional`; ``freezing``, which Dynamo must see to hand the
weights over as graph attributes) are applied around every call of the compiled object.
Guard checks run first in C++, so a call that needs no tracing pays only for entering the
context (microseconds).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from difforge.entry import wrap_entry
from difforge.options import CompileConfig


def _freezing(config: CompileConfig) -> bool:
    return bool(config.inductor_patches().get("freezing"))


def _needs_context(config: CompileConfig, specialize_floats: bool) -> bool:
    return not config.duck_sizing or specialize_floats or _freezing(config)


@contextlib.contextmanager
def tracing_settings(
    config: CompileConfig, specialize_floats: bool = False, freezing: bool | None = None
) -> Iterator[None]:
    """The trace-time settings of ``config``; ``specialize_floats``: trace Python floats
    as constants even with dynamic shapes (nested regions cannot take a ``SymFloat``);
    ``freezing``: whether ``config`` freezes (None: work it out, once per call)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    with contextlib.ExitStack() as stack:
        if hasattr(fx_config, "use_duck_shape"):
            stack.enter_context(fx_config.patch(use_duck_shape=config.duck_sizing))
        if specialize_floats and hasattr(dynamo_config, "specialize_float"):
            stack.enter_context(dynamo_config.patch(specialize_float=True))
        if _freezing(config) if freezing is None else freezing:
            # Dynamo reads Inductor's global `freezing` while tracing: only then does it
            # make the module's parameters graph attributes, the only weights Inductor's
            # freezing folds. Set in the backend's compile-time patches alone, it froze
            # nothing (weights stayed graph inputs).
            stack.enter_context(inductor_config.patch(freezing=True))
        yield


def with_tracing_settings(
    compiled: Any, config: CompileConfig, specialize_floats: bool = False
) -> Any:
    """Make every call of ``compiled`` (an OptimizedModule or function) trace under
    ``config``'s settings; returns ``compiled`` itself when there is nothing to set."""
    if not _needs_context(config, specialize_floats):
        return compiled
    freezing = _freezing(config)

    def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def run(*args: Any, **kwargs: Any) -> Any:
            with tracing_settings(config, specialize_floats, freezing):
                return call(*args, **kwargs)

        return run

    return wrap_entry(compiled, wrap)


__all__ = ["tracing_settings", "with_tracing_settings"]
