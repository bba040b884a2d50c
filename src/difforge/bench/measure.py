"""Measuring one compiler: warm-up (compile) time, inference time, memory, recompiles.

Nothing here prints tables or writes files; :mod:`difforge.bench.report` does that from
the :class:`CompilerResult` objects returned here.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from difforge.bench.args import BenchConfig
from difforge.bench.compilers import apply_compiler
from difforge.bench.pipeline import MULTIPLE_RESOLUTIONS, RARE_RESOLUTIONS, Workload, sweep_sizes
from difforge.passes import counters as difforge_counters

T = TypeVar("T")

#: Names of the image-comparison outcomes in the results.
REFERENCE, IDENTICAL, DIFFERS, NO_REFERENCE = "reference", "identical", "differs", "n/a"


@dataclass
class ResolutionResult:
    """One size of a resolution sweep."""

    kind: str
    """``multiple`` or ``rare``."""
    requested: str
    """The seed's size, ``HxW`` at 1024-pixel scale."""
    height: int
    """The size actually run (scaled for tiny presets, rounded to the model's multiple)."""
    width: int
    first_run_s: float | None = None
    """Wall time of the first call at this size, recompilation included."""
    run_s: float | None = None
    """Median of ``--runs`` more calls at this size, after any recompilation."""
    runs_s: list[float] = field(default_factory=list)
    """Each of those calls (device time)."""
    recompiles: int | None = None
    """Graphs Dynamo compiled during the first call (0: the compiled code was reused)."""
    recompiles_in_timed_runs: int | None = None
    """Graphs compiled during the timed calls; anything but 0 spoils ``run_s``."""
    memory_reserved_bytes: int | None = None
    """CUDA memory the caching allocator holds after this size (graph pools included), to
    show whether memory stays bounded across sizes; ``None`` on the CPU."""
    graph_captures: int | None = None
    """CUDA graphs difforge's pool captured during these two calls (``cudagraphs.impl``
    'pooled'; 0 for Inductor's trees, which count nothing here)."""
    error: str | None = None
    specialized_first_run_s: float | None = None
    """``--compare-specialized``: first call of a fresh pipeline compiled with
    ``dynamic=False`` at this size alone (its compilation included)."""
    specialized_run_s: float | None = None
    """Median of ``--runs`` more calls of that specialised pipeline."""
    specialized_runs_s: list[float] = field(default_factory=list)
    specialized_graphs: int | None = None
    """Graphs the specialised compilation made."""
    specialized_recompiles_in_timed_runs: int | None = None
    """Graphs the specialised pipeline compiled during its timed calls (should be 0)."""
    specialized_error: str | None = None

    @property
    def vs_specialized(self) -> float | None:
        """``run_s / specialized_run_s``: 1.05 = the dynamic graph is 5% slower here."""
        if self.run_s is None or not self.specialized_run_s:
            return None
        return self.run_s / self.specialized_run_s


