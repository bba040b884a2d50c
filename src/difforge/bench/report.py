"""Reporting: environment facts, the results table, JSON, the bar chart and images.

Everything here reads finished :class:`CompilerResult` objects; nothing measures.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from difforge._version import __version__
from difforge.bench.measure import REFERENCE, CompilerResult

GIB = 1024**3

#: Distributions whose versions go into the JSON.
PACKAGES: tuple[str, ...] = ("triton", "diffusers", "transformers")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit, when difforge runs from a git checkout (benchmarks/results
    should say which code produced them). `DIFFORGE_GIT_COMMIT` overrides it: a copied
    tree (a GPU machine's) can carry a stale `.git`."""
    if os.environ.get("DIFFORGE_GIT_COMMIT"):
        return os.environ["DIFFORGE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _inductor_cache() -> dict[str, Any]:
    # Compile times depend on whether Inductor's on-disk caches were warm.
    try:
        import torch._inductor.config as inductor_config
        from torch._inductor.runtime.runtime_utils import cache_dir

        return {"fx_graph_cache": bool(inductor_config.fx_graph_cache), "dir": cache_dir()}
    except Exception as e:  # a private API; never fail the benchmark over it
        return {"error": repr(e)}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device, the date and the cache state, for the JSON."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **{name: _version(name) for name in PACKAGES},
        "difforge": __version__,
        "git_commit": _git_commit(),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "inductor_cache": _inductor_cache(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("DIFFORGE_", "TORCHINDUCTOR_", "NEXFORT_"))
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            device_memory_gib=round(props.total_memory / GIB, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        env.update(device_name=env["cpu"], compute_capability=None)
    return env


# ----------------------------------------------------------------------------- formatting


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _memory(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def format_psnr(value: float | None, reference: bool = False) -> str:
    """A PSNR for tables: ``reference``, ``n/a``, ``inf (identical)`` or ``41.3``."""
    if reference:
        return "reference"
    if value is None:
        return "n/a"
    return "inf (identical)" if math.isinf(value) else f"{value:.1f}"


def _psnr(r: CompilerResult) -> str:
    return format_psnr(r.psnr_db, r.image_match == REFERENCE)


def _latent_psnr(r: CompilerResult) -> str:
    return format_psnr(r.latent_psnr_db, r.image_match == REFERENCE)


def speedups(results: Sequence[CompilerResult], baseline: str = "none") -> dict[str, float]:
    """Inference-time speedup of each successful compiler over ``baseline`` (if it ran)."""
    base = next((r for r in results if r.compiler == baseline and r.inference_s), None)
    if base is None or base.inference_s is None:
        return {}
    return {
        r.compiler: base.inference_s / r.inference_s
        for r in results
        if r.inference_s is not None and r.inference_s > 0
    }


def _caches(counts: dict[str, int] | None) -> str:
    """`` (FX cache 2 hits, 1 miss; AOT cache ...)`` for the warm-up line; empty when
    nothing was looked up (eager, or a compiler without torch's caches)."""
    if not counts or not any(counts.values()):
        return ""
    fx = f"FX cache {counts['fxgraph_hit']} hit, {counts['fxgraph_miss']} miss"
    aot = f"AOT cache {counts['aot_hit']} hit, {counts['aot_miss']} miss"
    aot += f", {counts['aot_bypass']} BYPASSED" if counts["aot_bypass"] else ""
    pre = f"; {counts['dynamo_cache_hit']} precompiled" if counts["dynamo_cache_hit"] else ""
    return f" ({fx}; {aot}{pre})"


def summary_line(r: CompilerResult, steps: int) -> str:
    """The per-compiler lines printed as soon as a compiler finishes."""
    if not r.ok:
        return f"[{r.compiler}] FAILED: {r.error}"
    return (
        f"[{r.compiler}] warm-up (compile): first run {_fmt(r.first_run_s, '.2f')} s, "
        f"{len(r.warmup_runs_s)} warm-up runs {_fmt(r.warmup_s, '.2f')} s, "
        f"{r.graphs} graphs compiled{_caches(r.compile_caches)}\n"
        f"[{r.compiler}] inference: {_fmt(r.inference_s, '.3f')} s "
        f"(median of {len(r.inference_runs_s)}), {_fmt(r.iterations_per_s, '.2f')} it/s "
        f"over {steps} steps, peak memory {_memory(r.peak_memory_bytes)}"
        + (
            f", {r.recompiles_in_timed_runs} RECOMPILES during timed runs"
            if r.recompiles_in_timed_runs
            else ""
        )
    )


def results_table(results: Sequence[CompilerResult]) -> str:
    """The main table: one row per compiler."""
    ups = speedups(results)
    headers = [
        "compiler",
        "1st run (compile) s",
        "warm-up s",
        "inference s",
        "it/s",
        "speedup",
        "peak memory",
        "PSNR dB",
        "latent PSNR dB",
        "max |diff|",
        "graphs",
    ]
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.compiler, "FAILED", *[""] * (len(headers) - 3), r.error])
            continue
        rows.append(
            [
                r.compiler,
                _fmt(r.first_run_s, ".2f"),
                _fmt(r.warmup_s, ".2f"),
                _fmt(r.inference_s, ".4f"),
                _fmt(r.iterations_per_s, ".2f"),
                f"{ups[r.compiler]:.2f}x" if r.compiler in ups else "n/a",
                _memory(r.peak_memory_bytes),
                _psnr(r),
                _latent_psnr(r),
                _fmt(r.max_abs_diff, ".2e"),
                r.graphs if r.graphs is not None else "n/a",
            ]
        )
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def resolutions_table(results: Sequence[CompilerResult]) -> str | None:
    """One row per compiler and sweep size, or ``None`` when no sweep ran."""
    rows = []
    specialized = any(s.specialized_run_s is not None for r in results for s in r.resolutions)
    for r in results:
        for s in r.resolutions:
            size = f"{s.height}x{s.width}"
            if s.requested != size:
                size += f" (seed {s.requested})"
            row = [
                r.compiler,
                s.kind,
                size,
                _fmt(s.first_run_s, ".3f"),
                _fmt(s.run_s, ".4f"),
                s.recompiles if s.recompiles is not None else "n/a",
            ]
            if specialized:
                row += [_fmt(s.specialized_run_s, ".4f"), _fmt(s.vs_specialized, ".3f")]
            rows.append([*row, s.error or s.specialized_error or ""])
    if not rows:
        return None
    headers = ["compiler", "sweep", "size", "1st run s", "run s", "recompiles"]
    if specialized:
        headers += ["specialised run s", "dynamic/specialised"]
    headers.append("error")
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# --------------------------------------------------------------------------------- files


def results_json(
    *,
    env: dict[str, Any],
    args: dict[str, Any],
    workload: dict[str, Any],
    results: Sequence[CompilerResult],
) -> dict[str, Any]:
    """The whole run as one JSON-ready dict."""
    return {
        "benchmark": "text_to_image",
        "environment": env,
        "args": args,
        "workload": workload,
        "reference": "none" if any(r.compiler == "none" and r.ok for r in results) else None,
        "speedup_vs_none": speedups(results),
        "results": [r.to_json() for r in results],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write strict JSON (no NaN/Infinity) through a temporary file, so a crash leaves no
    half-written results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_chart(path: Path, results: Sequence[CompilerResult], title: str) -> bool:
    """PNG bar chart of median inference time per compiler, labelled with the speedup over
    ``none``. Returns False when no compiler produced a time."""
    # The object API with an Agg canvas: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in results if r.inference_s is not None]
    if not done:
        return False
    ups = speedups(results)
    fig = Figure(figsize=(max(4.0, 1.6 * len(done) + 1.5), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    times = [r.inference_s for r in done]
    bars = ax.bar([r.compiler for r in done], times, color="#4C72B0")
    for bar, r in zip(bars, done, strict=True):
        label = f"{r.inference_s:.3g} s"
        if r.compiler in ups:
            label += f"\n{ups[r.compiler]:.2f}x"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("inference time, median (s)")
    if ups:
        ax.set_xlabel("labels: median time, speedup vs none", fontsize=8)
    ax.set_ylim(0, max(times) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return True


def image_paths(path: Path, compiler: str, count: int, several_compilers: bool) -> list[Path]:
    """``out.png`` -> ``out.png``, or ``out-difforge.png`` / ``out-difforge-1.png`` when
    several compilers or images share the name."""
    stem = path.stem + (f"-{compiler}" if several_compilers else "")
    suffix = path.suffix or ".png"
    if count == 1:
        return [path.with_name(stem + suffix)]
    return [path.with_name(f"{stem}-{i}{suffix}") for i in range(count)]


def save_images(path: Path, result: CompilerResult, several_compilers: bool) -> list[str]:
    """Save the result's final images as PNGs; returns the file names."""
    from PIL import Image

    if result.image is None:
        return []
    images = result.image.clamp(0, 1).mul(255).round().to(torch.uint8)
    paths = image_paths(path, result.compiler, images.shape[0], several_compilers)
    path.parent.mkdir(parents=True, exist_ok=True)
    for image, target in zip(images, paths, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(target)
    return [str(p) for p in paths]
