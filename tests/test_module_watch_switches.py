"""diffusers' attention switches (``set_processor``, ``set_attention_backend``) change what a
module computes through plain attributes: the module watch counts them, so a graph pool
drops graphs recorded before the switch (a stale replay computes the old attention)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from difforge.graph_pool import GraphPool
from difforge.module_watch import ModuleWatch
from tests.test_graph_pool import FakeCapturer

pytest.importorskip("diffusers")


@torch.no_grad()
def test_an_attention_processor_switched_after_a_capture_is_not_replayed_over() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class Doubled(AttnProcessor2_0):
        def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
            return super().__call__(*args, **kwargs) * 2

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    capturer = FakeCapturer(rerun=False)  # a replay leaves what it recorded, as a graph would
    pool = GraphPool(attn, max_graphs=4, capturer=capturer, watch=ModuleWatch(attn))
    x = torch.randn(1, 5, 16)
    plain = attn(x)
    pool(x)
    torch.testing.assert_close(pool(x), plain)
    attn.set_processor(Doubled())
    torch.testing.assert_close(pool(x), plain * 2)
    assert capturer.captures == 2


def test_attention_backend_switches_count_as_changes_of_the_model() -> None:
    from difforge.diffusers.presets import build_component, get_preset

    preset = get_preset("tiny-flux")
    model = build_component(preset, preset.denoiser)
    other = build_component(preset, preset.denoiser)
    watch = ModuleWatch(model)
    before = watch.generation
    other.set_attention_backend("_native_math")  # another model: not this watch's
    assert watch.generation == before
    model.set_attention_backend("_native_math")
    assert watch.generation > before
    switched = watch.generation
    model.reset_attention_backend()
    assert watch.generation > switched
    model.set_attn_processor(dict(model.attn_processors))  # the model-level setter too
    assert watch.generation > switched + 1


def test_a_models_own_lora_methods_count_as_changes() -> None:
    """The model-level methods (the pipeline's are wrapped by compile_pipe): a LoRA scale is
    a plain attribute, and fuse_lora writes the base weights by ``param.data = ...``."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    from difforge.diffusers.presets import build_component, get_preset

    preset = get_preset("tiny-flux")
    model = build_component(preset, preset.denoiser)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q"]), adapter_name="style")
    watch = ModuleWatch(model)
    for call in (
        lambda: model.set_adapters("style", 0.5),
        model.disable_lora,
        model.enable_lora,
        model.fuse_lora,
        model.unfuse_lora,
        model.unload_lora,
    ):
        before = watch.generation
        call()
        assert watch.generation > before


@pytest.mark.parametrize(
    ("preset_name", "on", "off"),
    [
        ("tiny-sdxl", lambda m: m.enable_freeu(0.9, 0.2, 1.1, 1.2), lambda m: m.disable_freeu()),
        (
            "tiny-sd3",
            lambda m: m.enable_forward_chunking(2),
            lambda m: m.disable_forward_chunking(),
        ),
    ],
)
def test_freeu_and_feed_forward_chunking_count_as_changes(
    preset_name: str, on: Any, off: Any
) -> None:
    from difforge.diffusers.presets import build_component, get_preset

    preset = get_preset(preset_name)
    model = build_component(preset, preset.denoiser)
    watch = ModuleWatch(model)
    for switch in (on, off):
        before = watch.generation
        switch(model)
        assert watch.generation > before
