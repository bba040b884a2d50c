"""difforge's rewrites on the real diffusers block structures (tiny presets, CPU): where they
fire, and that the compiled model still matches eager."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")

from tests.helpers import rel_err, tiny_sdxl_one_layer

import difforge
from difforge.diffusers.presets import Preset, build_component, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs


def _first(out: Any) -> torch.Tensor:
    return getattr(out, "sample", out[0] if isinstance(out, tuple) else out)


def _compiled_matches_eager(
    name: str | Preset, options: dict[str, Any], *, batch: int, size: int
) -> torch.nn.Module:
    """One float32 denoiser step of preset ``name`` at ``size``², compiled with ``options``,
    against eager (relative error < 1e-5); returns the eager model."""
    preset = get_preset(name)
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    call = denoiser_step_inputs(
        preset, batch=batch, height=size, width=size, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        ref = _first(call(model))
        out = _first(call(difforge.compile(model, options=options)))
    assert rel_err(out, ref) < 1e-5
    return model


@pytest.mark.parametrize(("regional", "splits"), [(False, 2), (True, 1)])
def test_flux_single_blocks_project_attention_and_mlp_without_the_concatenation(
    regional: bool, splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two single blocks: each projects cat([attn, mlp]); nested regions compile the body once.
    # The size floor is lowered to the tiny model's 48 x 160 features, where the timestep
    # embedding's cat([cos, sin]) (one row, 256 -> 32) stays below it.
    from difforge.passes import split_linear

    monkeypatch.setattr(split_linear, "MIN_COPY_ELEMENTS", 48 * 160)
    options = {"mode": "O2", "compile.regional": regional}
    _compiled_matches_eager("tiny-flux", options, batch=1, size=64)
    assert difforge.counters["split_cat_linear"] == splits


def test_sd3_joint_attention_reads_and_writes_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two joint blocks, batch 2 (CFG): each block's image and text q/k/v GEMMs write one
    # buffer, no concatenation.
    from difforge.passes import joint_linear

    monkeypatch.setattr(joint_linear, "MIN_ELEMENTS", 1)
    _compiled_matches_eager("tiny-sd3", {"mode": "O2"}, batch=2, size=128)
    assert difforge.counters["joint_linear"] == 2


def test_sd3_joint_attention_keeps_one_buffer_with_cached_fused_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fuse_qkv.cached_weights fuses the text stream's q/k/v too (the cost rule refuses them
    # at 154 tokens); joint_linear then takes both streams as one fused GEMM each.
    from difforge.passes import fuse_linear, joint_linear

    monkeypatch.setattr(joint_linear, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fuse_linear, "SMALL_GROUP_ELEMENTS", 1)
    # (the graph's fusion: fuse_qkv.modules would fuse the module before tracing)
    options = {"mode": "O2", "fuse_qkv.cached_weights": True, "fuse_qkv.modules": False}
    model = _compiled_matches_eager("tiny-sd3", options, batch=2, size=64)
    assert difforge.counters["fuse_qkv"] == 2 * len(model.transformer_blocks)
    assert difforge.counters["joint_linear"] == 2
    assert difforge.counters["fused_weights.cached"] == 2 * difforge.counters["fuse_qkv"]


def test_flux_double_blocks_write_v_into_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # FLUX's joint blocks: q and k pass RMSNorms before their concatenation (left as they are),
    # v is unflattened and concatenated as it comes: its two projections write one buffer.
    # At 1024px fuse_qkv leaves FLUX's projections apart (its cost rule); so does this test.
    from difforge.passes import joint_linear

    monkeypatch.setattr(joint_linear, "MIN_ELEMENTS", 1)
    options = {"mode": "O2", "passes.fuse_qkv": False, "fuse_qkv.modules": False}
    model = _compiled_matches_eager("tiny-flux", options, batch=1, size=64)
    assert difforge.counters["joint_linear"] == len(model.transformer_blocks)


def test_sd3_joint_attention_on_fp8_linears_reads_and_writes_one_buffer_per_projection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # O3's fp8 linears (traced to _scaled_mm: forced here, the CPU build has the row-wise
    # kernel) cannot be fused to one q/k/v GEMM, so each of q, k and v gets its buffer.
    from difforge.passes import joint_linear
    from difforge.quant.fp8 import Fp8Linear

    monkeypatch.setattr(joint_linear, "MIN_ELEMENTS", 1)
    preset = get_preset("tiny-sd3")
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    swapped = 0
    for block in model.transformer_blocks:
        attn = block.attn
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            fp8 = Fp8Linear.from_linear(getattr(attn, name))
            fp8.use_scaled_mm, fp8.direct_out_dtypes = True, (torch.float32,)
            setattr(attn, name, fp8)
            swapped += 1
    call = denoiser_step_inputs(
        preset, batch=2, height=128, width=128, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        ref = _first(call(model))
        out = _first(call(difforge.compile(model, options={"mode": "O2"})))
    assert rel_err(out, ref) < 1e-5
    assert difforge.counters["joint_linear"] == swapped // 2  # q, k, v of every block


def test_sd3_layer_norm_quantizer_takes_the_residual_updates_before_the_norms() -> None:
    # Every linear of the blocks fp8: each adaLN-modulated LayerNorm feeding them becomes
    # one Triton kernel (Triton's interpreter here); the four norms that read a block's
    # residual update (x + gate * attn, x + gate * ff) take that add in and write it out.
    from torch import nn

    from difforge.quant.fp8 import Fp8Linear

    preset = get_preset("tiny-sd3")
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    for block in model.transformer_blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear.from_linear(child))
    call = denoiser_step_inputs(
        preset, batch=2, height=64, width=64, device="cpu", dtype=torch.float32
    )
    options = {"mode": "O2", "passes.fp8_layer_norm_quant_kernel": True}
    with torch.no_grad():
        ref = _first(call(model))
        out = _first(call(difforge.compile(model, options=options)))
    assert rel_err(out, ref) < 1e-5
    assert difforge.counters["fp8_layer_norm_quant_kernel"] == 6
    assert difforge.counters["fp8_layer_norm_quant_kernel.residual"] == 4


def test_sdxl_unet_under_freezing_fuses_the_groups_the_cost_rule_leaves_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without freezing, fuse_qkv fuses a group only where the input reads it saves outweigh
    # the in-graph weight concatenation (a real SDXL's 1280-wide q/k/v and text k/v do not
    # pass); under freezing the weights are constants and the concatenation folds, so every
    # group fuses. The tiny UNet's groups are below the small-weights floor: lowered here.
    from difforge.passes import fuse_linear

    monkeypatch.setattr(fuse_linear, "SMALL_GROUP_ELEMENTS", 1)
    # One transformer layer per level and no mid block: the widths the cost rule judges
    # are the preset's.
    unet = tiny_sdxl_one_layer(mid_block=False)
    _compiled_matches_eager(unet, {"mode": "O2"}, batch=2, size=64)
    rule_only = difforge.counters["fuse_qkv"]
    torch._dynamo.reset()
    difforge.counters.clear()
    _compiled_matches_eager(unet, {"mode": "O2:freezing"}, batch=2, size=64)
    frozen = difforge.counters["fuse_qkv"]
    assert frozen > rule_only
    # fuse_qkv.cached_weights: the same groups fuse without freezing, the concatenations
    # made once (weights and biases: two per group at most, one where there is no bias).
    torch._dynamo.reset()
    difforge.counters.clear()
    options = {"mode": "O2", "fuse_qkv.cached_weights": True}
    _compiled_matches_eager(unet, options, batch=2, size=64)
    assert difforge.counters["fuse_qkv"] == frozen
    assert frozen <= difforge.counters["fused_weights.cached"] <= 2 * frozen


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-sdxl"])
def test_real_denoiser_graphs_write_nothing_another_node_reads(name: str) -> None:
    # Such a write turns the moving rewrites off (passes/mutation.py); diffusers' sin-cos
    # position embedding's `omega /= n` once did so for every PixArt graph. Dynamo capture
    # only: no Inductor compile.
    from difforge.passes.mutation import graph_mutates

    preset = get_preset(name)
    model = build_component(preset, preset.denoiser, dtype=torch.float32)
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cpu", dtype=torch.float32
    )
    verdicts: list[bool] = []

    def record(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
        verdicts.append(graph_mutates(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        call(torch.compile(model, backend=record, fullgraph=True))
    assert verdicts == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dynamic", [False, True])
def test_gpu_vae_decoder_group_norms_stay_nhwc(dynamic: bool) -> None:
    # CUDA's GroupNorm returns NCHW where the rewrite returns NHWC; the layout check copies
    # to NCHW only where a later view needs it. The VAE decoder's resnets need no copy: one
    # would cost a pass over the activation per GroupNorm (the VAE's O2 speed-up).
    from difforge.diffusers.step_inputs import VaeDecode, vae_decode_inputs

    preset = get_preset("tiny-sdxl")
    vae = build_component(preset, "vae", dtype=torch.float16).cuda()
    decode = VaeDecode(vae).eval()
    call = vae_decode_inputs(
        preset, batch=1, height=128, width=96, device="cuda", dtype=torch.float16
    )
    options = {"mode": "O2", "memory_format": "channels_last", "dynamic": dynamic}
    with torch.no_grad():
        ref = _first(call(decode))
        out = _first(call(difforge.compile(decode, options=options)))
    assert difforge.counters["group_norm_channels_last"] > 0
    assert difforge.counters["group_norm_channels_last.contiguous"] == 0
    assert rel_err(out.float(), ref.float()) < 5e-3
