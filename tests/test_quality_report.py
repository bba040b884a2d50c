"""Quality measurements of the benchmarks: final-latent PSNR in the text-to-image
benchmark, planted outlier channels, and ``benchmarks/quality_report.py`` end to end on the
tiny PixArt preset (CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import difforge.bench as bench
from difforge.bench import measure
from difforge.bench.args import parse_args
from difforge.bench.measure import CompilerResult, compare_to_reference, latent_psnr
from difforge.bench.outliers import outlier_columns, plant_outliers
from difforge.bench.pipeline import build_workload
from difforge.diffusers.presets import build_component

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------- latent PSNR


def test_latent_psnr_uses_the_reference_range_as_peak() -> None:
    ref = torch.randn(2, 4, 8, 8) * 50  # latents are unbounded: no fixed peak of 1
    assert latent_psnr(ref.clone(), ref) == math.inf
    noise = torch.randn_like(ref) * 0.5
    peak = float(ref.max() - ref.min())
    expected = 10 * math.log10(peak**2 / float(noise.double().square().mean()))
    assert latent_psnr(ref + noise, ref) == pytest.approx(expected, rel=1e-6)
    # Scaling both by 10 leaves the PSNR unchanged (a fixed peak would drop it by 20 dB).
    assert latent_psnr(10 * (ref + noise), 10 * ref) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(latent_psnr(torch.full_like(ref, math.nan), ref))
    with pytest.raises(ValueError, match="latent shapes differ"):
        latent_psnr(ref, ref[:1])


def test_compare_fills_latent_psnr_and_json_has_no_inf() -> None:
    image = torch.rand(1, 3, 8, 8)
    lat = torch.randn(1, 4, 4, 4)
    ref = CompilerResult("none", image=image, latents=lat)
    same = CompilerResult("compile", image=image.clone(), latents=lat.clone())
    other = CompilerResult("difforge", image=image.clone(), latents=lat + 1e-3)
    compare_to_reference([ref, same, other])
    assert same.latent_psnr_db == math.inf and same.image_match == "identical"
    assert other.latent_psnr_db is not None and 40 < other.latent_psnr_db < 100
    assert other.image_match == "identical"  # image equal, latents not: both are recorded
    assert same.to_json()["latent_psnr_db"] is None
    assert other.to_json()["latent_psnr_db"] == pytest.approx(other.latent_psnr_db)
    assert "latents" not in other.to_json()


def test_generate_returns_the_final_latents(cpu_only: None) -> None:
    w = build_workload(parse_args(["--no-text-encoders", "--steps", "2", "--no-progress"]))
    seen: list[torch.Tensor] = []

    def last_latents(step: int, t: Any, latents: torch.Tensor) -> None:
        seen.append(latents.clone())

    image, latents = w.generate()
    assert latents is not None and latents.shape == (1, 4, 8, 8)  # 64 px / VAE factor 8
    # Same seed: the same image as a plain call, and the latents PixArt's own callback
    # sees at its last step.
    assert torch.equal(image, w.call(extra={"callback": last_latents, "callback_steps": 1}))
    assert len(seen) == 2 and torch.equal(latents, seen[-1])


@pytest.mark.slow
def test_bench_records_latent_psnr(cpu_only: None, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--compare", "none,compile", "--no-text-encoders", "--steps", "2", "--no-progress"]
    argv += ["--warmups", "1", "--runs", "1", "--output-json", str(out)]
    assert bench.main(argv) == 0
    eager, compiled = json.loads(out.read_text())["results"]
    assert eager["image_match"] == "reference" and eager["latent_psnr_db"] is None
    # Inductor reorders float32 arithmetic: close to eager, not bit-identical.
    assert compiled["image_match"] == "differs"
    assert math.isfinite(compiled["latent_psnr_db"]) and compiled["latent_psnr_db"] > 60


def test_identical_runs_have_infinite_latent_psnr(cpu_only: None) -> None:
    # --compare refuses a compiler twice, so run eager twice by hand.
    argv = ["--no-text-encoders", "--steps", "2", "--warmups", "1", "--runs", "1"]
    config = parse_args(argv)
    w = build_workload(config)
    progress = measure.Progress(0, enabled=False)
    first = measure.run_compiler(w, "none", config, progress)
    second = measure.run_compiler(w, "none", config, progress)
    second.compiler = "none again"
    compare_to_reference([first, second])
    assert second.latent_psnr_db == math.inf and second.psnr_db == math.inf
    assert second.to_json()["latent_psnr_db"] is None and second.image_match == "identical"


# --------------------------------------------------------------------- planted outliers


def test_plant_outliers_scales_only_the_chosen_columns() -> None:
    module = build_component("tiny-pixart", "transformer", dtype=torch.float32)
    before = {
        n: m.weight.detach().clone() for n, m in module.named_modules() if isinstance(m, nn.Linear)
    }
    biases = {
        n: m.bias.detach().clone()
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and m.bias is not None
    }
    report = plant_outliers(module, 30.0, channels=4, seed=0)
    assert report.planted and set(report.planted) | set(report.skipped) == set(before)
    for name, cols in report.planted.items():
        w = module.get_submodule(name).weight
        assert len(cols) == 4 and cols == outlier_columns(name, w.shape[1], 4, 0)
        rest = torch.ones(w.shape[1], dtype=torch.bool)
        rest[cols] = False
        torch.testing.assert_close(w[:, cols], before[name][:, cols] * 30.0, rtol=0, atol=0)
        assert torch.equal(w[:, rest], before[name][:, rest])
        if name in biases:
            assert torch.equal(module.get_submodule(name).bias, biases[name])
    for name in report.skipped:  # too narrow for 4 outliers of at most 1/8 of the inputs
        assert module.get_submodule(name).in_features < 32
        assert torch.equal(module.get_submodule(name).weight, before[name])
    # Different linears get different columns; a second planting would compound: refused.
    assert len({tuple(c) for c in report.planted.values()}) > 1
    with pytest.raises(ValueError, match="already has planted outliers"):
        plant_outliers(module, 30.0)


def test_plant_outliers_is_the_same_in_every_build_and_dtype() -> None:
    a = build_component("tiny-pixart", "transformer", dtype=torch.float32)
    b = build_component("tiny-pixart", "transformer", dtype=torch.bfloat16)
    ra, rb = plant_outliers(a, 20.0), plant_outliers(b, 20.0)
    assert ra.planted == rb.planted
    assert (
        plant_outliers(build_component("tiny-pixart", "transformer"), 20.0, seed=1).planted
        != ra.planted
    )


@pytest.mark.slow
def test_bench_plants_outliers_once_for_every_compiler(
    cpu_only: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plain = build_component("tiny-pixart", "transformer", dtype=torch.float32)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = measure.apply_compiler

    def spy(pipe: Any, compiler: str, **kwargs: Any) -> Any:
        seen[compiler] = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
        return real(pipe, compiler, **kwargs)

    monkeypatch.setattr(measure, "apply_compiler", spy)
    out = tmp_path / "p.json"
    argv = ["--compare", "none,compile", "--no-text-encoders", "--steps", "2", "--no-progress"]
    argv += ["--warmups", "1", "--runs", "1", "--plant-outliers", "25", "--output-json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["workload"]["planted_outliers"]["factor"] == 25.0
    assert data["workload"]["planted_outliers"]["linears"] > 0
    assert set(seen) == {"none", "compile"}
    for key, value in seen["none"].items():
        assert torch.equal(value, seen["compile"][key]), key  # the same weights for both
    name = "transformer_blocks.0.attn1.to_q"
    cols = outlier_columns(name, plain.get_submodule(name).in_features, 4, 0)
    planted = seen["none"][f"{name}.weight"]
    torch.testing.assert_close(
        planted[:, cols], plain.get_submodule(name).weight[:, cols] * 25.0, rtol=0, atol=0
    )


def test_plant_outliers_flag_is_validated(cpu_only: None) -> None:
    assert parse_args([]).plant_outliers is None
    c = parse_args(["--plant-outliers", "30", "--outlier-channels", "2"])
    assert (c.plant_outliers, c.outlier_channels) == (30.0, 2)
    for bad in ("0", "-3", "inf", "x"):
        with pytest.raises(SystemExit):
            parse_args(["--plant-outliers", bad])


# ------------------------------------------------------------------ the quality report


def _load(name: str) -> ModuleType:
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quality_report_weight_sets(cpu_only: None) -> None:
    report = _load("quality_report")
    assert report.weight_sets("both", 30.0) == [None, 30.0]
    assert report.weight_sets("both", 0.0) == [None]
    assert report.weight_sets("built", 30.0) == [None]
    assert report.weight_sets("outliers", 30.0) == [30.0]
    assert report.parse_args([]).weights == "both"
    with pytest.raises(SystemExit):  # nothing would run
        report.parse_args(["--weights", "outliers", "--outlier-factor", "0"])
    with pytest.raises(SystemExit):
        report.parse_args(["--weights", "planted"])


def test_quality_report_passes_eager_components_to_every_mode(cpu_only: None) -> None:
    report = _load("quality_report")
    device = torch.device("cpu")
    built = report._bench_config("tiny-flux", report.parse_args([]), None, device)
    assert built.eager_components == ()
    args = report.parse_args(["--eager-components", "vae"])
    config = report._bench_config("tiny-flux", args, 30.0, device)
    assert config.eager_components == ("vae",) and config.plant_outliers == 30.0


@pytest.mark.slow
def test_quality_report_fp32_yardstick(cpu_only: None, tmp_path: Path) -> None:
    """``fp32``: the same pipeline converted to float32 against the run's dtype (bfloat16
    here): no step row, a finite generation PSNR that the run dtype's rounding explains."""
    report = _load("quality_report")
    out = tmp_path / "q.json"
    argv = ["--models", "tiny-pixart", "--modes", "eager,fp32", "--steps", "2", "--runs", "1"]
    argv += ["--dtype", "bfloat16", "--outlier-factor", "0", "--output-json", str(out)]
    assert report.main([*argv, "--no-progress"]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"eager", "fp32"} and rows["fp32"]["step"] is None
    gen = rows["fp32"]["generation"]
    assert gen["how"] == "eager, float32" and gen["image_match"] == "differs"
    # bfloat16 keeps 8 mantissa bits: two steps land ~50 dB from float32, not at 100+; a
    # pipeline with other weights (a float32 rebuild draws new random ones) lands at ~25.
    assert 40 < gen["latent_psnr_db"] < 90 and 40 < gen["psnr_db"] < 90


