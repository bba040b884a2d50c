"""diffusers' pipeline offloading methods after compile_pipe (tiny FLUX): model CPU offload
hooks the compiled components and runs them; group and sequential offloading drop the
compiled components' graphs (CPU), and sequential offload unfuses the
shared q/k/v first, as accelerate maps weights from a state_dict that leaves them out (GPU:
on the CPU a pipeline under accelerate's hooks makes its latents on the meta device)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from tests.helpers import tiny_images, tiny_pipeline

from difforge.diffusers import compile_pipe, pipe_methods

CPU = torch.device("cpu")


def _pipe() -> Any:
    return tiny_pipeline("tiny-flux")


def _run(pipe: Any) -> np.ndarray:
    return tiny_images(pipe, "tiny-flux")


def _fused(module: nn.Module) -> int:
    return sum(isinstance(getattr(m, "to_qkv", None), nn.Linear) for m in module.modules())


def test_group_offload_after_compile_pipe_drops_the_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = _pipe()
    expected = _run(pipe)
    compile_pipe(pipe, options="O2", ignores="vae")
    compiled = pipe.transformer
    reset: list[Any] = []
    monkeypatch.setattr(pipe_methods, "reset_graphs", reset.append)
    pipe.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    assert reset[0] is compiled and pipe.vae.decoder in reset and pipe.vae.encoder in reset
    np.testing.assert_allclose(_run(pipe), expected, atol=1e-4)


def test_sequential_offload_after_compile_pipe_unfuses_every_component_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its own run needs an accelerator (the gpu test below); here the method is a probe
    that records what it found, as accelerate would map the state_dicts."""
    pipe = _pipe()
    seen: dict[str, int] = {}

    def probe(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.update(transformer=_fused(self.transformer), vae=_fused(self.vae))

    monkeypatch.setattr(type(pipe), "enable_sequential_cpu_offload", probe)
    compile_pipe(pipe, options="O2", fuse_qkv_projections=True)  # no call: nothing compiles
    assert _fused(pipe.transformer) > 0 and _fused(pipe.vae) > 0
    with caplog.at_level(logging.INFO, logger="difforge.diffusers"):
        pipe.enable_sequential_cpu_offload()
    assert seen == {"transformer": 0, "vae": 0}
    assert "transformer: 3 attentions unfused" in caplog.text and "vae.decoder: " in caplog.text


def test_model_cpu_offload_after_compile_pipe_hooks_the_compiled_components() -> None:
    """diffusers' most used offloading moves each whole component to the accelerator before
    its call: a root hook on the compiled wrapper, which the graph pool does not count
    (the moves are module conversions the module watch sees). On the CPU the moves are
    no-ops; the gpu test below moves for real."""
    from difforge.module_hooks import hooks_reason

    pipe = _pipe()
    expected = _run(pipe)
    compile_pipe(pipe, options="O2")
    _run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    compiled = pipe.transformer
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert type(compiled._hf_hook).__name__ == "CpuOffload"
    assert hooks_reason(compiled) is None and hooks_reason(pipe.vae) is None
    for _ in range(2):
        np.testing.assert_allclose(_run(pipe), expected, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_model_cpu_offload_after_compile_pipe_moves_and_replays() -> None:
    import difforge

    def pipe() -> Any:
        return tiny_pipeline("tiny-flux", dtype=torch.bfloat16, device="cuda")

    expected = _run(pipe())
    compiled = pipe()
    compile_pipe(compiled, options="O2")
    _run(compiled)
    compiled.enable_model_cpu_offload()
    for _ in range(2):
        replays = difforge.counters["cudagraphs.replay"]
        np.testing.assert_allclose(_run(compiled), expected, atol=0.05)
        # each generation moves the denoiser over (new memory: its graphs are captured
        # again) and its second step replays
        assert difforge.counters["cudagraphs.replay"] > replays
        weight = next(compiled.transformer._orig_mod.parameters())
        assert weight.device.type == "cpu"  # offloaded again after the call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sequential_offload_after_compile_pipe_unfuses_and_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def pipe() -> Any:
        return tiny_pipeline("tiny-flux", dtype=torch.bfloat16, device="cuda")

    expected = _run(pipe())
    compiled = pipe()
    compile_pipe(compiled, options="O2", ignores="vae")
    _run(compiled)
    assert _fused(compiled.transformer._orig_mod) > 0
    with caplog.at_level(logging.INFO, logger="difforge.diffusers"):
        compiled.enable_sequential_cpu_offload()
    assert "attentions unfused for enable_sequential_cpu_offload" in caplog.text
    assert _fused(compiled.transformer._orig_mod) == 0
    for _ in range(2):
        np.testing.assert_allclose(_run(compiled), expected, atol=0.05)
