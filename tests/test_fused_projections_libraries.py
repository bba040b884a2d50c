"""The q/k/v fusion with the libraries users bring: PEFT LoRA adapters (diffusers'
``load_lora_adapter`` / ``add_adapter``), accelerate's sequential CPU offload and diffusers'
group offloading, each on a tiny real-structure model, against the same steps unfused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs
from difforge.fused_projections import fuse_qkv_projections

# FLUX: its transformer has diffusers' PEFT mixin (PixArt's has not), and both attention
# kinds (joint double blocks, single blocks).
NAME = "tiny-flux"
TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0"]


def _model() -> nn.Module:
    preset = get_preset(NAME)
    torch.manual_seed(0)
    return build_component(preset, preset.denoiser, dtype=torch.float32).eval()


def _run(model: nn.Module) -> torch.Tensor:
    call = denoiser_step_inputs(
        get_preset(NAME), batch=1, height=64, width=64, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        return call(model)[0]


def _count(model: nn.Module, attr: str) -> int:
    return sum(isinstance(getattr(m, attr, None), nn.Linear) for m in model.modules())


def _fused_count(model: nn.Module) -> int:
    return _count(model, "to_qkv")


def _lora_state_dict() -> dict[str, torch.Tensor]:
    """A LoRA for q/k/v (and more) whose update is not zero (PEFT starts B at zero)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = _model()
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    torch.manual_seed(1)
    for name, p in source.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    return get_peft_model_state_dict(source)


def test_a_peft_lora_loaded_after_compiling_runs_and_unloads_to_the_base_model() -> None:
    import difforge

    lora = _lora_state_dict()
    base = _model()
    base_out = _run(base)
    reference = copy.deepcopy(base)
    reference.load_lora_adapter(copy.deepcopy(lora), adapter_name="style", prefix=None)
    expected = _run(reference)
    assert (expected - base_out).abs().max() > 1e-3  # the adapter changes the step

    model = _model()
    attentions = _count(model, "to_q")
    compiled = difforge.compile(model, options={"fuse_qkv.modules": True})
    fused = _fused_count(model)
    assert fused == attentions > 1  # the double and the single blocks' attentions
    torch.testing.assert_close(_run(compiled), base_out, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="runs unfused from now on") as seen:
        model.load_lora_adapter(copy.deepcopy(lora), adapter_name="style", prefix=None)
    assert len([w for w in seen if "runs unfused" in str(w.message)]) == fused
    assert _fused_count(model) == 0
    torch.testing.assert_close(_run(compiled), expected, rtol=1e-4, atol=1e-4)

    model.unload_lora()
    torch.testing.assert_close(_run(compiled), base_out, rtol=1e-4, atol=1e-4)


def test_a_merged_peft_lora_after_the_fusion_is_the_merged_model() -> None:
    lora = _lora_state_dict()
    reference = _model()
    reference.load_lora_adapter(copy.deepcopy(lora), adapter_name="style", prefix=None)
    reference.fuse_lora()
    model = _model()
    assert fuse_qkv_projections(model)
    with pytest.warns(UserWarning, match="runs unfused"):
        model.load_lora_adapter(copy.deepcopy(lora), adapter_name="style", prefix=None)
    # merging writes the update into the base weights, which are rows of the fused ones
    model.fuse_lora()
    torch.testing.assert_close(_run(model), _run(reference), rtol=1e-5, atol=1e-5)


def test_a_peft_lora_loaded_before_the_fusion_stops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from peft import LoraConfig

    model = _model()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k"]))
    before = _run(model)
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(model) == []
    assert "attn.to_k (Linear)" in caplog.text  # PEFT's lora.Linear, not nn.Linear
    assert _fused_count(model) == 0
    torch.testing.assert_close(_run(model), before, rtol=0, atol=0)


def test_accelerate_sequential_offload_set_up_first_refuses_the_fusion() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _model()
    expected = _run(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert fuse_qkv_projections(model) == []
    assert _fused_count(model) == 0
    torch.testing.assert_close(_run(model), expected, rtol=0, atol=0)


def test_accelerate_sequential_offload_after_unfusing_the_shared_rows() -> None:
    accelerate = pytest.importorskip("accelerate")
    from difforge.fused_projections import unfuse_shared_rows

    model = _model()
    expected = _run(model)
    attentions = _count(model, "to_q")
    assert fuse_qkv_projections(model)
    assert unfuse_shared_rows(model) == attentions
    assert _fused_count(model) == 0 and unfuse_shared_rows(model) == 0
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    torch.testing.assert_close(_run(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_after_the_fusion_runs_the_fused_model(offload_type: str) -> None:
    model = _model()
    expected = _run(model)
    assert fuse_qkv_projections(model)
    cpu = torch.device("cpu")
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type=offload_type, **kwargs
    )
    assert _fused_count(model) == _count(model, "to_q")
    torch.testing.assert_close(_run(model), expected, rtol=1e-5, atol=1e-5)
