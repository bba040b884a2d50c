"""quant.fuse_qkv's fusion before quantizing: which fused projections count, the unfused
twins left out of the quantization, then made views of the fused rows (fp8 or not), and
an unfuse that still runs the same numbers."""

from __future__ import annotations

import copy
import gc
import io
import logging
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs
from difforge.fused_projections import FusedGroup, fuse_qkv_projections, quantize_fused
from difforge.quant import Fp8Linear, ModuleFilter

ALL_SIZES = ModuleFilter(min_features=0, min_weight_elements=0)


def _model(name: str) -> nn.Module:
    preset = get_preset(name)
    return build_component(preset, preset.denoiser, dtype=torch.float32).eval()


def _run(model: nn.Module, name: str) -> torch.Tensor:
    call = denoiser_step_inputs(
        get_preset(name), batch=1, height=64, width=64, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        return call(model)[0]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_groups_are_the_projections_the_fusion_made() -> None:
    model = _model("tiny-pixart")
    groups = fuse_qkv_projections(model)
    blocks = range(len(model.transformer_blocks))
    assert set(groups) == {
        *(
            FusedGroup(f"transformer_blocks.{i}.attn1", "to_qkv", ("to_q", "to_k", "to_v"))
            for i in blocks
        ),
        *(FusedGroup(f"transformer_blocks.{i}.attn2", "to_kv", ("to_k", "to_v")) for i in blocks),
    }
    assert len(groups) == 2 * len(blocks)


def test_joint_attention_has_its_added_projections_fused_too() -> None:
    model = _model("tiny-sd3")
    fused = {g.fused for g in fuse_qkv_projections(model)}
    assert fused == {"to_qkv", "to_added_qkv"}


def test_a_module_without_the_method_fuses_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(nn.Linear(16, 16)) == []
    assert "has no fuse_qkv_projections" in caplog.text


def _quantize(model: nn.Module, groups: list[FusedGroup]):  # type: ignore[no-untyped-def]
    return quantize_fused(model, ALL_SIZES, groups)


def test_parts_share_the_fused_rows_from_the_fusion_on() -> None:
    model = _model("tiny-pixart")
    originals = copy.deepcopy(model)
    assert len(fuse_qkv_projections(model)) == 2 * len(model.transformer_blocks)
    # right after the fusion: high-precision row views, the originals' memory released
    for block, orig in zip(model.transformer_blocks, originals.transformer_blocks, strict=True):
        for attn, o, fused, parts in (
            (block.attn1, orig.attn1, "to_qkv", ("to_q", "to_k", "to_v")),
            (block.attn2, orig.attn2, "to_kv", ("to_k", "to_v")),
        ):
            for attr in parts:
                part = getattr(attn, attr)
                assert type(part) is nn.Linear
                assert _same_storage(part.weight, getattr(attn, fused).weight)
                assert _same_storage(part.bias, getattr(attn, fused).bias)
                assert torch.equal(part.weight, getattr(o, attr).weight)
                assert torch.equal(part.bias, getattr(o, attr).bias)


def test_twins_are_kept_out_of_the_quantization_and_become_fp8_views() -> None:
    model = _model("tiny-pixart")
    originals = copy.deepcopy(model)
    groups = fuse_qkv_projections(model)
    report = _quantize(model, groups)
    attn1 = model.transformer_blocks[0].attn1
    attn2 = model.transformer_blocks[0].attn2
    assert "transformer_blocks.0.attn1.to_qkv" in report.converted
    assert "unfused twin of to_qkv" in report.skipped["transformer_blocks.0.attn1.to_q"]
    assert "skip_cross_attention_kv" in report.skipped["transformer_blocks.0.attn2.to_kv"]
    assert "unfused twin of to_kv" in report.skipped["transformer_blocks.0.attn2.to_k"]
    # (the cross-attention's to_q, outside any group, is converted on its own)
    assert not any(n.endswith(("attn1.to_q", "to_k", "to_v")) for n in report.converted)
    # fp8 fused: each part is an fp8 view of its rows, equal to the part quantized alone
    start = 0
    for attr in ("to_q", "to_k", "to_v"):
        part = getattr(attn1, attr)
        alone = Fp8Linear.from_linear(getattr(originals.transformer_blocks[0].attn1, attr))
        assert isinstance(part, Fp8Linear) and part.out_features == alone.out_features
        assert _same_storage(part.weight_fp8, attn1.to_qkv.weight_fp8)
        assert _same_storage(part.weight_scale, attn1.to_qkv.weight_scale)
        assert part.weight_fp8.data_ptr() == attn1.to_qkv.weight_fp8[start:].data_ptr()
        assert torch.equal(part.weight_fp8.view(torch.uint8), alone.weight_fp8.view(torch.uint8))
        assert torch.equal(part.weight_scale, alone.weight_scale)
        assert torch.equal(part.bias, alone.bias)
        start += part.out_features
    # the caption's k/v stay in high precision: still row views of the fused to_kv
    assert type(attn2.to_k) is nn.Linear and type(attn2.to_kv) is nn.Linear
    assert _same_storage(attn2.to_v.weight, attn2.to_kv.weight)


def test_unfused_after_sharing_runs_the_fused_numbers() -> None:
    model = _model("tiny-pixart")
    _quantize(model, fuse_qkv_projections(model))
    fused = _run(model, "tiny-pixart")
    model.unfuse_qkv_projections()
    assert not any(type(p).__name__.startswith("Fused") for p in model.attn_processors.values())
    unfused = _run(model, "tiny-pixart")
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-5)


