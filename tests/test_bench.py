"""The text-to-image benchmark: flags, pipeline setup, snapshot/restore, metrics, and
end-to-end runs on the tiny PixArt preset (CPU)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import difforge.bench as bench
from difforge.bench import args as bench_args
from difforge.bench import measure
from difforge.bench.args import BenchError, parse_args
from difforge.bench.compilers import PipelineSnapshot, compile_stock, load_quantize_pipe
from difforge.bench.measure import image_metrics
from difforge.bench.pipeline import MULTIPLE_RESOLUTIONS, RARE_RESOLUTIONS, build_workload
from difforge.bench.pipeline import sweep_sizes as sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------ flags


def test_cpu_defaults(cpu_only: None) -> None:
    c = parse_args([])
    assert c.model == "tiny-pixart"
    assert c.device == "cpu"
    assert c.steps == bench_args.CPU_DEFAULT_STEPS
    assert c.compilers == ("difforge",)
    assert (c.warmups, c.runs, c.batch) == (2, bench_args.CPU_DEFAULT_RUNS, 1)
    assert c.scheduler is None and c.dtype is None and c.text_encoders is None
    assert c.output_json is None and c.chart is None


def test_gpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    c = parse_args([])
    assert c.model == "pixart-xl-2-1024"
    assert c.device == "cuda"
    assert c.steps is None  # the preset's default, resolved once the pipeline exists
    assert c.runs == 3


def test_seed_aliases(cpu_only: None) -> None:
    c = parse_args(["--base", "sdxl", "--n_steps", "7", "--saved_image", "out/a.png"])
    assert c.model == "sdxl"
    assert c.steps == 7
    assert c.output_image == Path("out/a.png")
    assert parse_args(["--compiler", "nexfort"]).compilers == ("difforge",)
    assert parse_args(["--compare", "none, nexfort,compile"]).compilers == (
        "none",
        "difforge",
        "compile",
    )
    assert parse_args(["--cfg-scale", "3"]).guidance_scale == 3.0


@pytest.mark.parametrize(
    ("argv", "multiple", "rare"),
    [
        (["--run_multiple_resolutions"], True, False),
        (["--run_multiple_resolutions", "true", "--run_rare_resolutions", "0"], True, False),
        (["--run-rare-resolutions", "yes"], False, True),
        ([], False, False),
    ],
)
def test_resolution_flags(cpu_only: None, argv: list[str], multiple: bool, rare: bool) -> None:
    c = parse_args(argv)
    assert (c.multiple_resolutions, c.rare_resolutions) == (multiple, rare)


def test_bad_values(cpu_only: None) -> None:
    with pytest.raises(BenchError, match="unknown compiler 'tvm'"):
        parse_args(["--compare", "none,tvm"])
    with pytest.raises(BenchError, match="'difforge' twice"):
        parse_args(["--compare", "difforge,nexfort"])
    with pytest.raises(BenchError, match="--compiler-config"):
        parse_args(["--compiler-config", '{"mode": "O9"}'])
    with pytest.raises(BenchError, match="CUDA is not available"):
        parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    assert parse_args(["--compiler-config", '{"mode": "O2"}']).compiler_config is not None


def test_chart_defaults_next_to_json(cpu_only: None) -> None:
    c = parse_args(["--output-json", "r/x.json"])
    assert c.chart == Path("r/x.png")
    assert parse_args(["--output-json", "r/x.json", "--chart", "c.png"]).chart == Path("c.png")


def test_bad_input_exits_2_before_building(
    cpu_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--compiler-config", "{not json"]) == 2
    assert "difforge bench: error: --compiler-config" in capsys.readouterr().err


@pytest.mark.skipif(load_quantize_pipe() is not None, reason="quantize_pipe exists here")
def test_quantize_not_available(cpu_only: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quantize"]) == 2
    err = capsys.readouterr().err
    assert "--quantize is not available in this version" in err
    # Same through the `difforge bench` subcommand.
    from difforge.cli import main as cli_main

    assert cli_main(["bench", "--quantize"]) == 2
    assert "not available in this version" in capsys.readouterr().err


# ------------------------------------------------------------------- pipeline setup


@pytest.fixture
def tiny_workload(cpu_only: None) -> Any:
    return build_workload(parse_args(["--no-text-encoders", "--steps", "2", "--no-progress"]))


def test_workload_uses_random_embeddings(tiny_workload: Any) -> None:
    w = tiny_workload
    assert not w.text_encoders and "prompt" not in w.prompt_kwargs
    assert "prompt_embeds" in w.prompt_kwargs
    assert (w.height, w.width, w.steps, w.dtype) == (64, 64, 2, torch.float32)
    image = w.call()
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image, w.call())  # same seed, same image


def test_local_directory_model(cpu_only: None, tmp_path: Path) -> None:
    from difforge.diffusers.presets import build_pipeline

    build_pipeline("tiny-pixart").save_pretrained(tmp_path / "pipe")
    base = ["--model", str(tmp_path / "pipe"), "--height", "64", "--width", "64"]
    w = build_workload(parse_args(base))
    assert w.preset is None and w.text_encoders
    assert w.prompt_kwargs == {"prompt": bench_args.DEFAULT_PROMPT}
    assert w.call_kwargs["clean_caption"] is False  # bs4/ftfy are not needed
    assert w.call().shape == (1, 3, 64, 64)
    w = build_workload(parse_args([*base, "--no-text-encoders"]))
    assert not w.text_encoders and "prompt_embeds" in w.prompt_kwargs
    assert w.call().shape == (1, 3, 64, 64)


def test_scheduler_swap(cpu_only: None) -> None:
    c = parse_args(["--no-text-encoders", "--scheduler", "EulerDiscreteScheduler"])
    w = build_workload(c)
    assert type(w.pipe.scheduler).__name__ == w.scheduler == "EulerDiscreteScheduler"
    bad = parse_args(["--no-text-encoders", "--scheduler", "EulerDiscretScheduler"])
    with pytest.raises(BenchError, match="did you mean 'EulerDiscreteScheduler'"):
        build_workload(bad)


def test_sweep_sizes_scaled_for_tiny(tiny_workload: Any) -> None:
    assert tiny_workload.size_multiple == 16  # VAE factor 8 x patch 2
    sizes = sweep(tiny_workload, MULTIPLE_RESOLUTIONS)
    assert sizes[0] == ((1024, 1024), (64, 64))
    assert sizes[1] == ((768, 1024), (48, 64))
    for _, (h, w) in sweep(tiny_workload, RARE_RESOLUTIONS):
        assert h % 16 == 0 and w % 16 == 0 and h > 0 and w > 0


def test_snapshot_undoes_compile_pipe_and_torch_compile(tiny_workload: Any) -> None:
    from difforge.diffusers import compile_pipe

    pipe = tiny_workload.pipe
    before = tiny_workload.call()
    transformer, decoder = pipe.transformer, pipe.vae.decoder
    snapshot = PipelineSnapshot(pipe)

    # Compiling is lazy: nothing runs here, so this test costs no compile time.
    compile_pipe(pipe, options={"memory_format": "channels_last"}, fuse_qkv_projections=True)
    assert pipe.transformer is not transformer
    assert any(hasattr(m, "to_qkv") for m in transformer.modules())
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    snapshot.restore()

    assert pipe.transformer is transformer and pipe.vae.decoder is decoder
    assert not hasattr(pipe, "_difforge_state")
    assert not any(hasattr(m, "to_qkv") for m in transformer.modules())
    assert decoder.conv_in.weight.is_contiguous()
    assert not any(m._forward_pre_hooks for m in pipe.vae.modules())

    compile_stock(pipe, mode=None)
    assert isinstance(pipe.transformer, torch._dynamo.eval_frame.OptimizedModule)
    snapshot.restore()
    assert pipe.transformer is transformer and pipe.vae.decoder is decoder
    assert torch.equal(tiny_workload.call(), before)


def test_eager_components_are_left_alone_by_every_compiler(tiny_workload: Any) -> None:
    from difforge.bench.compilers import apply_compiler

    pipe = tiny_workload.pipe
    transformer, decoder = pipe.transformer, pipe.vae.decoder
    snapshot = PipelineSnapshot(pipe)
    # Lazy compiles again: wrapping costs nothing until a call.
    applied = apply_compiler(pipe, "compile", eager=("vae",))
    assert isinstance(pipe.transformer, torch._dynamo.eval_frame.OptimizedModule)
    assert pipe.vae.decoder is decoder and "vae" not in applied.how
    snapshot.restore()
    applied = apply_compiler(pipe, "difforge", eager=("vae.decoder",))
    assert pipe.transformer is not transformer
    assert pipe.vae.decoder is decoder and "ignores=['vae.decoder']" in applied.how
    snapshot.restore()
    with pytest.raises(BenchError, match=r"compiles no component 'vea'.*vae\.decoder"):
        apply_compiler(pipe, "compile", eager=("vea",))
    assert pipe.transformer is transformer  # nothing was compiled
    assert parse_args(["--eager-components", "vae, text_encoder"]).eager_components == (
        "vae",
        "text_encoder",
    )
    assert parse_args([]).eager_components == ()
    with pytest.raises(SystemExit):
        parse_args(["--eager-components", ","])


def test_warm_up_line_says_how_warm_the_caches_were() -> None:
    from difforge.bench.measure import CompilerResult
    from difforge.bench.report import summary_line

    r = CompilerResult("difforge", first_run_s=3.0, warmup_s=3.0, warmup_runs_s=[3.0])
    r.inference_s, r.inference_runs_s, r.iterations_per_s, r.graphs = 1.0, [1.0], 2.0, 2
    r.compile_caches = dict.fromkeys(
        ("fxgraph_hit", "fxgraph_miss", "aot_hit", "aot_miss", "aot_bypass", "dynamo_cache_hit"),
        0,
    )
    assert "cache" not in summary_line(r, 2)  # nothing looked up: nothing said
    r.compile_caches |= {"fxgraph_hit": 1, "fxgraph_miss": 1, "aot_bypass": 1}
    line = summary_line(r, 2)
    assert "FX cache 1 hit, 1 miss; AOT cache 0 hit, 0 miss, 1 BYPASSED" in line
    r.compile_caches |= {"aot_bypass": 0, "dynamo_cache_hit": 2}
    assert "0 miss; 2 precompiled)" in summary_line(r, 2)


# ------------------------------------------------------------------------- metrics


def test_image_metrics() -> None:
    a = torch.rand(1, 3, 8, 8)
    assert image_metrics(a, a.clone()) == (math.inf, 0.0)
    b = (a + 0.01).clamp(0, 1)
    psnr, max_abs = image_metrics(b, a)
    assert 35 < psnr < 45 and max_abs == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        image_metrics(a, a[..., :4])


def test_failing_compiler_is_reported_and_others_still_run(
    cpu_only: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = measure.apply_compiler

    def broken(pipe: Any, compiler: str, **kwargs: Any) -> Any:
        if compiler == "compile":
            raise RuntimeError("planted failure")
        return real(pipe, compiler, **kwargs)

    monkeypatch.setattr(measure, "apply_compiler", broken)
    out = tmp_path / "r.json"
    argv = ["--compare", "compile,none", "--no-text-encoders", "--steps", "2", "--no-progress"]
    assert bench.main([*argv, "--output-json", str(out)]) == 1
    data = json.loads(out.read_text())
    failed, eager = data["results"]
    assert failed["error"] == "RuntimeError: planted failure" and failed["inference_s"] is None
    assert eager["error"] is None and eager["image_match"] == "reference"
    assert "FAILED" in capsys.readouterr().out


# --------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `--compare none,compile,difforge` run on tiny-pixart, shared by the tests."""
    tmp = tmp_path_factory.mktemp("bench")
    argv = [
        "--compare",
        "none,compile,difforge",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--device",
        "cpu",
        "--output-json",
        str(tmp / "x.json"),
        "--output-image",
        str(tmp / "img.png"),
        "--no-progress",
    ]
    rc = bench.main(argv)
    return {"rc": rc, "tmp": tmp, "data": json.loads((tmp / "x.json").read_text())}


