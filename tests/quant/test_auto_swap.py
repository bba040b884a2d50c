"""low-precision / O3's fp8 linear swap (quant.fp8_linear) in difforge.compile: when it
happens (fp8 availability mocked on the CPU), the filter's choices, one warning where
fp8 is missing, the off switch, no double quantization, and compile_pipe's scope."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import difforge
import difforge.quant.auto as auto
from difforge import info
from difforge.errors import OptionsError
from difforge.quant import Fp8Linear, ModuleFilter, quantize_linears
from difforge.quant.auto import swap_report
from difforge.quant.select import DEFAULT_MIN_WEIGHT_ELEMENTS

#: Tiny widths: the size thresholds are lowered so the name/position rules decide.
SMALL = {"quant.min_features": 0, "quant.min_weight_elements": 0}


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x) * (1 + t)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + self.out(a)
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


class _ToyDiT(nn.Module):
    """Input layer, time embedder, modulation, two repeated blocks, output layer (plain
    names: only skip_edges and the 'emb' pattern keep the edges in high precision)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.time_emb = nn.Linear(d, d)
        self.modulation = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(2))
        self.head = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        te = self.modulation(self.time_emb(t))[:, None]
        for block in self.blocks:
            h = block(h, te)
        return self.head(h)


BLOCK_LINEARS = {f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "out", "ff1", "ff2")}


