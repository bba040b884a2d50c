"""A pipeline made from a compiled one (``from_pipe`` shares its modules): ``compile_pipe``
on it adopts the modules compiled with the same options instead of compiling them again
(and gives it difforge's pipeline-method wrappers); other options recompile."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

from tests.helpers import tiny_images, tiny_pipeline

from difforge.diffusers import compile_pipe, pipe_methods

OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


def _from_pipe(pipe: Any) -> Any:
    from diffusers import FluxPipeline

    return FluxPipeline.from_pipe(pipe)


def test_a_pipeline_from_a_compiled_one_adopts_its_compiled_modules(
    compile_calls: list[str],
) -> None:
    pipe = compile_pipe(tiny_pipeline("tiny-flux"), options="O2")
    shared = _from_pipe(pipe)
    assert shared.transformer is pipe.transformer  # from_pipe shares the compiled modules
    assert "set_adapters" not in vars(shared)  # but not the wrappers on the instance
    compiled_before = len(compile_calls)
    assert compile_pipe(shared, options="O2") is shared
    assert len(compile_calls) == compiled_before
    assert shared.transformer is pipe.transformer
    assert shared.vae.decoder is pipe.vae.decoder  # the VAE is shared, its halves compiled
    assert dict(shared._difforge_compiled) == dict(pipe._difforge_compiled)
    assert isinstance(vars(shared)["set_adapters"], pipe_methods.PipeMethod)
    np.testing.assert_allclose(tiny_images(shared, "tiny-flux"), tiny_images(pipe, "tiny-flux"))


def test_other_options_recompile_from_the_original_module(compile_calls: list[str]) -> None:
    pipe = compile_pipe(tiny_pipeline("tiny-flux"), options="O2", ignores="vae")
    shared = _from_pipe(pipe)
    compile_calls.clear()
    compile_pipe(shared, options="O1", ignores="vae")
    assert compile_calls == ["FluxTransformer2DModel"]
    assert isinstance(shared.transformer, OptimizedModule)
    assert shared.transformer is not pipe.transformer
    assert shared.transformer._orig_mod is pipe.transformer._orig_mod


def test_a_module_compiled_outside_difforge_is_not_adopted(compile_calls: list[str]) -> None:
    pipe = tiny_pipeline("tiny-flux")
    pipe.transformer = torch.compile(pipe.transformer)
    shared = _from_pipe(pipe)
    compile_pipe(shared, options="O2", ignores="vae")
    assert compile_calls == ["FluxTransformer2DModel"]
    assert shared.transformer is not pipe.transformer


def test_a_recompile_through_one_pipeline_is_seen_by_the_other(
    compile_calls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Both pipelines share the transformer's original and the VAE itself: after the first
    recompiles with other options, the second's record of what it holds is stale, and the
    modules in its slots (an old wrapper, the shared VAE's new decoder) say so."""
    first = compile_pipe(tiny_pipeline("tiny-flux"), options="O2")
    second = compile_pipe(_from_pipe(first), options="O2")  # adopted
    compile_pipe(first, options="O1")
    assert second.vae.decoder is first.vae.decoder  # the O1 decoder, in the shared VAE
    compile_calls.clear()
    with caplog.at_level("INFO", logger="difforge.diffusers"):
        compile_pipe(second, options="O2")
    assert sorted(compile_calls) == ["Decoder", "Encoder", "FluxTransformer2DModel"]
    assert "was recompiled by a pipeline sharing it" in caplog.text
    assert second.transformer is not first.transformer
    state = second._difforge_state
    for name, module in (("transformer", second.transformer), ("vae.decoder", second.vae.decoder)):
        assert module._difforge_record.key == state.compiled[name]


def test_an_adopted_module_that_ran_counts_as_run(compile_calls: list[str]) -> None:
    from difforge.diffusers.pipe import pipe_state

    first = compile_pipe(tiny_pipeline("tiny-flux"), options="O1", ignores="vae")
    tiny_images(first, "tiny-flux")
    second = compile_pipe(_from_pipe(first), options="O1", ignores="vae")
    state = pipe_state(second)
    assert state is not None and state.ran_components == {"transformer"}


def test_a_sibling_recompiled_to_the_options_asked_is_adopted_again(
    compile_calls: list[str],
) -> None:
    first = compile_pipe(tiny_pipeline("tiny-flux"), options="O2")
    second = compile_pipe(_from_pipe(first), options="O2")
    compile_pipe(first, options="O1")
    compile_calls.clear()
    compile_pipe(second, options="O1")
    # its own slot held the old O2 wrapper; the shared VAE's halves are O1 already
    assert compile_calls == ["FluxTransformer2DModel"]
    assert second.vae.decoder is first.vae.decoder


def test_pipelines_made_per_request_leave_no_hooks_behind() -> None:
    import gc
    import weakref

    from difforge.diffusers.pipe import pipe_state

    first = compile_pipe(tiny_pipeline("tiny-flux"), options="O1", ignores="vae")
    states = []
    for _ in range(5):
        made = compile_pipe(_from_pipe(first), options="O1", ignores="vae")
        states.append(weakref.ref(pipe_state(made)))
        del made
    gc.collect()
    assert all(state() is None for state in states)
    compile_pipe(_from_pipe(first), options="O1", ignores="vae")  # prunes the dead ones
    assert len(first.transformer._forward_pre_hooks) == 2  # the first's and the last's
