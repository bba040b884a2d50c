"""Compile time per model and mode: cold, warm in the same process, warm in a new process.

Every mode runs with ``cache-all`` so its artifacts land in a difforge cache folder of its
own (fresh for the cold compile, then reused):

- cold: a new process, empty cache; compile + first denoising step;
- warm-same: the same process after ``torch._dynamo.reset()`` (Inductor's FX-graph cache
  hits; loaded code is still in memory);
- warm-new: another process on the same folder, as a restarted server would be; reported
  as compile + first step, and as the time to the first finished step from process start
  (interpreter start, imports and model build included, also shown apart).

Each case runs in child processes so that no case inherits another's compiled code.

    python benchmarks/bench_compile.py --models pixart-xl-2-1024 --modes O1,O2,O3 \
        --output-json out/compile.json
    python benchmarks/bench_compile.py --models tiny-pixart --modes O2  # CPU, ~1 min
    python benchmarks/bench_compile.py --models pixart-xl-2-1024 --modes O2 \
        --regional off,nested                 # whole model vs regional compilation

``--regional`` takes ``off``, ``nested``, ``blocks`` (``compile.regional``, see
difforge.regional); every mode runs once per value. Each step also reports its median
time (``--step-runs``) so a regional compile can be checked for "no loss of speed".
``--precompile off,on`` adds ``cache.precompile`` (difforge.precompile: the warm new
process loads Dynamo's stored trace instead of tracing). ``--profile-warm N`` runs the warm-new phase under cProfile and keeps its N most costly
functions (own time and cumulative), to say which parts of a warm start are one-time
process costs and which are re-tracing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import logging
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

import difforge
from difforge.bench.args import default_model
from difforge.bench.measure import compile_cache_counts
from difforge.bench.report import environment
from difforge.cache import MARKER

_RESULT_PREFIX = "BENCH_COMPILE_RESULT "


@dataclass
class Phase:
    """One compile + first step, with what Inductor's caches did meanwhile."""

    seconds: float
    fxgraph_hit: int
    fxgraph_miss: int
    aot_hit: int
    aot_miss: int
    rel_err: float
    aot_bypass: int = 0
    """AOT-autograd cache bypasses (it refused to cache this graph; torch logs why)."""
    aot_bypass_reasons: list[str] = field(default_factory=list)
    """Why, as torch logged it (each distinct reason once, cut to 500 characters)."""
    dynamo_cache_hit: int = 0
    """``cache.precompile``: Dynamo's stored trace was loaded instead of tracing."""
    step_ms: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    """Seconds per compiler phase (Dynamo's own timers, the largest few), to say where a
    warm start's time goes."""
    profile: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """``--profile-warm``: the costliest functions by own time and by cumulative time."""


@dataclass
class CaseResult:
    """One (model, mode): the three timings and the new process's start-up split."""

    model: str
    mode: str
    cache_dir: str
    regional: str = "off"
    precompile: bool = False
    """``cache.precompile``: the warm new process loads Dynamo's stored trace."""
    step_ms: float | None = None
    """Median step time after compiling (warm-new process), to check speed is unchanged."""
    cold_s: float | None = None
    warm_same_s: float | None = None
    warm_new_s: float | None = None
    new_process_import_s: float | None = None
    new_process_build_s: float | None = None
    new_process_first_step_s: float | None = None
    cold_process_first_step_s: float | None = None
    phases: dict[str, Phase] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------ child side


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


# Dynamo's timers worth showing; nested ones overlap (tracing < compile_inner), so they are
# reported side by side, never summed.
_BREAKDOWN_KEYS = (
    "_compile.compile_inner",
    "bytecode_tracing",
    "OutputGraph.call_user_compiler",
    "create_aot_dispatcher_function",
    "compile_fx_inner",
    "fx_codegen_and_compile",
    "Scheduler.codegen",
    "async_compile.wait",
    "PyCodeCache.load_by_key_path",
    "build_guards",
)


