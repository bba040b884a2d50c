"""compile_pipe on real diffusers pipelines (tiny presets, random weights, CPU Inductor).

Each family's compiled image must match eager within PSNR >= 40 dB on [0, 1] images
(fp32 on the CPU lands above 120 dB; 40 dB leaves room for reordered reductions while
still catching any real bug, which shows up below 20 dB).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.helpers import tiny_sdxl_one_layer, tiny_vae_two_levels  # noqa: E402

import difforge  # noqa: E402
from difforge.diffusers import compile_pipe  # noqa: E402
from difforge.diffusers.pipe import pipe_state  # noqa: E402
from difforge.diffusers.presets import build_pipeline, get_preset  # noqa: E402
from difforge.errors import OptionsError  # noqa: E402

OptimizedModule = torch._dynamo.eval_frame.OptimizedModule
PSNR_MIN_DB = 40.0


def psnr(out: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two [0, 1] images, in dB."""
    mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def run(pipe: Any, kwargs: dict[str, Any]) -> np.ndarray:
    image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
    assert isinstance(image, np.ndarray)
    return image


def tiny(name: Any, *, text_encoders: bool = False) -> tuple[Any, dict[str, Any]]:
    """A tiny pipeline and the keyword arguments of one 64x64, 2-step call."""
    preset = get_preset(name)
    pipe = build_pipeline(preset, text_encoders=text_encoders)
    prompt = {"prompt": "a red fox"} if text_encoders else preset.prompt_kwargs(batch=1)
    return pipe, {**prompt, **preset.call_kwargs(), "output_type": "np"}


def assert_compiled(pipe: Any, names: list[str]) -> None:
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = getattr(pipe.vae if owner == "vae" else pipe, attr)
        assert isinstance(module, OptimizedModule), name
    assert set(names) <= set(pipe._difforge_compiled)


# ------------------------------------------------------------------------------------------
# Families, end to end
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "tiny-flux",
        pytest.param("tiny-pixart-sigma", marks=pytest.mark.slow),
        pytest.param("tiny-sd3", marks=pytest.mark.slow),
        pytest.param("tiny-sd15", marks=pytest.mark.slow),
    ],
)
def test_family_matches_eager(name: str) -> None:
    pipe, kwargs = tiny(name)
    ref = run(pipe, kwargs)
    assert ref.std() > 0.01  # a real image, not a constant one

    assert compile_pipe(pipe) is pipe
    denoiser = get_preset(name).denoiser
    assert_compiled(pipe, [denoiser, "vae.decoder", "vae.encoder"])
    assert isinstance(pipe.vae, diffusers.AutoencoderKL)  # config/dtype/upcast logic intact

    out = run(pipe, kwargs)
    assert psnr(out, ref) >= PSNR_MIN_DB
    assert pipe_state(pipe).ran


def test_pixart_with_text_encoders_and_second_call_compiles_nothing(
    compile_calls: list[str],
) -> None:
    pipe, kwargs = tiny("tiny-pixart", text_encoders=True)
    ref = run(pipe, kwargs)
    assert ref.std() > 0.01

    compile_pipe(pipe, options='{"mode": "O1"}')
    assert_compiled(pipe, ["text_encoder", "transformer", "vae.decoder", "vae.encoder"])
    out = run(pipe, kwargs)
    assert psnr(out, ref) >= PSNR_MIN_DB
    graphs = len(difforge.compile_records)
    assert graphs >= 3  # T5, transformer, VAE decoder (at least one graph each)

    # Same arguments again: no compile call, the same objects, and no new graph.
    modules = {n: getattr(pipe, n) for n in ("text_encoder", "transformer")}
    calls = len(compile_calls)
    compile_pipe(pipe, options={"mode": "O1"})
    assert len(compile_calls) == calls
    assert all(getattr(pipe, n) is m for n, m in modules.items())
    np.testing.assert_array_equal(run(pipe, kwargs), out)
    assert len(difforge.compile_records) == graphs
    assert pipe_state(pipe).ran_components == {"text_encoder", "transformer", "vae.decoder"}

    # Other options: fresh wrappers that have not run yet (load_pipe may still help them).
    compile_pipe(pipe, options={"mode": "O2"})
    assert not pipe_state(pipe).ran


