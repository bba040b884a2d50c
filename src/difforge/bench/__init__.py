"""The text-to-image benchmark: ``difforge bench ...`` or ``benchmarks/text_to_image.py``.

One pipeline is built once; each compiler (``none``, ``compile``,
``compile-max-autotune``, ``difforge``/``nexfort``) compiles a fresh wrapping of the
original modules and runs the same inputs from the same seed. Per compiler it reports the
warm-up (compile) time separately from the median inference time, iterations/s, peak CUDA
memory, graphs compiled, and the final image's PSNR / max difference against ``none``.

    difforge bench --compare none,compile,difforge --output-json out/pixart.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from difforge.bench.args import PROG, BenchConfig, BenchError, config_as_json, parse_args
from difforge.bench.compilers import PipelineSnapshot, load_compile_pipe, require_quantize
from difforge.bench.measure import (
    CompilerResult,
    Progress,
    calls_per_compiler,
    compare_to_reference,
    quiet_repeated_logs,
    run_compiler,
)
from difforge.bench.pipeline import Workload, build_workload
from difforge.bench.report import (
    environment,
    resolutions_table,
    results_json,
    results_table,
    save_images,
    summary_line,
    write_chart,
    write_json,
)

__all__ = [
    "BenchConfig",
    "BenchError",
    "CompilerResult",
    "main",
    "parse_args",
    "run_all",
]


def check_available(config: BenchConfig) -> None:
    """Fail before building anything when a requested feature is missing."""
    if config.quantize:
        require_quantize()
        if "difforge" not in config.compilers:
            raise BenchError("--quantize applies to the difforge compiler; add it to --compare")
    if "difforge" in config.compilers and load_compile_pipe() is None:
        raise BenchError(
            "compiler 'difforge' needs difforge.diffusers.compile_pipe, which this version "
            "does not have"
        )
    if config.compiler_config and "difforge" not in config.compilers:
        print(f"{PROG}: warning: --compiler-config only applies to difforge", file=sys.stderr)


def run_all(
    workload: Workload,
    config: BenchConfig,
    progress: Progress,
    on_result: Callable[[list[CompilerResult]], None] | None = None,
) -> list[CompilerResult]:
    """Run every compiler on the same pipeline, restoring the original modules between.
    ``on_result`` sees the results so far after each compiler (for partial JSON)."""
    snapshot = PipelineSnapshot(workload.pipe)
    results: list[CompilerResult] = []
    reported: set[int] = set()

    def report(result: CompilerResult) -> None:
        reported.add(id(result))
        progress.write(summary_line(result, workload.steps))

    for compiler in config.compilers:
        try:
            result = run_compiler(
                workload, compiler, config, progress, on_steady=report, restore=snapshot.restore
            )
        finally:
            snapshot.restore()
        results.append(result)
        if id(result) not in reported or not result.ok:  # failed before or during sweeps
            progress.write(summary_line(result, workload.steps))
        compare_to_reference(results)
        if on_result is not None:
            on_result(results)
    return results


def _title(workload: Workload, env: dict) -> str:
    return (
        f"{workload.model} {workload.height}x{workload.width}, {workload.steps} steps, "
        f"batch {workload.batch}, {workload.dtype}".replace("torch.", "")
        + f"\n{env['device_name']}, torch {env['torch']}, {env['date'][:10]}"
    )


def _header(workload: Workload, env: dict) -> str:
    d = workload.describe()
    text = "text encoders" if d["text_encoders"] else "random prompt embeddings"
    return (
        f"{d['pipeline']} ({d['model']}; {d['denoiser']} {d['denoiser_parameters'] / 1e6:.1f}M "
        f"params), {d['scheduler']}, {d['height']}x{d['width']}, {d['steps']} steps, "
        f"batch {d['batch']}, {d['dtype']} on {env['device_name']} ({text})\n"
        f"torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}, "
        f"difforge {env['difforge']}"
    )


def _write_results(
    config: BenchConfig,
    workload: Workload,
    env: dict,
    results: list[CompilerResult],
    *,
    complete: bool,
) -> None:
    assert config.output_json is not None
    data = results_json(
        env=env, args=config_as_json(config), workload=workload.describe(), results=results
    )
    # A long GPU run killed halfway still leaves the compilers it finished.
    data["complete"] = complete
    write_json(config.output_json, data)


def _partial_writer(
    config: BenchConfig, workload: Workload, env: dict
) -> Callable[[list[CompilerResult]], None] | None:
    if config.output_json is None:
        return None
    return lambda done: _write_results(config, workload, env, done, complete=False)


def write_outputs(
    config: BenchConfig, workload: Workload, env: dict, results: list[CompilerResult]
) -> None:
    """Images, JSON and chart, as the flags ask."""
    if config.output_image is not None:
        several = len(results) > 1
        for r in results:
            r.image_files = save_images(config.output_image, r, several)
            for name in r.image_files:
                print(f"image ({r.compiler}): {name}")
    if config.output_json is not None:
        _write_results(config, workload, env, results, complete=True)
        print(f"results: {config.output_json}")
    if config.chart is not None and write_chart(config.chart, results, _title(workload, env)):
        print(f"chart: {config.chart}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success, 1 if a compiler or a sweep size failed,
    2 on bad input."""
    try:
        config = parse_args(argv)
        check_available(config)
        workload = build_workload(config)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    env = environment(workload.device)
    print(_header(workload, env))
    progress = Progress(len(config.compilers) * calls_per_compiler(config), config.progress)
    try:
        with quiet_repeated_logs():
            results = run_all(workload, config, progress, _partial_writer(config, workload, env))
    finally:
        progress.close()

    print()
    print(results_table(results))
    sweeps = resolutions_table(results)
    if sweeps is not None:
        print()
        print(sweeps)
    print()
    write_outputs(config, workload, env, results)
    failed = any(not r.ok or any(s.error for s in r.resolutions) for r in results)
    return 1 if failed else 0
