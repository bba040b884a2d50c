"""Dynamic resolution: after one warm-up, every size and batch runs on the same graph.

The sweeps mirror the benchmark's sizes at tiny scale while keeping what makes them hard:
square and non-square, the model's own training size (PixArt's stored position table),
odd patch counts (960x720 gives 60x45 patches), and for the UNet latent sides that are
not multiples of ``2**num_upsamplers`` (544x408 gives a 68x51 latent). Outputs are
compared with an eager model built from the same seed and never adapted.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.helpers import rel_err, tiny_sdxl_one_layer, tiny_vae_two_levels

import difforge
from difforge.diffusers.presets import Preset, build_component, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs
from difforge.dynamic import (
    UNET_UPSAMPLERS,
    apply_shape_adapters,
    remove_shape_adapters,
    shape_adapters,
    sincos_pos_embed,
)
from difforge.errors import DifforgeError
from difforge.recompiles import recompile_events

# (height, width) in pixels; the first is the warm-up.
DIT_SIZES = [(96, 128), (128, 128), (128, 96), (64, 64), (144, 112), (80, 48)]
UNET_SIZES = [(96, 128), (128, 128), (128, 96), (64, 64), (120, 88), (136, 96), (88, 136)]
# The sweeps call each model dozens of times; under TRITON_INTERPRET=1 the RoPE kernel runs in
# Triton's interpreter and quadrupled the tiny-FLUX sweeps (61 -> 250 s on the CI machine).
# The pass and its kernel have their own tests (tests/kernels/test_rope_pass.py).
SWEEP_OPTIONS = {"dynamic": True, "recompile.strict": True, "passes.rms_norm_rope": False}


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def denoiser(name: str | Preset) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of the preset's denoiser with the same weights: one to compile (and
    adapt), one as the never-adapted eager reference."""
    component = "unet" if get_preset(name).family in ("sdxl", "sd15") else "transformer"
    return build_component(name, component), build_component(name, component)


def one_block_pixart() -> Preset:
    """tiny-pixart with one transformer block: what the size tests are about (PatchEmbed's
    table, the sizes' symbols) comes before and after the blocks."""
    preset = get_preset("tiny-pixart")
    config = {**preset.denoiser_config, "num_layers": 1}
    return dataclasses.replace(preset, denoiser_config=config)


def sweep(
    name: str | Preset,
    compiled: Any,
    reference: torch.nn.Module,
    sizes: list[tuple[int, int]],
    batches: tuple[int, ...],
    inputs: Callable[..., Callable[[Any], Any]] = denoiser_step_inputs,
) -> list[float]:
    """Run every batch x size with the preset's ``inputs`` (a denoiser step by default);
    returns the relative errors of the (first) output against the reference."""
    errors = []
    for batch in batches:
        for height, width in sizes:
            call = inputs(
                name, batch=batch, height=height, width=width, device="cpu", dtype=torch.float32
            )
            with torch.no_grad():
                out, ref = call(compiled), call(reference)
            if isinstance(out, tuple):
                out, ref = out[0], ref[0]
            assert out.shape == ref.shape
            errors.append(rel_err(out, ref))
    return errors


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("tiny-pixart", DIT_SIZES),
        pytest.param("tiny-sd3", DIT_SIZES, marks=pytest.mark.slow),
        pytest.param("tiny-flux", DIT_SIZES, marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", UNET_SIZES, marks=pytest.mark.slow),
    ],
)
def test_o2_sweep_of_sizes_and_batches_compiles_only_at_the_warm_up(
    name: str, sizes: list[tuple[int, int]]
) -> None:
    """O2 with dynamic: true: warm-up at a non-square size, then every size at the
    denoiser batches of 1, 2 and 4 images with CFG (2, 4, 8), all on the warm-up's one
    graph: the default ``shapes.batch`` (``"upward"``) compiles no batch-1 graph for a
    first call at batch 2 (tests/diffusers/test_dynamic_batch.py covers batch 1)."""
    # The UNet with one transformer layer per level and no mid block (the down and up
    # levels still resample every size), PixArt with one block: the sizes, not the depth,
    # are the point.
    preset = tiny_sdxl_one_layer(mid_block=False) if name == "tiny-sdxl" else get_preset(name)
    if name == "tiny-pixart":
        preset = one_block_pixart()
    module, reference = denoiser(preset)
    compiled = difforge.compile(module, options={"mode": "O2", **SWEEP_OPTIONS})
    events = len(recompile_events)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="difforge: recompiling")
        errors = sweep(preset, compiled, reference, sizes[:1], (2,))
        assert graphs() == 1  # batch >= 2 only: a CFG denoiser never runs batch 1
        errors += sweep(preset, compiled, reference, sizes[1:], (2,))
        errors += sweep(preset, compiled, reference, sizes[:2], (4, 8))
    assert graphs() == 1, torch._dynamo.utils.counters["stats"]
    assert len(recompile_events) == events
    assert max(errors) < 1e-5, errors