@pytest.fixture
def fp8_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this CPU has an fp8 GEMM for the swap decision. The swapped modules still
    ask the real scaled_mm_available, so they run the float32 reference path."""
    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: True)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto, "_WARNED", set())
    torch._dynamo.reset()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 9, 16, generator=g), torch.randn(2, 32, generator=g)


def test_o3_swaps_the_blocks_linears_and_stays_close(fp8_here: None) -> None:
    torch.manual_seed(0)
    model = _ToyDiT().eval()
    x, t = _inputs()
    with torch.no_grad():
        ref = model(x, t)
        compiled = difforge.compile(model, options={"mode": "O3", **SMALL})
        out = compiled(x, t)
    report = swap_report(model)
    assert report is not None and set(report.converted) == BLOCK_LINEARS
    assert "outside the repeated blocks" in report.skipped["inp"]
    assert "'emb'" in report.skipped["time_emb"]  # name patterns are reported first
    assert "outside the repeated blocks" in report.skipped["head"]
    assert "outside the repeated blocks" in report.skipped["modulation"]
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in BLOCK_LINEARS)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # fp8: a few percent, never exact
    with torch.no_grad():  # the compiled (traceable) path = the eager (op) path
        torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [{"mode": "O2"}, {"mode": "O1"}, {"mode": "O3", "quant.fp8_linear": False}],
    ids=["O2", "O1", "O3-switched-off"],
)
def test_no_swap_without_low_precision_or_when_switched_off(fp8_here: None, options: dict) -> None:
    model = _ToyDiT()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difforge.compile(model, options={**options, **SMALL})
    assert swap_report(model) is None
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def test_explicit_switch_works_without_the_mode(fp8_here: None) -> None:
    model = _ToyDiT()
    difforge.compile(model, options={"quant.fp8_linear": True, **SMALL})
    assert set(swap_report(model).converted) == BLOCK_LINEARS


def test_without_fp8_one_warning_and_no_swap() -> None:
    """The real CPU: no fp8 GEMM. The first compile warns once, later ones stay quiet."""
    model = _ToyDiT()
    with pytest.warns(RuntimeWarning, match="fp8 linears not available here") as record:
        difforge.compile(model, options={"mode": "O3", **SMALL})
    assert len([w for w in record if "fp8" in str(w.message)]) == 1
    assert "quant.fp8_linear" in str(record[0].message)  # says how to silence it
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difforge.compile(_ToyDiT(), options={"mode": "O3", **SMALL})


def test_unavailable_reasons_name_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "move the module" in auto.unavailable_reason([torch.device("cpu")])
    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: False)
    why = auto.unavailable_reason([torch.device("cuda", 0)])
    assert "compute capability >= 8.9" in why and "difforge info" in why
    monkeypatch.setattr(auto, "scaled_mm_available", lambda device: device.type == "cuda")
    assert auto.unavailable_reason([torch.device("cuda", 0)]) is None


def test_no_double_quantization(fp8_here: None) -> None:
    model = _ToyDiT()
    difforge.compile(model, options={"mode": "O3", **SMALL})
    first = {n: model.get_submodule(n) for n in BLOCK_LINEARS}
    report = swap_report(model)
    difforge.compile(model, options={"mode": "O3", **SMALL, "quant.skip_edges": False})
    assert swap_report(model) is report
    assert all(model.get_submodule(n) is m for n, m in first.items())
    assert type(model.inp) is nn.Linear  # the second call's wider filter did not apply

    # A module the user quantized (quantize_linears / quantize_pipe) is left as it is.
    user = _ToyDiT()
    mine = quantize_linears(
        user, ModuleFilter(min_features=0, min_weight_elements=0, include=("*.ff2",))
    )
    difforge.compile(user, options={"mode": "O3", **SMALL})
    assert swap_report(user) is None
    converted = {n for n, m in user.named_modules() if isinstance(m, Fp8Linear)}
    assert converted == set(mine.converted) == {"blocks.0.ff2", "blocks.1.ff2"}


def test_default_filter_uses_the_measured_crossover() -> None:
    """Default thresholds, real DiT widths (plan only: nothing is quantized)."""
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.ModuleDict() for _ in range(2))
    for block in model.blocks:
        block["to_q"] = nn.Linear(1152, 1152, device="meta")  # PixArt q/k/v/out: 1.3M
        block["ff1"] = nn.Linear(1152, 4608, device="meta")  # 5.3M
        block["ff2"] = nn.Linear(4608, 1152, device="meta")
        block["sdxl"] = nn.Linear(640, 5120, device="meta")  # SDXL GEGLU: 640 < 1024
        block["sd3"] = nn.Linear(1536, 1536, device="meta")  # 2.36M >= 2**21
    plan = ModuleFilter().plan(model)
    assert plan["blocks.0.ff1"] is None and plan["blocks.1.ff2"] is None
    assert plan["blocks.0.sd3"] is None
    assert "min_weight_elements" in plan["blocks.0.to_q"]
    assert "min_features" in plan["blocks.0.sdxl"]
    assert 1152 * 1152 < DEFAULT_MIN_WEIGHT_ELEMENTS < 1152 * 3456


def test_edges_without_repeated_blocks_are_the_first_and_last_linear() -> None:
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Linear(32, 16))
    plan = ModuleFilter(min_features=0, min_weight_elements=0, exclude=()).plan(mlp)
    assert "first" in plan["0"] and plan["2"] is None and "last" in plan["3"]
    # Linears only inside repeated blocks: none counts as the model's first or last.
    only_blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16)) for _ in range(3))
    assert all(
        why is None
        for why in ModuleFilter(min_features=0, min_weight_elements=0).plan(only_blocks).values()
    )
    off = ModuleFilter(min_features=0, min_weight_elements=0, exclude=(), skip_edges=False)
    assert all(why is None for why in off.plan(mlp).values())


def test_quant_options_are_validated() -> None:
    cfg = difforge.parse_options({"mode": "low-precision"})
    assert cfg.settings["quant.fp8_linear"] is True
    assert difforge.parse_options({"mode": "O2"}).settings["quant.fp8_linear"] is False
    assert difforge.parse_options({"mode": "O3"}).settings["quant.fp8_linear"] is True
    with pytest.raises(OptionsError, match="quant.min_features"):
        difforge.parse_options({"quant.min_features": -1})
    with pytest.raises(OptionsError, match="quant.exclude"):
        difforge.parse_options({"quant.exclude": "emb"})  # a list, not a string
    with pytest.raises(OptionsError, match="quant.include"):
        difforge.parse_options({"quant.include": ["ok", ""]})
    with pytest.raises(OptionsError, match="did you mean"):
        difforge.parse_options({"quant.fp8_linears": True})
    patterns = {"quant.exclude": ["head"], "quant.include": ["blocks.*"]}
    f = auto.filter_from_settings(difforge.parse_options(patterns).settings)
    assert f.exclude == ("head",) and f.include == ("blocks.*",)
    assert f.skip_gated_outputs is True  # the default
    with pytest.raises(OptionsError, match="quant.skip_gated_outputs"):
        difforge.parse_options({"quant.skip_gated_outputs": "no"})
    gated_off = difforge.parse_options({"quant.skip_gated_outputs": False}).settings
    assert auto.filter_from_settings(gated_off).skip_gated_outputs is False
    kv_on = difforge.parse_options({"quant.skip_cross_attention_kv": False}).settings
    assert auto.filter_from_settings(kv_on).skip_cross_attention_kv is False
    with pytest.raises(OptionsError, match="quant.skip_cross_attention_kv"):
        difforge.parse_options({"quant.skip_cross_attention_kv": 0})


def test_info_says_what_the_modes_do_with_fp8() -> None:
    feature = info.fp8_gemm()
    assert "low-precision/O3" in feature.reason
    if not torch.cuda.is_available():
        assert not feature.available and "keep every linear" in feature.reason


def test_compile_pipe_swaps_the_denoiser_only() -> None:
    pytest.importorskip("diffusers")
    from difforge.diffusers.pipe import _component_options

    for name, denoiser in (("transformer", True), ("text_encoder", False), ("vae.decoder", False)):
        _raw, cfg = _component_options({"mode": "O3"}, "difforge", False, denoiser)
        assert cfg is not None and cfg.settings["quant.fp8_linear"] is denoiser, name


def test_torch_compile_entry_point_says_the_swap_needs_difforge_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import difforge.backend as backend

    monkeypatch.setattr(backend, "_warned_fp8", False)
    model = _ToyDiT()
    x, t = _inputs()
    compiled = torch.compile(model, backend="difforge", options={"mode": "O3", **SMALL})
    with pytest.warns(UserWarning, match="difforge.compile"), torch.no_grad():
        compiled(x, t)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


def _tiny_o3(name: str, batch: int, **options: object) -> tuple[nn.Module, float]:
    """A tiny diffusers denoiser compiled at O3 (small thresholds plus ``options``), after
    one step: (the swapped model, relative error of the compiled step against eager)."""
    pytest.importorskip("diffusers")
    from difforge.diffusers.presets import build_component, get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset(name)
    model = build_component(preset, preset.denoiser, dtype=torch.float32).eval()
    call = denoiser_step_inputs(
        preset, batch=batch, height=64, width=64, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        ref = call(model)[0].clone()
        out = call(difforge.compile(model, options={"mode": "O3", **SMALL, **options}))[0]
    return model, float((out - ref).norm() / ref.norm())


def test_fuse_qkv_option_quantizes_the_fused_projections(fp8_here: None) -> None:
    model, err = _tiny_o3("tiny-pixart", 2, **{"quant.fuse_qkv": True})
    report = swap_report(model)
    assert report is not None
    fused = {n for n in report.converted if n.endswith((".to_qkv", ".to_kv"))}
    # each block: self-attention q/k/v as one fp8 GEMM; the cross-attention's fused k/v
    # read the caption only and stay in high precision (skip_cross_attention_kv)
    assert fused == {f"transformer_blocks.{i}.attn1.to_qkv" for i in range(2)}, fused
    assert len(model.transformer_blocks) == 2
    text_kv = [n for n in report.skipped if n.endswith("attn2.to_kv")]
    assert len(text_kv) == 2 and all(
        "skip_cross_attention_kv" in report.skipped[n] for n in text_kv
    )
    assert 0 < err < 0.05
    # the unfused q/k/v are fp8 views of the fused rows, not quantized twice
    attn1 = model.transformer_blocks[0].attn1
    assert "unfused twin" in report.skipped["transformer_blocks.0.attn1.to_q"]
    assert isinstance(attn1.to_q, Fp8Linear)
    assert attn1.to_q.weight_fp8.untyped_storage().data_ptr() == (
        attn1.to_qkv.weight_fp8.untyped_storage().data_ptr()
    )
    # What is left for the graph pass: the two blocks' high-precision to_kv read the same
    # caption tokens, so they become one GEMM.
    assert difforge.counters["fuse_qkv"] == 1


def test_fuse_qkv_option_is_on_in_o3_and_harmless_without_diffusers_fusion(
    fp8_here: None,
) -> None:
    from difforge.options import parse_options

    assert parse_options({"mode": "O3"}).settings["quant.fuse_qkv"] is True
    assert parse_options({"mode": "O2"}).settings["quant.fuse_qkv"] is False
    model = _ToyDiT().eval()  # no fuse_qkv_projections(): logged, nothing else changes
    with torch.no_grad():
        difforge.compile(model, options={"mode": "O3", "quant.fuse_qkv": True, **SMALL})(*_inputs())
    report = swap_report(model)
    assert report is not None and set(report.converted) == BLOCK_LINEARS


def test_flux_single_blocks_proj_out_goes_fp8_with_one_gelu_pass(fp8_here: None) -> None:
    """FLUX's largest GEMMs (each single block's proj_out) are converted, and the
    quantization of their cat([attention, gelu(mlp)]) input takes the GELU bound."""
    model, err = _tiny_o3("tiny-flux", 1)
    report = swap_report(model)
    assert report is not None
    singles = len(model.single_transformer_blocks)
    assert {f"single_transformer_blocks.{i}.proj_out" for i in range(singles)} <= set(
        report.converted
    )
    assert "skip_edges" in report.skipped["proj_out"]  # the model's own output layer
    assert difforge.counters["fp8_gelu_scale"] == singles
    assert 0 < err < 0.05
