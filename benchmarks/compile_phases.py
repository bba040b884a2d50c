"""Where one cold compile of a preset's denoiser spends its time: Dynamo's phase timers.

    python benchmarks/compile_phases.py --model sdxl-base \
        --options '{"mode": "O2", "dynamic": true, "memory_format": "channels_last"}'

Compiles in this process (run it with an empty cache, e.g. ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``),
times the first call, and writes Dynamo's aggregated timers (``torch._dynamo.utils.compile_times``)
as JSON. Made for long compiles that ``bench_compile.py`` would time out on; wrap it in
``py-spy record`` for a sampling profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import difforge
from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import denoiser_step_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl-base")
    parser.add_argument("--options", default='{"mode": "O2", "dynamic": true}', help="JSON")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = CFG)")
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.model)
    dtype = preset.dtype if device.type == "cuda" else torch.bfloat16
    module = build_component(preset, preset.denoiser, dtype=dtype, device=device)
    options = json.loads(args.options)
    compiled = difforge.compile(module, options=options)
    call = denoiser_step_inputs(
        preset, batch=args.batch, height=args.height, width=args.width, device=device, dtype=dtype
    )
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*call.args, **call.kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    timers = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    phases = dict(zip(timers[0], (float(v) for v in timers[1]), strict=True))
    result = {
        "model": args.model,
        "options": options,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "first_call_s": first_call_s,
        "phases_s": phases,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        args.output_json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