def test_newer_attention_modules_share_too() -> None:
    """FLUX's attention (diffusers' AttentionModuleMixin) deletes its fused linears on
    unfuse; the parts, views, keep the rows alive and give the same output."""
    model = _model("tiny-flux")
    reference = _run(model, "tiny-flux")
    groups = fuse_qkv_projections(model)
    assert {g.fused for g in groups} == {"to_qkv", "to_added_qkv"}
    fused = _run(model, "tiny-flux")
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    model.unfuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") for m in model.modules())
    torch.testing.assert_close(_run(model, "tiny-flux"), reference, rtol=1e-5, atol=1e-5)


def test_rows_that_differ_are_not_a_group() -> None:
    model = _model("tiny-pixart")
    attn = model.transformer_blocks[0].attn1
    real = attn.fuse_projections

    def fuse_then_drift(*args: object, **kwargs: object) -> None:  # to_qkv != its parts
        real(*args, **kwargs)
        with torch.no_grad():
            attn.to_qkv.weight[0, 0] += 1

    attn.fuse_projections = fuse_then_drift
    owners = {g.owner for g in fuse_qkv_projections(model)}
    assert "transformer_blocks.0.attn1" not in owners
    assert "transformer_blocks.1.attn1" in owners


def test_row_view_checks_its_range() -> None:
    linear = Fp8Linear.from_linear(nn.Linear(32, 48))
    view = linear.row_view(16, 32)
    assert view.out_features == 16 and view.weight_fp8.shape == (16, 32)
    assert torch.equal(view.bias, linear.bias[16:32])
    with pytest.raises(ValueError, match="outside"):
        linear.row_view(32, 64)
    with pytest.raises(ValueError, match="16-row bounds"):
        linear.row_view(8, 24)