@pytest.mark.slow
def test_compare_writes_json_with_three_results(compare_run: dict[str, Any]) -> None:
    assert compare_run["rc"] == 0
    data = compare_run["data"]
    assert [r["compiler"] for r in data["results"]] == ["none", "compile", "difforge"]
    assert data["reference"] == "none"
    assert data["workload"]["steps"] == 2 and data["workload"]["height"] == 64
    assert data["args"]["compilers"] == ["none", "compile", "difforge"]
    for key in ("torch", "diffusers", "difforge", "device_name", "date", "triton"):
        assert key in data["environment"]
    for r in data["results"]:
        assert r["error"] is None
        assert r["first_run_s"] > 0 and r["warmup_s"] >= r["first_run_s"]
        assert r["inference_s"] > 0
        assert len(r["inference_runs_s"]) == bench_args.CPU_DEFAULT_RUNS
        assert r["iterations_per_s"] == pytest.approx(2 / r["inference_s"])
        assert r["peak_memory_bytes"] is None  # CPU
        assert r["recompiles_in_timed_runs"] == 0
    none, compiled, ours = data["results"]
    assert not any(none["compile_caches"].values())  # eager looks nothing up
    for r in (compiled, ours):  # every compiled graph went through Inductor's FX cache
        caches = r["compile_caches"]
        assert caches["fxgraph_hit"] + caches["fxgraph_miss"] >= r["graphs"]
        assert caches["aot_bypass"] == 0
    assert none["image_match"] == "reference" and none["psnr_db"] is None
    assert none["max_abs_diff"] == 0.0 and none["graphs"] == 0
    for r in (compiled, ours):
        assert r["graphs"] >= 1
        # Identical images have no finite PSNR; JSON says so with image_match.
        assert r["image_match"] == "identical" or r["psnr_db"] > 30
        assert r["max_abs_diff"] < 1e-2
    assert set(data["speedup_vs_none"]) == {"none", "compile", "difforge"}


