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
