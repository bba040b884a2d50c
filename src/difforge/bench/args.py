"""The benchmark's flags, parsed and checked into one frozen :class:`BenchConfig`.

Flag names follow the seed's ``benchmarks/text_to_image.py`` (``--compiler nexfort``,
``--run_multiple_resolutions true``) and its SDXL example (``--base``, ``--n_steps``,
``--saved_image``), so existing command lines keep working.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PROG = "difforge bench"

#: Every value ``--compiler`` accepts; ``nexfort`` is the seed's name for ``difforge``.
COMPILERS: tuple[str, ...] = ("none", "compile", "compile-max-autotune", "difforge", "nexfort")
COMPILER_ALIASES: dict[str, str] = {"nexfort": "difforge"}
#: The compilers that take ``--compiler-config``.
DIFFORGE_COMPILERS: frozenset[str] = frozenset({"difforge"})

GPU_DEFAULT_MODEL = "pixart-xl-2-1024"
CPU_DEFAULT_MODEL = "tiny-pixart"


def default_model() -> str:
    """The preset every benchmark runs when none is named: full size with a GPU, tiny without."""
    import torch

    return GPU_DEFAULT_MODEL if torch.cuda.is_available() else CPU_DEFAULT_MODEL


#: Denoising steps when none are given on the CPU: enough to exercise the scheduler
#: loop, few enough to finish in seconds.
CPU_DEFAULT_STEPS = 4
#: Timed runs when none are given on the CPU: the tiny preset's runs last ~10 ms each, where
#: three of them on a 2-core machine gave difforge 0.96x, 1.47x and 2.21x of eager in three
#: back-to-back runs of scripts/bench (2026-11-29); the median of 25 costs a second.
CPU_DEFAULT_RUNS = 25
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed, 8k"

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class BenchError(Exception):
    """A user-facing failure: printed as ``difforge bench: error: ...``, exit code 2."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run, with every device-dependent default already resolved."""

    model: str
    """Preset name/alias or a local pipeline directory with real weights."""
    scheduler: str | None
    """diffusers scheduler class name; ``None`` keeps the pipeline's own."""
    steps: int | None
    """Denoising steps; ``None``: the preset's (or pipeline's) default."""
    height: int | None
    width: int | None
    batch: int
    """Images per prompt (``num_images_per_prompt``)."""
    warmups: int
    """Untimed runs before timing; the first one compiles."""
    runs: int
    """Timed runs; the median is reported."""
    seed: int
    prompt: str
    guidance_scale: float | None
    compilers: tuple[str, ...]
    """Canonical compiler names, in run order (aliases resolved, no duplicates)."""
    compiler_config: str | None
    """JSON options for difforge (validated)."""
    fuse_qkv_projections: bool
    quantize: bool
    eager_components: tuple[str, ...]
    """Components every compiler leaves eager (``vae``, ``vae.decoder``, ``text_encoder`` ...)."""
    multiple_resolutions: bool
    rare_resolutions: bool
    specialized: tuple[str, ...] | None
    """``--compare-specialized``: ``None`` off; ``()`` every swept size; else the seed sizes
    (``HxW`` at 1024-pixel scale) at which to also compile a shape-specialised pipeline."""
    output_image: Path | None
    output_json: Path | None
    chart: Path | None
    device: str
    dtype: torch.dtype | None
    """``None``: the preset's dtype on a GPU, float32 on the CPU (see pipeline setup)."""
    text_encoders: bool | None
    """``None``: real (random-weight) encoders for tiny presets only."""
    plant_outliers: float | None
    """Factor by which a few input columns of each denoiser linear are scaled before any
    compiler runs (:func:`difforge.bench.outliers.plant_outliers`); ``None``: off."""
    outlier_channels: int
    """How many input columns per linear ``plant_outliers`` scales."""
    fresh_cache: bool
    """Compile each compiler into an empty temporary Inductor/Triton cache."""
    progress: bool


