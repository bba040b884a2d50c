"""GPU diagnosis: which of Inductor's kernels make a dynamic-shape graph slower than a static one.

Compiles one sub-module of a preset's component (the SDXL UNet's ``mid_block``, a down block,
the VAE decoder's ``up_blocks.0``...) twice with difforge: static, and with ``dynamic: true``
first called at ``--first-size`` as a service warmed up at another resolution is. Both are
timed at ``--height`` x ``--width`` on the same inputs, every kernel is profiled, and each
variant's generated code is written out, so the kernels that differ can be read side by side.

    OUT=out python benchmarks/diag_dynamic_kernels.py --model sdxl-base --component denoiser \\
        --block mid_block --height 960 --width 720 --first-size 1024x1024

Writes ``$OUT/diag_dynamic_<component>_<block>.json`` (times, every kernel per variant, and
the kernel families whose time differs most) and ``$OUT/code_<variant>_<block>.py`` (the
output code of every graph the variant compiled). Inductor's caches are off for the run, so
the code is always logged. Made for one question (2026-11-27: the SDXL UNet step at 960x720
was 1.118x slower dynamic, all of it in Triton elementwise/reduction kernels).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import difforge
from difforge.bench.output_code import CodeLog, logged_code
from difforge.bench.step import _breakdown, _size, _step_call, _time_ms
from difforge.diffusers.presets import build_component, get_preset
from difforge.diffusers.step_inputs import StepCall, VaeDecode


def _component(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    preset = get_preset(args.model)
    if args.component == "vae":
        return VaeDecode(build_component(preset, "vae", dtype=dtype, device=device)).eval()
    return build_component(preset, preset.denoiser, dtype=dtype, device=device).eval()


def block_inputs(model: nn.Module, block: nn.Module, call: StepCall) -> StepCall:
    """The arguments ``block`` receives when ``model`` runs ``call`` (its first call)."""
    seen: list[StepCall] = []

    def grab(_module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        if not seen:
            seen.append(StepCall(a, dict(kw)))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            call(model)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the block never ran in the component's forward")
    return seen[0]


def families(kernels: list[tuple[str, str, float, int]]) -> dict[str, list[float]]:
    """{kernel name without Inductor's serial number: [ms per call, launches per call]}."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for _category, name, ms, launches in kernels:
        family = re.sub(r"_\d+$", "", name)
        out[family][0] += ms
        out[family][1] += launches
    return dict(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sdxl-base")
    parser.add_argument("--component", choices=("denoiser", "vae"), default="denoiser")
    parser.add_argument("--block", default="mid_block", help="sub-module path, '' = whole")
    parser.add_argument("--height", type=int, default=960)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--first-size", type=_size, default=(1024, 1024), metavar="HxW")
    parser.add_argument("--batch", type=int, default=2, help="denoiser batch (CFG: 2)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--options", default='{"mode": "O2", "memory_format": "channels_last"}')
    args = parser.parse_args(argv)
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = get_preset(args.model).dtype if device.type == "cuda" else torch.float32

    model = _component(args, device, dtype)
    block = model.get_submodule(args.block) if args.block else model
    size = (args.height, args.width)
    measured = block_inputs(
        model, block, _step_call(args.model, args.component, size, dtype, device, args)
    )
    first = block_inputs(
        model, block, _step_call(args.model, args.component, args.first_size, dtype, device, args)
    )
    del model  # the block keeps its own weights

    with logged_code() as code_log:
        result = _compare(args, block, first, measured, code_log, device, out_dir)
    name = args.block or "whole"
    path = out_dir / f"diag_dynamic_{args.component}_{name.replace('.', '_')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def _compare(
    args: argparse.Namespace,
    block: nn.Module,
    first: StepCall,
    measured: StepCall,
    code_log: CodeLog,
    device: torch.device,
    out_dir: Path,
) -> dict[str, Any]:
    base = json.loads(args.options)
    name = args.block or "whole"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {**vars(args), "first_size": list(args.first_size)},
        "variants": {},
    }
    for label, options in (("static", base), ("dynamic", {**base, "dynamic": True})):
        torch._dynamo.reset()
        code_log.records.clear()
        graphs_before = len(difforge.compile_records)
        compiled = difforge.compile(block, options=options)
        with torch.no_grad():
            if label == "dynamic":
                first(compiled)
            measured(compiled)
            run = functools.partial(measured, compiled)
            times = _time_ms(run, device, args.iters)
            breakdown, kernels = (
                _breakdown(run, device, top=10_000) if device.type == "cuda" else ({}, [])
            )
        code_path = out_dir / f"code_{label}_{name.replace('.', '_')}.py"
        code_path.write_text("\n\n# ---- next graph ----\n\n".join(code_log.records))
        result["variants"][label] = {
            "median_ms": statistics.median(times),
            "graphs": len(difforge.compile_records) - graphs_before,
            "breakdown_ms": breakdown,
            "kernels": kernels,
            "code": code_path.name,
            "code_graphs": len(code_log.records),
        }
        print(f"{label}: {statistics.median(times):.3f} ms, {breakdown}", flush=True)

    static_f = families(result["variants"]["static"]["kernels"])
    dynamic_f = families(result["variants"]["dynamic"]["kernels"])
    diff = [
        {
            "family": f,
            "static_ms": static_f.get(f, [0.0, 0])[0],
            "dynamic_ms": dynamic_f.get(f, [0.0, 0])[0],
            "static_launches": static_f.get(f, [0.0, 0])[1],
            "dynamic_launches": dynamic_f.get(f, [0.0, 0])[1],
        }
        for f in set(static_f) | set(dynamic_f)
    ]
    diff.sort(key=lambda d: -abs(d["dynamic_ms"] - d["static_ms"]))
    result["family_diff"] = diff
    for d in diff[:25]:
        print(
            f"{d['dynamic_ms'] - d['static_ms']:+.3f} ms  static {d['static_ms']:.3f} "
            f"({d['static_launches']})  dynamic {d['dynamic_ms']:.3f} "
            f"({d['dynamic_launches']})  {d['family'][:110]}"
        )
    return result


if __name__ == "__main__":
    main()
