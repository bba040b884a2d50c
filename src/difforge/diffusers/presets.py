"""Offline model presets: real diffusion-pipeline architectures with random weights.

Each :class:`Preset` restates the published configuration of a diffusers pipeline (denoiser,
VAE, scheduler, text encoders) so that benchmarks and tests can build the exact
architecture without the Hub. Weights are random; speed does not depend on weight values.
Every family also has a ``tiny-*`` preset with the same classes and block structure at toy
width, for CPU tests.

>>> from difforge.diffusers.presets import build_pipeline, get_preset
>>> p = get_preset("tiny-pixart")
>>> pipe = build_pipeline(p, text_encoders=False)
>>> image = pipe(**p.prompt_kwargs(batch=1), **p.call_kwargs(), output_type="np").images

Two ways to feed prompts:

* ``text_encoders=True``: the encoders are built from their configs with random weights and
  paired with offline tokenizers (:mod:`.presets_tokenizers`), so ``pipe(prompt=...)`` works.
  This is the default for tiny presets only: a full-size T5-XXL alone has 4.7B parameters.
* ``text_encoders=False``: encoders and tokenizers are ``None`` and
  :meth:`Preset.prompt_kwargs` / :func:`random_prompt_embeds` supply random precomputed
  embeddings with exactly the keyword arguments and shapes the pipeline's ``__call__`` takes.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from difforge.diffusers import _configs as C

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

Family = Literal["pixart", "sd3", "flux", "sdxl", "sd15"]
Denoiser = Literal["transformer", "unet"]
EncoderKind = Literal["clip", "clip_projection", "t5"]

__all__ = [
    "PRESETS",
    "Preset",
    "TextEncoderSpec",
    "build_component",
    "build_pipeline",
    "count_parameters",
    "get_preset",
    "list_presets",
    "random_prompt_embeds",
]

# CLIP tokenizers always pad/truncate to 77 tokens; the pipelines hard-wire it too.
CLIP_MAX_LENGTH = 77

# Six SDXL micro-conditioning values (original size, crop top-left, target size).
_SDXL_TIME_IDS = 6


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text-encoder slot of a pipeline and the tokenizer slot that feeds it."""

    component: str
    """Pipeline attribute of the encoder, e.g. ``"text_encoder_2"``."""
    tokenizer: str
    """Pipeline attribute of its tokenizer, e.g. ``"tokenizer_2"``."""
    kind: EncoderKind
    """``clip`` (CLIPTextModel), ``clip_projection`` (CLIPTextModelWithProjection), ``t5``."""
    model: str
    """Which encoder: ``"clip-l"``, ``"clip-bigg"`` or ``"t5-xxl"`` (tiny twins share names)."""
    config: Mapping[str, Any]
    """transformers config kwargs."""


