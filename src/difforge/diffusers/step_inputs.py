"""Inputs of one denoising step (and of a VAE decode) for each preset family.

Step-level benchmarks and tests call the denoiser directly, the way the pipeline's
loop does, without schedulers or text encoders. Shapes follow the pipelines of
diffusers 0.42: latents at 1/8 of the image size (FLUX packs 2x2 patches of 16
channels into tokens), prompt embeddings from :func:`random_prompt_embeds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.diffusers.presets import Preset, get_preset, random_prompt_embeds

VAE_SCALE = 8  # every supported VAE downsamples by 8


@dataclass
class StepCall:
    """A callable's positional and keyword arguments."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, fn: Any) -> Any:
        return fn(*self.args, **self.kwargs)


def _latent_size(height: int, width: int, multiple: int = 2 * VAE_SCALE) -> tuple[int, int]:
    """Latent size of an image; ``multiple``: pixels the model needs (16 for DiTs, whose
    2x2 patches need even latents; 8 for UNets and VAEs, which take any latent size)."""
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    return height // VAE_SCALE, width // VAE_SCALE


def denoiser_step_inputs(
    preset: str | Preset,
    *,
    batch: int,
    height: int,
    width: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
) -> StepCall:
    """Arguments for ``denoiser(**kwargs)`` as the pipeline's loop passes them.

    ``batch`` is the denoiser's batch (2 x images for classifier-free guidance).
    """
    p = get_preset(preset)
    cfg = p.denoiser_config
    gen = torch.Generator("cpu").manual_seed(seed)
    unet = p.family in ("sdxl", "sd15")
    lat_h, lat_w = _latent_size(height, width, VAE_SCALE if unet else 2 * VAE_SCALE)
    embeds = random_prompt_embeds(
        p, batch, guidance_scale=1.0, device=device, dtype=dtype, seed=seed
    )

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    timestep = (torch.rand(batch, generator=gen) * 999).to(device)
    if p.family == "pixart":
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if cfg.get("sample_size") == 128:  # the alpha pipeline's micro-conditions
            added = {
                "resolution": torch.tensor([[height, width]] * batch, dtype=dtype, device=device),
                "aspect_ratio": torch.tensor(
                    [[height / width]] * batch, dtype=dtype, device=device
                ),
            }
        return StepCall(
            (),
            {
                "hidden_states": randn(batch, cfg["in_channels"], lat_h, lat_w),
                "encoder_hidden_states": embeds["prompt_embeds"],
                "encoder_attention_mask": embeds["prompt_attention_mask"],
                "timestep": timestep,
                "added_cond_kwargs": added,
                "return_dict": False,
            },
        )
    if p.family == "sd3":
        return StepCall(
            (),
            {
                "hidden_states": randn(batch, cfg["in_channels"], lat_h, lat_w),
                "encoder_hidden_states": embeds["prompt_embeds"],
                "pooled_projections": embeds["pooled_prompt_embeds"],
                "timestep": timestep,
                "return_dict": False,
            },
        )
    if p.family == "flux":
        tokens_h, tokens_w = lat_h // 2, lat_w // 2
        img_ids = torch.zeros(tokens_h, tokens_w, 3)
        img_ids[..., 1] = torch.arange(tokens_h)[:, None]
        img_ids[..., 2] = torch.arange(tokens_w)[None, :]
        text_len = embeds["prompt_embeds"].shape[1]
        kwargs = {
            "hidden_states": randn(batch, tokens_h * tokens_w, cfg["in_channels"]),
            "encoder_hidden_states": embeds["prompt_embeds"],
            "pooled_projections": embeds["pooled_prompt_embeds"],
            "timestep": timestep / 1000,  # FLUX takes sigmas in [0, 1]
            "img_ids": img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
            "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
            "guidance": None,
            "return_dict": False,
        }
        if cfg.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=torch.float32)
        return StepCall((), kwargs)
    # UNets: SDXL adds pooled text embeddings and the six size/crop micro-conditions.
    kwargs = {
        "sample": randn(batch, cfg["in_channels"], lat_h, lat_w),
        "timestep": timestep,
        "encoder_hidden_states": embeds["prompt_embeds"],
        "return_dict": False,
    }
    if p.family == "sdxl":
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=dtype)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": embeds["pooled_prompt_embeds"],
            "time_ids": time_ids.to(device),
        }
    return StepCall((), kwargs)


class VaeDecode(nn.Module):
    """``vae.decode(latents)`` as a module, so it can be compiled and timed like a step."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def vae_decode_inputs(
    preset: str | Preset,
    *,
    batch: int,
    height: int,
    width: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
) -> StepCall:
    """Latents for :class:`VaeDecode` of ``preset``'s VAE."""
    p = get_preset(preset)
    lat_h, lat_w = _latent_size(height, width, VAE_SCALE)
    gen = torch.Generator("cpu").manual_seed(seed)
    channels = p.vae_config.get("latent_channels", 4)
    latents = torch.randn((batch, channels, lat_h, lat_w), generator=gen)
    return StepCall((latents.to(device=device, dtype=dtype),), {})