def test_o2_twice_compiles_nothing_the_second_time(compile_calls: list[str]) -> None:
    """O2 fuses the transformer's q/k/v while compiling (fuse_qkv.modules): the second
    identical call must find the key the first recorded, not a 'fused' one that differs."""
    pipe, _ = tiny("tiny-pixart")
    compile_pipe(pipe, options={"mode": "O2"})
    assert hasattr(pipe.transformer._orig_mod.transformer_blocks[0].attn1, "to_qkv")
    calls = len(compile_calls)
    compiled = pipe.transformer
    compile_pipe(pipe, options={"mode": "O2"})
    assert len(compile_calls) == calls
    assert pipe.transformer is compiled


@pytest.mark.filterwarnings("ignore:.*upcast_vae.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:difforge. recompiling:UserWarning")  # the fp16 graph: wanted
def test_sdxl_fp16_vae_with_force_upcast() -> None:
    """SDXL casts an fp16 VAE to fp32 around decode when ``force_upcast`` is set. The
    compiled decoder shares the VAE's parameters, so each dtype gets its own graph (a
    guard failure and recompile), never a stale one. The VAE is the tiny one's first two
    levels and the UNet has one transformer layer per level (it only runs the pipeline)."""
    pipe, kwargs = tiny(tiny_vae_two_levels(tiny_sdxl_one_layer()))
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    ref = run(pipe, kwargs)
    assert pipe.vae.dtype == torch.float16  # the pipeline cast it back after decoding

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # as inside the pipeline: grad mode is part of the guards
        eager16 = pipe.vae.decode(latents.half()).sample.double()
        exact = pipe.vae.to(torch.float32).decode(latents).sample.double()
    pipe.vae.to(torch.float16)

    compile_pipe(pipe)
    assert_compiled(pipe, ["unet", "vae.decoder"])
    assert psnr(run(pipe, kwargs), ref) >= PSNR_MIN_DB  # decoder compiled for fp32
    assert pipe.vae.dtype == torch.float16

    graphs = len(difforge.compile_records)
    with torch.no_grad():
        out16 = pipe.vae.decode(latents.half()).sample
    assert out16.dtype == torch.float16
    assert len(difforge.compile_records) == graphs + 1  # the fp16 decoder graph
    # Within fp16's own error: compiled fp16 vs fp32 truth, against eager fp16 vs truth.
    err_eager = float((eager16 - exact).norm() / exact.norm())
    err_compiled = float((out16.double() - exact).norm() / exact.norm())
    assert err_compiled <= 2 * err_eager + 1e-3

    # Back through the pipeline: the fp32 graph is picked again, results unchanged.
    assert psnr(run(pipe, kwargs), ref) >= PSNR_MIN_DB
    assert len(difforge.compile_records) == graphs + 1


def test_text_encoders_get_their_output_hooks_before_compiling() -> None:
    """transformers >= 5 adds output-capturing hooks at the first forward, under a lock
    Dynamo cannot trace; compile_pipe adds them first, so a compiled first call traces the
    same graph as one after an eager run (and saved artifacts match across processes)."""
    output_capturing = pytest.importorskip("transformers.utils.output_capturing")
    if not hasattr(output_capturing, "maybe_install_capturing_hooks"):
        pytest.skip("this transformers installs no output-capturing hooks")
    pipe, _ = tiny("tiny-sdxl", text_encoders=True)
    compile_pipe(pipe, ignores=("unet", "vae"))
    hooked = "_output_capturing_hooks_installed"
    assert getattr(pipe.text_encoder._orig_mod, hooked, False)  # CLIPTextModel: itself
    with_projection = pipe.text_encoder_2._orig_mod  # delegates to a CLIPTextModel
    assert getattr(with_projection.text_model, hooked, False)
    assert not getattr(with_projection, hooked, False)  # never both: states recorded twice


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-flux"])
def test_fused_qkv_compiled_matches_unfused_eager(name: str) -> None:
    pipe, kwargs = tiny(name)
    ref = run(pipe, kwargs)
    compile_pipe(pipe, fuse_qkv_projections=True, options={"mode": "O2"})
    assert pipe_state(pipe).fused == {get_preset(name).denoiser, "vae"}
    assert psnr(run(pipe, kwargs), ref) >= PSNR_MIN_DB


# ------------------------------------------------------------------------------------------
# Arguments (no pipeline run: compilation is lazy, so these are quick)
# ------------------------------------------------------------------------------------------