@dataclass(frozen=True, eq=False)
class Preset:
    """A diffusers pipeline architecture that can be built offline with random weights."""

    name: str
    """Registry key, e.g. ``"pixart-xl-2-1024"`` or ``"tiny-pixart"``."""
    family: Family
    repo_id: str
    """Hub repository of the real model (documentation only; nothing is downloaded). Tiny
    presets name the model whose structure they shrink."""
    pipeline_class: str
    """diffusers pipeline class name."""
    denoiser: Denoiser
    """Pipeline attribute of the denoiser."""
    denoiser_class: str
    denoiser_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    scheduler_class: str
    scheduler_config: Mapping[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]
    dtype: torch.dtype
    """Inference dtype of the real model (tiny presets: float32, they target CPU tests)."""
    default_height: int
    default_width: int
    default_steps: int
    guidance_scale: float
    max_sequence_length: int | None = None
    """T5 tokens per prompt; ``None`` for CLIP-only pipelines."""
    tiny: bool = False
    aliases: tuple[str, ...] = ()
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``__init__`` arguments of the pipeline (e.g. no safety checker)."""
    call_extra: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``__call__`` arguments that :meth:`call_kwargs` adds."""

    @property
    def text_seq_len(self) -> int:
        """Sequence length of ``prompt_embeds`` as the denoiser receives it."""
        return _text_seq_len(self.family, self.max_sequence_length)

    def call_kwargs(
        self,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for ``pipe(...)`` with this preset's defaults (no prompt)."""
        return {
            "height": height or self.default_height,
            "width": width or self.default_width,
            "num_inference_steps": steps or self.default_steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            **self.call_extra,
        }

    def prompt_kwargs(
        self,
        batch: int = 1,
        *,
        guidance_scale: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
        valid_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Random precomputed prompt embeddings; see :func:`random_prompt_embeds`."""
        return random_prompt_embeds(
            self,
            batch,
            guidance_scale=guidance_scale,
            device=device,
            dtype=dtype,
            seed=seed,
            valid_tokens=valid_tokens,
        )

    def build_pipeline(self, **kwargs: Any) -> DiffusionPipeline:
        """Shorthand for :func:`build_pipeline` on this preset."""
        return build_pipeline(self, **kwargs)

    def build_component(self, component: str, **kwargs: Any) -> torch.nn.Module:
        """Shorthand for :func:`build_component` on this preset."""
        return build_component(self, component, **kwargs)

    def num_parameters(self, component: str | None = None) -> int:
        """Parameter count of a component (default: the denoiser), counted on ``meta``."""
        return count_parameters(self, component or self.denoiser)

    @property
    def components(self) -> tuple[str, ...]:
        """Names of the buildable modules: denoiser, ``vae``, then the text encoders."""
        return (self.denoiser, "vae", *(te.component for te in self.text_encoders))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


# Encoder name -> (full-size config, tiny config).
_ENCODERS: dict[str, tuple[C.Config, C.Config]] = {
    "clip-l": (C.CLIP_L, C.TINY_CLIP_L),
    "clip-bigg": (C.CLIP_BIGG, C.TINY_CLIP_BIGG),
    "t5-xxl": (C.T5_XXL, C.TINY_T5),
}


def _encoder(
    component: str, tokenizer: str, kind: EncoderKind, model: str, tiny: bool = False
) -> TextEncoderSpec:
    cfg = _ENCODERS[model][1 if tiny else 0]
    return TextEncoderSpec(component, tokenizer, kind, model, MappingProxyType(cfg))


def _pixart_presets() -> list[Preset]:
    out = []
    for name, repo, pipeline, cfg, vae, text_len, aliases in (
        (
            "pixart-xl-2-1024",
            "PixArt-alpha/PixArt-XL-2-1024-MS",
            "PixArtAlphaPipeline",
            C.PIXART_ALPHA_XL2,
            C.VAE_SD,
            120,
            ("pixart", "pixart-alpha", "PixArt-XL-2-1024-MS"),
        ),
        (
            "pixart-sigma-xl-2-1024",
            "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
            "PixArtSigmaPipeline",
            C.PIXART_SIGMA_XL2,
            C.VAE_SDXL,
            300,
            ("pixart-sigma", "PixArt-Sigma-XL-2-1024-MS"),
        ),
    ):
        out.append(
            Preset(
                name=name,
                family="pixart",
                repo_id=repo,
                pipeline_class=pipeline,
                denoiser="transformer",
                denoiser_class="PixArtTransformer2DModel",
                denoiser_config=MappingProxyType(cfg),
                vae_config=MappingProxyType(vae),
                scheduler_class=C.PIXART_SCHEDULER[0],
                scheduler_config=MappingProxyType(C.PIXART_SCHEDULER[1]),
                text_encoders=(_encoder("text_encoder", "tokenizer", "t5", "t5-xxl"),),
                dtype=torch.float16,
                default_height=1024,
                default_width=1024,
                default_steps=20,
                guidance_scale=4.5,
                max_sequence_length=text_len,
                aliases=aliases,
                # clean_caption needs bs4 + ftfy and only warns without them.
                call_extra=MappingProxyType(
                    {"clean_caption": False, "max_sequence_length": text_len}
                ),
            )
        )
    return out


def _sd3_preset() -> Preset:
    return Preset(
        name="sd3-medium",
        family="sd3",
        repo_id="stabilityai/stable-diffusion-3-medium-diffusers",
        pipeline_class="StableDiffusion3Pipeline",
        denoiser="transformer",
        denoiser_class="SD3Transformer2DModel",
        denoiser_config=MappingProxyType(C.SD3_MEDIUM),
        vae_config=MappingProxyType(C.VAE_SD3),
        scheduler_class=C.SD3_SCHEDULER[0],
        scheduler_config=MappingProxyType(C.SD3_SCHEDULER[1]),
        text_encoders=(
            _encoder("text_encoder", "tokenizer", "clip_projection", "clip-l"),
            _encoder("text_encoder_2", "tokenizer_2", "clip_projection", "clip-bigg"),
            _encoder("text_encoder_3", "tokenizer_3", "t5", "t5-xxl"),
        ),
        dtype=torch.float16,
        default_height=1024,
        default_width=1024,
        default_steps=28,
        guidance_scale=7.0,
        max_sequence_length=256,
        aliases=("sd3", "stable-diffusion-3-medium"),
        call_extra=MappingProxyType({"max_sequence_length": 256}),
    )


def _flux_presets() -> list[Preset]:
    out = []
    for variant, cfg, sched, steps, guidance, text_len in (
        ("dev", C.FLUX_DEV, C.FLUX_DEV_SCHEDULER, 28, 3.5, 512),
        ("schnell", C.FLUX_SCHNELL, C.FLUX_SCHNELL_SCHEDULER, 4, 0.0, 256),
    ):
        out.append(
            Preset(
                name=f"flux-{variant}",
                family="flux",
                repo_id=f"black-forest-labs/FLUX.1-{variant}",
                pipeline_class="FluxPipeline",
                denoiser="transformer",
                denoiser_class="FluxTransformer2DModel",
                denoiser_config=MappingProxyType(cfg),
                vae_config=MappingProxyType(C.VAE_FLUX),
                scheduler_class=sched[0],
                scheduler_config=MappingProxyType(sched[1]),
                text_encoders=(
                    _encoder("text_encoder", "tokenizer", "clip", "clip-l"),
                    _encoder("text_encoder_2", "tokenizer_2", "t5", "t5-xxl"),
                ),
                dtype=torch.bfloat16,
                default_height=1024,
                default_width=1024,
                default_steps=steps,
                guidance_scale=guidance,
                max_sequence_length=text_len,
                aliases=(f"flux.1-{variant}",) + (("flux",) if variant == "dev" else ()),
                call_extra=MappingProxyType({"max_sequence_length": text_len}),
            )
        )
    return out


def _sdxl_preset() -> Preset:
    return Preset(
        name="sdxl-base",
        family="sdxl",
        repo_id="stabilityai/stable-diffusion-xl-base-1.0",
        pipeline_class="StableDiffusionXLPipeline",
        denoiser="unet",
        denoiser_class="UNet2DConditionModel",
        denoiser_config=MappingProxyType(C.SDXL_BASE_UNET),
        vae_config=MappingProxyType(C.VAE_SDXL),
        scheduler_class=C.SDXL_SCHEDULER[0],
        scheduler_config=MappingProxyType(C.SDXL_SCHEDULER[1]),
        text_encoders=(
            _encoder("text_encoder", "tokenizer", "clip", "clip-l"),
            _encoder("text_encoder_2", "tokenizer_2", "clip_projection", "clip-bigg"),
        ),
        dtype=torch.float16,
        default_height=1024,
        default_width=1024,
        default_steps=50,
        guidance_scale=5.0,
        aliases=("sdxl", "sdxl-base-1.0", "stable-diffusion-xl-base-1.0"),
        # The invisible-watermark package is optional and irrelevant for benchmarks.
        pipeline_kwargs=MappingProxyType({"add_watermarker": False}),
    )


def _sd15_preset() -> Preset:
    return Preset(
        name="sd15",
        family="sd15",
        repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline_class="StableDiffusionPipeline",
        denoiser="unet",
        denoiser_class="UNet2DConditionModel",
        denoiser_config=MappingProxyType(C.SD15_UNET),
        vae_config=MappingProxyType(C.VAE_SD),
        scheduler_class=C.SD15_SCHEDULER[0],
        scheduler_config=MappingProxyType(C.SD15_SCHEDULER[1]),
        text_encoders=(_encoder("text_encoder", "tokenizer", "clip", "clip-l"),),
        dtype=torch.float16,
        default_height=512,
        default_width=512,
        default_steps=50,
        guidance_scale=7.5,
        aliases=("sd1.5", "sd-1.5", "stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        pipeline_kwargs=MappingProxyType(
            {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        ),
    )


# Full-size name -> (tiny name, tiny aliases, tiny denoiser config, tiny T5 tokens).
_TINY: dict[str, tuple[str, tuple[str, ...], C.Config, int | None]] = {
    "pixart-xl-2-1024": ("tiny-pixart", ("tiny-pixart-alpha",), C.TINY_PIXART_ALPHA, 16),
    "pixart-sigma-xl-2-1024": ("tiny-pixart-sigma", (), C.TINY_PIXART_SIGMA, 24),
    "sd3-medium": ("tiny-sd3", (), C.TINY_SD3, 32),
    "flux-dev": ("tiny-flux", ("tiny-flux-dev",), C.TINY_FLUX_DEV, 32),
    "flux-schnell": ("tiny-flux-schnell", (), C.TINY_FLUX_SCHNELL, 32),
    "sdxl-base": ("tiny-sdxl", (), C.TINY_SDXL_UNET, None),
    "sd15": ("tiny-sd15", (), C.TINY_SD15_UNET, None),
}


def _tiny_of(full: Preset) -> Preset:
    """Shrink a full preset: tiny denoiser, VAE and encoders, 64x64 pixels, 2 steps, fp32."""
    name, aliases, cfg, text_len = _TINY[full.name]
    encoders = tuple(
        _encoder(te.component, te.tokenizer, te.kind, te.model, tiny=True)
        for te in full.text_encoders
    )
    call_extra = dict(full.call_extra)
    if text_len is not None:
        call_extra["max_sequence_length"] = text_len
    if full.family == "pixart":
        # Resolution binning snaps the requested size to the nearest 1024-px aspect-ratio
        # bin (chosen by sample_size), which would turn a 64x64 test into 1024x1024.
        call_extra["use_resolution_binning"] = False
    return Preset(
        name=name,
        family=full.family,
        repo_id=full.repo_id,
        pipeline_class=full.pipeline_class,
        denoiser=full.denoiser,
        denoiser_class=full.denoiser_class,
        denoiser_config=MappingProxyType(cfg),
        vae_config=MappingProxyType(C.tiny_vae(dict(full.vae_config))),
        scheduler_class=full.scheduler_class,
        scheduler_config=full.scheduler_config,
        text_encoders=encoders,
        dtype=torch.float32,
        default_height=64,
        default_width=64,
        default_steps=2,
        guidance_scale=full.guidance_scale,
        max_sequence_length=text_len,
        tiny=True,
        aliases=aliases,
        pipeline_kwargs=full.pipeline_kwargs,
        call_extra=MappingProxyType(call_extra),
    )


def _make_registry() -> dict[str, Preset]:
    full = [*_pixart_presets(), _sd3_preset(), *_flux_presets(), _sdxl_preset(), _sd15_preset()]
    presets = full + [_tiny_of(p) for p in full]
    return {p.name: p for p in presets}


PRESETS: Mapping[str, Preset] = MappingProxyType(_make_registry())
"""All presets by canonical name."""


def _lookup_table() -> dict[str, str]:
    """Lower-cased names, aliases and repo ids (full presets only) -> canonical name."""
    table: dict[str, str] = {}
    for p in PRESETS.values():
        keys = [p.name, *p.aliases] + ([] if p.tiny else [p.repo_id])
        for key in keys:
            table[key.lower()] = p.name
    return table


_LOOKUP = _lookup_table()


def list_presets(*, tiny: bool | None = None) -> list[str]:
    """Canonical preset names; ``tiny=True``/``False`` keeps only tiny/full-size ones."""
    return [n for n, p in PRESETS.items() if tiny is None or p.tiny == tiny]


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name, alias or Hub repo id (case-insensitive).

    Raises ``ValueError`` naming the closest match and all valid names when unknown.
    """
    if isinstance(name, Preset):
        return name
    key = str(name).strip().lower()
    if key in _LOOKUP:
        return PRESETS[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.4)
    hint = f" Did you mean {_LOOKUP[close[0]]!r}?" if close else ""
    raise ValueError(
        f"Unknown model preset {name!r}.{hint} Valid names: {', '.join(PRESETS)} "
        "(Hub repo ids and aliases such as 'sdxl' or 'flux' work too)."
    )


# --------------------------------------------------------------------------------------------
# Building modules
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _construction(dtype: torch.dtype, device: torch.device, seed: int) -> Iterator[None]:
    """Create tensors directly in ``dtype`` on ``device`` from a fixed seed.

    Allocating in the target dtype/device avoids a float32 CPU copy first (FLUX is 48 GB in
    float32). Buffers that need precision (sin-cos position tables) are computed with explicit
    float32/float64 dtypes by diffusers, so the default dtype does not degrade them.
    """
    old_dtype = torch.get_default_dtype()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(seed)
        if dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old_dtype)


def _component_seed(seed: int, component: str) -> int:
    """Distinct, stable seed per component, so build_component matches build_pipeline."""
    return (seed + zlib.crc32(component.encode())) % (2**63)


def _denoiser_cls(preset: Preset) -> Any:
    import diffusers

    return getattr(diffusers, preset.denoiser_class)


def _text_encoder_factory(spec: TextEncoderSpec) -> Any:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = copy.deepcopy(dict(spec.config))
    if spec.kind == "t5":
        return lambda: T5EncoderModel(T5Config(**cfg))
    cls = CLIPTextModelWithProjection if spec.kind == "clip_projection" else CLIPTextModel
    return lambda: cls(CLIPTextConfig(**cfg))


def _factory(preset: Preset, component: str) -> Any:
    """A zero-argument callable constructing ``component`` of ``preset``."""
    if component == preset.denoiser:
        cfg = copy.deepcopy(dict(preset.denoiser_config))
        return lambda: _denoiser_cls(preset).from_config(cfg)
    if component == "vae":
        from diffusers import AutoencoderKL

        cfg = copy.deepcopy(dict(preset.vae_config))
        return lambda: AutoencoderKL.from_config(cfg)
    for spec in preset.text_encoders:
        if spec.component == component:
            return _text_encoder_factory(spec)
    raise ValueError(
        f"Preset {preset.name!r} has no component {component!r}; "
        f"buildable ones: {', '.join(preset.components)}."
    )


def _keep_fp32_modules(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Mirror transformers' from_pretrained: some modules stay float32 in half precision
    (T5's ``wo`` projections overflow in fp16)."""
    names = set()
    if dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            sub.to(torch.float32)


@torch.no_grad()
def _reinit_zero_weights(module: torch.nn.Module) -> list[str]:
    """Give all-zero weight matrices small random values; returns their names.

    Some architectures zero-initialise output projections so a fresh model starts as an
    identity/no-op. With random weights that would make outputs exactly zero (or constant),
    which hides numerical bugs in compiled code and makes error ratios meaningless. A
    unit-gain normal init (std = fan_in**-0.5) keeps the output at its input's scale.
    The diffusers classes behind today's presets zero-initialise nothing (checked in the
    tests); this is a safety net for versions or families that do.
    """
    fixed = []
    for name, param in module.named_parameters():
        if param.dim() >= 2 and param.is_floating_point() and not bool(param.any()):
            fan_in = param[0].numel()
            param.normal_(0.0, fan_in**-0.5)
            fixed.append(name)
    return fixed


def build_component(
    preset: str | Preset,
    component: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
) -> torch.nn.Module:
    """Build one module of a preset with random weights, in eval mode without grads.

    ``component`` is the denoiser (``"transformer"`` or ``"unet"``), ``"vae"`` or a text
    encoder attribute (``"text_encoder"``, ``"text_encoder_2"``, ...). ``dtype`` defaults to
    the preset's. ``device="meta"`` builds the structure without memory (parameter counts,
    shapes); weights are then not materialised.
    """
    p = get_preset(preset)
    dtype = dtype or p.dtype
    dev = torch.device(device)
    factory = _factory(p, component)
    with _construction(dtype, dev, _component_seed(seed, component)):
        module = cast(torch.nn.Module, factory())
        # Casts the float32 buffers. Plain nn.Module.to: diffusers' override warns about
        # fp32-pinned modules on every dtype cast, even when the model has none.
        torch.nn.Module.to(module, dtype=dtype)
        _keep_fp32_modules(module, dtype)
        if dev.type != "meta":
            _reinit_zero_weights(module)
    return module.eval().requires_grad_(False)


def count_parameters(preset: str | Preset, component: str) -> int:
    """Number of parameters of a component, counted on the meta device (no memory)."""
    module = build_component(preset, component, device="meta", dtype=torch.float32)
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def _make_tokenizer(spec: TextEncoderSpec, preset: Preset) -> Any:
    from difforge.diffusers.presets_tokenizers import make_clip_tokenizer, make_t5_tokenizer

    if spec.kind == "t5":
        return make_t5_tokenizer(preset.max_sequence_length or 512)
    return make_clip_tokenizer(CLIP_MAX_LENGTH)


def _local_dir(source: object) -> Path | None:
    """``source`` as a pipeline directory, or ``None`` when it names a preset."""
    if isinstance(source, Preset):
        return None
    if isinstance(source, str) and source.strip().lower() in _LOOKUP:
        return None  # a registered name wins over a same-named folder in the cwd
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return Path(source)
    return None


def _dtype_kwarg(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: newer diffusers renamed ``torch_dtype`` to
    ``dtype`` and warn on the old name; older ones only know ``torch_dtype``."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def build_pipeline(
    source: str | os.PathLike[str] | Preset,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    text_encoders: bool | None = None,
    seed: int = 0,
    progress_bar: bool = False,
) -> DiffusionPipeline:
    """Build a diffusers pipeline from a preset (random weights) or a local directory.

    ``source``: preset name, alias, Hub repo id of a preset, a :class:`Preset`, or a local
    directory holding a saved pipeline (then loaded with ``local_files_only=True``; ``dtype``
    None keeps what ``from_pretrained`` picks).
    ``text_encoders``: build random-weight encoders and offline tokenizers (default: only
    for tiny presets); otherwise they are ``None`` and prompts come from
    :meth:`Preset.prompt_kwargs`.
    ``seed``: components get distinct seeds derived from it (see :func:`build_component`).
    """
    import diffusers

    local = _local_dir(source)
    if local is not None:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            local, local_files_only=True, **_dtype_kwarg(dtype)
        )
    else:
        try:
            p = get_preset(cast("str | Preset", source))
        except ValueError as err:
            raise ValueError(f"{err} It is not a local pipeline directory either.") from None
        dtype = dtype or p.dtype
        with_text = p.tiny if text_encoders is None else text_encoders
        parts: dict[str, Any] = {
            name: build_component(p, name, dtype=dtype, device=device, seed=seed)
            for name in (p.denoiser, "vae")
        }
        for spec in p.text_encoders:
            parts[spec.component] = (
                build_component(p, spec.component, dtype=dtype, device=device, seed=seed)
                if with_text
                else None
            )
            parts[spec.tokenizer] = _make_tokenizer(spec, p) if with_text else None
        scheduler_cls = getattr(diffusers, p.scheduler_class)
        parts["scheduler"] = scheduler_cls.from_config(copy.deepcopy(dict(p.scheduler_config)))
        pipe = getattr(diffusers, p.pipeline_class)(**parts, **p.pipeline_kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


# --------------------------------------------------------------------------------------------
# Precomputed prompt embeddings
# --------------------------------------------------------------------------------------------

# Pipeline class -> (family, T5 tokens by default in its __call__, default guidance).
_PIPELINE_FAMILY: dict[str, tuple[Family, int | None, float]] = {
    "PixArtAlphaPipeline": ("pixart", 120, 4.5),
    "PixArtSigmaPipeline": ("pixart", 300, 4.5),
    "StableDiffusion3Pipeline": ("sd3", 256, 7.0),
    "FluxPipeline": ("flux", 512, 3.5),
    "StableDiffusionXLPipeline": ("sdxl", None, 5.0),
    "StableDiffusionPipeline": ("sd15", None, 7.5),
}


def _text_seq_len(family: Family, t5_tokens: int | None) -> int:
    if family == "sd3":  # CLIP tokens and T5 tokens are concatenated along the sequence
        return CLIP_MAX_LENGTH + (t5_tokens or 0)
    if family in ("pixart", "flux"):
        assert t5_tokens is not None
        return t5_tokens
    return CLIP_MAX_LENGTH


def _embedding_shapes(
    family: Family, cfg: Mapping[str, Any], seq: int
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Per-prompt (prompt_embeds, pooled_prompt_embeds or None) shapes from the denoiser
    config, i.e. what the real text encoders would produce for it."""
    if family == "pixart":
        return (seq, cfg["caption_channels"]), None
    if family in ("sd3", "flux"):
        return (seq, cfg["joint_attention_dim"]), (cfg["pooled_projection_dim"],)
    if family == "sdxl":
        pooled = cfg["projection_class_embeddings_input_dim"] - (
            _SDXL_TIME_IDS * cfg["addition_time_embed_dim"]
        )
        return (seq, cfg["cross_attention_dim"]), (pooled,)
    return (seq, cfg["cross_attention_dim"]), None


def _resolve_source(
    source: str | Preset | DiffusionPipeline,
) -> tuple[Family, Mapping[str, Any], int | None, float, torch.dtype]:
    """(family, denoiser config, T5 tokens, default guidance, dtype) of a preset or pipe."""
    if isinstance(source, (str, Preset)):
        p = get_preset(source)
        return p.family, p.denoiser_config, p.max_sequence_length, p.guidance_scale, p.dtype
    kind = type(source).__name__
    if kind not in _PIPELINE_FAMILY:
        raise ValueError(
            f"Cannot make prompt embeddings for {kind}; supported: {', '.join(_PIPELINE_FAMILY)}."
        )
    family, t5_tokens, guidance = _PIPELINE_FAMILY[kind]
    denoiser = source.transformer if family in ("pixart", "sd3", "flux") else source.unet
    return family, denoiser.config, t5_tokens, guidance, denoiser.dtype


def random_prompt_embeds(
    source: str | Preset | DiffusionPipeline,
    batch: int = 1,
    *,
    guidance_scale: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    t5_tokens: int | None = None,
    valid_tokens: int | None = None,
) -> dict[str, Any]:
    """Random stand-ins for the text encoders' outputs, as ``pipe(**kwargs)`` arguments.

    Returns ``prompt_embeds`` (and ``pooled_prompt_embeds``, ``prompt_attention_mask`` where
    the family takes them) for ``batch`` prompts, plus the matching ``negative_*`` tensors
    when the family uses classifier-free guidance and ``guidance_scale`` (default: the
    preset's) is above 1; without them the pipeline would try to tokenize a negative prompt.
    For PixArt it also sets ``negative_prompt=None`` (its default ``""`` clashes with
    ``negative_prompt_embeds``).
    FLUX never gets negatives: its guidance is an embedding, not a second batch.

    Values are standard normal, the scale of the final-LayerNorm outputs of CLIP and T5.
    ``valid_tokens`` limits PixArt's attention mask to that many leading tokens (default:
    all). ``t5_tokens`` overrides the T5 sequence length (must match the call's
    ``max_sequence_length`` when text encoders are present). Tensors are drawn on the CPU
    (from ``generator`` or ``seed``), so values do not depend on ``device``.
    """
    family, cfg, default_t5, default_guidance, default_dtype = _resolve_source(source)
    seq = _text_seq_len(family, t5_tokens or default_t5)
    embed_shape, pooled_shape = _embedding_shapes(family, cfg, seq)
    guidance = default_guidance if guidance_scale is None else guidance_scale
    gen = generator or torch.Generator("cpu").manual_seed(seed)
    dtype = dtype or default_dtype

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn((batch, *shape), generator=gen).to(device=device, dtype=dtype)

    prefixes = [""]
    if family != "flux" and guidance > 1.0:
        prefixes.append("negative_")
    out: dict[str, Any] = {}
    for prefix in prefixes:
        out[f"{prefix}prompt_embeds"] = draw(embed_shape)
        if pooled_shape is not None:
            out[f"{prefix}pooled_prompt_embeds"] = draw(pooled_shape)
        if family == "pixart":
            mask = torch.zeros(batch, seq, dtype=torch.long)
            mask[:, : (valid_tokens or seq)] = 1
            out[f"{prefix}prompt_attention_mask"] = mask.to(device)
    if family == "pixart" and len(prefixes) > 1:
        # PixArt's negative_prompt defaults to "" and may not be combined with embeddings.
        out["negative_prompt"] = None
    return out
