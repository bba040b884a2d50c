"""Regional compilation on the real diffusers block structures (tiny presets, CPU)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests.helpers import rel_err, tiny_sdxl_one_layer

import difforge
from difforge import regional
from difforge.diffusers import compile_pipe
from difforge.diffusers.pipe import pipe_state
from difforge.diffusers.presets import Preset, build_component, build_pipeline, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs

pytestmark = pytest.mark.skipif(
    not regional.nested_regions_available()[0], reason="torch lacks nested_compile_region"
)
OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


def _first(out: Any) -> torch.Tensor:
    return getattr(out, "sample", out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        # PixArt declares no _repeated_blocks: found as identical ModuleList children
        ("tiny-pixart", {"BasicTransformerBlock": 2}),
        # FLUX declares them; its single block returns two slices of one tensor (aliasing
        # outputs, which a region refuses unless difforge clones them)
        ("tiny-flux", {"FluxSingleTransformerBlock": 2}),
        # the UNet declares BasicTransformerBlock; 2 widths -> 2 regions (one transformer
        # layer per level: 4 blocks, not the preset's 8)
        pytest.param(
            tiny_sdxl_one_layer(),
            {"BasicTransformerBlock": 4},
            marks=pytest.mark.slow,
            id="tiny-sdxl-blocks2",
        ),
    ],
)
def test_denoiser_regional_matches_eager(name: str | Preset, blocks: dict[str, int]) -> None:
    preset = get_preset(name)
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    call = denoiser_step_inputs(
        preset, batch=2, height=64, width=64, device="cpu", dtype=torch.float32
    )
    groups = regional.find_repeated_blocks(model)
    found: dict[str, int] = {}
    for group in groups:
        found[group.class_name] = found.get(group.class_name, 0) + len(group.names)
    assert found == blocks
    with torch.no_grad():
        ref = _first(call(model)).clone()
        start = len(difforge.compile_records)
        compiled = difforge.compile(model, options={"mode": "O2", "compile.regional": True})
        out = _first(call(compiled))
    assert rel_err(out, ref) < 1e-5
    records = difforge.compile_records[start:]
    assert len(records) == 1  # one graph for the whole denoiser
    assert len(records[0].regions) == len(groups)
    assert sum(records[0].regions.values()) == sum(blocks.values())


def test_tiny_sd3_has_no_repeated_blocks() -> None:
    # Its two blocks differ (the last is context_pre_only); the GELU wrappers inside them
    # are identical but are no blocks (one Linear each), so nothing is chosen.
    preset = get_preset("tiny-sd3")
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    assert regional.find_repeated_blocks(model) == []


def test_compile_pipe_regional_keys_and_styles() -> None:
    preset = get_preset("tiny-pixart")
    pipe = build_pipeline(preset)
    kwargs = {**preset.prompt_kwargs(batch=1), **preset.call_kwargs(), "output_type": "np"}

    def run() -> Any:
        return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images

    ref = run()
    opts = {"mode": "O1", "compile.regional": True}
    compile_pipe(pipe, options=opts, ignores=("vae",))
    assert isinstance(pipe.transformer, OptimizedModule)
    key = pipe_state(pipe).compiled["transformer"]
    assert '"compile.regional": true' in key
    assert regional.marked_blocks(pipe.transformer._orig_mod)
    assert abs(run() - ref).max() < 1e-4
    compile_pipe(pipe, options=opts, ignores=("vae",))  # same options: nothing recompiled
    assert pipe_state(pipe).compiled["transformer"] == key

    # 'blocks': the transformer stays the module, its blocks become compiled frames
    compile_pipe(pipe, options={**opts, "compile.regional": "blocks"}, ignores=("vae",))
    transformer = pipe.transformer
    assert not isinstance(transformer, OptimizedModule)
    assert all(isinstance(b, OptimizedModule) for b in transformer.transformer_blocks)
    assert abs(run() - ref).max() < 1e-4
    assert "transformer" in pipe_state(pipe).ran_components

    # off again: the original blocks are back, nothing regional left
    compile_pipe(pipe, options={"mode": "O1"}, ignores=("vae",))
    assert isinstance(pipe.transformer, OptimizedModule)
    original = pipe.transformer._orig_mod
    assert not regional.marked_blocks(original)
    assert not any(isinstance(b, OptimizedModule) for b in original.transformer_blocks)


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-flux"])
def test_denoiser_regional_dynamic_true(name: str) -> None:
    # FLUX's attention reads dispatch_attention_fn's dropout_p=0.0 default: with dynamic=True
    # a nested region once failed on it ("Freevar has no source") and difforge fell back to
    # 'blocks'. Traced with specialize_float, both models keep one nested graph, and a
    # second resolution is served without recompiling.
    preset = get_preset(name)
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    options = {"mode": "O1", "dynamic": True, "compile.regional": True}
    start = len(difforge.compile_records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        compiled = difforge.compile(model, options=options)
    with torch.no_grad():
        for height, width in ((64, 48), (96, 64)):
            call = denoiser_step_inputs(
                preset, batch=2, height=height, width=width, device="cpu", dtype=torch.float32
            )
            assert rel_err(_first(call(compiled)), _first(call(model))) < 1e-5
    records = difforge.compile_records[start:]
    assert len(records) == 1  # batch 2 only (shapes.batch "upward": no batch-1 graph)
    assert all(sum(record.regions.values()) >= 2 for record in records)
    assert not any(isinstance(b, OptimizedModule) for b in model.modules())


def test_flux_nested_automatic_dynamic_reuses_its_region() -> None:
    # dynamic=None: at the dynamic recompile the region's outputs (slices, cloned) must
    # be plainly contiguous, else reuse failed and both bodies were inlined (no regions).
    preset = get_preset("tiny-flux")
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    start = len(difforge.compile_records)
    compiled = difforge.compile(model, options={"mode": "O1", "compile.regional": True})
    with torch.no_grad():
        for height in (64, 96):
            call = denoiser_step_inputs(
                preset, batch=2, height=height, width=64, device="cpu", dtype=torch.float32
            )
            assert rel_err(_first(call(compiled)), _first(call(model))) < 1e-5
    records = difforge.compile_records[start:]
    assert [sum(r.regions.values()) for r in records] == [2, 2]


def test_unet_regions_with_dynamic_shapes_work_or_fall_back_whole_with_a_warning() -> None:
    # torch 2.13's reuse of a traced region raises KeyError for the UNet's blocks under
    # dynamic shapes (regional.with_region_fallback); difforge then compiles the UNet whole.
    # Either way the model must run and match eager, and a fallback must be said. One
    # transformer layer per level and no mid block: the blocks still repeat (the down
    # level's and the up level's).
    preset = tiny_sdxl_one_layer(mid_block=False)
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    options = {"mode": "O1", "dynamic": True, "compile.regional": True}
    compiled = difforge.compile(model, options=options)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for height, width in ((64, 48), (96, 64)):
            call = denoiser_step_inputs(
                preset, batch=2, height=height, width=width, device="cpu", dtype=torch.float32
            )
            assert rel_err(_first(call(compiled)), _first(call(model))) < 1e-5
    fell_back = [w for w in caught if "compiling the whole model instead" in str(w.message)]
    assert len(fell_back) <= 1
    assert bool(fell_back) == (not regional.marked_blocks(model))


def test_region_fallback_reraises_errors_from_outside_regions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_component(
        get_preset("tiny-pixart"), get_preset("tiny-pixart").denoiser, dtype=torch.float32
    )
    regional.mark_regions(model, regional.find_repeated_blocks(model))

    def broken(*args: object, **kwargs: object) -> None:
        raise torch._dynamo.exc.InternalTorchDynamoError("KeyError: 64")

    wrapped = regional.with_region_fallback(broken, model)
    with pytest.raises(torch._dynamo.exc.InternalTorchDynamoError):
        wrapped()
    assert regional.marked_blocks(model)  # not a region failure: nothing was unmarked

    calls: list[int] = []

    def broken_once(*args: object, **kwargs: object) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise torch._dynamo.exc.InternalTorchDynamoError("KeyError: 64")
        return "whole"

    monkeypatch.setattr(regional, "_raised_in_region", lambda exc: True)
    wrapped = regional.with_region_fallback(broken_once, model)
    with pytest.warns(UserWarning, match="compiling the whole model instead"):
        assert wrapped() == "whole"
    assert not regional.marked_blocks(model) and len(calls) == 2
