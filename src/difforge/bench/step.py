"""One denoising step (or one VAE decode) per model: the measurement behind
``benchmarks/bench_step.py`` and ``benchmarks/quality_report.py``.

Everything for one model runs in one process on the same weights and inputs: compile
time (first call) apart from run time (median of CUDA-event timings after warm-up),
achieved TFLOP/s, peak memory, relative error against a float32 eager reference, and,
with ``profile``, where the kernel time goes (attention / GEMM / conv / elementwise /
other / idle gaps between kernels). ``plant_outliers`` scales a few input columns of every
denoiser linear (the same ones in the float32 reference), as trained weights have.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

import difforge
from difforge.bench.args import default_model
from difforge.bench.outliers import plant_outliers
from difforge.bench.telemetry import GpuTelemetry
from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import (
    StepCall,
    VaeDecode,
    denoiser_step_inputs,
    vae_decode_inputs,
)
from difforge.fused_projections import fuse_qkv_projections, quantize_fused
from difforge.kernels import attention_select
from difforge.memory_format import apply_memory_format, convert_conv_weights
from difforge.quant import Fp8Linear, ModuleFilter
from difforge.quant.auto import swap_report

# Kernel-name fragments per category (cuDNN/flash/efficient attention, cuBLAS/CUTLASS/
# Triton GEMM templates, cuDNN/Triton convs); what is left and starts with triton_ is
# Inductor's fused elementwise/reduction code.
_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_mha", "mha_")),
    (
        "gemm",
        (
            "gemm",
            "cutlass",
            "xmma",
            "nvjet",
            "cublas",
            "_mm_",
            "mm_kernel",
            "matmul",
            "tem_fused_mm",
            "addmm",
            "bmm",
        ),
    ),
    ("conv", ("conv", "implicit_gemm", "winograd", "dgrad", "wgrad", "fprop")),
    (
        "elementwise",
        ("triton_", "elementwise", "vectorized", "reduce", "layer_norm", "group_norm", "softmax"),
    ),
)


@dataclass
class VariantResult:
    """One (model, variant) measurement."""

    model: str
    variant: str
    compile_s: float | None
    """The first call's time in this process: a later variant reuses the Triton kernels,
    autotuning results and FX graphs that earlier ones compiled (``fx_cache_hits`` counts
    the last), so compare it within one variant order only; cold times come from
    ``benchmarks/bench_compile.py`` (a fresh process and cache per case)."""
    median_ms: float | None
    min_ms: float | None
    tflops: float | None
    peak_mem_gib: float | None
    rel_err_vs_fp32: float | None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    speedup_vs_compile_min: float | None = None
    """Stock compile's fastest step over this variant's: the ratio that a host-bound
    baseline (see ``spread``) does not inflate."""
    spread: float | None = None
    """Median over minimum of the timed steps: near 1 when the GPU sets the pace, well
    above it when the host does (a baseline launching every kernel from Python on a busy
    CPU), which makes ratios against this variant's median unreliable."""
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    top_kernels: list[tuple[str, str, float, int]] = field(default_factory=list)
    error: str | None = None
    options: dict[str, Any] | None = None
    fp8_linears: int | None = None
    """Linears the variant swapped to fp8 (low-precision/O3, ``quant.fp8_linear``, or the
    ``fp8`` variant)."""
    first_size: list[int] | None = None
    """[height, width] of the compiling first call when it was not the measured size
    (``--first-size``, dynamic variants only)."""
    graphs: int | None = None
    """Graphs Dynamo compiled for the variant (a dynamic one: 1 per model, however many
    sizes it was called at)."""
    attention_8bit: list[dict[str, Any]] = field(default_factory=list)
    """What the attention_int8 pass measured per attention shape (SDPA vs the best 8-bit
    tile) and chose; empty when the pass was off or saw no eligible call."""
    pass_counts: dict[str, int] = field(default_factory=dict)
    """difforge counters (rewrites per pass, etc.) bumped while the variant compiled and
    ran its first call. The fx-stage passes run at every compile; the post-grad ones do not
    run again for a graph Inductor loads from its FX graph cache (``fx_cache_hits``), so
    theirs are missing then."""
    fx_cache_hits: int = 0
    """Graphs Inductor took from its FX graph cache for this variant."""
    gpu_telemetry: dict[str, Any] | None = None
    """SM clock, board power and temperature sampled over the warm-up, timed and profiled
    steps (:class:`difforge.bench.telemetry.TelemetrySummary`); None off CUDA or without
    ``nvidia-smi``. A gap-free variant can run the same kernels at a lower clock."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_counters() -> tuple[dict[str, int], int]:
    """A snapshot of difforge's counters and Inductor's FX graph cache hits."""
    hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    return dict(difforge.counters), int(hits)


def _counter_delta(before: tuple[dict[str, int], int]) -> tuple[dict[str, int], int]:
    """What changed since ``before``: the counters that grew, and the new cache hits."""
    counts, hits = _compile_counters()
    grown = {k: v - before[0].get(k, 0) for k, v in sorted(counts.items())}
    return {k: v for k, v in grown.items() if v > 0}, hits - before[1]


def _time_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    return float((out - ref).norm() / ref.norm())


def _count_flops(module: nn.Module, call: StepCall) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(module)
    return float(counter.get_total_flops())


def _category(name: str) -> str:
    lowered = name.lower()
    # Inductor names its kernels after the ops they fuse ("triton_poi_fused_addmm_gelu",
    # "triton_poi_fused__scaled_dot_product_cudnn_attention_…" for a layout copy feeding
    # attention), so its own kernels are classified by prefix first: templates are GEMMs,
    # everything else it generates is elementwise/reduction work.
    if lowered.startswith("triton_tem"):
        return "gemm"
    if lowered.startswith(("triton_", "triton__")):
        return "elementwise"
    for category, fragments in _CATEGORIES:
        if any(f in lowered for f in fragments):
            return category
    return "other"


def _breakdown(
    fn: Callable[[], Any], device: torch.device, iters: int = 5, top: int = 60
) -> tuple[dict[str, float], list[tuple[str, str, float, int]]]:
    """Kernel time per category and idle time between kernels, per step (ms), and the
    ``top`` kernels by time as (category, name, ms per step, launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync(device)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    totals: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    intervals = []
    for e in kernels:
        cat = _category(e.name)
        ms = (e.time_range.end - e.time_range.start) / 1e3
        totals[cat] = totals.get(cat, 0.0) + ms
        per_kernel.setdefault(e.name, []).append(ms)
        intervals.append((e.time_range.start, e.time_range.end))
    intervals.sort()
    busy, span_start, span_end, cur_s, cur_e = 0.0, None, None, None, None
    for s, e in intervals:
        span_start = s if span_start is None else min(span_start, s)
        span_end = e if span_end is None else max(span_end, e)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    out = {k: v / iters for k, v in sorted(totals.items())}
    if span_start is not None:
        out["idle"] = ((span_end - span_start) - busy) / 1e3 / iters
    ranked = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    tops = [(_category(n), n[:160], sum(t) / iters, len(t) // iters) for n, t in ranked]
    return out, tops


def _attention_report() -> list[dict[str, Any]]:
    """The attention_int8 pass's per-shape measurements of the variant just run."""
    rows = []
    for key, m in attention_select.measurements.items():
        shape = key[1]
        rows.append(
            {
                "shape": [shape.batch, shape.heads, shape.seq_q, shape.seq_kv, shape.head_dim],
                "sdpa_ms": m.sdpa_ms,
                "best_8bit_ms": m.best_ms,
                "best_8bit_kernel_ms": m.kernel_ms,
                "rel_err_vs_sdpa": m.rel_err,
                "chosen": None if m.choice is None else m.choice.__dict__,
            }
        )
    return rows


def _variant_options(variant: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``"O2"`` -> mode O2; ``'label={"mode": "O2", ...}'`` -> those options (A/B of knobs)."""
    label, sep, spec = variant.partition("=")
    if sep:
        return {**extra, **difforge.options.load_options(spec)}
    return {"mode": label, **extra}


def fp8_filter(preset_name: str) -> ModuleFilter:
    """The linears the ``fp8`` variant quantizes: the ``low-precision`` swap's default
    filter, except on tiny presets, whose widths are all below its size thresholds (there
    every linear its name rules allow, so the fp8 numerics are exercised at all)."""
    if get_preset(preset_name).tiny:
        return ModuleFilter(min_features=0, min_weight_elements=0)
    return ModuleFilter()


#: Stock torch.compile variants of one step and their ``mode``. ``compile-cudagraphs``
#: (cudagraph trees) is the control for O2's CUDA graphs: a step replayed without gaps,
#: the same kernels as ``compile``, none of difforge's rewrites. (The pipeline benchmark
#: leaves CUDA graphs out of its stock baselines: see ``compilers.STOCK_MODES``.)
STOCK_STEP_MODES: dict[str, str | None] = {
    "compile": None,
    "compile-max-autotune": "max-autotune-no-cudagraphs",
    "compile-cudagraphs": "reduce-overhead",
}


def _compile(
    module: nn.Module, variant: str, extra: dict[str, Any], preset_name: str
) -> Callable[..., Any]:
    if variant == "eager":
        return module
    if variant == "fp8":
        # Quantization alone, run eagerly: fp8 linears (the float32 reference path where
        # this device has no fp8 GEMM), q/k/v fused first as quantize_pipe and O3 do. In
        # place: the caller rebuilds the module afterwards.
        quantize_fused(module, fp8_filter(preset_name), fuse_qkv_projections(module))
        return module
    if variant in STOCK_STEP_MODES:
        return torch.compile(module, mode=STOCK_STEP_MODES[variant])
    return difforge.compile(module, options=_variant_options(variant, extra))


def _step_call(
    name: str,
    target: str,
    size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
) -> StepCall:
    """The inputs of one step (or decode) of ``name`` at ``size`` = (height, width)."""
    preset = get_preset(name)
    height, width = size
    if target == "vae":
        return vae_decode_inputs(
            preset, batch=1, height=height, width=width, device=device, dtype=dtype
        )
    batch = args.batch or (1 if preset.family == "flux" else 2)
    return denoiser_step_inputs(
        preset, batch=batch, height=height, width=width, device=device, dtype=dtype
    )


def _build(
    name: str, target: str, dtype: torch.dtype, device: torch.device, args: argparse.Namespace
) -> tuple[nn.Module, StepCall]:
    preset = get_preset(name)
    call = _step_call(name, target, (args.height, args.width), dtype, device, args)
    if target == "vae":
        vae = build_component(preset, "vae", dtype=dtype, device=device)
        return VaeDecode(vae).eval(), call
    module = build_component(preset, preset.denoiser, dtype=dtype, device=device).eval()
    if args.plant_outliers:
        # Columns chosen by name and seed: every build (the float32 reference too) gets
        # the same outliers.
        plant_outliers(module, args.plant_outliers, channels=args.outlier_channels)
    return module, call


def _cast_call(call: StepCall, dtype: torch.dtype) -> StepCall:
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v

    return StepCall(tuple(cast(a) for a in call.args), {k: cast(v) for k, v in call.kwargs.items()})


def _structure(module: Any) -> list[tuple[str, type]]:
    """Each submodule's name and type: what an in-place swap or fusion changes."""
    if not isinstance(module, nn.Module):
        return []
    return [(name, type(sub)) for name, sub in module.named_modules()]


def bench_model(
    spec: str, args: argparse.Namespace, device: torch.device, extra: dict[str, Any]
) -> list[VariantResult]:
    """All variants for one model spec: a preset name, or ``<preset>:vae`` for its decoder."""
    name, _, target = spec.partition(":")
    preset = get_preset(name)
    dtype = getattr(torch, args.dtype) if args.dtype else preset.dtype
    if device.type == "cpu" and not args.dtype:
        dtype = torch.float32
    module, call = _build(name, target or "denoiser", dtype, device, args)
    # Dynamic variants compile at --first-size, as a service warmed up at another size does:
    # Inductor tunes a dynamic graph's kernels for the sizes it first sees.
    first_call = call
    if args.first_size is not None:
        first_call = _step_call(name, target or "denoiser", args.first_size, dtype, device, args)

    reference = None
    if args.fp32_reference and dtype == torch.float32:
        with torch.no_grad():  # the module itself is the float32 reference
            reference = _first_tensor(call(module)).float().clone()
    elif args.fp32_reference:
        # Same weights in float32: the reference that eager's own error is measured against.
        ref_module = _build(name, target or "denoiser", torch.float32, device, args)[0]
        with torch.no_grad():
            reference = _first_tensor(_cast_call(call, torch.float32)(ref_module)).float()
        del ref_module
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    flops = _count_flops(module, call)

    results = []
    structure = _structure(module)
    for variant in args.variants:
        torch._dynamo.reset()
        if isinstance(module, nn.Module):
            # A channels_last variant re-lays the shared module's conv weights in place and
            # hooks its inputs; every variant starts from the layout the preset built.
            apply_memory_format(module, "preserve")
            convert_conv_weights(module, "contiguous")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        label = variant.partition("=")[0]
        result = VariantResult(spec, label, None, None, None, None, None, None)
        if label not in ("eager", "fp8", *STOCK_STEP_MODES):
            result.options = _variant_options(variant, extra)
        fn = None
        attention_select.measurements.clear()
        try:
            fn = _compile(module, variant, extra, name)
            dynamic = bool(result.options and result.options.get("dynamic") is True)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            before = _compile_counters()
            with torch.no_grad():
                _sync(device)
                t0 = time.perf_counter()
                if dynamic and first_call is not call:
                    first_call(fn)
                    result.first_size = list(args.first_size)
                # Clone: a CUDA-graph replay reuses its output buffers on the next call.
                out = _first_tensor(call(fn)).clone()
                _sync(device)
                result.compile_s = time.perf_counter() - t0
                result.graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
                result.pass_counts, result.fx_cache_hits = _counter_delta(before)
                with GpuTelemetry(device) as telemetry:
                    for _ in range(args.warmup):
                        call(fn)
                    times = _time_ms(lambda fn=fn: call(fn), device, args.iters)
                    if args.profile and device.type == "cuda":
                        result.breakdown_ms, result.top_kernels = _breakdown(
                            lambda fn=fn: call(fn), device
                        )
                summary = telemetry.summary()
                result.gpu_telemetry = asdict(summary) if summary is not None else None
            result.median_ms = statistics.median(times)
            result.min_ms = min(times)
            result.spread = result.median_ms / result.min_ms
            result.tflops = flops / (result.median_ms * 1e-3) / 1e12
            if device.type == "cuda":
                result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if reference is not None:
                result.rel_err_vs_fp32 = _rel_err(out.float(), reference)
        except Exception as exc:  # one failing variant must not hide the others' numbers
            result.error = f"{type(exc).__name__}: {str(exc)[:500]}"
        result.attention_8bit = _attention_report()
        results.append(result)
        swapped = swap_report(module) if isinstance(module, nn.Module) else None
        fp8_modules = sum(isinstance(m, Fp8Linear) for m in module.modules())
        if swapped is not None or fp8_modules:
            result.fp8_linears = len(swapped.converted) if swapped is not None else fp8_modules
        if _structure(module) != structure:
            # The variant changed the module in place (the fp8 swap, the fp8 variant, a q/k/v
            # fusion such as fuse_qkv.modules): later variants get a fresh build (the same
            # seeded weights), never the changed one.
            del fn, module
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            module = _build(name, target or "denoiser", dtype, device, args)[0]
        print(_row(result), flush=True)
    by_variant = {r.variant: r for r in results if r.median_ms}
    for r in results:
        if r.median_ms and "eager" in by_variant:
            r.speedup_vs_eager = by_variant["eager"].median_ms / r.median_ms
        if r.median_ms and "compile" in by_variant:
            r.speedup_vs_compile = by_variant["compile"].median_ms / r.median_ms
            if r.min_ms and by_variant["compile"].min_ms:
                r.speedup_vs_compile_min = by_variant["compile"].min_ms / r.min_ms
    del module
    gc.collect()
    return results


#: Above this median/min spread a baseline's timings are called unreliable.
NOISY_SPREAD = 1.10


def noisy_baselines(results: list[VariantResult]) -> list[str]:
    """One line per ratio baseline (eager, compile) whose median is far above its minimum,
    saying what the ratios against it are worth."""
    notes = []
    for r in results:
        if r.variant in ("eager", "compile") and r.spread and r.spread > NOISY_SPREAD:
            notes.append(
                f"{r.model} {r.variant}: median {r.median_ms:.2f} ms is {r.spread:.2f}x its "
                f"minimum {r.min_ms:.2f} ms (host-bound or disturbed steps); ratios against "
                "its median are not fair: rerun, or read 'x compile (min)'"
            )
    return notes


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(r: VariantResult) -> str:
    if r.error:
        return f"{r.model:24s} {r.variant:22s} ERROR {r.error}"
    return (
        f"{r.model:24s} {r.variant:22s} compile {_fmt(r.compile_s, '.1f')} s  "
        f"step {_fmt(r.median_ms, '.2f')} ms  {_fmt(r.tflops, '.0f')} TFLOP/s  "
        f"err {_fmt(r.rel_err_vs_fp32, '.2e')}"
        + (f"  fp8 linears {r.fp8_linears}" if r.fp8_linears else "")
    )


def table(results: list[VariantResult]) -> str:
    rows = [
        [
            r.model,
            r.variant,
            _fmt(r.compile_s, ".1f"),
            _fmt(r.median_ms, ".2f"),
            _fmt(r.speedup_vs_eager, ".2f"),
            _fmt(r.speedup_vs_compile, ".2f"),
            _fmt(r.speedup_vs_compile_min, ".2f"),
            _fmt(r.spread, ".2f"),
            _fmt(r.tflops, ".0f"),
            _fmt(r.peak_mem_gib, ".1f"),
            _fmt(r.rel_err_vs_fp32, ".2e"),
            _fmt(r.gpu_telemetry["sm_clock_mhz"] if r.gpu_telemetry else None, ".0f"),
            r.error or "",
        ]
        for r in results
    ]
    headers = [
        "model",
        "variant",
        "compile s",
        "step ms",
        "x eager",
        "x compile",
        "x compile (min)",
        "median/min",
        "TFLOP/s",
        "peak GiB",
        "rel err",
        "SM MHz",
        "error",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or "0" in (height, width):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 768x1024, got {text!r}")
    return int(height), int(width)


def parse_args(argv: list[str] | None, description: str | None = None) -> argparse.Namespace:
    """``benchmarks/bench_step.py``'s command line (``description``: its help text)."""
    parser = argparse.ArgumentParser(
        description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.add_argument(
        "--models",
        default=default_model(),
        help="comma-separated presets; '<preset>:vae' times that preset's VAE decode",
    )
    parser.add_argument(
        "--variants",
        default="eager,compile,O2",
        help="eager, compile, compile-max-autotune, compile-cudagraphs (stock "
        "reduce-overhead), fp8 (the denoiser's linears quantized "
        "to fp8, run eagerly), any difforge mode string, or label=<options JSON>; separate "
        "with ';' when a JSON has commas",
    )
    parser.add_argument(
        "--options", default="{}", help="extra difforge options (JSON) for difforge variants"
    )
    parser.add_argument("--height", type=int, default=1024 if on_gpu else 64)
    parser.add_argument("--width", type=int, default=1024 if on_gpu else 64)
    parser.add_argument(
        "--first-size",
        type=_size,
        default=None,
        metavar="HxW",
        help="variants with dynamic: true compile at this size first, then are measured at "
        "--height x --width without recompiling (a warmed-up service's case)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="denoiser batch (default 2, FLUX 1)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float16/bfloat16/float32 (default: preset's)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown (CUDA)")
    parser.add_argument("--no-fp32-reference", dest="fp32_reference", action="store_false")
    parser.add_argument(
        "--plant-outliers",
        metavar="FACTOR",
        type=float,
        default=None,
        help="multiply a few input columns of every denoiser linear by FACTOR (e.g. 30), in "
        "the measured module and its float32 reference alike",
    )
    parser.add_argument(
        "--outlier-channels",
        metavar="N",
        type=int,
        default=4,
        help="input columns per linear that --plant-outliers scales (default 4)",
    )
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    sep = ";" if ";" in args.variants else ","
    args.variants = [v for v in args.variants.split(sep) if v]
    return args