class _OddAttention(nn.Module):
    """One diffusers Attention whose q/k/v have 24 rows (off fp8's 16-row grid), with the
    model-level fuse_qkv_projections() diffusers' models have."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim=24, heads=2, dim_head=12, bias=True)

    def fuse_qkv_projections(self) -> None:
        from diffusers.models.attention_processor import FusedAttnProcessor2_0

        self.attn.fuse_projections(fuse=True)
        self.attn.set_processor(FusedAttnProcessor2_0())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def test_parts_off_the_16_row_grid_share_rows_but_stay_out_of_fp8() -> None:
    """Row views of a high-precision linear need no alignment; fp8 row views of it could
    not run _scaled_mm, so the fp8 swap keeps such a fused linear in high precision."""
    model = _OddAttention()
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        reference = model(x)
    groups = fuse_qkv_projections(model)
    assert groups == [FusedGroup("attn", "to_qkv", ("to_q", "to_k", "to_v"))]
    assert _same_storage(model.attn.to_k.weight, model.attn.to_qkv.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    report = _quantize(model, groups)
    assert "16-row grid" in report.skipped["attn.to_qkv"]
    assert type(model.attn.to_qkv) is nn.Linear and type(model.attn.to_q) is nn.Linear
    assert "attn.to_qkv" not in report.converted


def test_a_fusion_whose_rows_cannot_be_shared_is_undone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from difforge.fused_projections import groups

    model = _model("tiny-pixart")
    reference = _run(model, "tiny-pixart")
    monkeypatch.setattr(groups, "rows_match", lambda fused, parts: False)
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(model) == []
    assert "left unfused" in caplog.text
    attn1 = model.transformer_blocks[0].attn1
    assert getattr(attn1, "to_qkv", None) is None
    assert type(attn1.processor).__name__ == "AttnProcessor2_0"
    torch.testing.assert_close(_run(model, "tiny-pixart"), reference, rtol=0, atol=0)


def test_offloading_hooks_stop_the_fusion(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("tiny-pixart")
    model.transformer_blocks[0].attn1.to_q._hf_hook = object()  # as accelerate's offload
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(model) == []
    assert "accelerate hook" in caplog.text
    assert getattr(model.transformer_blocks[1].attn1, "to_qkv", None) is None


def test_a_processor_set_after_the_fusion_survives_a_part_replacement() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    model = _model("tiny-pixart")
    fuse_qkv_projections(model)
    attn2 = model.transformer_blocks[0].attn2
    mine = AttnProcessor()
    attn2.set_processor(mine)  # the user's, unfused, after the fusion
    with pytest.warns(UserWarning, match="runs unfused"):
        _with_adapter(model, "transformer_blocks.0.attn2.to_k")
    assert attn2.processor is mine
    assert getattr(attn2, "to_kv", None) is None


def test_the_o3_swap_frees_each_high_precision_weight_as_it_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peak memory: the unfused q/k/v are gone before quantizing starts, and each converted
    weight is freed before the next conversion (nothing holds the old modules)."""
    import difforge.quant.auto as auto
    from difforge.options import parse_options

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    model = _model("tiny-flux")
    parts = [
        weakref.ref(m.weight)
        for n, m in model.named_modules()
        if n.endswith(("to_q", "to_k", "to_v", "add_q_proj"))
    ]
    converted: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    real = Fp8Linear.from_linear

    def from_linear(linear: nn.Linear) -> Fp8Linear:
        gc.collect()
        alive.append(sum(r() is not None for r in [*parts, *converted]))
        converted.append(weakref.ref(linear.weight))
        return real(linear)

    monkeypatch.setattr(Fp8Linear, "from_linear", from_linear)
    settings = parse_options(
        {"mode": "O3", "quant.min_features": 0, "quant.min_weight_elements": 0}
    ).settings
    report = auto.swap_fp8_linears(model, settings)
    assert report is not None and len(converted) == len(report.converted) > 4
    assert any(n.endswith("to_qkv") for n in report.converted)
    assert alive == [0] * len(alive)


def test_a_second_fusion_returns_what_the_first_shared_and_fuses_nothing_new() -> None:
    model = _model("tiny-pixart")
    first = fuse_qkv_projections(model)
    fused = {g.owner: model.get_submodule(g.owner).to_qkv for g in first if g.fused == "to_qkv"}
    processors = dict(model.original_attn_processors)
    assert fuse_qkv_projections(model) == first
    for owner, linear in fused.items():
        assert model.get_submodule(owner).to_qkv is linear  # not rebuilt
    # an unfuse still restores the real originals, not the fused processors
    assert {k: type(v) for k, v in model.original_attn_processors.items()} == {
        k: type(v) for k, v in processors.items()
    }