@pytest.mark.slow
def test_quality_report_end_to_end(
    cpu_only: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _load("quality_report")
    out = tmp_path / "q.json"
    argv = ["--models", "tiny-pixart", "--modes", "eager,compile,fp8", "--steps", "2"]
    argv += ["--outlier-factor", "30", "--output-json", str(out), "--no-progress"]
    assert report.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "quality_report"
    for key in ("torch", "difforge", "device_name", "date"):
        assert key in data["environment"]
    assert data["args"]["steps"] == 2 and data["args"]["modes"] == ["eager", "compile", "fp8"]
    rows = data["results"]
    assert [(r["mode"], r["outliers"] is not None) for r in rows] == [
        (m, planted) for planted in (False, True) for m in ("eager", "compile", "fp8")
    ]
    for r in rows:
        assert r["model"] == "tiny-pixart" and r["error"] is None
        assert set(r["step"]) >= {"rel_err_vs_fp32", "median_ms", "fp8_linears"}
        assert set(r["generation"]) >= {"psnr_db", "latent_psnr_db", "image_match", "inference_s"}
    by = {(r["mode"], r["outliers"] is not None): r for r in rows}
    for planted in (False, True):
        eager, compiled, fp8 = (by[m, planted] for m in ("eager", "compile", "fp8"))
        assert eager["step"]["rel_err_vs_fp32"] == 0.0  # float32 eager is the reference
        assert eager["generation"]["image_match"] == "reference"
        assert 0 < compiled["step"]["rel_err_vs_fp32"] < 1e-4
        assert compiled["generation"]["latent_psnr_db"] > 60
        # fp8 is lossy: a finite latent PSNR, well below the float32 compile's.
        assert fp8["step"]["fp8_linears"] > 0 and fp8["step"]["rel_err_vs_fp32"] > 1e-3
        assert fp8["generation"]["latent_psnr_db"] < compiled["generation"]["latent_psnr_db"]
    assert by["eager", True]["outliers"]["factor"] == 30.0
    printed = capsys.readouterr().out
    # The markdown table comes last.
    assert printed.rstrip().splitlines()[-1].startswith("| tiny-pixart")
    assert "latent PSNR" in printed