def test_ignores_leave_components_eager() -> None:
    pipe, _ = tiny("tiny-pixart")
    compile_pipe(pipe, ignores=("vae",))
    assert isinstance(pipe.transformer, OptimizedModule)
    assert not isinstance(pipe.vae.decoder, OptimizedModule)
    assert not isinstance(pipe.vae.encoder, OptimizedModule)
    assert set(pipe._difforge_compiled) == {"transformer"}

    pipe, _ = tiny("tiny-pixart")
    compile_pipe(pipe, ignores="vae.encoder")
    assert isinstance(pipe.vae.decoder, OptimizedModule)
    assert not isinstance(pipe.vae.encoder, OptimizedModule)
    # A slot that exists but holds no module (no text encoder built) is a valid name.
    compile_pipe(pipe, ignores=("text_encoder", "vae.encoder"))


def test_ignoring_a_compiled_component_later_restores_the_original() -> None:
    pipe, _ = tiny("tiny-pixart")
    original = pipe.transformer
    compile_pipe(pipe)
    compile_pipe(pipe, ignores=("transformer",))
    assert pipe.transformer is original
    assert "transformer" not in pipe._difforge_compiled


def test_unknown_ignore_name_lists_the_valid_ones() -> None:
    pipe, _ = tiny("tiny-pixart")
    with pytest.raises(ValueError, match="'unet'") as err:
        compile_pipe(pipe, ignores=("unet",))
    for valid in ("transformer", "vae.decoder", "vae.encoder", "vae", "text_encoder"):
        assert valid in str(err.value)
    assert not isinstance(pipe.transformer, OptimizedModule)  # nothing was touched


