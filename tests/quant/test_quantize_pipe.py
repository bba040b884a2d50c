"""quantize_pipe on tiny diffusers pipelines: the filter's choices, end to end images,
order (quantize before compile), idempotence and the slow-path warning."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from difforge.diffusers.presets import build_component, build_pipeline, get_preset
from difforge.diffusers.quantize import (
    QuantizeOrderError,
    quant_report,
    quantize_pipe,
)
from difforge.quant import Fp8Linear, ModuleFilter, quantize_linears

PRESET = "tiny-pixart"
#: Stated bound for the tiny PixArt (float32, 2 steps, 64x64): measured 51.7 dB.
MIN_PSNR_DB = 35.0


def _pipe() -> Any:
    return build_pipeline(PRESET, text_encoders=False, dtype=torch.float32)


def _image(pipe: Any) -> np.ndarray:
    p = get_preset(PRESET)
    kwargs = {**p.call_kwargs(), "num_inference_steps": 2, "height": 64, "width": 64}
    torch.manual_seed(0)  # the same random prompt embeddings for both pipes
    prompts = p.prompt_kwargs(batch=1)
    gen = torch.Generator().manual_seed(0)
    return pipe(**prompts, **kwargs, generator=gen, output_type="np").images


def _quiet_quantize(pipe: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "fp8 GEMM not available" on CPU
        return quantize_pipe(pipe, **kwargs)


def test_filter_choices_on_the_tiny_pixart_transformer() -> None:
    model = build_component(PRESET, "transformer", dtype=torch.float32, device="cpu")
    # Tiny widths (48/192) are far below the default min_features: pass 0 to convert.
    report = quantize_linears(model, ModuleFilter(min_features=0, min_weight_elements=0))
    blocks = [n for n in report.converted if n.startswith("transformer_blocks.")]
    assert blocks == report.converted  # only the transformer blocks' linears
    per_block = {n.split(".", 2)[2] for n in blocks}
    assert per_block == {
        *(f"attn1.to_{p}" for p in ("q", "k", "v")),
        "attn2.to_q",
        "attn1.to_out.0",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    }
    skipped = report.skipped
    # The cross-attention's k/v read the caption's tokens: skip_cross_attention_kv.
    for p in ("k", "v"):
        assert skipped[f"transformer_blocks.0.attn2.to_{p}"] == (
            "reads the prompt's tokens (skip_cross_attention_kv)"
        )
    assert "skip_edges" in skipped["proj_out"]  # the model's output layer is an edge
    assert "'emb'" in skipped["adaln_single.emb.timestep_embedder.linear_1"]
    assert "'adaln'" in skipped["adaln_single.linear"]
    assert "caption_projection" in skipped["caption_projection.linear_1"]
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in report.converted)
    # With the default min_features nothing in a tiny model qualifies.
    fresh = build_component(PRESET, "transformer", dtype=torch.float32, device="cpu")
    assert quantize_linears(fresh).converted == []


def test_gated_feed_forward_output_stays_in_high_precision_on_the_tiny_sdxl_unet() -> None:
    """SDXL's feed-forwards are GEGLU: their output linear (ff.net.2) is skipped by
    skip_gated_outputs, their input linear (the GEGLU's proj) and attention are not; a
    GELU feed-forward (PixArt, above) keeps ff.net.2 converted. The text k/v of the
    cross-attention are skipped by skip_cross_attention_kv."""
    unet = build_component("tiny-sdxl", "unet", dtype=torch.float32, device="cpu")
    ff = [n for n, _ in unet.named_modules() if n.endswith(".ff.net.2")]
    assert ff  # the tiny UNet has transformer blocks
    every = ModuleFilter(min_features=0, min_weight_elements=0)
    plan = every.plan(unet)
    for name in ff:
        assert plan[name] == "input is a GEGLU's output (skip_gated_outputs)"
        block = name.removesuffix("ff.net.2")
        assert plan[f"{block}ff.net.0.proj"] is None
        assert plan[f"{block}attn1.to_q"] is None
    off = ModuleFilter(min_features=0, min_weight_elements=0, skip_gated_outputs=False)
    assert all(off.plan(unet)[name] is None for name in ff)
    # The cross-attention (attn2) k/v read the text: skipped; its q reads the image.
    text_kv = [n for n in plan if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert text_kv and all("skip_cross_attention_kv" in (plan[n] or "") for n in text_kv)
    assert all(plan[n.replace("attn2.to_k", "attn2.to_q")] is None for n in text_kv[::2])
    kv_on = ModuleFilter(min_features=0, min_weight_elements=0, skip_cross_attention_kv=False)
    assert all(kv_on.plan(unet)[n] is None for n in text_kv)
    # quantize_linears follows the plan: the skipped linears stay nn.Linear.
    report = quantize_linears(unet, every)
    assert set(ff) <= set(report.skipped) and not set(ff) & set(report.converted)
    assert all(type(unet.get_submodule(n)) is torch.nn.Linear for n in ff)
    with pytest.raises(TypeError, match="skip_gated_outputs"):
        ModuleFilter(skip_gated_outputs=1)  # type: ignore[arg-type]


def test_quantize_pipe_end_to_end_image() -> None:
    ref = _image(_pipe())
    pipe = _quiet_quantize(_pipe(), min_features=0, min_weight_elements=0)
    report = quant_report(pipe)
    assert report is not None and report.component == "transformer"
    # 2 blocks x 6: the fused q/k/v and out of self-attention, q/out of cross-attention,
    # the FF pair (fuse_qkv_projections is on by default, as quant.fuse_qkv in O3).
    assert len(report.converted) == 12 and report.bytes_saved > 0
    assert "transformer_blocks.0.attn1.to_qkv" in report.converted
    out = _image(pipe)
    assert np.isfinite(out).all()
    mse = float(((out.astype(np.float64) - ref) ** 2).mean())
    psnr = 10 * np.log10(1.0 / max(mse, 1e-20))
    assert psnr > MIN_PSNR_DB, f"PSNR {psnr:.1f} dB vs unquantized"


def test_without_fusion_each_projection_is_quantized() -> None:
    ref = _image(_pipe())
    pipe = _quiet_quantize(
        _pipe(), min_features=0, min_weight_elements=0, fuse_qkv_projections=False
    )
    report = quant_report(pipe)
    assert report is not None
    # 2 blocks x 8: q/k/v/out of self-attention, q/out of cross-attention, the FF pair.
    assert len(report.converted) == 16
    assert not any("to_qkv" in n or "to_kv" in n for n in [*report.converted, *report.skipped])
    assert "skip_cross_attention_kv" in report.skipped["transformer_blocks.0.attn2.to_k"]
    out = _image(pipe)
    mse = float(((out.astype(np.float64) - ref) ** 2).mean())
    assert 10 * np.log10(1.0 / max(mse, 1e-20)) > MIN_PSNR_DB


def test_second_call_does_nothing_and_other_settings_raise() -> None:
    pipe = _quiet_quantize(_pipe(), min_features=0, min_weight_elements=0)
    first = quant_report(pipe)
    modules = dict(pipe.transformer.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second slow-path warning either
        assert quantize_pipe(pipe, min_features=0, min_weight_elements=0) is pipe
    assert quant_report(pipe) is first
    assert dict(pipe.transformer.named_modules()) == modules
    with pytest.raises(ValueError, match="already quantized"):
        quantize_pipe(pipe, min_features=0, min_weight_elements=0, exclude=())


def test_refuses_after_compile_pipe() -> None:
    from difforge.diffusers import compile_pipe

    pipe = compile_pipe(_pipe())  # lazy: nothing is traced until the pipe runs
    with pytest.raises(QuantizeOrderError, match="quantize before compile"):
        quantize_pipe(pipe, min_features=0, min_weight_elements=0)
    assert not any(isinstance(m, Fp8Linear) for m in pipe.transformer.modules())


def test_refuses_a_denoiser_compiled_outside_difforge() -> None:
    pipe = _pipe()
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(QuantizeOrderError, match="transformer"):
        quantize_pipe(pipe)


def test_warns_once_without_fp8_gemm_and_checks_arguments() -> None:
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without an fp8 GEMM")
    pipe = _pipe()
    with pytest.warns(RuntimeWarning, match="fp8 GEMM not available") as record:
        quantize_pipe(pipe, min_features=0, min_weight_elements=0)
    assert len([w for w in record if "fp8 GEMM" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="dtype"):
        quantize_pipe(_pipe(), dtype="int4")
    with pytest.raises(TypeError, match="pipeline"):
        quantize_pipe(pipe.transformer)


@pytest.mark.slow
def test_quantized_pipe_compiles_and_matches_quantized_eager() -> None:
    from difforge.diffusers import compile_pipe

    pipe = _quiet_quantize(_pipe(), min_features=0, min_weight_elements=0)
    eager = _image(pipe)
    compile_pipe(pipe, options={"mode": "O2", "fullgraph": True}, ignores=("vae",))
    out = _image(pipe)
    # Same fp8 operands; only Inductor's float32 reordering differs.
    np.testing.assert_allclose(out, eager, atol=1e-4)


@pytest.mark.slow
def test_compile_pipe_o3_swaps_the_transformer_like_quantize_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """O3 through compile_pipe with fp8 availability mocked (the swapped linears then run
    the float32 reference on the CPU): the same linears as quantize_pipe, the transformer
    only, and the image within the quantize_pipe bound."""
    import difforge.quant.auto as auto
    from difforge.diffusers import compile_pipe

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    ref = _image(_pipe())
    expected = quant_report(_quiet_quantize(_pipe(), min_features=0, min_weight_elements=0))
    pipe = _pipe()
    small = {"quant.min_features": 0, "quant.min_weight_elements": 0}
    compile_pipe(pipe, options={"mode": "O3", **small})
    out = _image(pipe)
    report = auto.swap_report(getattr(pipe.transformer, "_orig_mod", pipe.transformer))
    assert report is not None and expected is not None
    assert report.converted == expected.converted
    assert not any(isinstance(m, Fp8Linear) for m in pipe.vae.modules())
    mse = float(((out.astype(np.float64) - ref) ** 2).mean())
    assert 10 * np.log10(1.0 / max(mse, 1e-12)) > MIN_PSNR_DB