def _bool_value(text: str) -> bool:
    """The seed passes ``--run_multiple_resolutions true``; accept the usual spellings."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def canonical_compiler(name: str) -> str:
    """``nexfort`` -> ``difforge``; other valid names unchanged; unknown ones rejected."""
    key = name.strip().lower()
    if key not in COMPILERS:
        raise BenchError(f"unknown compiler {name!r}; choose from: {', '.join(COMPILERS)}")
    return COMPILER_ALIASES.get(key, key)


def _component_list(text: str) -> tuple[str, ...]:
    """``"vae, text_encoder"`` -> ``("vae", "text_encoder")``; checked against the pipeline
    once it is built (:func:`difforge.bench.compilers.check_eager_components`)."""
    names = tuple(part for part in (p.strip() for p in text.split(",")) if part)
    if not names:
        raise argparse.ArgumentTypeError("needs at least one component name, e.g. vae")
    return names


def parse_compilers(text: str) -> tuple[str, ...]:
    """``"none,compile,nexfort"`` -> ``("none", "compile", "difforge")``."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise BenchError("--compare needs at least one compiler, e.g. none,compile,difforge")
    out: list[str] = []
    for name in names:
        canonical = canonical_compiler(name)
        if canonical in out:
            raise BenchError(f"--compare names {canonical!r} twice ({text!r})")
        out.append(canonical)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Text-to-image benchmark: compile time, inference time, peak memory and "
        "image difference per compiler, on the same pipeline weights and inputs.",
    )
    model = p.add_argument_group("model and workload")
    model.add_argument(
        "--model",
        "--base",
        dest="model",
        help=f"preset name or local pipeline directory (default: {GPU_DEFAULT_MODEL} with a "
        f"GPU, {CPU_DEFAULT_MODEL} without)",
    )
    model.add_argument(
        "--scheduler",
        default="none",
        help="diffusers scheduler class, e.g. EulerDiscreteScheduler; 'none' keeps the "
        "pipeline's (default)",
    )
    model.add_argument(
        "--steps",
        "--n_steps",
        dest="steps",
        type=_positive_int,
        help=f"denoising steps (default: the model's; {CPU_DEFAULT_STEPS} on the CPU)",
    )
    model.add_argument("--height", type=_positive_int, help="default: the model's")
    model.add_argument("--width", type=_positive_int, help="default: the model's")
    model.add_argument(
        "--batch", type=_positive_int, default=1, help="images per prompt (default: 1)"
    )
    model.add_argument("--prompt", default=DEFAULT_PROMPT)
    model.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    model.add_argument(
        "--guidance-scale", "--cfg-scale", dest="guidance_scale", type=float, default=None
    )
    model.add_argument(
        "--device", help="torch device (default: cuda if available, else cpu)", default=None
    )
    model.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="default: the preset's dtype on a GPU, float32 on the CPU",
    )
    model.add_argument(
        "--text-encoders",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run real (random-weight) text encoders; off: random precomputed prompt "
        "embeddings (default: on for tiny presets and local directories, off otherwise)",
    )
    model.add_argument(
        "--plant-outliers",
        metavar="FACTOR",
        type=_positive_float,
        help="before any compiler runs, multiply a few input columns (--outlier-channels, "
        "chosen by a fixed seed) of every nn.Linear weight of the denoiser by FACTOR (e.g. "
        "30), as trained models have and random weights lack; this tests that "
        "low-precision scales hold up. It makes another model, used by every compiler "
        "(eager included), so comparisons stay fair",
    )
    model.add_argument(
        "--outlier-channels",
        metavar="N",
        type=_positive_int,
        default=4,
        help="input columns per linear that --plant-outliers scales (default: 4; a linear "
        "with fewer than 8*N inputs is left alone)",
    )

    comp = p.add_argument_group("compilers")
    comp.add_argument(
        "--compiler",
        default="difforge",
        choices=COMPILERS,
        help="nexfort is an alias of difforge (default: difforge)",
    )
    comp.add_argument(
        "--compare",
        metavar="LIST",
        help="comma-separated compilers to run in this one process on the same weights and "
        "inputs, e.g. none,compile,difforge (overrides --compiler)",
    )
    comp.add_argument(
        "--compiler-config", metavar="JSON", help='difforge options, e.g. \'{"mode": "O3"}\''
    )
    comp.add_argument(
        "--fuse-qkv-projections",
        action="store_true",
        help="ask compile_pipe to fuse Q/K/V projections (difforge only)",
    )
    comp.add_argument(
        "--eager-components",
        metavar="LIST",
        type=_component_list,
        default=(),
        help="comma-separated components every compiler leaves eager, e.g. vae (both halves) "
        "or vae.encoder,text_encoder: compile_pipe's ignores, and the same modules skipped by "
        "stock torch.compile",
    )
    comp.add_argument(
        "--quantize",
        action="store_true",
        help="quantize the pipeline with difforge.diffusers.quantize_pipe (difforge only)",
    )

    runs = p.add_argument_group("measurement")
    runs.add_argument(
        "--warmups",
        type=_positive_int,
        default=2,
        help="untimed runs first; the first compiles (default: 2)",
    )
    runs.add_argument(
        "--runs",
        type=_positive_int,
        help=f"timed runs (default: 3; {CPU_DEFAULT_RUNS} on the CPU)",
    )
    for flag, what in (
        ("run_multiple_resolutions", "1024x1024, 768x1024, 1024x768, 512x512"),
        ("run_rare_resolutions", "960x720 and 544x408"),
    ):
        runs.add_argument(
            f"--{flag}",
            f"--{flag.replace('_', '-')}",
            dest=flag,
            metavar="BOOL",
            type=_bool_value,
            nargs="?",
            const=True,
            default=False,
            help=f"afterwards, run {what} (scaled for tiny presets) and count recompiles",
        )
    runs.add_argument(
        "--compare-specialized",
        "--compare_specialized",
        dest="compare_specialized",
        metavar="SIZES",
        nargs="?",
        const="all",
        help="after the sweeps, compile a fresh shape-specialised pipeline (the same options "
        "with dynamic=false; stock torch.compile with dynamic=False) at each swept size, or at "
        "the listed seed sizes (e.g. 1024x1024,544x408), time it and report the ratio of the "
        "dynamic pipeline's time to it (each size costs a full compile)",
    )
    runs.add_argument(
        "--fresh-cache",
        action="store_true",
        help="give each compiler an empty temporary Inductor/Triton cache, so compile times "
        "are cold-start times (default: the shared on-disk caches, which earlier runs, and "
        "earlier compilers of this run, may have warmed)",
    )
    runs.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress bars on stderr (default: on)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--output-image",
        "--saved_image",
        dest="output_image",
        metavar="PATH",
        type=Path,
        help="save the final image (one file per compiler when comparing)",
    )
    out.add_argument("--output-json", metavar="PATH", type=Path, help="write all results as JSON")
    out.add_argument(
        "--chart",
        metavar="PATH",
        type=Path,
        help="PNG bar chart of inference time (default: next to --output-json)",
    )
    return p


