"""Pipeline setup: one pipeline, one set of inputs, shared by every compiler of a run."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from difforge.bench.args import BenchConfig, BenchError
from difforge.bench.outliers import OutlierReport, plant_outliers
from difforge.diffusers.presets import Preset, build_pipeline, get_preset, random_prompt_embeds

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: Sizes (height, width) of the seed's resolution sweeps, at 1024-pixel scale.
MULTIPLE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (768, 1024),
    (1024, 768),
    (512, 512),
)
RARE_RESOLUTIONS: tuple[tuple[int, int], ...] = ((960, 720), (544, 408))

#: Pipeline attributes that hold text encoders.
TEXT_ENCODER_ATTRS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Workload:
    """The pipeline and everything each call passes to it."""

    pipe: DiffusionPipeline
    preset: Preset | None
    """``None`` when the model is a local directory."""
    model: str
    device: torch.device
    dtype: torch.dtype
    height: int
    width: int
    steps: int
    batch: int
    seed: int
    prompt_kwargs: dict[str, Any]
    """Either ``prompt=`` or precomputed (random) embeddings."""
    call_kwargs: dict[str, Any]
    """Every other ``pipe(...)`` argument except size, generator and output type."""
    text_encoders: bool
    scheduler: str
    size_multiple: int
    """Height and width must be multiples of this (VAE factor x patch size)."""
    resolution_scale: float
    """Scale from the seed's 1024-pixel sweep sizes to this model's (tiny presets: < 1)."""
    accepts: frozenset[str] = field(default_factory=frozenset)
    """Keyword arguments the pipeline's ``__call__`` takes."""
    outliers: OutlierReport | None = None
    """What ``--plant-outliers`` changed in the denoiser (``None``: nothing)."""

    @property
    def denoiser(self) -> str:
        """Pipeline attribute of the denoiser (``transformer`` or ``unet``)."""
        return "transformer" if getattr(self.pipe, "transformer", None) is not None else "unet"

    def call(
        self,
        *,
        height: int | None = None,
        width: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Run the pipeline once from the fixed seed; images as (B, 3, H, W) in [0, 1].
        ``extra``: more ``pipe(...)`` arguments for this call only."""
        # A CPU generator draws the same latents whatever the device, so every compiler
        # (and every machine) starts from identical noise.
        generator = torch.Generator("cpu").manual_seed(self.seed)
        # ``extra`` overrides the workload's own arguments (a sweep turns off the
        # resolution binning that call_kwargs may set).
        kwargs = {**self.prompt_kwargs, **self.call_kwargs, **(extra or {})}
        out = self.pipe(
            **kwargs,
            height=height or self.height,
            width=width or self.width,
            generator=generator,
            output_type="pt",
        )
        return out.images

    def generate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One :meth:`call` that also returns the final latents (after the last scheduler
        step, before the VAE; FLUX's still packed), or ``None`` if the pipeline has no step
        callback. The callback runs once per step in Python, so timed runs leave it out."""
        captured: list[torch.Tensor] = []

        def keep(latents: torch.Tensor) -> None:
            # A copy: the pipeline may reuse or rescale the tensor after the callback.
            captured[:] = [latents.detach().clone()]

        extra: dict[str, Any] = {}
        if "callback_on_step_end" in self.accepts:

            def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
                keep(kwargs["latents"])
                return {}

            extra = {
                "callback_on_step_end": on_step_end,
                "callback_on_step_end_tensor_inputs": ["latents"],
            }
        elif {"callback", "callback_steps"} <= self.accepts:  # PixArt's older interface
            extra = {"callback": lambda step, t, latents: keep(latents), "callback_steps": 1}
        images = self.call(extra=extra)
        return images, (captured[-1] if captured else None)

    def sweep_kwargs(self) -> dict[str, Any]:
        """Extra call arguments for resolution sweeps: no aspect-ratio binning, so the
        denoiser really runs at the requested size."""
        return {"use_resolution_binning": False} if "use_resolution_binning" in self.accepts else {}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the workload."""
        return {
            "model": self.model,
            "preset": self.preset.name if self.preset else None,
            "pipeline": type(self.pipe).__name__,
            "denoiser": type(getattr(self.pipe, self.denoiser)).__name__,
            "denoiser_parameters": sum(
                p.numel() for p in getattr(self.pipe, self.denoiser).parameters()
            ),
            "scheduler": self.scheduler,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "height": self.height,
            "width": self.width,
            "steps": self.steps,
            "batch": self.batch,
            "text_encoders": self.text_encoders,
            "prompt": self.prompt_kwargs.get("prompt"),
            "call_kwargs": {k: _jsonable(v) for k, v in self.call_kwargs.items()},
            "planted_outliers": self.outliers.summary() if self.outliers else None,
        }


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def find_preset(model: str) -> Preset | None:
    """The preset ``model`` names, or ``None`` for a local directory (or unknown name)."""
    try:
        return get_preset(model)
    except ValueError:
        return None


def default_dtype(config: BenchConfig, preset: Preset | None) -> torch.dtype:
    """--dtype, else the preset's dtype on a GPU (float16 for local dirs), float32 on CPU."""
    if config.dtype is not None:
        return config.dtype
    if not config.device.startswith("cuda"):
        return torch.float32
    return preset.dtype if preset is not None else torch.float16


def set_scheduler(pipe: DiffusionPipeline, name: str | None) -> str:
    """Swap in the named diffusers scheduler built from the pipeline's scheduler config."""
    import diffusers

    if name is None:
        return type(pipe.scheduler).__name__
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        known = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; e.g. {', '.join(known[:5])}"
        raise BenchError(f"unknown scheduler {name!r}{hint}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return name


def _has_text_encoders(pipe: DiffusionPipeline) -> bool:
    return any(getattr(pipe, attr, None) is not None for attr in TEXT_ENCODER_ATTRS)


def _drop_text_encoders(pipe: DiffusionPipeline) -> None:
    """Remove a local pipeline's encoders so random embeddings are used instead."""
    for attr in TEXT_ENCODER_ATTRS:
        if getattr(pipe, attr, None) is not None:
            setattr(pipe, attr, None)


def _call_parameters(pipe: DiffusionPipeline) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def _default_size(pipe: DiffusionPipeline, preset: Preset | None) -> tuple[int, int]:
    if preset is not None:
        return preset.default_height, preset.default_width
    sample_size = getattr(pipe, "default_sample_size", None)
    if sample_size is None:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample_size, (tuple, list)):
        sample_size = sample_size[0]
    if not isinstance(sample_size, int):
        return 1024, 1024
    size = sample_size * int(getattr(pipe, "vae_scale_factor", 8))
    return size, size


def _size_multiple(pipe: DiffusionPipeline) -> int:
    """Pixel multiple a size must have: the VAE's factor, times 2 for DiTs (they cut the
    latent into 2x2 patches, or pack 2x2 for FLUX)."""
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return vae_factor
    patch = getattr(transformer.config, "patch_size", 1) or 1
    return vae_factor * max(int(patch), 2)


def _default_steps(config: BenchConfig, preset: Preset | None, params: dict) -> int:
    if config.steps is not None:
        return config.steps
    if preset is not None:
        return preset.default_steps
    default = params.get("num_inference_steps")
    if default is None or not isinstance(default.default, int):
        return 20
    return default.default


def build_workload(config: BenchConfig) -> Workload:
    """Build the pipeline (random weights for presets) and the inputs every run uses."""
    preset = find_preset(config.model)
    dtype = default_dtype(config, preset)
    try:
        pipe = build_pipeline(
            config.model,
            dtype=dtype,
            device=config.device,
            text_encoders=config.text_encoders,
            seed=config.seed,
        )
    except ValueError as e:
        raise BenchError(str(e)) from None
    if preset is None and config.text_encoders is False:
        _drop_text_encoders(pipe)
    pipe.set_progress_bar_config(disable=True)  # we show our own progress
    outliers = None
    if config.plant_outliers is not None:
        # Before any compiler: every run, eager included, sees the same planted weights.
        denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        outliers = plant_outliers(
            denoiser, config.plant_outliers, channels=config.outlier_channels, seed=config.seed
        )
    scheduler = set_scheduler(pipe, config.scheduler)

    params = _call_parameters(pipe)
    with_text = _has_text_encoders(pipe)
    device = torch.device(config.device)
    if with_text:
        prompt_kwargs: dict[str, Any] = {"prompt": config.prompt}
    else:
        # One random "prompt"; num_images_per_prompt makes the batch, as with real text.
        prompt_kwargs = random_prompt_embeds(
            preset if preset is not None else pipe,
            1,
            guidance_scale=config.guidance_scale,
            device=device,
            dtype=dtype,
            seed=config.seed,
        )

    default_h, default_w = _default_size(pipe, preset)
    steps = _default_steps(config, preset, params)
    if preset is not None:
        call_kwargs = preset.call_kwargs(steps=steps, guidance_scale=config.guidance_scale)
        call_kwargs.pop("height")
        call_kwargs.pop("width")
    else:
        call_kwargs = {"num_inference_steps": steps}
        if config.guidance_scale is not None:
            call_kwargs["guidance_scale"] = config.guidance_scale
        if "clean_caption" in params:
            call_kwargs["clean_caption"] = False  # needs bs4 + ftfy; only warns without
    call_kwargs["num_images_per_prompt"] = config.batch

    tiny = preset is not None and preset.tiny
    return Workload(
        pipe=pipe,
        preset=preset,
        model=config.model,
        device=device,
        dtype=dtype,
        height=config.height or default_h,
        width=config.width or default_w,
        steps=steps,
        batch=config.batch,
        seed=config.seed,
        prompt_kwargs=prompt_kwargs,
        call_kwargs=call_kwargs,
        text_encoders=with_text,
        scheduler=scheduler,
        size_multiple=_size_multiple(pipe),
        resolution_scale=default_h / 1024 if tiny else 1.0,
        accepts=frozenset(params),
        outliers=outliers,
    )


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def sweep_sizes(
    workload: Workload, sizes: tuple[tuple[int, int], ...]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each seed size (h, w) with the size actually run: scaled for tiny presets and
    rounded to the pipeline's multiple (e.g. 544x408 -> 544x416 for a DiT)."""
    m, s = workload.size_multiple, workload.resolution_scale
    return [((h, w), (_round_to(h * s, m), _round_to(w * s, m))) for h, w in sizes]
