"""Component configurations of the models behind ``difforge.diffusers.presets``.

Pure data, no imports of diffusers or transformers. The full-size dicts restate the published
``config.json`` / ``scheduler_config.json`` files of each model (keys that only affect
loading, such as ``_diffusers_version``, are left out; keys a class no longer accepts are
dropped). The ``TINY_*`` dicts keep each family's block structure and classes with the
smallest widths that the architectures allow, so a whole pipeline call runs on a CPU in
well under a second.

Every dict here is treated as read-only: consumers deep-copy before use.
"""

from __future__ import annotations

from typing import Any

Config = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Text encoders (transformers configs)
# --------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14 text tower, as shipped in SD1.5 / SDXL / SD3 / FLUX.
# Token ids 0/2/1 are the legacy values of that config; with eos_token_id == 2 transformers
# pools at argmax(input_ids), i.e. at the end-of-text token (the largest id in CLIP's vocab).
CLIP_L: Config = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (SDXL text_encoder_2, SD3 text_encoder_2).
CLIP_BIGG: Config = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

# google/t5-v1_1-xxl encoder (PixArt-alpha/-Sigma, SD3 text_encoder_3, FLUX text_encoder_2).
T5_XXL: Config = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}

# Tiny encoders. Vocab sizes cover the offline tokenizers of presets_tokenizers (514 CLIP
# pieces, < 256 T5 pieces). T5 is 64 wide because SD3 zero-pads the concatenated CLIP-L and
# CLIP-G hidden states (32 + 32) up to the T5 width.
TINY_CLIP_L: Config = {
    **CLIP_L,
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TINY_CLIP_BIGG: Config = {**TINY_CLIP_L, "hidden_act": "gelu"}
TINY_T5: Config = {
    **T5_XXL,
    "vocab_size": 256,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
}

# --------------------------------------------------------------------------------------------
# VAEs (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

_VAE_BASE: Config = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
}

# stabilityai/sd-vae-ft-ema (PixArt-alpha) and the SD1.5 VAE: same weights layout.
VAE_SD: Config = {**_VAE_BASE, "sample_size": 512, "scaling_factor": 0.18215}
# stabilityai/sdxl-vae (SDXL, PixArt-Sigma). Overflows in fp16, hence force_upcast.
VAE_SDXL: Config = {
    **_VAE_BASE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# 16-channel VAEs without quant convs (SD3, FLUX).
VAE_SD3: Config = {
    **_VAE_BASE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
VAE_FLUX: Config = {**VAE_SD3, "scaling_factor": 0.3611, "shift_factor": 0.1159}


def tiny_vae(full: Config) -> Config:
    """The tiny twin of a full VAE config: four levels (so the 8x latent downsampling and
    the pipelines' ``vae_scale_factor`` stay real), one resnet per level, 16-32 channels."""
    return {
        **full,
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


# --------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------

# PixArt-alpha/PixArt-XL-2-1024-MS transformer (PixArtTransformer2DModel). 16 heads x 72.
PIXART_ALPHA_XL2: Config = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: eps and variance
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "attention_type": "default",
}
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: same network, no size/aspect-ratio conditioning.
PIXART_SIGMA_XL2: Config = {
    **PIXART_ALPHA_XL2,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}
# Hidden 48 = 2 heads x 24: PixArt-alpha's size conditioning splits the width in thirds.
# sample_size stays 128: the alpha pipeline only passes size/aspect-ratio micro-conditions
# when sample_size == 128, and it also sets the position-embedding interpolation scale (2).
# Smaller latents just get their sin-cos table recomputed in forward.
TINY_PIXART_ALPHA: Config = {
    **PIXART_ALPHA_XL2,
    "num_attention_heads": 2,
    "attention_head_dim": 24,
    "num_layers": 2,
    "cross_attention_dim": 48,
    "caption_channels": TINY_T5["d_model"],
}
TINY_PIXART_SIGMA: Config = {
    **TINY_PIXART_ALPHA,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}

# stabilityai/stable-diffusion-3-medium-diffusers transformer (SD3Transformer2DModel).
SD3_MEDIUM: Config = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
TINY_SD3: Config = {
    **SD3_MEDIUM,
    "sample_size": 8,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5["d_model"],
    "caption_projection_dim": 32,
    "pooled_projection_dim": TINY_CLIP_L["projection_dim"] + TINY_CLIP_BIGG["projection_dim"],
    "pos_embed_max_size": 16,
}

# black-forest-labs/FLUX.1-dev transformer (FluxTransformer2DModel); schnell lacks guidance.
FLUX_DEV: Config = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_SCHNELL: Config = {**FLUX_DEV, "guidance_embeds": False}
TINY_FLUX_DEV: Config = {
    **FLUX_DEV,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5["d_model"],
    "pooled_projection_dim": TINY_CLIP_L["hidden_size"],
    "axes_dims_rope": [4, 6, 6],  # must sum to attention_head_dim
}
TINY_FLUX_SCHNELL: Config = {**TINY_FLUX_DEV, "guidance_embeds": False}

# stabilityai/stable-diffusion-xl-base-1.0 UNet. Note diffusers' naming quirk: for this
# class "attention_head_dim" holds the number of heads per level (64-wide heads).
SDXL_BASE_UNET: Config = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "upcast_attention": None,
    "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    # 6 micro-conditioning values x 256 + the 1280-wide pooled CLIP-bigG embedding.
    "projection_class_embeddings_input_dim": 2816,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
}
TINY_SDXL_UNET: Config = {
    **SDXL_BASE_UNET,
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": TINY_CLIP_L["hidden_size"] + TINY_CLIP_BIGG["hidden_size"],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_CLIP_BIGG["projection_dim"],
}

# stable-diffusion-v1-5/stable-diffusion-v1-5 UNet ("attention_head_dim" = 8 heads).
SD15_UNET: Config = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
TINY_SD15_UNET: Config = {
    **SD15_UNET,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": TINY_CLIP_L["hidden_size"],
    "attention_head_dim": 2,
}

# --------------------------------------------------------------------------------------------
# Schedulers (class name, config)
# --------------------------------------------------------------------------------------------

PIXART_SCHEDULER: tuple[str, Config] = (
    "DPMSolverMultistepScheduler",
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    },
)
SD3_SCHEDULER: tuple[str, Config] = (
    "FlowMatchEulerDiscreteScheduler",
    {"num_train_timesteps": 1000, "shift": 3.0},
)
FLUX_DEV_SCHEDULER: tuple[str, Config] = (
    "FlowMatchEulerDiscreteScheduler",
    {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
)
FLUX_SCHNELL_SCHEDULER: tuple[str, Config] = (
    "FlowMatchEulerDiscreteScheduler",
    {
        **FLUX_DEV_SCHEDULER[1],
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
)
SDXL_SCHEDULER: tuple[str, Config] = (
    "EulerDiscreteScheduler",
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
)
SD15_SCHEDULER: tuple[str, Config] = (
    "PNDMScheduler",
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    },
)