@dataclass
class CompilerResult:
    """Everything measured for one compiler."""

    compiler: str
    how: str = ""
    """What was applied (e.g. ``torch.compile(mode=None) on transformer, ...``)."""
    error: str | None = None
    first_run_s: float | None = None
    """Wall time of the first warm-up run: compilation plus one inference."""
    warmup_s: float | None = None
    """Wall time of all warm-up runs together."""
    warmup_runs_s: list[float] = field(default_factory=list)
    inference_s: float | None = None
    """Median of the timed runs (CUDA events on a GPU, perf_counter on the CPU)."""
    inference_runs_s: list[float] = field(default_factory=list)
    iterations_per_s: float | None = None
    """Denoising steps per second of the median run (whole pipeline call)."""
    peak_memory_bytes: int | None = None
    """Peak CUDA memory allocated during the timed runs; ``None`` on the CPU."""
    peak_memory_warmup_bytes: int | None = None
    """Peak CUDA memory allocated during the warm-up (compilation, autotuning)."""
    graphs: int | None = None
    """Graphs Dynamo compiled during the warm-up."""
    compile_caches: dict[str, int] | None = None
    """:func:`compile_cache_counts` during the first warm-up run (hits say how warm a
    first run was; a slow "warm" first run with misses or AOT bypasses says why)."""
    recompiles_in_timed_runs: int | None = None
    """Graphs compiled during the timed runs; anything but 0 spoils the timing."""
    image_match: str = NO_REFERENCE
    """``reference``, ``identical``, ``differs`` or ``n/a`` (no ``none`` run to compare)."""
    psnr_db: float | None = None
    """PSNR against the ``none`` run's image, in dB (``inf`` when identical)."""
    max_abs_diff: float | None = None
    """Largest absolute pixel difference on [0, 1] images against the ``none`` run."""
    latent_psnr_db: float | None = None
    """PSNR of the final latents against the ``none`` run's, in dB, with the reference
    latents' range (max - min) as the peak, since latents have no fixed range (``inf``
    when identical, ``nan`` for non-finite latents; ``None`` without a reference or when
    the pipeline has no step callback)."""
    resolutions: list[ResolutionResult] = field(default_factory=list)
    image_files: list[str] = field(default_factory=list)
    image: torch.Tensor | None = field(default=None, repr=False)
    """The quality run's images, (B, 3, H, W) float32 on the CPU (not in the JSON)."""
    latents: torch.Tensor | None = field(default=None, repr=False)
    """The quality run's final latents, float32 on the CPU (not in the JSON)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields; an infinite PSNR becomes ``null`` (``image_match`` says why:
        ``identical``, or ``reference`` for the reference run itself)."""
        out = dataclasses.asdict(dataclasses.replace(self, image=None, latents=None))
        out.pop("image")
        out.pop("latents")
        for entry, sweep in zip(out["resolutions"], self.resolutions, strict=True):
            entry["vs_specialized"] = sweep.vs_specialized
        # Strict JSON has no inf/nan: null, with image_match telling identical apart.
        for key in ("psnr_db", "latent_psnr_db"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


class Progress:
    """One tqdm bar over all pipeline calls of the benchmark, on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, disable=not enabled, unit="call", file=sys.stderr, dynamic_ncols=True
        )

    def phase(self, text: str) -> None:
        self.bar.set_description_str(text)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, line: str) -> None:
        """Print a line on stdout without breaking the bar."""
        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once: the pipeline repeats the same warning
    (e.g. prompt truncated by a tiny tokenizer) on every one of dozens of calls."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextmanager
def quiet_repeated_logs(loggers: tuple[str, ...] = ("diffusers", "transformers")) -> Iterator[None]:
    """Install :class:`_OncePerMessage` on these libraries' handlers for the duration."""
    once = _OncePerMessage()
    handlers = [h for name in loggers for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(once)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(once)


def calls_per_compiler(config: BenchConfig) -> int:
    """Pipeline calls one compiler makes (for the progress bar's total)."""
    sweeps = len(MULTIPLE_RESOLUTIONS) * config.multiple_resolutions
    sweeps += len(RARE_RESOLUTIONS) * config.rare_resolutions
    # + 1: the untimed quality run that keeps the image and the latents.
    per_size = 1 + config.runs  # the first call (recompiles show), then the timed ones
    return config.warmups + config.runs + 1 + per_size * (sweeps + len(specialized_sizes(config)))


def specialized_sizes(config: BenchConfig) -> list[tuple[int, int]]:
    """Seed sizes (h, w) that ``--compare-specialized`` compiles a specialised pipeline for."""
    if config.specialized is None:
        return []
    swept = [*MULTIPLE_RESOLUTIONS] * config.multiple_resolutions
    swept += [*RARE_RESOLUTIONS] * config.rare_resolutions
    chosen = set(config.specialized)
    return [(h, w) for h, w in swept if not chosen or f"{h}x{w}" in chosen]


def unique_graphs() -> int:
    """Graphs Dynamo has compiled in this process (since the last counters reset)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_cache_counts() -> dict[str, int]:
    """torch's compile-cache counters of this process (since the last counters reset):
    Inductor's FX-graph cache, AOTAutograd's cache (a bypass: it refused to cache a graph,
    so a warm start re-traces through AOTAutograd) and Dynamo's precompile cache."""
    c = torch._dynamo.utils.counters
    return {
        "fxgraph_hit": int(c["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_miss": int(c["inductor"]["fxgraph_cache_miss"]),
        "aot_hit": int(c["aot_autograd"]["autograd_cache_hit"]),
        "aot_miss": int(c["aot_autograd"]["autograd_cache_miss"]),
        "aot_bypass": int(c["aot_autograd"]["autograd_cache_bypass"]),
        # cache.precompile: a hit loads Dynamo's stored trace (no tracing, no Inductor lookup).
        "dynamo_cache_hit": int(c["dynamo_cache"]["dynamo_cache_hit"]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Wall-clock seconds of ``fn()`` with the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def device_time(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds of ``fn()``: CUDA events around the call on a GPU, perf_counter on a CPU."""
    if device.type != "cuda":
        return wall_time(fn, device)
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000.0, out


def timed_runs(fn: Callable[[], Any], device: torch.device, runs: int) -> tuple[list[float], int]:
    """``runs`` device-timed calls of ``fn`` and the graphs Dynamo compiled during them."""
    before = unique_graphs()
    times = [device_time(fn, device)[0] for _ in range(max(1, runs))]
    return times, unique_graphs() - before


def fresh_state(device: torch.device) -> None:
    """Forget all compiled code and free memory, so compilers do not see each other."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]


@contextmanager
def _recording_errors(result: Any, what: str) -> Iterator[None]:
    """Turn a failure into ``result.error`` (traceback on stderr) so the others still run."""
    try:
        yield
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        print(f"{what} failed: {_describe(e)}", file=sys.stderr)
        result.error = _describe(e)


def measure_steady(
    workload: Workload, config: BenchConfig, result: CompilerResult, progress: Progress
) -> None:
    """Warm-up runs (the first compiles), timed runs at the main size, then one untimed
    quality run whose images and final latents are compared with the reference's."""
    device = workload.device
    name = result.compiler
    before = unique_graphs()
    caches = compile_cache_counts()  # before the first run, the one that compiles
    for i in range(config.warmups):
        progress.phase(f"{name}: warm-up {i + 1}/{config.warmups}" + (" (compiling)" * (i == 0)))
        seconds, _ = wall_time(workload.call, device)
        if i == 0:
            after = compile_cache_counts()
            result.compile_caches = {k: after[k] - caches[k] for k in after}
        result.warmup_runs_s.append(seconds)
        progress.advance()
    result.first_run_s = result.warmup_runs_s[0]
    result.warmup_s = sum(result.warmup_runs_s)
    result.graphs = unique_graphs() - before
    result.peak_memory_warmup_bytes = _peak_memory(device)

    _reset_peak(device)
    before = unique_graphs()
    for i in range(config.runs):
        progress.phase(f"{name}: timed run {i + 1}/{config.runs}")
        seconds, _ = device_time(workload.call, device)
        result.inference_runs_s.append(seconds)
        progress.advance()
    result.recompiles_in_timed_runs = unique_graphs() - before
    result.peak_memory_bytes = _peak_memory(device)
    result.inference_s = statistics.median(result.inference_runs_s)
    result.iterations_per_s = workload.steps / result.inference_s

    # The latents come from a step callback, kept out of the timed runs.
    progress.phase(f"{name}: quality run")
    image, latents = workload.generate()
    progress.advance()
    result.image = image.detach().float().cpu()
    result.latents = None if latents is None else latents.detach().float().cpu()


def measure_resolutions(
    workload: Workload,
    kind: str,
    sizes: tuple[tuple[int, int], ...],
    result: CompilerResult,
    progress: Progress,
    runs: int = 1,
) -> None:
    """Run each size once to show recompilation, then ``runs`` times for the speed."""
    extra = workload.sweep_kwargs()
    for (req_h, req_w), (height, width) in sweep_sizes(workload, sizes):
        entry = ResolutionResult(kind, f"{req_h}x{req_w}", height, width)
        result.resolutions.append(entry)
        progress.phase(f"{result.compiler}: {height}x{width}")

        def call(h: int = height, w: int = width) -> torch.Tensor:
            return _call_with(workload, extra, h, w)

        with _recording_errors(entry, f"{result.compiler} at {height}x{width}"):
            before = unique_graphs()
            captures = difforge_counters["cudagraphs.capture"]
            entry.first_run_s, _ = wall_time(call, workload.device)
            entry.recompiles = unique_graphs() - before
            progress.advance()
            entry.runs_s, entry.recompiles_in_timed_runs = timed_runs(call, workload.device, runs)
            entry.run_s = statistics.median(entry.runs_s)
            progress.advance()
            entry.graph_captures = difforge_counters["cudagraphs.capture"] - captures
            if workload.device.type == "cuda":
                entry.memory_reserved_bytes = torch.cuda.memory_reserved(workload.device)
        progress.write(resolution_line(result.compiler, entry))


def resolution_line(compiler: str, r: ResolutionResult) -> str:
    """One line per sweep size, printed as soon as it is measured."""
    size = f"{r.height}x{r.width}" + (
        f" (seed {r.requested})" if r.requested != f"{r.height}x{r.width}" else ""
    )
    if r.error is not None:
        return f"[{compiler}] {size}: FAILED: {r.error}"
    memory = (
        ""
        if r.memory_reserved_bytes is None
        else f", {r.memory_reserved_bytes / 2**30:.2f} GiB reserved"
    )
    spoiled = (
        f" ({r.recompiles_in_timed_runs} graphs compiled while timing)"
        if r.recompiles_in_timed_runs
        else ""
    )
    return (
        f"[{compiler}] {size}: first run {r.first_run_s:.3f} s with {r.recompiles} "
        f"recompiled graphs, then {r.run_s:.4f} s (median of {len(r.runs_s)}){spoiled}{memory}"
    )


def measure_specialized(
    workload: Workload,
    config: BenchConfig,
    result: CompilerResult,
    progress: Progress,
    restore: Callable[[], None],
) -> None:
    """For each chosen sweep size: put the original modules back, compile them again with
    ``dynamic=False``, run at that size only (the first run compiles, then ``--runs``
    timed ones), and record the times next to the dynamic pipeline's. ``restore`` puts the
    original modules back."""
    chosen = {f"{h}x{w}" for h, w in specialized_sizes(config)}
    extra = workload.sweep_kwargs()
    for entry in result.resolutions:
        if entry.requested not in chosen or entry.error is not None:
            continue
        chosen.discard(entry.requested)  # a size in both sweeps is compared once
        progress.phase(f"{result.compiler}: specialised {entry.height}x{entry.width}")
        failure = types.SimpleNamespace(error=None)
        with _recording_errors(failure, f"specialised {entry.height}x{entry.width}"):
            restore()
            fresh_state(workload.device)
            applied = apply_compiler(
                workload.pipe,
                result.compiler,
                options=config.compiler_config if result.compiler == "difforge" else None,
                fuse_qkv_projections=config.fuse_qkv_projections and result.compiler == "difforge",
                quantize=config.quantize and result.compiler == "difforge",
                dynamic=False,
                eager=config.eager_components,
            )
            run = dataclasses.replace(workload, pipe=applied.pipe)

            def call(
                run: Workload = run, h: int = entry.height, w: int = entry.width
            ) -> torch.Tensor:
                return _call_with(run, extra, h, w)

            before = unique_graphs()
            entry.specialized_first_run_s, _ = wall_time(call, workload.device)
            entry.specialized_graphs = unique_graphs() - before
            progress.advance()
            entry.specialized_runs_s, entry.specialized_recompiles_in_timed_runs = timed_runs(
                call, workload.device, config.runs
            )
            entry.specialized_run_s = statistics.median(entry.specialized_runs_s)
            progress.advance()
        entry.specialized_error = failure.error
        progress.write(specialized_line(result.compiler, entry))
    restore()


def specialized_line(compiler: str, r: ResolutionResult) -> str:
    """One line per specialised comparison, printed as soon as it is measured."""
    size = f"{r.height}x{r.width}"
    if r.specialized_error is not None:
        return f"[{compiler}] {size} specialised: FAILED: {r.specialized_error}"
    return (
        f"[{compiler}] {size} specialised (dynamic=False): first run "
        f"{r.specialized_first_run_s:.3f} s ({r.specialized_graphs} graphs), then "
        f"{r.specialized_run_s:.4f} s (median of {len(r.specialized_runs_s)}"
        f"{', graphs compiled while timing' if r.specialized_recompiles_in_timed_runs else ''}"
        f"); dynamic {r.run_s:.4f} s = {r.vs_specialized:.3f}x the specialised time"
    )


def _call_with(workload: Workload, extra: dict[str, Any], height: int, width: int) -> Any:
    return workload.call(height=height, width=width, extra=extra)


@contextmanager
def compile_cache(fresh: bool) -> Iterator[None]:
    """An empty temporary Inductor/Triton cache (and cleared in-memory code caches) when
    ``fresh``; otherwise the shared on-disk caches."""
    if not fresh:
        yield
        return
    from torch._inductor.utils import fresh_cache  # torch >= 2.8 (we need 2.9)

    with fresh_cache():
        yield


def run_compiler(
    workload: Workload,
    compiler: str,
    config: BenchConfig,
    progress: Progress,
    on_steady: Callable[[CompilerResult], None] | None = None,
    restore: Callable[[], None] | None = None,
) -> CompilerResult:
    """Apply ``compiler`` to the workload's pipeline and measure it.

    ``on_steady`` sees the result once the main-size timings exist, before any sweep. The
    caller restores the original modules afterwards (:class:`PipelineSnapshot`); a
    failure is recorded in the result instead of raised. ``restore`` (the snapshot's)
    is needed by ``--compare-specialized``, which recompiles the original modules.
    """
    result = CompilerResult(compiler)
    fresh_state(workload.device)
    with _recording_errors(result, f"compiler {compiler!r}"), compile_cache(config.fresh_cache):
        progress.phase(f"{compiler}: compiling")
        applied = apply_compiler(
            workload.pipe,
            compiler,
            options=config.compiler_config if compiler == "difforge" else None,
            fuse_qkv_projections=config.fuse_qkv_projections and compiler == "difforge",
            quantize=config.quantize and compiler == "difforge",
            eager=config.eager_components,
        )
        result.how = applied.how
        # compile_pipe may hand back another pipeline object; run that one.
        run = dataclasses.replace(workload, pipe=applied.pipe)
        measure_steady(run, config, result, progress)
        if on_steady is not None:
            on_steady(result)
        if config.multiple_resolutions:
            measure_resolutions(
                run, "multiple", MULTIPLE_RESOLUTIONS, result, progress, config.runs
            )
        if config.rare_resolutions:
            measure_resolutions(run, "rare", RARE_RESOLUTIONS, result, progress, config.runs)
        if config.specialized is not None and compiler != "none" and restore is not None:
            measure_specialized(workload, config, result, progress, restore)
    return result


def image_metrics(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(PSNR in dB, max absolute difference) of two [0, 1] images; PSNR is inf if equal."""
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {tuple(image.shape)} vs {tuple(reference.shape)}")
    diff = image.double() - reference.double()
    mse = float(diff.square().mean())
    max_abs = float(diff.abs().max())
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return psnr, max_abs


def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of ``latents`` against ``reference``, with peak = the reference's range
    (max - min): latents are unbounded, so a fixed peak like an image's 1.0 would say
    nothing. ``inf`` when equal."""
    if latents.shape != reference.shape:
        raise ValueError(
            f"latent shapes differ: {tuple(latents.shape)} vs {tuple(reference.shape)}"
        )
    ref = reference.double()
    mse = float((latents.double() - ref).square().mean())
    if mse == 0.0:
        return math.inf
    peak = float(ref.max() - ref.min())
    if not math.isfinite(mse) or peak == 0.0:
        return math.nan  # non-finite latents, or a constant reference: no meaningful PSNR
    return 10.0 * math.log10(peak * peak / mse)


def compare_to_reference(results: list[CompilerResult], reference: str = "none") -> None:
    """Fill ``psnr_db``/``max_abs_diff``/``image_match`` and ``latent_psnr_db`` against
    the ``reference`` run."""
    ref = next((r for r in results if r.compiler == reference and r.image is not None), None)
    for r in results:
        if ref is None or r.image is None:
            r.image_match = NO_REFERENCE
            continue
        r.psnr_db, r.max_abs_diff = image_metrics(r.image, ref.image)  # type: ignore[arg-type]
        if r.latents is not None and ref.latents is not None:
            r.latent_psnr_db = latent_psnr(r.latents, ref.latents)
        if r is ref:
            r.image_match = REFERENCE
        else:
            r.image_match = IDENTICAL if r.max_abs_diff == 0.0 else DIFFERS
