"""GPU diagnosis: which GroupNorms the channels_last rewrite skips in a dynamic SDXL VAE decode
graph, and the decode time dynamic vs static in one process (1024x1024, batch 1, fp16).

    OUT=out python benchmarks/diag_vae_dynamic.py   # writes $OUT/diag_vae.json

Made for one question (2026-11-26: why the dynamic decode was 1.5x slower than the static
one); kept so that the numbers quoted from it can be reproduced.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import difforge
from difforge.bench.step import _time_ms
from difforge.diffusers.presets import build_component
from difforge.diffusers.step_inputs import VaeDecode, vae_decode_inputs
from difforge.passes import norm
from difforge.passes.registry import node_arg, node_tensor

VARIANTS: dict[str, dict[str, Any]] = {
    "O2-dynamic": {"mode": "O2", "memory_format": "channels_last", "dynamic": True},
    "O2": {"mode": "O2", "memory_format": "channels_last"},
}

seen: list[dict[str, Any]] = []
_predicate = norm._channels_last_group_norm


def _logged(node: torch.fx.Node) -> bool:
    """The pass's own predicate, recording what it saw for every GroupNorm."""
    ok = _predicate(node)
    if node.op == "call_function" and node.target is F.group_norm:
        x = node_tensor(node_arg(node, 0, "input"))
        info: dict[str, Any] = {"ok": ok}
        if x is not None:
            info["shape"] = str(tuple(x.shape))
            info["stride"] = str(x.stride())
            info["is_contiguous_channels_last"] = str(
                x.is_contiguous(memory_format=torch.channels_last)
            )
        seen.append(info)
    return ok


def main() -> None:
    norm._channels_last_group_norm = _logged
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    call = vae_decode_inputs(
        "sdxl-base", batch=1, height=1024, width=1024, device="cuda", dtype=torch.float16
    )
    for label, options in VARIANTS.items():
        torch._dynamo.reset()
        seen.clear()
        vae = build_component("sdxl-base", "vae", dtype=torch.float16, device="cuda")
        compiled = difforge.compile(VaeDecode(vae).eval(), options=options)

        def run(compiled: Any = compiled) -> None:
            compiled(*call.args, **call.kwargs)

        with torch.no_grad():
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            for _ in range(5):
                run()
            step = statistics.median(_time_ms(run, torch.device("cuda"), 20))
        rewrites = dict(difforge.compile_records[-1].rewrites)
        out[label] = {
            "compile_s": compile_s,
            "median_ms": step,
            "rewrites": rewrites,
            "group_norms": list(seen),
        }
        print(label, f"compile {compile_s:.1f} s, {step:.2f} ms", rewrites, flush=True)
        for info in seen:
            if not info["ok"]:
                print("  skipped", info, flush=True)
    path = Path(os.environ.get("OUT", ".")) / "diag_vae.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
