"""Quality report per model and mode: how far each mode's output is from the reference.

For each model and mode, once on the preset's random weights and once with planted outlier
channels (a few input columns of every denoiser linear scaled by --outlier-factor, as
trained weights have and random ones lack):

- one denoising step: relative error ``||out - ref|| / ||ref||`` against the same module
  in float32 eager (``benchmarks/bench_step.py``'s measurement), and its median time;
- a full generation (--steps, same seed, weights and inputs): PSNR of the decoded image
  and of the final latents against eager in the run's dtype (the text-to-image
  benchmark's measurement; latent PSNR takes the eager latents' max - min as the peak),
  and the generation's median time.

Modes: ``eager`` (the reference of the generation), ``compile`` (stock torch.compile),
any difforge mode string (``O2``, ``O3``, ...), ``fp8`` (the denoiser's linears
quantized to fp8 by ``quantize_pipe``, run eagerly: the quantization's error alone; tiny
presets quantize every linear the name rules allow, full ones what ``O3`` would), and
``fp32`` (the same pipeline converted to float32 and run eagerly, same seed, weights and
prompt embeddings: how far the run's own dtype is from float32 over a generation, the
yardstick for every other row; no step row, as the step's reference is float32 already). On a
machine without fp8 GEMMs (any CPU) ``O3`` swaps nothing and ``fp8`` runs through the
float32 reference path: a CPU run checks the machinery, it is no quality claim for a GPU.

    python benchmarks/quality_report.py --models pixart-xl-2-1024,sd3-medium \
        --output-json out/quality.json
    python benchmarks/quality_report.py --models tiny-pixart   # CPU, about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from difforge.bench import args as bench_args
from difforge.bench import step as bench_step
from difforge.bench.args import default_model
from difforge.bench.compilers import PipelineSnapshot
from difforge.bench.measure import (
    REFERENCE,
    CompilerResult,
    Progress,
    compare_to_reference,
    quiet_repeated_logs,
    run_compiler,
)
from difforge.bench.pipeline import Workload, build_workload
from difforge.bench.report import environment, format_psnr, write_json
from difforge.diffusers.presets import get_preset
from difforge.diffusers.quantize import quant_report, quantize_pipe
from difforge.errors import OptionsError
from difforge.options import parse_options

DEFAULT_MODES = ("eager", "compile", "O2", "O3", "fp8", "fp32")
STOCK = {"eager": "none", "compile": "compile"}
FP32 = "fp32"  # the eager pipeline in float32: see the module docstring
DEFINITIONS = {
    "step_rel_err_vs_fp32": "||out - ref|| / ||ref|| of one denoiser call, ref = the same "
    "module (same weights, planted outliers included) in float32 eager",
    "psnr_db": "PSNR of the decoded image ([0, 1], peak 1) against eager in the run's dtype, "
    "same seed, weights and inputs; null when identical or for eager itself",
    "latent_psnr_db": "PSNR of the final latents (after the last scheduler step, before the "
    "VAE) against eager's, peak = eager's latents max - min; null when identical or for "
    "eager itself",
    "fp32": "the same pipeline (weights, embeddings) converted to float32 and run eagerly: "
    "its PSNR is the run dtype's own distance from float32 over the generation",
    "outliers": "null: the preset's random weights; else a few input columns of every "
    "denoiser nn.Linear multiplied by factor (difforge.bench.outliers.plant_outliers)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default=default_model(),
        help="comma-separated presets (default: pixart-xl-2-1024 with a GPU, tiny-pixart without)",
    )
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated: eager, compile, fp8, or a difforge mode string such as O2, O3 "
        f"or max-optimize:cudagraphs (default: {','.join(DEFAULT_MODES)}); eager always runs "
        "as the generation's reference",
    )
    p.add_argument("--steps", type=int, default=20, help="generation steps (default: 20)")
    p.add_argument(
        "--outlier-factor",
        type=float,
        default=30.0,
        help="factor of the planted outlier columns (default: 30; 0: no planted runs)",
    )
    p.add_argument(
        "--weights",
        choices=("both", "built", "outliers"),
        default="both",
        help="which weight sets: the preset's as built, with planted outliers, or both (the "
        "default); one set per command keeps a large model within a time limit",
    )
    p.add_argument(
        "--outlier-channels",
        type=int,
        default=4,
        help="input columns per linear that get outliers (default: 4)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(bench_args.DTYPES),
        help="default: the preset's on a GPU, float32 on the CPU",
    )
    p.add_argument("--height", type=int, help="default: the model's")
    p.add_argument("--width", type=int, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        type=int,
        default=3 if on_gpu else 1,
        help="timed generations per mode (default: 3 with a GPU, 1 without); one untimed "
        "run more gives the image and latents",
    )
    p.add_argument(
        "--step-iters",
        type=int,
        default=10 if on_gpu else 1,
        help="timed single steps per mode (default: 10 with a GPU, 1 without)",
    )
    p.add_argument(
        "--eager-components",
        metavar="LIST",
        default="",
        help="pipeline components every mode leaves eager, e.g. vae (text_to_image.py's flag): "
        "the denoiser alone then decides the PSNR, and a large model's report spends no device "
        "time compiling its VAE (FLUX's O3 generation took 202 s to its first image on an "
        "H100, the denoiser's and the VAE's compiles together)",
    )
    p.add_argument("--output-json", type=Path)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.models or not args.modes:
        p.error("--models and --modes need at least one entry")
    if len(set(args.modes)) != len(args.modes):
        p.error(f"--modes names a mode twice: {args.modes}")
    for mode in args.modes:
        if mode not in (*STOCK, "fp8", FP32):
            difforge_options(mode)  # an unknown mode fails now, not after minutes
    if args.steps < 1 or args.runs < 1 or args.step_iters < 1 or args.outlier_channels < 1:
        p.error("--steps, --runs, --step-iters and --outlier-channels must be positive")
    if args.outlier_factor < 0:
        p.error("--outlier-factor must be >= 0")
    if args.weights == "outliers" and not args.outlier_factor:
        p.error("--weights outliers needs a positive --outlier-factor")
    return args


def difforge_options(mode: str) -> str:
    """The compile_pipe options (JSON) of a difforge mode, validated."""
    options = json.dumps({"mode": mode})
    try:
        parse_options(options)
    except OptionsError as e:
        raise SystemExit(f"quality_report: --modes {mode!r}: {e}") from None
    return options


# ------------------------------------------------------------------------ one step


def measure_steps(
    model: str, args: argparse.Namespace, factor: float | None, device: torch.device
) -> dict[str, Any]:
    """bench_step's measurement of every mode on one model: variant label -> result."""
    variants = [m for m in args.modes if m != FP32]
    if not variants:
        return {}
    argv = ["--models", model, "--variants", ",".join(variants)]
    argv += ["--warmup", "0" if device.type == "cpu" else "3", "--iters", str(args.step_iters)]
    argv += ["--outlier-channels", str(args.outlier_channels)]
    if factor is not None:
        argv += ["--plant-outliers", str(factor)]
    if args.dtype:
        argv += ["--dtype", str(bench_args.DTYPES[args.dtype]).removeprefix("torch.")]
    if args.height:
        argv += ["--height", str(args.height)]
    if args.width:
        argv += ["--width", str(args.width)]
    ns = bench_step.parse_args(argv)
    if not args.height or not args.width:
        # bench_step's own default is 1024 or 64 px; use the preset's size instead.
        preset = get_preset(model)
        ns.height = args.height or preset.default_height
        ns.width = args.width or preset.default_width
    ns.variants = variants  # a mode string may contain commas or colons
    return {r.variant: r for r in bench_step.bench_model(model, ns, device, {})}


