"""Offline model presets: real configs (checked on the meta device) and tiny pipelines that
run end to end on the CPU, with offline tokenizers or with precomputed embeddings."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even by accident
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difforge.diffusers import _configs  # noqa: E402
from difforge.diffusers.presets import (  # noqa: E402
    PRESETS,
    Preset,
    _reinit_zero_weights,
    build_component,
    build_pipeline,
    count_parameters,
    get_preset,
    list_presets,
    random_prompt_embeds,
)
from difforge.diffusers.presets_tokenizers import (  # noqa: E402
    CLIP_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    make_clip_tokenizer,
    make_t5_tokenizer,
)

TINY = list_presets(tiny=True)
FULL = list_presets(tiny=False)


# ------------------------------------------------------------------------------------------
# Registry and lookup
# ------------------------------------------------------------------------------------------


def test_registry_has_every_family_in_full_and_tiny_size() -> None:
    assert set(FULL) == {
        "pixart-xl-2-1024",
        "pixart-sigma-xl-2-1024",
        "sd3-medium",
        "flux-dev",
        "flux-schnell",
        "sdxl-base",
        "sd15",
    }
    assert {"tiny-pixart", "tiny-pixart-sigma", "tiny-sd3", "tiny-flux"} <= set(TINY)
    assert {"tiny-sdxl", "tiny-sd15"} <= set(TINY)
    assert set(PRESETS) == set(FULL) | set(TINY)


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("PixArt-alpha/PixArt-XL-2-1024-MS", "pixart-xl-2-1024"),
        ("pixart-alpha/pixart-sigma-xl-2-1024-ms", "pixart-sigma-xl-2-1024"),
        ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3-medium"),
        ("black-forest-labs/FLUX.1-dev", "flux-dev"),
        ("FLUX.1-schnell", "flux-schnell"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl-base"),
        ("runwayml/stable-diffusion-v1-5", "sd15"),
        ("  SDXL ", "sdxl-base"),
        ("tiny-flux-dev", "tiny-flux"),
    ],
)
def test_get_preset_accepts_aliases_and_repo_ids(alias: str, name: str) -> None:
    assert get_preset(alias).name == name
    assert get_preset(get_preset(alias)) is get_preset(alias)


def test_unknown_preset_names_the_closest_match_and_all_valid_names() -> None:
    with pytest.raises(ValueError, match="Did you mean 'pixart-xl-2-1024'") as err:
        get_preset("pixart-xl-2-1042")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="not a local pipeline directory either"):
        build_pipeline("/no/such/pipeline-dir")


def test_preset_metadata() -> None:
    expect = {
        "pixart-xl-2-1024": ("pixart", "transformer", torch.float16, 1024, 20),
        "pixart-sigma-xl-2-1024": ("pixart", "transformer", torch.float16, 1024, 20),
        "sd3-medium": ("sd3", "transformer", torch.float16, 1024, 28),
        "flux-dev": ("flux", "transformer", torch.bfloat16, 1024, 28),
        "flux-schnell": ("flux", "transformer", torch.bfloat16, 1024, 4),
        "sdxl-base": ("sdxl", "unet", torch.float16, 1024, 50),
        "sd15": ("sd15", "unet", torch.float16, 512, 50),
    }
    for name, (family, denoiser, dtype, size, steps) in expect.items():
        p = get_preset(name)
        got = (p.family, p.denoiser, p.dtype, p.default_height, p.default_steps)
        assert got == (family, denoiser, dtype, size, steps), name
        assert p.default_width == size and "/" in p.repo_id and not p.tiny
    for name in TINY:
        p = get_preset(name)
        assert p.tiny and p.dtype == torch.float32 and p.default_steps == 2
        assert p.default_height == p.default_width == 64


# ------------------------------------------------------------------------------------------
# Full-size configs: values and parameter counts, without allocating weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "component", "expected"),
    [
        ("pixart-xl-2-1024", "transformer", 611e6),
        ("pixart-sigma-xl-2-1024", "transformer", 611e6),
        ("sd3-medium", "transformer", 2.028e9),
        ("flux-dev", "transformer", 11.90e9),
        ("flux-schnell", "transformer", 11.89e9),
        ("sdxl-base", "unet", 2.567e9),
        ("sd15", "unet", 859.5e6),
        ("sd15", "vae", 83.65e6),
        ("sd3-medium", "vae", 83.8e6),
        ("sdxl-base", "text_encoder", 123.1e6),  # CLIP ViT-L/14 text tower
        ("sdxl-base", "text_encoder_2", 694.7e6),  # OpenCLIP bigG text tower + projection
        ("flux-dev", "text_encoder_2", 4.762e9),  # T5 v1.1 XXL encoder
    ],
)
def test_full_size_parameter_counts(name: str, component: str, expected: float) -> None:
    n = count_parameters(name, component)
    assert abs(n - expected) / expected < 0.02, f"{name}.{component}: {n / 1e6:.1f}M"


def test_full_size_modules_build_on_meta_with_real_values() -> None:
    flux = build_component("flux-dev", "transformer", device="meta")
    assert flux.dtype == torch.bfloat16 and flux.device.type == "meta"
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert (
        flux.config.guidance_embeds
        and not get_preset("flux-schnell").denoiser_config["guidance_embeds"]
    )
    t5 = build_component("pixart-xl-2-1024", "text_encoder", device="meta")
    assert (t5.config.d_model, t5.config.num_layers, t5.config.d_ff) == (4096, 24, 10240)
    assert (t5.config.num_heads, t5.config.is_gated_act) == (64, True)
    for name in ("sd3-medium", "flux-dev"):
        vae = build_component(name, "vae", device="meta")
        assert vae.config.latent_channels == 16 and vae.quant_conv is None
    assert build_component("sdxl-base", "vae", device="meta").config.force_upcast
    assert get_preset("sdxl-base").denoiser_config["addition_embed_type"] == "text_time"
    pixart = build_component("pixart-xl-2-1024", "transformer", device="meta")
    assert pixart.use_additional_conditions  # alpha: size/aspect-ratio micro-conditions
    sigma = build_component("pixart-sigma-xl-2-1024", "transformer", device="meta")
    assert not sigma.use_additional_conditions


def _init_params(cls: Any) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_config_key_is_a_real_argument(name: str) -> None:
    """Catches typos: diffusers/transformers would silently ignore an unknown key."""
    import transformers

    p = get_preset(name)
    assert set(p.denoiser_config) <= _init_params(getattr(diffusers, p.denoiser_class))
    assert set(p.vae_config) <= _init_params(diffusers.AutoencoderKL)
    assert set(p.scheduler_config) <= _init_params(getattr(diffusers, p.scheduler_class))
    for te in p.text_encoders:
        config_cls = transformers.T5Config if te.kind == "t5" else transformers.CLIPTextConfig
        known = set(config_cls().to_dict()) | {"tie_word_embeddings"}
        assert set(te.config) <= known, te.component


def test_tiny_encoders_cover_the_offline_tokenizers() -> None:
    assert _configs.TINY_CLIP_L["vocab_size"] >= CLIP_VOCAB_SIZE
    assert _configs.TINY_T5["vocab_size"] >= T5_VOCAB_SIZE
    assert _configs.CLIP_L["vocab_size"] >= CLIP_VOCAB_SIZE
    assert _configs.T5_XXL["vocab_size"] >= T5_VOCAB_SIZE


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_offline_tokenizers_behave_like_the_real_ones() -> None:
    clip = make_clip_tokenizer()
    ids = clip("A photo of a cat!", padding="max_length", max_length=77, truncation=True)
    ids = ids["input_ids"]
    assert len(ids) == 77 and ids[0] == clip.bos_token_id
    # Legacy CLIP configs pool at argmax(input_ids): that must be the first end-of-text.
    eos_at = ids.index(clip.eos_token_id)
    assert max(ids) == clip.eos_token_id and int(torch.tensor(ids).argmax()) == eos_at
    assert len(clip("word " * 200, truncation=True, max_length=77)["input_ids"]) == 77

    t5 = make_t5_tokenizer(model_max_length=16)
    enc = t5("a cat, ünïcode", padding="max_length", max_length=16, truncation=True)
    assert enc["input_ids"][enc["attention_mask"].index(0) - 1] == t5.eos_token_id == 1
    assert enc["input_ids"][-1] == t5.pad_token_id == 0
    assert max(enc["input_ids"]) < T5_VOCAB_SIZE


# ------------------------------------------------------------------------------------------
# Tiny pipelines, both prompt modes
# ------------------------------------------------------------------------------------------


def _capture_denoiser_inputs(pipe: Any, denoiser: str) -> list[dict[str, tuple[Any, ...]]]:
    """Record (shape, dtype) of every tensor argument of each denoiser call."""
    calls: list[dict[str, tuple[Any, ...]]] = []

    def hook(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
        nested = seen.pop("added_cond_kwargs", None) or {}
        seen |= {f"added.{k}": v for k, v in nested.items()}
        calls.append(
            {k: (tuple(v.shape), v.dtype) for k, v in seen.items() if isinstance(v, torch.Tensor)}
        )

    getattr(pipe, denoiser).register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _run(pipe: Any, p: Preset, prompt_kwargs: dict[str, Any]) -> torch.Tensor:
    out = pipe(
        **prompt_kwargs,
        **p.call_kwargs(),
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize("name", TINY)
def test_tiny_pipeline_runs_with_text_encoders_and_with_embeddings(name: str) -> None:
    p = get_preset(name)
    with_text = build_pipeline(p, text_encoders=True, seed=0)
    text_inputs = _capture_denoiser_inputs(with_text, p.denoiser)
    image = _run(with_text, p, {"prompt": "a photo of a cat"})

    embeds_only = build_pipeline(p, text_encoders=False, seed=0)
    assert all(getattr(embeds_only, te.component) is None for te in p.text_encoders)
    assert all(getattr(embeds_only, te.tokenizer) is None for te in p.text_encoders)
    embed_inputs = _capture_denoiser_inputs(embeds_only, p.denoiser)
    image2 = _run(embeds_only, p, p.prompt_kwargs(batch=1))

    for img in (image, image2):
        assert img.shape == (1, 3, 64, 64)
        assert torch.isfinite(img).all() and img.std() > 1e-3
    # Precomputed embeddings must reach the denoiser exactly as the encoders' outputs do.
    # (PNDM makes one extra model call at the first step.)
    assert len(text_inputs) == len(embed_inputs) >= p.default_steps
    assert text_inputs == embed_inputs


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-sdxl"])
def test_precomputed_embeddings_batch(name: str) -> None:
    p = get_preset(name)
    pipe = build_pipeline(p, text_encoders=False)
    kwargs = p.prompt_kwargs(batch=2, seed=1)
    assert all(v.shape[0] == 2 for v in kwargs.values() if isinstance(v, torch.Tensor))
    images = _run(pipe, p, kwargs)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])


def test_prompt_kwargs_shapes_of_full_size_presets() -> None:
    def shapes(name: str, **kw: Any) -> dict[str, tuple[int, ...]]:
        out = random_prompt_embeds(name, 2, **kw)
        return {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}

    pixart = shapes("pixart-xl-2-1024", valid_tokens=10)
    assert pixart["prompt_embeds"] == pixart["negative_prompt_embeds"] == (2, 120, 4096)
    assert pixart["prompt_attention_mask"] == (2, 120)
    assert shapes("pixart-sigma-xl-2-1024")["prompt_embeds"] == (2, 300, 4096)
    sd3 = shapes("sd3-medium")
    assert sd3["prompt_embeds"] == (2, 77 + 256, 4096) and sd3["pooled_prompt_embeds"] == (2, 2048)
    assert shapes("flux-dev") == {"prompt_embeds": (2, 512, 4096), "pooled_prompt_embeds": (2, 768)}
    assert shapes("flux-schnell")["prompt_embeds"] == (2, 256, 4096)
    sdxl = shapes("sdxl-base")
    assert sdxl["negative_prompt_embeds"] == (2, 77, 2048)
    assert sdxl["negative_pooled_prompt_embeds"] == (2, 1280)
    assert shapes("sd15") == {"prompt_embeds": (2, 77, 768), "negative_prompt_embeds": (2, 77, 768)}
    # No classifier-free guidance, no negatives.
    assert set(shapes("sdxl-base", guidance_scale=1.0)) == {"prompt_embeds", "pooled_prompt_embeds"}

    out = random_prompt_embeds("pixart-xl-2-1024", valid_tokens=10, dtype=torch.float32)
    assert out["prompt_attention_mask"].sum() == 10 and out["negative_prompt"] is None
    assert out["prompt_embeds"].dtype == torch.float32
    assert get_preset("sd15").prompt_kwargs()["prompt_embeds"].dtype == torch.float16


def test_prompt_kwargs_from_a_pipeline_match_its_preset() -> None:
    p = get_preset("tiny-sd3")
    pipe = build_pipeline(p, text_encoders=False)
    from_pipe = random_prompt_embeds(pipe, 1, t5_tokens=p.max_sequence_length, seed=5)
    from_preset = p.prompt_kwargs(1, seed=5)
    assert from_pipe.keys() == from_preset.keys()
    for k, v in from_pipe.items():
        assert torch.equal(v, from_preset[k]), k
    with pytest.raises(ValueError, match="supported"):
        random_prompt_embeds(object())  # type: ignore[arg-type]


def test_call_kwargs_defaults_and_overrides() -> None:
    p = get_preset("tiny-pixart")
    kw = p.call_kwargs()
    assert (kw["height"], kw["width"], kw["num_inference_steps"]) == (64, 64, 2)
    assert kw["use_resolution_binning"] is False and kw["guidance_scale"] == 4.5
    kw = get_preset("flux-schnell").call_kwargs(height=512, steps=8, guidance_scale=0.0)
    assert (kw["height"], kw["width"], kw["num_inference_steps"]) == (512, 1024, 8)
    assert kw["max_sequence_length"] == 256 and kw["guidance_scale"] == 0.0


# ------------------------------------------------------------------------------------------
# Weights: seeds, dtypes, no all-zero layers
# ------------------------------------------------------------------------------------------


def test_build_component_is_seeded_and_matches_the_pipeline() -> None:
    rng = torch.get_rng_state()
    a = build_component("tiny-sdxl", "unet", seed=3).state_dict()
    b = build_component("tiny-sdxl", "unet", seed=3).state_dict()
    c = build_component("tiny-sdxl", "unet", seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    unet = build_pipeline("tiny-sdxl", text_encoders=False, seed=3).unet.state_dict()
    assert all(torch.equal(a[k], unet[k]) for k in a)


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-sd15"])
def test_half_precision_construction_keeps_buffers_exact(name: str) -> None:
    """Modules are built with the target dtype as default dtype (no float32 copy first);
    precomputed buffers such as sin-cos position tables must not lose precision to that."""
    p = get_preset(name)
    for component in (p.denoiser, "vae", p.text_encoders[0].component):
        half = build_component(p, component, dtype=torch.float16)
        full = build_component(p, component, dtype=torch.float32)
        assert next(half.parameters()).dtype == torch.float16
        for (key, b16), (_, b32) in zip(half.named_buffers(), full.named_buffers(), strict=True):
            assert torch.equal(b16, b32.to(b16.dtype)), f"{component}.{key}"


def test_t5_keeps_wo_in_float32_under_fp16_like_from_pretrained() -> None:
    t5 = build_component("tiny-pixart", "text_encoder", dtype=torch.float16)
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
    t5 = build_component("tiny-pixart", "text_encoder", dtype=torch.bfloat16)
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16


def test_zero_initialised_weights_are_replaced() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    torch.nn.init.zeros_(m[2].weight)
    torch.nn.init.zeros_(m[2].bias)
    assert _reinit_zero_weights(m) == ["2.weight"]
    assert m[2].weight.abs().min() >= 0 and m[2].weight.std() > 0.1
    assert not m[2].bias.any() and not m[1].bias.any()  # biases/norms keep their init
    for name in TINY:
        p = get_preset(name)
        denoiser = build_component(p, p.denoiser)
        assert all(w.any() for w in denoiser.parameters() if w.dim() >= 2), name


def test_unknown_component() -> None:
    with pytest.raises(ValueError, match="buildable ones: unet, vae, text_encoder"):
        build_component("tiny-sd15", "transformer")


# ------------------------------------------------------------------------------------------
# Local directories
# ------------------------------------------------------------------------------------------


def test_local_directory_loads_offline(tmp_path: Path) -> None:
    p = get_preset("tiny-sd15")
    pipe = build_pipeline(p)  # tiny presets default to text encoders + offline tokenizer
    pipe.save_pretrained(tmp_path)
    for source in (tmp_path, str(tmp_path)):
        loaded = build_pipeline(source)
        assert type(loaded).__name__ == "StableDiffusionPipeline"
        a = _run(pipe, p, {"prompt": "a cat"})
        b = _run(loaded, p, {"prompt": "a cat"})
        assert torch.equal(a, b)
    half = build_pipeline(tmp_path, dtype=torch.float16)
    assert half.unet.dtype == torch.float16
