"""One denoising step (or one VAE decode) per model: eager vs stock compile vs difforge.

Everything for one model runs in one process on the same weights and inputs: compile
time (first call; later variants reuse earlier ones' kernels and caches, so cold compile
times come from bench_compile.py) apart from run time (median of CUDA-event timings after warm-up),
achieved TFLOP/s, peak memory, relative error against a float32 eager reference, and,
with --profile, where the kernel time goes (attention / GEMM / conv / elementwise /
other / idle gaps between kernels). --plant-outliers scales a few input columns of every
denoiser linear (the same ones in the float32 reference), as trained weights have.

    python benchmarks/bench_step.py --models pixart-xl-2-1024,sdxl-base \
        --variants eager,compile,O2 --output-json out/step.json
    python benchmarks/bench_step.py --models tiny-pixart --height 64 --width 64  # CPU
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import difforge
from difforge.bench.report import environment
from difforge.bench.step import VariantResult, bench_model, noisy_baselines, parse_args, table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, description=__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extra = difforge.options.load_options(args.options)
    results: list[VariantResult] = []
    for spec in args.models:
        results.extend(bench_model(spec, args, device, extra))
    print()
    print(table(results))
    notes = noisy_baselines(results)
    for note in notes:
        print(f"warning: {note}")
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": environment(device),
            "args": {k: v for k, v in vars(args).items()},
            "results": [asdict(r) for r in results],
            "warnings": notes,
        }
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