# ---------------------------------------------------------------------- generation


def _bench_config(
    model: str, args: argparse.Namespace, factor: float | None, device: torch.device
) -> bench_args.BenchConfig:
    argv = ["--model", model, "--steps", str(args.steps), "--seed", str(args.seed)]
    argv += ["--warmups", "1", "--runs", str(args.runs), "--device", str(device)]
    argv += ["--outlier-channels", str(args.outlier_channels)]
    # Random prompt embeddings: the text encoders are no part of what the modes change.
    argv += ["--no-text-encoders", "--no-progress"]
    if factor is not None:
        argv += ["--plant-outliers", str(factor)]
    if args.eager_components:
        argv += ["--eager-components", args.eager_components]
    for flag in ("dtype", "height", "width"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    return bench_args.parse_args(argv)


def _run_fp8(
    workload: Workload, model: str, config: bench_args.BenchConfig, progress: Progress
) -> CompilerResult:
    """quantize_pipe with bench_step's fp8 filter, then the eager pipeline."""
    chosen = bench_step.fp8_filter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "fp8 GEMM not available" on CPU
        quantize_pipe(
            workload.pipe,
            min_features=chosen.min_features,
            min_weight_elements=chosen.min_weight_elements,
        )
    report = quant_report(workload.pipe)
    result = run_compiler(workload, "none", config, progress)
    result.how = f"quantize_pipe ({len(report.converted) if report else 0} fp8 linears), eager"
    return result


def measure_generations(
    model: str,
    args: argparse.Namespace,
    factor: float | None,
    device: torch.device,
    progress: Progress,
) -> tuple[dict[str, CompilerResult], dict[str, Any]]:
    """Every mode's full generation on one pipeline; mode -> result (compared with eager),
    and the workload's description."""
    config = _bench_config(model, args, factor, device)
    workload = build_workload(config)
    snapshot = PipelineSnapshot(workload.pipe)
    results: dict[str, CompilerResult] = {}
    # Eager first: it is the reference the others are compared with.
    for mode in ["eager", *(m for m in args.modes if m not in ("eager", FP32))]:
        progress.phase(f"{model}: {mode}")
        try:
            if mode in STOCK:
                result = run_compiler(workload, STOCK[mode], config, progress)
            elif mode == "fp8":
                result = _run_fp8(workload, model, config, progress)
            else:
                mode_config = dataclasses.replace(config, compiler_config=difforge_options(mode))
                result = run_compiler(workload, "difforge", mode_config, progress)
        finally:
            snapshot.restore()  # the next mode starts from the original modules
        # compare_to_reference finds the reference by the name "none".
        result.compiler = "none" if mode == "eager" else mode
        results[mode] = result
    description = workload.describe()
    if FP32 in args.modes:  # last: it converts the pipeline in place
        progress.phase(f"{model}: {FP32}")
        results[FP32] = _run_fp32(workload, config, progress)
        results[FP32].compiler = FP32
    compare_to_reference(list(results.values()))
    del workload, snapshot
    gc.collect()
    return results, description


def _run_fp32(
    workload: Workload, config: bench_args.BenchConfig, progress: Progress
) -> CompilerResult:
    """The workload's pipeline converted to float32 in place (the run dtype's weights and
    prompt embeddings, exactly, in float32), run eagerly. A rebuilt float32 pipeline would
    not do: presets draw their random weights per dtype."""
    workload.pipe.to(torch.float32)
    prompt = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in workload.prompt_kwargs.items()
    }
    fp32 = dataclasses.replace(workload, dtype=torch.float32, prompt_kwargs=prompt)
    result = run_compiler(fp32, "none", dataclasses.replace(config, dtype=torch.float32), progress)
    result.how = "eager, float32"
    return result


