"""Helpers shared by the tests: error metric, tiny-model inputs, compile checks."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def compile_with_grad_enabled(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    options: dict[str, Any],
    counter: str,
    fires: int,
    tol: float,
) -> torch.Tensor:
    """Compile ``model`` with ``options`` outside ``torch.no_grad`` and run it: the rewrite
    ``counter`` fired ``fires`` times and the output is within ``tol`` of eager. Returns
    the output, still attached to its autograd graph."""
    import difforge

    out = difforge.compile(model, options=options)(*inputs)
    assert difforge.counters[counter] == fires
    with torch.no_grad():
        assert rel_err(out.detach(), model(*inputs)) < tol
    return out


def tiny_sdxl_one_layer(*, mid_block: bool = True) -> Any:
    """The tiny-sdxl preset with one transformer layer per level (the preset has two at its
    second level, and so in the mid block and the first up block): the same down/mid/up
    blocks and cross-attention, half the BasicTransformerBlocks, ~15% less compile time.
    ``mid_block=False`` leaves the mid block out too (its resnets and transformer are the
    kinds the second down level and the first up level have, at the same size)."""
    import dataclasses

    from difforge.diffusers.presets import get_preset

    tiny = get_preset("tiny-sdxl")
    config = {**tiny.denoiser_config, "transformer_layers_per_block": [1, 1]}
    if not mid_block:
        config["mid_block_type"] = None
    return dataclasses.replace(tiny, denoiser_config=config)


def tiny_vae_two_levels(name: str) -> Any:
    """Preset ``name`` with its tiny VAE cut to the first two of four levels (one upsampler
    instead of three): the same resnets, GroupNorms, mid-block attention and latent
    channels in about half the decoder's compile time. Its decoder still takes the latents
    that ``vae_decode_inputs`` makes (sized for 8x); it outputs 2x them."""
    import dataclasses

    from difforge.diffusers.presets import get_preset

    preset = get_preset(name)
    vae = preset.vae_config
    cut = ("down_block_types", "up_block_types", "block_out_channels")
    return dataclasses.replace(preset, vae_config={**vae, **{k: vae[k][:2] for k in cut}})


def dit_inputs(batch: int = 2, size: int = 16, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(batch, 4, size, size),
        torch.rand(batch) * 1000,
        torch.randn(batch, tokens, 48),
    )


def unet_inputs(batch: int = 2, size: int = 16) -> tuple[torch.Tensor, ...]:
    return torch.randn(batch, 4, size, size), torch.rand(batch) * 1000


def run_child(script: str, *args: str, env: dict[str, str]) -> Any:
    """Run ``script`` in a new Python process; the JSON its last output line holds."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_without_interpreter(script: str, cache_dir: str | None = None) -> str:
    """Run ``script`` in a new process without ``TRITON_INTERPRET`` (kernels imported here
    may have been built for the interpreter, which cannot be lowered) and return its
    stdout; ``cache_dir`` as Triton's cache makes it really compile. Skips where Triton has
    no NVIDIA backend."""
    import os
    from pathlib import Path

    import pytest

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src_dir = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src_dir), env.get("PYTHONPATH", "")])
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def compile_for_sm90(script: str) -> None:
    """Run ``script`` (which compiles Triton kernels for sm_90a and prints ``sm90 ok``)
    through :func:`run_without_interpreter`."""
    assert "sm90 ok" in run_without_interpreter(script)


def dynamo_graphs(fn: Any, *inputs: torch.Tensor) -> list[torch.fx.Graph]:
    """The graphs Dynamo captures from ``fn`` (with their fake values), not compiled."""
    graphs: list[torch.fx.Graph] = []

    def record(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record)(*inputs)
    return graphs


def tiny_pipeline(name: str, **kwargs: Any) -> Any:
    """A tiny preset pipeline without text encoders (random prompt embeddings), seeded."""
    from difforge.diffusers.presets import build_pipeline, get_preset

    torch.manual_seed(0)
    return build_pipeline(get_preset(name), text_encoders=False, **kwargs)


def tiny_images(pipe: Any, name: str) -> Any:
    """The images (numpy) of one seeded call of a :func:`tiny_pipeline` at its preset's
    call arguments, the prompt embeddings on the pipeline's execution device and in its
    dtype (its first module's: one dtype throughout in these tests), as FLUX makes its
    latents in the embeddings' dtype."""
    from difforge.diffusers.presets import get_preset

    preset = get_preset(name)
    prompt = preset.prompt_kwargs(batch=1, device=pipe._execution_device, dtype=pipe.dtype)
    kwargs = {**prompt, **preset.call_kwargs(), "output_type": "np"}
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