class _BypassReasons(logging.Handler):
    """Collects the reasons AOTAutograd's cache gives (at INFO) for refusing a graph: a
    bypass makes every warm start re-trace through AOTAutograd (PixArt O3 on an H100 at
    dd049e8: 20 s instead of 9 s, until the passes' functions were marked cacheable)."""

    LOGGER = "torch._functorch._aot_autograd.autograd_cache"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Bypassing autograd cache" in message:
            reason = message[:500]
            if reason not in self.reasons:
                self.reasons.append(reason)

    @contextlib.contextmanager
    def attached(self) -> Iterator[_BypassReasons]:
        logger = logging.getLogger(self.LOGGER)
        level = logger.level
        logger.addHandler(self)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # torch's handlers may print these lines too
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)


def _breakdown() -> dict[str, float]:
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    return {k: round(sum(metrics[k]), 3) for k in _BREAKDOWN_KEYS if metrics.get(k)}


def _build(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    from difforge.diffusers.presets import build_component, get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset(spec["model"])
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else preset.dtype
    if device.type == "cpu" and not spec["dtype"]:
        dtype = torch.float32  # half-precision matmuls on the CPU would time the wrong thing
    module = build_component(preset, preset.denoiser, dtype=dtype, device=device).eval()
    batch = spec["batch"] or (1 if preset.family == "flux" else 2)
    call = denoiser_step_inputs(
        preset, batch=batch, height=spec["height"], width=spec["width"], device=device, dtype=dtype
    )
    return module, call


def _eager_output(module: torch.nn.Module, call: Any) -> torch.Tensor:
    """``module``'s output with every compiled function in it run eagerly: the `blocks` style
    compiles the blocks in place, and a plain call then compared compiled with compiled
    (FLUX.1-dev: an error of 0)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    eager = set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
    with eager:
        return _first_tensor(call(module)).float()


def _phase(module: torch.nn.Module, call: Any, spec: dict[str, Any], device: torch.device) -> Phase:
    """Compile ``module`` and run one step; the counters are this phase's alone."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    getattr(torch._dynamo.utils, "compilation_time_metrics", {}).clear()
    options = {"mode": spec["mode"], "cache.dir": spec["cache_dir"]}
    if spec.get("regional", "off") != "off":
        options["compile.regional"] = True if spec["regional"] == "nested" else spec["regional"]
    if spec.get("precompile"):
        options["cache.precompile"] = True
    with torch.no_grad(), _BypassReasons().attached() as bypass:
        _sync(device)
        start = time.perf_counter()
        compiled = difforge.compile(module, options=options)
        out = _first_tensor(call(compiled)).float().clone()
        _sync(device)
        seconds = time.perf_counter() - start
        ref = _eager_output(module, call)
        step_ms = _median_ms(compiled, call, device, spec.get("step_runs", 0))
    rel_err = float((out - ref).double().norm() / ref.double().norm())
    return Phase(
        seconds=seconds,
        rel_err=rel_err,
        step_ms=step_ms,
        breakdown=_breakdown(),
        aot_bypass_reasons=bypass.reasons,
        **compile_cache_counts(),
    )


def _profile_rows(profiler: cProfile.Profile, top: int) -> dict[str, list[dict[str, Any]]]:
    """The ``top`` functions by own and by cumulative time: seconds, calls, where."""
    # pstats keeps its table in an undocumented attribute: (file, line, name) -> counts.
    table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "path": file,
            "calls": calls,
            "own_s": round(own, 4),
            "cumulative_s": round(cumulative, 4),
        }
        for (file, line, name), (_, calls, own, cumulative, _) in table.items()
    ]
    return {
        key: sorted(rows, key=lambda r: r[key], reverse=True)[:top]
        for key in ("own_s", "cumulative_s")
    }