@pytest.mark.slow
def test_compare_writes_chart_and_images(compare_run: dict[str, Any]) -> None:
    tmp = compare_run["tmp"]
    chart = tmp / "x.png"
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    for compiler in ("none", "compile", "difforge"):
        assert (tmp / f"img-{compiler}.png").read_bytes()[:8] == PNG_SIGNATURE
    files = [f for r in compare_run["data"]["results"] for f in r["image_files"]]
    assert len(files) == 3


@pytest.mark.slow
def test_rare_resolutions_report_recompiles(
    cpu_only: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rare.json"
    # The VAE stays eager: the sweep's bookkeeping is what is tested here, and the
    # decoder's CPU compiles doubled the test's time (its dynamic sizes: test_dynamic*.py).
    argv = ["--compiler", "nexfort", "--run_rare_resolutions", "--no-text-encoders"]
    argv += ["--steps", "2", "--warmups", "1", "--runs", "1", "--no-progress"]
    argv += ["--eager-components", "vae"]
    assert bench.main([*argv, "--output-json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["compiler"] == "difforge"
    sizes = result["resolutions"]
    assert [s["requested"] for s in sizes] == ["960x720", "544x408"]
    for s in sizes:
        assert s["kind"] == "rare" and s["error"] is None
        assert isinstance(s["recompiles"], int) and s["recompiles"] >= 0
        assert s["first_run_s"] > 0 and s["run_s"] > 0
    # A new size makes Dynamo compile at least once (then shapes become dynamic).
    assert sizes[0]["recompiles"] >= 1
    assert "recompiles" in capsys.readouterr().out


def test_compare_specialized_flag(cpu_only: None) -> None:
    assert parse_args([]).specialized is None
    c = parse_args(["--run_rare_resolutions", "--compare-specialized"])
    assert c.specialized == ()
    assert measure.specialized_sizes(c) == list(RARE_RESOLUTIONS)
    c = parse_args(["--run_rare_resolutions", "--compare_specialized", "544x408"])
    assert measure.specialized_sizes(c) == [(544, 408)]
    with pytest.raises(BenchError, match="add --run_multiple_resolutions"):
        parse_args(["--compare-specialized"])
    with pytest.raises(BenchError, match="1024x1024 is not a swept size"):
        parse_args(["--run_rare_resolutions", "--compare-specialized", "1024x1024"])


@pytest.mark.slow
def test_o2_sweep_compares_with_specialised_compiles(
    cpu_only: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """O2 + dynamic: after the warm-up no sweep size recompiles; a specialised
    (dynamic=False) pipeline is compiled and timed at the chosen size."""
    out = tmp_path / "spec.json"
    argv = ["--compiler", "difforge", "--compiler-config", '{"mode": "O2", "dynamic": true}']
    argv += ["--run_rare_resolutions", "--compare-specialized", "960x720", "--no-text-encoders"]
    argv += ["--steps", "2", "--warmups", "1", "--runs", "2", "--no-progress"]
    argv += ["--eager-components", "vae"]  # as in test_rare_resolutions_report_recompiles
    assert bench.main([*argv, "--output-json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert "ignores=['vae']" in result["how"]
    sizes = result["resolutions"]
    # Both sizes reuse the warm-up's graphs (the VAE decoder, which at 32x32 may compile
    # once more on the CPU for its conv-backend choice, is eager here).
    assert sizes[0]["recompiles"] == 0 and sizes[1]["recompiles"] == 0
    first, second = sizes
    assert first["specialized_run_s"] > 0 and first["specialized_graphs"] >= 1
    assert first["vs_specialized"] == pytest.approx(first["run_s"] / first["specialized_run_s"])
    # Both sides are medians of --runs timed calls, and neither compiled while timed.
    assert len(first["runs_s"]) == 2 and len(first["specialized_runs_s"]) == 2
    assert first["run_s"] == pytest.approx(statistics.median(first["runs_s"]))
    assert first["recompiles_in_timed_runs"] == 0
    assert first["specialized_recompiles_in_timed_runs"] == 0
    assert second["specialized_run_s"] is None and second["vs_specialized"] is None
    printed = capsys.readouterr().out
    assert "specialised (dynamic=False)" in printed and "dynamic/specialised" in printed


def test_readme_step_table_is_generated_from_committed_results() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "step_table.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_step_measurement_on_tiny_pixart() -> None:
    """difforge.bench.step (behind bench_step.py and quality_report.py): eager is the
    float32 reference itself, a compiled variant matches it, each has its timings."""
    from difforge.bench.step import bench_model, parse_args

    args = parse_args(
        [
            "--models",
            "tiny-pixart",
            "--variants",
            "eager,compile,O1",
            "--height",
            "64",
            "--width",
            "64",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--dtype",
            "float32",
        ]
    )
    results = {r.variant: r for r in bench_model("tiny-pixart", args, torch.device("cpu"), {})}
    assert set(results) == {"eager", "compile", "O1"}
    assert all(r.error is None and r.median_ms and r.median_ms > 0 for r in results.values())
    assert results["eager"].rel_err_vs_fp32 == 0.0
    assert results["O1"].rel_err_vs_fp32 is not None and results["O1"].rel_err_vs_fp32 < 1e-5
    assert all(r.spread == r.median_ms / r.min_ms >= 1.0 for r in results.values())
    # Each variant says which difforge rewrites fired for it: none for stock compile.
    assert results["compile"].pass_counts == {} and results["eager"].pass_counts == {}
    assert results["O1"].pass_counts or results["O1"].fx_cache_hits
    fastest_compile = results["compile"].min_ms
    for r in results.values():
        assert r.speedup_vs_compile_min == pytest.approx(fastest_compile / r.min_ms)


@pytest.mark.parametrize(
    "variant,mode",
    [
        ("compile", None),
        ("compile-max-autotune", "max-autotune-no-cudagraphs"),
        ("compile-cudagraphs", "reduce-overhead"),
    ],
)
def test_step_stock_variants_are_plain_torch_compile(
    monkeypatch: pytest.MonkeyPatch, variant: str, mode: str | None
) -> None:
    """Stock variants are torch.compile with their mode and no difforge options (the
    cudagraph-trees one is the control for O2's graphs: same kernels, no gaps)."""
    from difforge.bench import step

    calls: list[tuple[nn.Module, str | None]] = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: calls.append((m, mode)) or m)
    module = nn.Linear(2, 2)
    assert step._compile(module, variant, {}, "tiny-pixart") is module
    assert calls == [(module, mode)]


def test_a_host_bound_baseline_is_called_out() -> None:
    """The seventeenth session's SDXL run: stock compile's median 47.91 ms against a
    37.32 ms minimum made O3 look 1.56x; the report must say that baseline is unfair."""
    from difforge.bench.step import VariantResult, noisy_baselines

    def result(variant: str, median: float, low: float) -> VariantResult:
        r = VariantResult("sdxl-base", variant, 1.0, median, low, None, None, None)
        r.spread = median / low
        return r

    steady = [result("compile", 37.62, 34.23), result("O2", 32.64, 32.24)]
    assert noisy_baselines(steady) == []
    noisy = [result("compile", 47.91, 37.32), result("O3", 30.69, 30.09)]
    (note,) = noisy_baselines(noisy)
    assert note.startswith("sdxl-base compile: median 47.91 ms is 1.28x its minimum 37.32")
    # A slow difforge variant is not a baseline: no note for it.
    assert noisy_baselines([result("O3", 40.0, 30.0)]) == []


def test_step_first_size_compiles_dynamic_variants_elsewhere_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--first-size: a dynamic variant's compiling call is at another size, and the measured
    size then runs on the same graph; a static variant compiles at the measured size only."""
    from difforge.bench import step
    from difforge.bench.step import bench_model, parse_args

    first_latents: dict[str, tuple[int, ...]] = {}
    real = step._compile

    def spy(module, variant, extra, preset_name):  # type: ignore[no-untyped-def]
        fn = real(module, variant, extra, preset_name)
        label = variant.partition("=")[0]

        def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
            latents = next(
                v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() == 4
            )
            first_latents.setdefault(label, tuple(latents.shape))
            return fn(*args, **kwargs)

        return recorded

    monkeypatch.setattr(step, "_compile", spy)

    argv = ["--models", "tiny-pixart", "--height", "64", "--width", "64", "--warmup", "0"]
    argv += ["--iters", "1", "--dtype", "float32", "--first-size", "48x80", "--variants"]
    argv += ['static={"mode": "O1"};dyn={"mode": "O1", "dynamic": true}']
    results = {
        r.variant: r for r in bench_model("tiny-pixart", parse_args(argv), torch.device("cpu"), {})
    }
    assert results["dyn"].error is None and results["dyn"].first_size == [48, 80]
    assert results["dyn"].graphs == 1 and results["dyn"].rel_err_vs_fp32 < 1e-5
    assert results["static"].first_size is None and results["static"].graphs == 1
    # the first call's latents: 48x80 pixels -> 6x10 for the dynamic variant, 64x64 -> 8x8
    assert first_latents["dyn"][-2:] == (6, 10) and first_latents["static"][-2:] == (8, 8)
    with pytest.raises(SystemExit):
        parse_args(["--first-size", "1024"])


def test_step_variants_each_start_from_the_built_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels_last variant re-lays the shared module's conv weights in place; the next
    variant (here stock compile, then a 'preserve' one) must see the preset's NCHW weights."""
    from difforge.bench import step

    seen: list[tuple[str, bool]] = []
    real = step._compile

    def spy(module, variant, extra, preset_name):  # type: ignore[no-untyped-def]
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        seen.append((variant.partition("=")[0], conv.weight.is_contiguous()))
        return real(module, variant, extra, preset_name)

    monkeypatch.setattr(step, "_compile", spy)
    argv = ["--models", "tiny-sdxl", "--height", "64", "--width", "64", "--warmup", "0"]
    argv += ["--iters", "1", "--dtype", "float32", "--no-fp32-reference", "--variants"]
    argv += ['cl={"mode": "O1", "memory_format": "channels_last"};eager;keep={"mode": "O1"}']
    results = step.bench_model("tiny-sdxl", step.parse_args(argv), torch.device("cpu"), {})
    assert all(r.error is None for r in results)
    assert seen == [("cl", True), ("eager", True), ("keep", True)]


def test_a_variant_that_fuses_the_module_leaves_the_next_an_unfused_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fuse_qkv.modules (on in O2) fuses the shared module in place: a variant after it
    (here O2 without the fusion, then stock compile) must get a fresh, unfused build."""
    from difforge.bench import step

    seen: list[tuple[str, bool]] = []
    real = step._compile

    def spy(module, variant, extra, preset_name):  # type: ignore[no-untyped-def]
        fused = any(hasattr(m, "to_qkv") for m in module.modules())
        seen.append((variant.partition("=")[0], fused))
        return real(module, variant, extra, preset_name)

    monkeypatch.setattr(step, "_compile", spy)
    argv = ["--models", "tiny-pixart", "--height", "64", "--width", "64", "--warmup", "0"]
    argv += ["--iters", "1", "--dtype", "float32", "--variants"]
    argv += ['fm={"mode": "O1", "fuse_qkv.modules": true};O1;compile']
    results = step.bench_model("tiny-pixart", step.parse_args(argv), torch.device("cpu"), {})
    assert all(r.error is None for r in results)
    assert seen == [("fm", False), ("O1", False), ("compile", False)]
    # the fused variant computed the same function
    assert results[0].rel_err_vs_fp32 is not None and results[0].rel_err_vs_fp32 < 1e-5


def test_compile_phases_reports_dynamos_timers_for_one_cold_compile(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_phases.py"
    spec = importlib.util.spec_from_file_location("compile_phases", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "phases.json"
    argv = ["--model", "tiny-pixart", "--options", '{"mode": "O1"}', "--height", "64"]
    assert module.main([*argv, "--width", "64", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    phases = result["phases_s"]
    assert result["first_call_s"] > 0
    # the compile happened in this call: Dynamo timed its tracing and Inductor's codegen
    assert phases["bytecode_tracing"] > 0 and phases["_compile.compile_inner"] > 0
    assert phases["_compile.compile_inner"] <= result["first_call_s"]


@pytest.mark.slow
def test_diag_dynamic_kernels_compares_one_block_and_keeps_its_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/diag_dynamic_kernels.py on the CPU: one UNet transformer block, static and
    dynamic (first called elsewhere), one graph each, each variant's generated code kept; the
    logging and cache settings it changes are put back."""
    import importlib.util
    import re

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "diag_dynamic_kernels.py"
    spec = importlib.util.spec_from_file_location("diag_dynamic_kernels", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    from torch._inductor.codecache import output_code_log

    from difforge.bench.output_code import CodeLog

    propagate = output_code_log.propagate
    argv = ["--model", "tiny-sdxl", "--block", "down_blocks.1.attentions.0", "--iters", "2"]
    result = module.main([*argv, "--height", "96", "--width", "64", "--first-size", "64x48"])
    static, dynamic = result["variants"]["static"], result["variants"]["dynamic"]
    assert static["graphs"] == dynamic["graphs"] == 1
    static_code = (tmp_path / static["code"]).read_text()
    dynamic_code = (tmp_path / dynamic["code"]).read_text()
    assert "def call(" in static_code and "def call(" in dynamic_code
    # the dynamic graph takes its sizes as arguments; the static one has none
    assert re.search(r"\bs\d+ = arg", dynamic_code) and not re.search(r"\bs\d+ = arg", static_code)
    assert (tmp_path / "diag_dynamic_denoiser_down_blocks_1_attentions_0.json").exists()
    assert output_code_log.propagate == propagate
    assert not any(isinstance(h, CodeLog) for h in output_code_log.handlers)
    assert torch._inductor.config.force_disable_caches is False