def test_a_plain_diffusers_fusion_is_not_redone_but_shared() -> None:
    model = _model("tiny-pixart")
    model.fuse_qkv_projections()  # the user's own: parts keep their own weights
    attn1 = model.transformer_blocks[0].attn1
    to_qkv, to_k = attn1.to_qkv, attn1.to_k.weight.detach().clone()
    assert not _same_storage(attn1.to_k.weight, to_qkv.weight)
    groups = fuse_qkv_projections(model)
    assert len(groups) == 2 * len(model.transformer_blocks)
    assert attn1.to_qkv is to_qkv  # not rebuilt
    assert _same_storage(attn1.to_k.weight, to_qkv.weight)
    assert torch.equal(attn1.to_k.weight, to_k)
    # parts that no longer equal their rows (the fused weight edited after a plain fusion)
    # are not a group, and keep their own weights
    other = _model("tiny-pixart")
    other.fuse_qkv_projections()
    with torch.no_grad():
        other.transformer_blocks[1].attn1.to_qkv.weight[0, 0] += 1
    owners = {g.owner for g in fuse_qkv_projections(other)}
    edited = other.transformer_blocks[1].attn1
    assert not _same_storage(edited.to_q.weight, edited.to_qkv.weight)
    assert "transformer_blocks.1.attn1" not in owners and "transformer_blocks.0.attn1" in owners


def test_fuse_qkv_modules_option_fuses_before_tracing() -> None:
    import difforge

    model = _model("tiny-pixart")
    reference = _run(model, "tiny-pixart")
    compiled = difforge.compile(model, options={"fuse_qkv.modules": True})
    out = _run(compiled, "tiny-pixart")
    attn1 = model.transformer_blocks[0].attn1
    assert type(attn1.to_qkv) is nn.Linear
    assert _same_storage(attn1.to_v.weight, attn1.to_qkv.weight)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_the_fp8_swap_after_fuse_qkv_modules_quantizes_the_shared_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import difforge.quant.auto as auto
    from difforge.options import parse_options

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    model = _model("tiny-sd3")
    groups = fuse_qkv_projections(model)  # what fuse_qkv.modules does first
    settings = parse_options(
        {"mode": "O3", "quant.min_features": 0, "quant.min_weight_elements": 0}
    ).settings
    report = auto.swap_fp8_linears(model, settings)
    assert report is not None
    assert {n for n in report.converted if n.endswith(("to_qkv", "to_added_qkv"))} == {
        g.name(g.fused) for g in groups
    }
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.add_k_proj, Fp8Linear)
    assert _same_storage(attn.add_k_proj.weight_fp8, attn.to_added_qkv.weight_fp8)
    assert not any(n.endswith(("attn.to_q", "add_q_proj")) for n in report.converted)


def test_originals_are_released_while_the_model_fuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak memory of the fusion itself: each attention's unfused weights go as it fuses."""
    from diffusers.models.attention_processor import Attention

    model = _model("tiny-pixart")
    originals = [
        weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith(("to_k", "to_v"))
    ]
    alive: list[int] = []
    real = Attention.fuse_projections

    def counting(self: Attention, *args: object, **kwargs: object) -> None:
        gc.collect()
        alive.append(sum(r() is not None for r in originals))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "fuse_projections", counting)
    fuse_qkv_projections(model)
    gc.collect()
    assert alive[0] == len(originals) and alive == sorted(alive, reverse=True)
    assert alive[-1] < alive[0] and all(r() is None for r in originals)


def test_a_model_diffusers_refuses_to_fuse_is_left_unfused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _model("tiny-pixart")

    def refuse() -> None:  # what diffusers raises for added-KV processors
        raise ValueError("not supported for models having added KV projections")

    model.fuse_qkv_projections = refuse
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(model) == []
    assert "cannot fuse" in caplog.text
    assert not hasattr(model.transformer_blocks[0].attn1, "to_qkv")
    assert "fuse_projections" not in vars(model.transformer_blocks[0].attn1)  # unwrapped


def test_custom_attention_processors_are_kept_and_nothing_fuses() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Mine(AttnProcessor2_0):
        pass

    model = _model("tiny-pixart")
    model.transformer_blocks[1].attn1.set_processor(Mine())
    assert fuse_qkv_projections(model) == []
    assert isinstance(model.transformer_blocks[1].attn1.processor, Mine)
    assert not hasattr(model.transformer_blocks[0].attn1, "to_qkv")