def _median_ms(compiled: Any, call: Any, device: torch.device, runs: int) -> float | None:
    if runs <= 0:
        return None
    times = []
    for _ in range(runs + 2):  # two warm-up calls
        _sync(device)
        start = time.perf_counter()
        call(compiled)
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    times = sorted(times[2:])
    return times[len(times) // 2]


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One process's share of a case: ``cold`` (+ ``warm-same``) or ``warm-new``."""
    imported = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, call = _build(spec, device)
    built = time.time()
    first, *rest = spec["phases"]
    profiler = cProfile.Profile() if spec.get("profile_top") else None
    if profiler is not None:
        profiler.enable()
    phase = _phase(module, call, spec, device)
    if profiler is not None:
        profiler.disable()
        phase.profile = _profile_rows(profiler, int(spec["profile_top"]))
    phases = {first: asdict(phase)}
    first_step = time.time()
    for name in rest:
        if spec.get("regional") == "blocks":  # its blocks were compiled in place: a fresh copy
            module, call = _build(spec, device)
        phases[name] = asdict(_phase(module, call, spec, device))
    return {
        "import_s": imported - spec["spawned"],
        "build_s": built - imported,
        "first_step_s": first_step - spec["spawned"],
        "phases": phases,
    }


# ----------------------------------------------------------------------- parent side


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    spec = {**spec, "spawned": time.time()}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX) :])
    raise RuntimeError(f"child exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}")


def with_cache_all(mode: str) -> str:
    """``"O2"`` -> ``"O2:cache-all"``: every case persists its artifacts."""
    parts = [p for p in mode.split(":") if p]
    return ":".join(parts if "cache-all" in parts else [*parts, "cache-all"])


def _fresh_dir(root: Path, model: str, mode: str) -> Path:
    """An empty cache folder for one case; only a difforge cache may be emptied."""
    folder = root / model / mode.replace(":", "_")
    if folder.exists():
        if not (folder / MARKER).is_file() and any(folder.iterdir()):
            raise SystemExit(f"{folder} exists and is not a difforge cache; pick another root")
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def bench_case(
    model: str,
    mode: str,
    root: Path,
    args: argparse.Namespace,
    regional: str = "off",
    precompile: bool = False,
) -> CaseResult:
    """Cold + warm-same in one new process, then warm-new in another, on one folder."""
    label = mode if regional == "off" else f"{mode}:regional-{regional}"
    folder = _fresh_dir(root, model, label + (":precompile" if precompile else ""))
    result = CaseResult(
        model=model, mode=mode, cache_dir=str(folder), regional=regional, precompile=precompile
    )
    spec = {
        "model": model,
        "mode": mode,
        "regional": regional,
        "precompile": precompile,
        "step_runs": 0,
        "cache_dir": str(folder),
        "dtype": args.dtype,
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
    }
    try:
        cold = _spawn({**spec, "phases": ["cold", "warm-same"]}, args.timeout)
        warm = {
            "phases": ["warm-new"],
            "step_runs": args.step_runs,
            "profile_top": args.profile_warm,
        }
        new = _spawn({**spec, **warm}, args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:1500]}"
        return result
    result.phases = {k: Phase(**v) for k, v in {**cold["phases"], **new["phases"]}.items()}
    result.cold_s = result.phases["cold"].seconds
    result.warm_same_s = result.phases["warm-same"].seconds
    result.warm_new_s = result.phases["warm-new"].seconds
    result.step_ms = result.phases["warm-new"].step_ms
    result.new_process_import_s = new["import_s"]
    result.new_process_build_s = new["build_s"]
    result.new_process_first_step_s = new["first_step_s"]
    result.cold_process_first_step_s = cold["first_step_s"]
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _hits(phase: Phase | None) -> str:
    return "-" if phase is None else f"{phase.fxgraph_hit}/{phase.fxgraph_miss}"