def _check_compiler_config(text: str | None) -> str | None:
    """Validate difforge options now, not after minutes of pipeline building."""
    if text is None:
        return None
    from difforge.errors import OptionsError
    from difforge.options import parse_options

    try:
        parse_options(text)
    except OptionsError as e:
        raise BenchError(f"--compiler-config: {e}") from None
    return text


def _resolve_device(requested: str | None) -> str:
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise BenchError(f"--device {requested!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {requested!r}: CUDA is not available on this machine")
    return str(device)


def _specialized_sizes(ns: argparse.Namespace) -> tuple[str, ...] | None:
    """Validate ``--compare-specialized`` against the sweeps requested."""
    text = ns.compare_specialized
    if text is None:
        return None
    from difforge.bench.pipeline import MULTIPLE_RESOLUTIONS, RARE_RESOLUTIONS

    swept = [*MULTIPLE_RESOLUTIONS] * ns.run_multiple_resolutions
    swept += [*RARE_RESOLUTIONS] * ns.run_rare_resolutions
    if not swept:
        raise BenchError(
            "--compare-specialized compares sweep sizes: add --run_multiple_resolutions "
            "and/or --run_rare_resolutions"
        )
    if text.strip().lower() == "all":
        return ()
    names = [f"{h}x{w}" for h, w in swept]
    sizes = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in sizes if t not in names]
    if unknown or not sizes:
        raise BenchError(
            f"--compare-specialized: {', '.join(unknown) or repr(text)} is not a swept size; "
            f"the sweeps requested run {', '.join(names)} (or give no value for all)"
        )
    return sizes


def resolve(ns: argparse.Namespace) -> BenchConfig:
    """Turn parsed flags into a :class:`BenchConfig` (device-dependent defaults filled)."""
    device = _resolve_device(ns.device)
    on_gpu = device.startswith("cuda")
    compilers = parse_compilers(ns.compare) if ns.compare else (canonical_compiler(ns.compiler),)
    steps = ns.steps if ns.steps is not None or on_gpu else CPU_DEFAULT_STEPS
    chart = ns.chart
    if chart is None and ns.output_json is not None:
        chart = ns.output_json.with_suffix(".png")
    return BenchConfig(
        model=ns.model or (GPU_DEFAULT_MODEL if on_gpu else CPU_DEFAULT_MODEL),
        scheduler=None if ns.scheduler.strip().lower() == "none" else ns.scheduler.strip(),
        steps=steps,
        height=ns.height,
        width=ns.width,
        batch=ns.batch,
        warmups=ns.warmups,
        runs=ns.runs if ns.runs is not None else (3 if on_gpu else CPU_DEFAULT_RUNS),
        seed=ns.seed,
        prompt=ns.prompt,
        guidance_scale=ns.guidance_scale,
        compilers=compilers,
        compiler_config=_check_compiler_config(ns.compiler_config),
        fuse_qkv_projections=ns.fuse_qkv_projections,
        quantize=ns.quantize,
        eager_components=ns.eager_components,
        multiple_resolutions=ns.run_multiple_resolutions,
        rare_resolutions=ns.run_rare_resolutions,
        specialized=_specialized_sizes(ns),
        output_image=ns.output_image,
        output_json=ns.output_json,
        chart=chart,
        device=device,
        dtype=DTYPES[ns.dtype] if ns.dtype else None,
        text_encoders=ns.text_encoders,
        plant_outliers=ns.plant_outliers,
        outlier_channels=ns.outlier_channels,
        fresh_cache=ns.fresh_cache,
        progress=ns.progress,
    )


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``). Usage errors exit via argparse;
    invalid values raise :class:`BenchError`."""
    return resolve(build_parser().parse_args(argv))


def config_as_json(config: BenchConfig) -> dict[str, object]:
    """The config as JSON-ready values (paths and dtypes as strings)."""
    out: dict[str, object] = {}
    for key, value in vars(config).items():
        if isinstance(value, (Path, torch.dtype)):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    json.dumps(out)  # fail here, not halfway through writing the results file
    return out
