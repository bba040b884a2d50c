"""diffusers' pipeline offloading methods after compile_pipe (tiny FLUX): every offloading
method drops the compiled components' graphs (CPU), and sequential offload unfuses the
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