# ---------------------------------------------------------------------------- report


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def row_json(
    model: str,
    mode: str,
    outliers: dict[str, Any] | None,
    step: Any | None,
    gen: CompilerResult | None,
) -> dict[str, Any]:
    """One (model, outliers, mode) entry of the JSON."""
    errors = [e for e in (step.error if step else None, gen.error if gen else None) if e]
    return {
        "model": model,
        "mode": mode,
        "outliers": outliers,
        "step": None
        if step is None
        else {
            "rel_err_vs_fp32": step.rel_err_vs_fp32,
            "median_ms": step.median_ms,
            "compile_s": step.compile_s,
            "fp8_linears": step.fp8_linears,
            "error": step.error,
        },
        "generation": None
        if gen is None
        else {
            "how": gen.how,
            "image_match": gen.image_match,
            "psnr_db": _finite(gen.psnr_db),
            "latent_psnr_db": _finite(gen.latent_psnr_db),
            "max_abs_diff": gen.max_abs_diff,
            "inference_s": gen.inference_s,
            "first_run_s": gen.first_run_s,
            "error": gen.error,
        },
        "error": "; ".join(errors) or None,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], gens: list[CompilerResult | None]) -> str:
    """One line per (model, outliers, mode); PSNRs from the results (inf = identical)."""
    table = []
    for row, gen in zip(rows, gens, strict=True):
        step, out = row["step"] or {}, row["outliers"]
        ref = gen is not None and gen.image_match == REFERENCE
        table.append(
            [
                row["model"],
                "none" if out is None else f"{out['factor']:g}x, {out['channels']} ch",
                row["mode"],
                _fmt(step.get("rel_err_vs_fp32"), ".2e"),
                _fmt(step.get("median_ms"), ".2f"),
                format_psnr(gen.psnr_db if gen else None, ref),
                format_psnr(gen.latent_psnr_db if gen else None, ref),
                _fmt(gen.inference_s if gen else None, ".3f"),
                step.get("fp8_linears") or 0,
                row["error"] or "",
            ]
        )
    headers = [
        "model",
        "outliers",
        "mode",
        "step rel err vs fp32",
        "step ms",
        "image PSNR dB",
        "latent PSNR dB",
        "generation s",
        "fp8 linears",
        "error",
    ]
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def weight_sets(weights: str, outlier_factor: float) -> list[float | None]:
    """The runs' outlier factors: None for the preset's weights as built, then the planted
    factor (``--weights both``, the default; no planted run with factor 0)."""
    sets: list[float | None] = []
    if weights in ("both", "built"):
        sets.append(None)
    if weights in ("both", "outliers") and outlier_factor:
        sets.append(outlier_factor)
    return sets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    factors = weight_sets(args.weights, args.outlier_factor)
    rows: list[dict[str, Any]] = []
    gens: list[CompilerResult | None] = []
    workloads: dict[str, Any] = {}
    # Pipeline calls: per model, planting and mode (eager always), compile + timed + quality.
    modes = len({"eager", *args.modes})
    progress = Progress(len(args.models) * len(factors) * modes * (args.runs + 2), args.progress)
    try:
        with quiet_repeated_logs():
            for model in args.models:
                for factor in factors:
                    steps = measure_steps(model, args, factor, device)
                    generations, described = measure_generations(
                        model, args, factor, device, progress
                    )
                    outliers = described["planted_outliers"]
                    workloads[f"{model}, outliers {factor or 'none'}"] = described
                    for mode in args.modes:
                        gen = generations.get(mode)
                        rows.append(row_json(model, mode, outliers, steps.get(mode), gen))
                        gens.append(gen)
                    if args.output_json is not None:  # partial results survive a crash
                        _write(args, env, workloads, rows, complete=False)
    finally:
        progress.close()
    if args.output_json is not None:
        _write(args, env, workloads, rows, complete=True)
        print(f"results: {args.output_json}")
    print()
    print(markdown_table(rows, gens))
    return 1 if any(r["error"] for r in rows) else 0


def _write(
    args: argparse.Namespace,
    env: dict[str, Any],
    workloads: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    complete: bool,
) -> None:
    write_json(
        args.output_json,
        {
            "benchmark": "quality_report",
            "environment": env,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "definitions": DEFINITIONS,
            "workloads": workloads,
            "complete": complete,
            "results": rows,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