def table(results: list[CaseResult]) -> str:
    rows = [
        [
            r.model,
            r.mode,
            r.regional,
            "on" if r.precompile else "off",
            _fmt(r.cold_s),
            _fmt(r.warm_same_s),
            _fmt(r.warm_new_s),
            _fmt(r.cold_process_first_step_s),
            _fmt(r.new_process_first_step_s),
            _fmt(r.new_process_import_s),
            _fmt(r.new_process_build_s),
            " ".join(_hits(r.phases.get(p)) for p in ("cold", "warm-same", "warm-new")),
            _fmt(r.step_ms, ".2f"),
            _fmt(max((p.rel_err for p in r.phases.values()), default=None), ".1e"),
            r.error or "",
        ]
        for r in results
    ]
    headers = [
        "model",
        "mode",
        "regional",
        "precompile",
        "cold s",
        "warm same-proc s",
        "warm new-proc s",
        "cold proc to 1st step s",
        "new proc to 1st step s",
        "import s",
        "build s",
        "fx hit/miss (c ws wn)",
        "step ms",
        "max rel err",
        "error",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    parser.add_argument(
        "--models",
        default=default_model(),
        help="comma-separated presets (difforge.diffusers.presets; tiny-* for the CPU)",
    )
    parser.add_argument(
        "--modes",
        default="O1,O2",
        help="comma-separated difforge modes, e.g. O1,O2,O3:max-autotune (cache-all is added)",
    )
    parser.add_argument("--height", type=int, default=1024 if on_gpu else 64)
    parser.add_argument("--width", type=int, default=1024 if on_gpu else 64)
    parser.add_argument(
        "--batch", type=int, default=None, help="denoiser batch (default 2, FLUX 1)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float16/bfloat16/float32 (default: preset's)"
    )
    parser.add_argument(
        "--regional",
        default="off",
        help="comma-separated compile.regional values to compare: off, nested, blocks",
    )
    parser.add_argument(
        "--precompile",
        default="off",
        help="comma-separated cache.precompile values to compare: off, on",
    )
    parser.add_argument(
        "--step-runs",
        type=int,
        default=10,
        help="timed steps after the warm-new compile (median reported; 0 = skip)",
    )
    parser.add_argument(
        "--profile-warm",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the warm-new compile; keep its N costliest functions (0 = off)",
    )
    parser.add_argument("--cache-root", default=None, help="where the per-case folders go")
    parser.add_argument("--keep-cache", action="store_true", help="keep the temporary root")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [with_cache_all(m.strip()) for m in args.modes.split(",") if m.strip()]
    args.regional = [r.strip() for r in args.regional.split(",") if r.strip()]
    bad = [r for r in args.regional if r not in ("off", "nested", "blocks")]
    if bad:
        parser.error(f"--regional: unknown value(s) {bad}; use off, nested, blocks")
    values = [v.strip() for v in args.precompile.split(",") if v.strip()]
    if not values or any(v not in ("off", "on") for v in values):
        parser.error(f"--precompile: use off, on or off,on (got {args.precompile!r})")
    args.precompile = [v == "on" for v in values]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(_RESULT_PREFIX + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    temporary = args.cache_root is None
    root = Path(args.cache_root or tempfile.mkdtemp(prefix="difforge-bench-compile-"))
    results = []
    try:
        for model in args.models:
            for mode in args.modes:
                for regional, precompile in itertools.product(args.regional, args.precompile):
                    result = bench_case(model, mode, root, args, regional, precompile)
                    results.append(result)
                    print(
                        f"{model} {mode} regional={regional} precompile={precompile}: "
                        f"cold {_fmt(result.cold_s)} s, "
                        f"warm same-process {_fmt(result.warm_same_s)} s, warm new-process "
                        f"{_fmt(result.warm_new_s)} s, step {_fmt(result.step_ms, '.2f')} ms"
                        + (f"  ERROR {result.error}" if result.error else ""),
                        flush=True,
                    )
                    for name, phase in result.phases.items():
                        for reason in phase.aot_bypass_reasons:
                            print(f"  {name}: {reason}", flush=True)
    finally:
        if temporary and not args.keep_cache:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results))
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": environment(
                torch.device("cuda" if torch.cuda.is_available() else "cpu")
            ),
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "results": [asdict(r) for r in results],
        }
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