def test_pixart_at_its_training_size_uses_the_same_graph() -> None:
    """PixArt's PatchEmbed keeps a table for its training size and branches on it; with a
    16-latent training size (128 px) the sweep crosses that size without recompiling."""
    from difforge.diffusers import _configs
    from diffusers import PixArtTransformer2DModel

    config = {**_configs.TINY_PIXART_ALPHA, "sample_size": 16, "num_layers": 1}
    torch.manual_seed(0)
    module = PixArtTransformer2DModel(**config).eval()
    reference = PixArtTransformer2DModel(**config).eval()
    reference.load_state_dict(module.state_dict())
    # One batch here ("dynamo": no batch-1 graph ahead of use); sizes are the point.
    compiled = difforge.compile(module, options={"dynamic": True, "shapes.batch": "dynamo"})
    errors = sweep("tiny-pixart", compiled, reference, [(96, 128), (128, 128), (64, 128)], (2,))
    assert graphs() == 1
    assert max(errors) < 1e-5


def test_adapters_apply_only_with_dynamic_true() -> None:
    """What the README's options table says: the adapters come with ``dynamic: true`` only;
    the default (Dynamo's automatic dynamic) and ``false`` leave the module as it is."""
    for dynamic, expected in (
        (None, {}),
        (False, {}),
        (True, {"dynamic_pos_embed": ["pos_embed"]}),
    ):
        module, _ = denoiser("tiny-pixart")
        difforge.compile(module, options={"dynamic": dynamic})
        assert shape_adapters(module) == expected, dynamic


def test_without_adapters_pixart_recompiles_for_square_sizes() -> None:
    """The negative case: ``shapes.adapters`` off leaves diffusers' square branch."""
    preset = one_block_pixart()
    module, reference = denoiser(preset)
    options = {"dynamic": True, "shapes.adapters": False, "shapes.batch": "dynamo"}
    compiled = difforge.compile(module, options=options)
    assert shape_adapters(module) == {}
    with pytest.warns(UserWarning, match="recompiling .*grid"):
        sweep(preset, compiled, reference, [(96, 128), (128, 128)], (2,))
    assert graphs() == 2


def test_strict_recompile_cap_raises_on_static_shapes() -> None:
    preset = one_block_pixart()
    module, reference = denoiser(preset)
    compiled = difforge.compile(
        module,
        options={"mode": "O2", "dynamic": False, "recompile.limit": 0, "recompile.strict": True},
    )
    sweep(preset, compiled, reference, [(96, 128)], (2,))
    with pytest.raises(Exception, match="more than recompile.limit=0") as info:
        sweep(preset, compiled, reference, [(128, 96)], (2,))
    chain: BaseException | None = info.value  # Dynamo wraps backend errors
    while chain is not None and not isinstance(chain, DifforgeError):
        chain = chain.__cause__ or chain.__context__
    assert isinstance(chain, DifforgeError)