def test_a_frozen_model_stays_frozen() -> None:
    model = _model("tiny-pixart").requires_grad_(False)
    fuse_qkv_projections(model)
    assert not any(p.requires_grad for p in model.parameters())
    trainable = _model("tiny-pixart").requires_grad_(True)
    trainable.transformer_blocks[0].attn1.to_k.requires_grad_(False)
    fuse_qkv_projections(trainable)
    assert trainable.transformer_blocks[0].attn1.to_qkv.weight.requires_grad  # q and v do


def test_meta_weights_make_no_groups() -> None:
    model = _model("tiny-pixart").to("meta")
    assert fuse_qkv_projections(model) == []
    assert getattr(model.transformer_blocks[0].attn1, "to_qkv", None) is None  # not fused


def test_o3_without_quant_fuse_qkv_quantizes_the_groups_fuse_qkv_modules_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fuse_qkv.modules (on in O2/O3) fused first: with quant.fuse_qkv off the swap still
    treats those groups as groups (quantizing a part alone would unfuse its attention)."""
    import difforge.quant.auto as auto
    from difforge.options import parse_options

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    model = _model("tiny-sd3")
    groups = fuse_qkv_projections(model)
    settings = parse_options(
        {
            "mode": "O3",
            "quant.fuse_qkv": False,
            "quant.min_features": 0,
            "quant.min_weight_elements": 0,
        }
    ).settings
    report = auto.swap_fp8_linears(model, settings)
    assert report is not None
    assert {g.name(g.fused) for g in groups} <= set(report.converted)
    attn = model.transformer_blocks[0].attn
    assert isinstance(attn.to_qkv, Fp8Linear) and isinstance(attn.to_q, Fp8Linear)
    assert _same_storage(attn.to_q.weight_fp8, attn.to_qkv.weight_fp8)


def test_a_native_to_kv_without_its_parts_does_not_count_as_fused() -> None:
    model = _model("tiny-pixart")
    model.perceiver = nn.Module()  # e.g. a Perceiver attention's own to_kv
    model.perceiver.to_kv = nn.Linear(8, 16)
    assert len(fuse_qkv_projections(model)) == 2 * len(model.transformer_blocks)


def test_state_dict_keeps_the_unfused_layout_and_loads_both_ways(tmp_path: object) -> None:
    """Shared memory and safetensors: the fused linears are left out of state_dict (the
    parts hold the same values); a fresh unfused model loads it, and an unfused checkpoint
    loads into the fused model, its rows reaching the fused weight."""
    from safetensors.torch import load_file, save_file

    original = _model("tiny-pixart")
    model = copy.deepcopy(original)
    fuse_qkv_projections(model)
    state = model.state_dict()
    assert set(state) == set(original.state_dict())  # no to_qkv / to_kv keys
    path = f"{tmp_path}/model.safetensors"
    save_file(state, path)  # raised "Some tensors share memory" with the fused keys in
    fresh = _model("tiny-pixart")
    fresh.load_state_dict(load_file(path), strict=True)
    torch.testing.assert_close(_run(fresh, "tiny-pixart"), _run(original, "tiny-pixart"))

    doubled = {k: v * 2 for k, v in original.state_dict().items()}
    model.load_state_dict(doubled, strict=True)  # no to_qkv keys: built from the parts'
    attn1 = model.transformer_blocks[0].attn1
    assert torch.equal(
        attn1.to_qkv.weight[:48], 2 * original.transformer_blocks[0].attn1.to_q.weight
    )
    assert _same_storage(attn1.to_q.weight, attn1.to_qkv.weight)


def test_an_fp8_state_dict_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("tiny-pixart")
    groups = fuse_qkv_projections(model)
    _quantize(model, groups)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # not views of the model
    assert not any(".to_qkv." in k for k in state)
    assert "transformer_blocks.0.attn1.to_q.weight_fp8" in state
    before = _run(model, "tiny-pixart")
    zeroed = {k: torch.zeros_like(v) for k, v in state.items()}
    model.load_state_dict(zeroed, strict=True)
    assert not model.transformer_blocks[0].attn1.to_qkv.weight_scale.any()
    model.load_state_dict(state, strict=True)  # the fp8 rows rebuilt from the parts'
    torch.testing.assert_close(_run(model, "tiny-pixart"), before)


def _parts_view_fused(model: nn.Module) -> bool:
    """Whether every attn1 q/k/v (weight and bias, fp8 or not) lives in its to_qkv."""
    for block in model.transformer_blocks:
        attn = block.attn1
        for attr in ("to_q", "to_k", "to_v"):
            for a, b in zip(
                getattr(attn, attr).parameters(), attn.to_qkv.parameters(), strict=False
            ):
                if not _same_storage(a, b):
                    return False
    return True


def test_a_dtype_conversion_keeps_the_parts_views_of_the_fused_rows() -> None:
    model = _model("tiny-pixart")
    fuse_qkv_projections(model)
    q_weight = model.transformer_blocks[0].attn1.to_q.weight
    reference = _run(model, "tiny-pixart").double()
    model.double()  # nn.Module._apply copies each tensor on its own
    assert _parts_view_fused(model)
    assert model.transformer_blocks[0].attn1.to_q.weight is q_weight  # same Parameter
    assert q_weight.dtype == torch.float64
    call = denoiser_step_inputs(
        get_preset("tiny-pixart"), batch=1, height=64, width=64, device="cpu", dtype=torch.float64
    )
    with torch.no_grad():
        out = call(model)[0]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    model.unfuse_qkv_projections()  # the parts hold the converted rows
    with torch.no_grad():
        torch.testing.assert_close(call(model)[0], out, rtol=1e-10, atol=1e-10)


def test_a_device_move_keeps_the_fp8_parts_views_too() -> None:
    model = _model("tiny-pixart")
    _quantize(model, fuse_qkv_projections(model))
    attn1 = model.transformer_blocks[0].attn1
    assert isinstance(attn1.to_k, Fp8Linear)
    before = _run(model, "tiny-pixart")
    model._apply(lambda t: t.clone())  # what a move to another device does, tensor by tensor
    assert not _same_storage(attn1.to_k.weight_fp8, attn1.to_k.weight_fp8.clone())
    assert _parts_view_fused(model)
    assert _same_storage(attn1.to_k.weight_fp8, attn1.to_qkv.weight_fp8)
    torch.testing.assert_close(_run(model, "tiny-pixart"), before, rtol=0, atol=0)


def test_a_conversion_moves_each_row_once_and_the_parts_follow_the_fused_linear() -> None:
    model = _model("tiny-pixart")
    fuse_qkv_projections(model)
    seen: list[int] = []

    def noisy(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t + torch.randn_like(t) if t.is_floating_point() else t

    tensors = [*model.parameters(), *model.buffers()]
    parts = {
        id(t)
        for block in model.transformer_blocks
        for attn, attrs in ((block.attn1, "to_q to_k to_v"), (block.attn2, "to_k to_v"))
        for attr in attrs.split()
        for t in getattr(attn, attr).parameters()
    }
    once = sum(t.numel() for t in tensors if id(t) not in parts)
    model._apply(noisy)
    # each q/k/v row went through the conversion once, inside the fused linear: the parts'
    # tensors were emptied for it
    assert sum(seen) == once
    assert _parts_view_fused(model)  # views of the converted rows, whatever fn did
    attn1 = model.transformer_blocks[0].attn1
    assert torch.equal(
        attn1.to_k.weight, attn1.to_qkv.weight[attn1.to_q.out_features :][: attn1.to_k.out_features]
    )


def test_copies_that_no_longer_equal_their_rows_stay_copies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = copy.deepcopy(_fused("tiny-pixart"))  # deepcopy: each part its own copy
    assert not _parts_view_fused(model)
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        model._apply(lambda t: t + torch.randn_like(t) if t.is_floating_point() else t)
    assert not _parts_view_fused(model)  # each copy got its own noise: not its rows
    assert "no longer equals its fused rows" in caplog.text


def _fused(name: str) -> nn.Module:
    model = _model(name)
    fuse_qkv_projections(model)
    return model


def test_a_deep_copy_converts_into_its_own_views() -> None:
    model = _model("tiny-pixart")
    fuse_qkv_projections(model)
    twin = copy.deepcopy(model)
    twin.double()
    assert _parts_view_fused(twin)
    attn, twin_attn = model.transformer_blocks[0].attn1, twin.transformer_blocks[0].attn1
    assert not _same_storage(twin_attn.to_q.weight, attn.to_qkv.weight)
    assert attn.to_q.weight.dtype == torch.float32  # the original untouched


def test_a_fused_model_saved_whole_loads_and_runs() -> None:
    model = _model("tiny-pixart")
    fuse_qkv_projections(model)
    reference = _run(model, "tiny-pixart")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_run(loaded, "tiny-pixart"), reference, rtol=0, atol=0)
    assert _parts_view_fused(loaded)  # torch.save keeps shared storage
    loaded.double()  # ... and the loaded attentions still convert keeping their views
    assert _parts_view_fused(loaded)
    assert not any(".to_qkv." in k for k in loaded.state_dict())


class _AdapterLinear(nn.Module):
    """A LoRA-style wrapper (as PEFT's): ``.weight`` is the base weight, the output adds
    a low-rank update that a concatenation of ``.weight`` would lose."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.down = nn.Linear(base.in_features, 4, bias=False)
        self.up = nn.Linear(4, base.out_features, bias=False)
        nn.init.normal_(self.up.weight)
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.up(self.down(x))


def test_an_adapter_wrapped_projection_stops_the_fusion(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _model("tiny-pixart")
    attn1 = model.transformer_blocks[0].attn1
    attn1.to_v = _AdapterLinear(attn1.to_v)
    reference = _run(model, "tiny-pixart")
    with caplog.at_level(logging.INFO, logger="difforge.fused_projections"):
        assert fuse_qkv_projections(model) == []
    assert "transformer_blocks.0.attn1.to_v (_AdapterLinear)" in caplog.text
    assert getattr(attn1, "to_qkv", None) is None
    assert not any(type(p).__name__.startswith("Fused") for p in model.attn_processors.values())
    torch.testing.assert_close(_run(model, "tiny-pixart"), reference, rtol=0, atol=0)


def _with_adapter(model: nn.Module, path: str, seed: int = 0) -> _AdapterLinear:
    """Wrap the linear at dotted ``path`` in an _AdapterLinear with seeded weights."""
    owner_name, _, attr = path.rpartition(".")
    owner = model.get_submodule(owner_name)
    torch.manual_seed(seed)
    adapter = _AdapterLinear(getattr(owner, attr))
    setattr(owner, attr, adapter)
    return adapter


@pytest.mark.parametrize(
    "name,path,fused_attr,other",
    [
        # older Attention
        ("tiny-pixart", "transformer_blocks.0.attn1.to_q", "to_qkv", "transformer_blocks.1.attn1"),
        # AttentionModuleMixin
        (
            "tiny-flux",
            "transformer_blocks.0.attn.to_k",
            "to_qkv",
            "single_transformer_blocks.0.attn",
        ),
        (
            "tiny-sd3",
            "transformer_blocks.0.attn.add_v_proj",
            "to_added_qkv",
            "transformer_blocks.1.attn",
        ),
    ],
)
def test_an_adapter_added_after_the_fusion_runs_as_that_attention_unfuses(
    name: str, path: str, fused_attr: str, other: str
) -> None:
    model = _model(name)
    reference = copy.deepcopy(model)
    fuse_qkv_projections(model)
    with pytest.warns(UserWarning, match="runs unfused from now on"):
        _with_adapter(model, path)
    _with_adapter(reference, path)
    owner = model.get_submodule(path.rpartition(".")[0])
    assert getattr(owner, fused_attr, None) is None
    assert not type(owner.processor).__name__.startswith("Fused")
    assert isinstance(model.get_submodule(other).to_qkv, nn.Linear)  # still fused
    torch.testing.assert_close(_run(model, name), _run(reference, name), rtol=1e-5, atol=1e-5)


def test_an_adapter_added_after_compiling_reaches_the_compiled_model() -> None:
    import difforge

    model = _model("tiny-pixart")
    reference = copy.deepcopy(model)
    compiled = difforge.compile(model, options={"fuse_qkv.modules": True})
    _run(compiled, "tiny-pixart")
    with pytest.warns(UserWarning, match="runs unfused"):
        _with_adapter(model, "transformer_blocks.1.attn1.to_v")
    _with_adapter(reference, "transformer_blocks.1.attn1.to_v")
    expected = _run(reference, "tiny-pixart")
    torch.testing.assert_close(_run(compiled, "tiny-pixart"), expected, rtol=1e-4, atol=1e-4)


def test_a_plain_diffusers_fusion_unfuses_by_its_processors_name() -> None:
    model = _model("tiny-pixart")
    reference = copy.deepcopy(model)
    model.fuse_qkv_projections()  # diffusers alone: no processor of ours recorded
    fuse_qkv_projections(model)  # then shared (what compile_pipe's fusion did before)
    with pytest.warns(UserWarning, match="runs unfused"):
        _with_adapter(model, "transformer_blocks.0.attn2.to_k")
    _with_adapter(reference, "transformer_blocks.0.attn2.to_k")
    attn2 = model.transformer_blocks[0].attn2
    assert type(attn2.processor).__name__ == "AttnProcessor2_0"
    torch.testing.assert_close(
        _run(model, "tiny-pixart"), _run(reference, "tiny-pixart"), rtol=1e-5, atol=1e-5
    )


def test_our_own_fp8_views_replacing_the_parts_do_not_unfuse(
    recwarn: pytest.WarningsRecorder,
) -> None:
    model = _model("tiny-pixart")
    _quantize(model, fuse_qkv_projections(model))
    assert isinstance(model.transformer_blocks[0].attn1.to_q, Fp8Linear)
    assert isinstance(model.transformer_blocks[0].attn1.to_qkv, Fp8Linear)
    assert not [w for w in recwarn if "fused q/k/v" in str(w.message)]


def test_excluding_the_fused_names_keeps_q_k_v_in_high_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the README advises for outlier-heavy attention inputs under O3."""
    import difforge.quant.auto as auto
    from difforge.options import parse_options
    from difforge.quant import DEFAULT_EXCLUDE

    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)
    model = _model("tiny-sd3")
    fuse_qkv_projections(model)  # what fuse_qkv.modules does first under O3
    settings = parse_options(
        {
            "mode": "O3",
            "quant.exclude": [*DEFAULT_EXCLUDE, "to_qkv", "to_added_qkv"],
            "quant.min_features": 0,
            "quant.min_weight_elements": 0,
        }
    ).settings
    report = auto.swap_fp8_linears(model, settings)
    assert report is not None and report.converted  # the feed-forwards, say
    for block in model.transformer_blocks:
        attn = block.attn
        for attr in ("to_qkv", "to_q", "to_k", "to_v", "to_added_qkv", "add_k_proj"):
            assert type(getattr(attn, attr)) is nn.Linear, attr
        assert _same_storage(attn.to_v.weight, attn.to_qkv.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_on_the_cpu_then_moved_keeps_views_and_runs_fp8_after() -> None:
    """The path of a pipeline fused, then moved (or offloaded) with .to(): the q/k/v rows
    move once, inside the fused linears, and are views of them on the GPU; the fp8 swap
    afterwards makes fp8 views; every step matches the CPU float32 model."""
    model = _model("tiny-pixart")
    reference = _run(model, "tiny-pixart")
    fuse_qkv_projections(model)
    model.to("cuda", torch.float16)
    assert _parts_view_fused(model)
    assert model.transformer_blocks[0].attn1.to_q.weight.device.type == "cuda"
    call = denoiser_step_inputs(
        get_preset("tiny-pixart"), batch=1, height=64, width=64, device="cuda", dtype=torch.float16
    )
    with torch.no_grad():
        half = call(model)[0].float().cpu()
    assert ((half - reference).norm() / reference.norm()).item() < 2e-2
    groups = fuse_qkv_projections(model)  # already fused: the shared groups
    _quantize(model, groups)
    assert isinstance(model.transformer_blocks[0].attn1.to_q, Fp8Linear)
    assert _parts_view_fused(model)
    with torch.no_grad():
        fp8 = call(model)[0].float().cpu()
    assert ((fp8 - reference).norm() / reference.norm()).item() < 1e-1
    model.to("cpu")  # and back (what a model CPU offload does after each call)
    assert _parts_view_fused(model)