def test_other_options_recompile_from_the_original_modules(
    compile_calls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    pipe, _ = tiny("tiny-pixart")
    originals = {"transformer": pipe.transformer, "decoder": pipe.vae.decoder}
    compile_pipe(pipe)
    first = pipe.transformer
    keys = dict(pipe._difforge_compiled)
    assert len(compile_calls) == 3

    with caplog.at_level(logging.INFO, logger="difforge.diffusers"):
        compile_pipe(pipe, options={"mode": "O2"}, backend="nexfort")
    assert "compile options changed; recompiling from the original module" in caplog.text
    assert len(compile_calls) == 6
    assert pipe.transformer is not first
    assert pipe.transformer._orig_mod is originals["transformer"]  # not a wrapper's wrapper
    assert pipe.vae.decoder._orig_mod is originals["decoder"]
    assert all(pipe._difforge_compiled[n] != k for n, k in keys.items())
    assert "max-optimize" in pipe._difforge_compiled["transformer"]

    compile_pipe(pipe, options='{"mode": "O2"}')  # the alias gave the same key
    assert len(compile_calls) == 6


def test_another_cache_folder_recompiles(compile_calls: list[str], tmp_path: Any) -> None:
    """The options key leaves out cache.dir (saved pipes stay portable), but a second folder
    must recompile, or its artifacts would keep going to the first one (reviewer's find)."""
    pipe, _ = tiny("tiny-pixart")
    first = {"mode": "cache-all", "cache.dir": str(tmp_path / "a")}
    compile_pipe(pipe, options=first)
    assert len(compile_calls) == 3
    compile_pipe(pipe, options=first)
    assert len(compile_calls) == 3
    compile_pipe(pipe, options={"mode": "cache-all", "cache.dir": str(tmp_path / "b")})
    assert len(compile_calls) == 6
    assert pipe_state(pipe).configs["transformer"].cache_dir == tmp_path / "b"


def test_module_compiled_elsewhere_is_recompiled_from_its_original(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe, _ = tiny("tiny-pixart")
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend="eager")
    with caplog.at_level(logging.INFO, logger="difforge.diffusers"):
        compile_pipe(pipe, ignores=("vae",))
    assert "was compiled outside difforge" in caplog.text
    assert pipe.transformer._orig_mod is original


def test_memory_format_applies_to_conv_components_only() -> None:
    pipe, _ = tiny("tiny-pixart")
    compile_pipe(pipe, options={"memory_format": "channels_last"})
    decoder_conv = pipe.vae.decoder._orig_mod.conv_in.weight
    assert decoder_conv.is_contiguous(memory_format=torch.channels_last)
    patch_conv = pipe.transformer._orig_mod.pos_embed.proj.weight
    assert patch_conv.is_contiguous() and not patch_conv.is_contiguous(
        memory_format=torch.channels_last
    )
    assert '"memory_format": "preserve"' in pipe._difforge_compiled["transformer"]
    assert '"memory_format": "channels_last"' in pipe._difforge_compiled["vae.decoder"]


def test_not_a_pipeline() -> None:
    with pytest.raises(TypeError, match=r"difforge\.compile\(\)"):
        compile_pipe(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects a diffusers pipeline"):
        compile_pipe(object())


def test_bad_options_fail_at_call_time_and_change_nothing() -> None:
    pipe, _ = tiny("tiny-pixart")
    with pytest.raises(OptionsError, match="unknown mode"):
        compile_pipe(pipe, options={"mode": "O9"})
    with pytest.raises(OptionsError, match="not valid JSON"):
        compile_pipe(pipe, options="{mode: O2}")
    assert not isinstance(pipe.transformer, OptimizedModule)
    assert pipe_state(pipe) is None


def test_fuse_qkv_projections_where_supported(caplog: pytest.LogCaptureFixture) -> None:
    pipe, _ = tiny("tiny-pixart")

    def unsupported() -> None:
        raise ValueError("added KV projections")

    object.__setattr__(pipe.vae, "fuse_qkv_projections", unsupported)
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        compile_pipe(pipe, fuse_qkv_projections=True)
    assert "AutoencoderKL cannot fuse its q/k/v projections (added KV" in caplog.text
    state = pipe_state(pipe)
    assert state.fused == {"transformer"}
    processors = pipe.transformer._orig_mod.attn_processors.values()
    assert all(type(p).__name__ == "FusedAttnProcessor2_0" for p in processors)
    assert '"fuse_qkv": true' in pipe._difforge_compiled["transformer"]
    attn = pipe.transformer._orig_mod.transformer_blocks[0].attn1
    # the unfused q/k/v are views of the fused rows: the weights are held once
    assert attn.to_k.weight.untyped_storage().data_ptr() == (
        attn.to_qkv.weight.untyped_storage().data_ptr()
    )

    # Unfused behind our back (e.g. a benchmark restoring its snapshot): fused again, and
    # the compiled module, whose key says "fused", stays valid.
    transformer = pipe.transformer
    transformer._orig_mod.unfuse_qkv_projections()
    compile_pipe(pipe, fuse_qkv_projections=True)
    assert pipe.transformer is transformer
    processors = pipe.transformer._orig_mod.attn_processors.values()
    assert all(type(p).__name__ == "FusedAttnProcessor2_0" for p in processors)
    # diffusers rebuilt to_qkv: the parts now view the new one, not the old one's memory
    assert attn.to_k.weight.untyped_storage().data_ptr() == (
        attn.to_qkv.weight.untyped_storage().data_ptr()
    )

    # Without fusion: unfused and recompiled; the VAE, never fused, keeps its graph.
    decoder = pipe.vae.decoder
    compile_pipe(pipe)
    assert state.fused == set()
    processors = pipe.transformer._orig_mod.attn_processors.values()
    assert not any(type(p).__name__ == "FusedAttnProcessor2_0" for p in processors)
    assert pipe.vae.decoder is decoder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:.*upcast_vae.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:difforge cudagraphs.*weights changed:UserWarning")
def test_gpu_sdxl_dynamic_o2_pipeline_goes_back_to_earlier_sizes() -> None:
    """The SDXL pipeline casts its fp16 VAE (``force_upcast``) to fp32 before each decode
    and back after: new memory for every decoder weight at every call. On an H100 the
    decoder's CUDA graph, replayed when the sweep came back to the warm-up size, read freed
    memory (an illegal memory access). Its graphs must be dropped, and since they never
    live to be replayed, capturing it must stop; the UNet keeps replaying."""
    preset = get_preset("tiny-sdxl")
    pipes = [build_pipeline(preset, dtype=torch.float16, device="cuda") for _ in range(2)]
    reference, pipe = pipes
    assert pipe.vae.config.force_upcast
    options = {"mode": "O2", "dynamic": True, "memory_format": "channels_last"}
    compile_pipe(pipe, options=options)
    prompt = preset.prompt_kwargs(batch=1, device="cuda", dtype=torch.float16)
    for height, width in [(96, 128), (128, 128), (96, 128), (64, 64), (128, 128), (96, 128)]:
        kwargs = {**prompt, **preset.call_kwargs(height=height, width=width), "output_type": "np"}
        out, ref = run(pipe, kwargs), run(reference, kwargs)
        torch.cuda.synchronize()
        assert out.shape == ref.shape == (1, height, width, 3)
        assert psnr(out, ref) >= 30.0, (height, width)  # fp16 graphs vs fp16 eager
    assert difforge.counters["cudagraphs.volatile"] == 1  # the decoder, once
    assert difforge.counters["cudagraphs.replay"] > 0  # the UNet's steps