# --------------------------------------------------------------------------------------------
# The adapters themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8, 8), (6, 8), (17, 13), (45, 60), (64, 64)])
@pytest.mark.parametrize(("base_size", "scale"), [(64, 1.0), (32, 2.0), (8, 1.0)])
def test_sincos_table_is_bitwise_diffusers(
    grid: tuple[int, int], base_size: int, scale: float
) -> None:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(
        96, grid, base_size=base_size, interpolation_scale=scale, output_type="pt"
    )
    out = sincos_pos_embed(
        96, *grid, base_size=base_size, interpolation_scale=scale, device=torch.device("cpu")
    )
    assert torch.equal(out, ref.float().unsqueeze(0))


def test_sincos_table_equals_the_stored_one_at_the_training_size() -> None:
    from diffusers.models.embeddings import PatchEmbed

    embed = PatchEmbed(height=128, width=128, patch_size=2, in_channels=4, embed_dim=96)
    table = sincos_pos_embed(
        96, 64, 64, base_size=embed.base_size, interpolation_scale=1, device=torch.device("cpu")
    )
    assert torch.equal(table, embed.pos_embed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pos_embed_adapter_is_bitwise_eager_at_the_training_size(dtype: torch.dtype) -> None:
    """After ``.half()`` eager adds the stored float16 table: the adapter's recomputed table
    is cast to it (a reviewer found 3333 of 16384 elements differing before)."""
    from diffusers.models.embeddings import PatchEmbed

    from difforge.dynamic import apply_shape_adapters

    torch.manual_seed(0)
    embed = PatchEmbed(height=32, width=32, patch_size=2, in_channels=4, embed_dim=64).to(dtype)
    x = torch.randn(1, 4, 32, 32, dtype=dtype)
    with torch.no_grad():
        ref = embed(x)
        apply_shape_adapters(embed)
        assert torch.equal(embed(x), ref)


def test_adapters_apply_once_undo_and_leave_other_modules_alone() -> None:
    pixart, _ = denoiser("tiny-pixart")
    sd3, _ = denoiser("tiny-sd3")
    unet, _ = denoiser("tiny-sdxl")
    before = unet.num_upsamplers

    assert apply_shape_adapters(pixart) == ["dynamic_pos_embed"]
    assert apply_shape_adapters(pixart) == []  # idempotent
    assert shape_adapters(pixart) == {"dynamic_pos_embed": ["pos_embed"]}
    assert difforge.counters["dynamic_pos_embed"] == 1
    # SD3 crops a stored table (pos_embed_max_size): no size branch, nothing to adapt.
    assert apply_shape_adapters(sd3) == []
    assert apply_shape_adapters(unet) == ["dynamic_unet_upsample"]
    assert unet.num_upsamplers == UNET_UPSAMPLERS

    assert remove_shape_adapters(pixart) == ["dynamic_pos_embed"]
    assert "forward" not in vars(pixart.pos_embed) and shape_adapters(pixart) == {}
    assert remove_shape_adapters(unet) == ["dynamic_unet_upsample"]
    assert unet.num_upsamplers == before


def test_static_compile_does_not_adapt() -> None:
    module, _ = denoiser("tiny-sdxl")
    difforge.compile(module, options={"mode": "O2", "dynamic": False})
    assert shape_adapters(module) == {}
    difforge.compile(module, options={"mode": "O2"})  # Dynamo's automatic dynamic
    assert shape_adapters(module) == {}
    difforge.compile(module, options={"mode": "O2", "dynamic": True})
    assert shape_adapters(module) == {"dynamic_unet_upsample": [""]}


def test_unet_size_path_is_bitwise_the_scale_path_eagerly() -> None:
    """Forwarding skip sizes (the adapter) reads the same pixels as scale_factor=2."""
    module, reference = denoiser("tiny-sdxl")
    apply_shape_adapters(module)
    for height, width in [(96, 128), (64, 64)]:  # sides divisible by 2**num_upsamplers
        call = denoiser_step_inputs(
            "tiny-sdxl", batch=2, height=height, width=width, device="cpu", dtype=torch.float32
        )
        with torch.no_grad():
            assert torch.equal(call(module)[0], call(reference)[0])


def test_presets_leave_dynamic_to_the_user() -> None:
    # Measured: dynamic-from-the-first-call tripled PixArt's cold compile (options.py).
    assert difforge.parse_options({"mode": "O2"}).dynamic is None
    assert difforge.parse_options({"mode": "O3"}).dynamic is None
    assert difforge.parse_options({"mode": "O1"}).dynamic is None
    assert difforge.parse_options({"mode": "O2", "dynamic": True}).dynamic is True
    assert difforge.parse_options({"mode": "O2", "dynamic": False}).dynamic is False
    assert difforge.parse_options({"mode": "O2"}, dynamic=False).dynamic is False


# --------------------------------------------------------------------------------------------
# Rewrites fire on symbolic sizes as they do on static ones
# --------------------------------------------------------------------------------------------


def _vae_rewrites(device: str, dtype: torch.dtype, dynamic: bool) -> dict[str, int]:
    from difforge.diffusers.step_inputs import VaeDecode, vae_decode_inputs

    torch._dynamo.reset()
    # Two of the four levels on the CPU (half the decoder's compile time): the same resnet
    # GroupNorms and mid-block attention whose rewrites are counted.
    preset = tiny_vae_two_levels("tiny-sdxl") if device == "cpu" else get_preset("tiny-sdxl")
    vae = build_component(preset, "vae", dtype=dtype, device=device)
    options = {"mode": "O2", "memory_format": "channels_last", "dynamic": dynamic}
    compiled = difforge.compile(VaeDecode(vae).eval(), options=options)
    call = vae_decode_inputs("tiny-sdxl", batch=2, height=96, width=64, device=device, dtype=dtype)
    with torch.no_grad():
        compiled(*call.args, **call.kwargs)
    return dict(difforge.compile_records[-1].rewrites)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_vae_rewrites_fire_alike_on_symbolic_sizes(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dynamic graph must get every rewrite the static one gets. On an H100 (torch 2.11)
    the dynamic SDXL VAE decode lost its GroupNorm rewrite (``is_contiguous`` on symbolic
    strides) and its wide-head attention rewrite (a static-only size cap): 36.8 or 39.6 ms
    against 23.9 ms static. The tiny VAE's attention has a narrow head, so the wide-head
    threshold is lowered here to make it count."""
    from difforge.passes import attention

    monkeypatch.setattr(attention, "WIDE_HEAD_DIM", 8)
    monkeypatch.setattr(attention, "WIDE_DEVICES", ("cuda", "cpu"))
    dtype = torch.float16 if device == "cuda" else torch.bfloat16  # the rewrite wants half
    static = _vae_rewrites(device, dtype, dynamic=False)
    dynamic = _vae_rewrites(device, dtype, dynamic=True)
    assert static["group_norm_channels_last"] > 0 and static["attention_wide_heads"] == 1
    assert dynamic == static


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unet_rewrites_fire_alike_on_symbolic_sizes() -> None:
    """The same for the tiny SDXL UNet on CUDA (its GroupNorms went through the check that
    torch 2.11 answered wrongly for symbolic strides)."""
    counts = []
    for dynamic in (False, True):
        torch._dynamo.reset()
        module = build_component("tiny-sdxl", "unet", dtype=torch.float16, device="cuda")
        options = {"mode": "O2", "memory_format": "channels_last", "dynamic": dynamic}
        compiled = difforge.compile(module.eval(), options=options)
        call = denoiser_step_inputs(
            "tiny-sdxl", batch=2, height=96, width=64, device="cuda", dtype=torch.float16
        )
        with torch.no_grad():
            compiled(*call.args, **call.kwargs)
        counts.append(dict(difforge.compile_records[-1].rewrites))
    static, dynamic_counts = counts
    assert static["group_norm_channels_last"] > 0
    assert dynamic_counts == static
