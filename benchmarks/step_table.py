"""The README's one-step performance table, generated from committed bench_step JSON.

    python benchmarks/step_table.py            # prints the markdown table
    python benchmarks/step_table.py --check    # exit 1 if README.md does not contain it

Only files listed in :data:`STEP_RESULTS` are used, each with the card and torch it names,
so every number in the table has a file behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from difforge.bench.step import NOISY_SPREAD

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS.parent.parent / "README.md"

#: Until 2026-11-26's seventh session O2 was max-optimize without CUDA graphs; older files'
#: "O2" rows are labelled by what they ran.
_OLD_O2 = "O2 then (max-optimize, no graphs)"
#: Runs with today's O3: fp8 linears, the GELU/fp8 rewrites.
_WITH_FP8 = {"compile": "torch.compile", "O2": _OLD_O2, "O3": "O3 (fp8 linears)"}
#: O2 beside its weight variants (cached fused weights, freezing).
_WEIGHTS = {
    "compile": "torch.compile",
    "O2": "O2",
    "O2-cached": "O2 + fuse_qkv.cached_weights",
    "O2-freezing": "O2:freezing (weights folded)",
}
#: Today's O2 (max-optimize + difforge's pooled CUDA graphs) against O2 without graphs.
_O2_GRAPHS = {
    "compile": "torch.compile",
    "O2-nocg": "max-optimize (O2 without graphs)",
    "O2": "O2 (max-optimize + CUDA graphs)",
}
#: The VAE decode's A/B of the two VAE rewrites (attention_wide_heads,
#: group_norm_channels_last), every O variant in channels_last, O2 without graphs.
_VAE_LABELS = {
    "compile": "torch.compile",
    "O2-before": "max-optimize without the two VAE rewrites",
    "O2-nogn": "max-optimize with attention_wide_heads only",
    "O2": "max-optimize (+ group_norm_channels_last)",
    "O3": "O3",
}
_O2 = ("compile", "O2-nocg", "O2")
#: O3 with and without difforge's Triton fp8 quantizers (2026-11-28, H200).
_QUANT_KERNELS = {
    "compile": "torch.compile",
    "O3-nocatq": "O3 without the one-kernel GELU quantizer",
    "O3": "O3 (with it)",
    "O3-lnq": "O3 + LayerNorm quantizer kernel (opt-in)",
}

#: O3 against O3 + the LayerNorm quantizer kernel that also takes the residual update.
_RESIDUAL_LNQ = {
    "compile": "torch.compile",
    "O3": "O3",
    "O3-lnq": "O3 + LayerNorm quantizer with the residual (opt-in)",
}

#: O3 with and without quant.fuse_qkv (diffusers' q/k/v fusion before the fp8 swap; O3's
#: default since 2026-11-29's twenty-sixth session).
_FUSED_QKV = {
    "compile": "torch.compile",
    "O3": "O3 then (q/k/v quantized apart, where the size filter let them)",
    "O3-fq": "O3 + quant.fuse_qkv (today's O3)",
    "O3-nofq": "O3 without quant.fuse_qkv",
}

#: O2 with and without fuse_qkv.modules (module-level q/k/v fusion; O2's default since
#: 2026-11-29's twenty-seventh session).
_MODULE_QKV = {
    "compile": "torch.compile",
    "O2": "O2 then (q/k/v fused in the graph, where the cost rule let them)",
    "O2-fm": "O2 + fuse_qkv.modules (today's O2)",
}

#: (file, model, label, variants shown, their labels): one run per row group, every
#: variant from that same run.
STEP_RESULTS: tuple[tuple[str, str, str, tuple[str, ...], dict[str, str]], ...] = (
    (
        "2026-11-26_h100_step_o2_dit.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        _O2,
        _O2_GRAPHS,
    ),
    ("2026-11-26_h100_step_o2_dit.json", "sd3-medium", "SD3-medium fp16, batch 2", _O2, _O2_GRAPHS),
    (
        "2026-11-27_h100_step_joint_sd3_s14.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O2-nojoint", "O2"),
        {
            "compile": "torch.compile",
            "O2-nojoint": "O2 without joint_linear",
            "O2": "O2 (+ joint_linear)",
        },
    ),
    ("2026-11-26_h100_step_o2_flux.json", "flux-dev", "FLUX.1-dev bf16, batch 1", _O2, _O2_GRAPHS),
    (
        "2026-11-27_h100_step_joint_flux_s15.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("compile", "O2-nojoint", "O2"),
        {
            "compile": "torch.compile",
            "O2-nojoint": "O2 without joint_linear",
            "O2": "O2 (+ joint_linear on v)",
        },
    ),
    (
        "2026-11-26_h100_step_o2_unet.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        _O2,
        _O2_GRAPHS,
    ),
    (
        "2026-11-26_h100_step_o2_vae.json",
        "sdxl-base:vae",
        "SDXL VAE decode fp16, batch 1 (channels_last)",
        _O2,
        _O2_GRAPHS,
    ),
    (
        "2026-11-26_h100_step_o3_gelu_scale.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O2", "O3"),
        _WITH_FP8,
    ),
    (
        "2026-11-26_h100_step_o3_gelu_scale.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O2", "O3"),
        _WITH_FP8,
    ),
    (
        "2026-11-27_h100_step_joint_sd3_o3_s15.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O3-nojoint", "O3"),
        {
            "compile": "torch.compile",
            "O3-nojoint": "O3 without joint_linear",
            "O3": "O3 (+ joint_linear on fp8 linears)",
        },
    ),
    (
        "2026-11-26_h100_step_flux_o3.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("eager", "compile", "O2", "O3"),
        _WITH_FP8,
    ),
    (
        "2026-11-27_h100_step_o3_unet_s13.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O3"),
        {"compile": "torch.compile", "O3": "O3 (fp8 linears)"},
    ),
    (
        "2026-11-28_h100_step_o3_sdxl_s17.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O3-old", "O3"),
        {
            "compile": "torch.compile",
            "O3-old": "O3, GEGLU output and text k/v linears in fp8 too",
            "O3": "O3 (skip_gated_outputs, skip_cross_attention_kv)",
        },
    ),
    (
        "2026-11-28_h100_step_freeze_sdxl_s17.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O2", "O2-freezing"),
        _WEIGHTS,
    ),
    (
        "2026-11-28_h100_step_cached_sdxl_s18.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O2", "O2-cached", "O2-freezing"),
        _WEIGHTS,
    ),
    (
        "2026-11-28_h100_step_cached_sdxl_s19.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O2", "O2-cached", "O2-freezing"),
        _WEIGHTS,
    ),
    (
        "2026-11-28_h100_step_cgcontrol_pixart_s19.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "compile-cudagraphs", "O2"),
        {
            "compile": "torch.compile",
            "compile-cudagraphs": "torch.compile + CUDA graph trees (reduce-overhead)",
            "O2": "O2",
        },
    ),
    (
        "2026-11-28_h100_step_o3_flux_s19.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("compile", "O3"),
        {"compile": "torch.compile", "O3": "O3 (fp8 linears)"},
    ),
    (
        "2026-11-28_h200_step_catquant_flux_s22.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("compile", "O3"),
        {"compile": "torch.compile", "O3": "O3 (fp8 linears, one-kernel GELU quantizer)"},
    ),
    (
        "2026-11-28_h200_step_catquant_dit_s22.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O3-nocatq", "O3", "O3-lnq"),
        _QUANT_KERNELS,
    ),
    (
        "2026-11-28_h200_step_catquant_dit_s22.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O3-nocatq", "O3", "O3-lnq"),
        _QUANT_KERNELS,
    ),
    (
        "2026-11-28_h200_step_rope_flux_s23.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("compile", "O2", "O2-rope"),
        {
            "compile": "torch.compile",
            "O2": "O2 without rms_norm_rope",
            "O2-rope": "O2 (rms_norm_rope on since this run)",
        },
    ),
    (
        "2026-11-28_h200_step_lnres_dit_s23.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O3", "O3-lnq"),
        _RESIDUAL_LNQ,
    ),
    (
        "2026-11-28_h200_step_lnres_dit_s23.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O3", "O3-lnq"),
        _RESIDUAL_LNQ,
    ),
    (
        "2026-11-29_h200_step_fm_dit_s27.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O2", "O2-fm"),
        _MODULE_QKV,
    ),
    (
        "2026-11-29_h200_step_fm_dit_s27.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O2", "O2-fm"),
        _MODULE_QKV,
    ),
    (
        "2026-11-29_h200_step_fm_sdxl_s27.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O2", "O2-fm"),
        _MODULE_QKV,
    ),
    (
        "2026-11-29_h200_step_fm_flux_s28.json",
        "flux-dev",
        "FLUX.1-dev bf16, batch 1",
        ("compile", "O2-nofm", "O2"),
        {
            "compile": "torch.compile",
            "O2-nofm": "O2 without fuse_qkv.modules",
            "O2": "O2 (+ fuse_qkv.modules, today's O2)",
        },
    ),
    (
        "2026-11-29_h200_step_fq_pixart_s26.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O3", "O3-fq"),
        _FUSED_QKV,
    ),
    (
        "2026-11-29_h200_step_fq_sd3_s26.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O3-nofq", "O3"),
        {**_FUSED_QKV, "O3": "O3 (+ quant.fuse_qkv)"},
    ),
    (
        "2026-11-29_h200_step_fq_sdxl_s26.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O3", "O3-fq"),
        _FUSED_QKV,
    ),
    (
        "2026-11-28_h100_step_cached_pixart_s18.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O2", "O2-cached"),
        _WEIGHTS,
    ),
    (
        "2026-11-28_h100_step_cached_sd3_s18.json",
        "sd3-medium",
        "SD3-medium fp16, batch 2",
        ("compile", "O2", "O2-cached"),
        _WEIGHTS,
    ),
    (
        "2026-11-27_h100_step_attn_always_pixart_s13.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O3", "O3-attn8-always"),
        {
            "compile": "torch.compile",
            "O3": "O3 (fp8 linears)",
            "O3-attn8-always": "O3 + 8-bit attention (forced, fp8 P·V)",
        },
    ),
    (
        "2026-11-27_h100_step_ablate_pixart_s15.json",
        "pixart-xl-2-1024",
        "PixArt-XL-2 fp16, batch 2",
        ("compile", "O2", "O2-noqkv", "O2-nogelu"),
        {
            "compile": "torch.compile",
            "O2": "O2",
            "O2-noqkv": "O2 without fuse_qkv",
            "O2-nogelu": "O2 without gelu_epilogue",
        },
    ),
    (
        "2026-11-26_h100_step_unet_gn.json",
        "sdxl-base",
        "SDXL UNet fp16, batch 2 (channels_last)",
        ("compile", "O2-nogn", "O2"),
        {
            "compile": "torch.compile",
            "O2-nogn": "max-optimize without group_norm_channels_last",
            "O2": _OLD_O2,
        },
    ),
    (
        "2026-11-26_h100_step_vae_wide.json",
        "sdxl-base:vae",
        "SDXL VAE decode fp16, batch 1",
        ("compile", "O2-before", "O2-nogn", "O2", "O3"),
        _VAE_LABELS,
    ),
)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


#: Under a stock-compile baseline whose median exceeds its minimum by more than
#: NOISY_SPREAD (host-bound in its run), ratios are marked, not trusted.
NOISY_NOTE = (
    f"† that run's stock compile was host-bound (median over {NOISY_SPREAD:.2f}x its minimum: "
    "it launches every kernel from Python), so ratios against its median overstate "
    "difforge's gain."
)


def _noisy(baseline: dict | None) -> bool:
    if not baseline or not baseline.get("min_ms") or not baseline.get("median_ms"):
        return False
    return baseline["median_ms"] / baseline["min_ms"] > NOISY_SPREAD


def table() -> str:
    rows = []
    flagged = False
    for file, model, label, variants, labels in STEP_RESULTS:
        data = json.loads((RESULTS / file).read_text())
        env = data["environment"]
        card = env.get("device_name", "?").replace("NVIDIA ", "").replace(" 80GB HBM3", "")
        by_variant = {r["variant"]: r for r in data["results"] if r["model"] == model}
        mark = "†" if _noisy(by_variant.get("compile")) else ""
        flagged = flagged or bool(mark)
        for name in variants:
            r = by_variant[name]
            shown = labels.get(name, name)
            breakdown = r.get("breakdown_ms") or {}
            rows.append(
                [
                    label if name == variants[0] else "",
                    f"{card}, torch {env['torch']}" if name == variants[0] else "",
                    shown,
                    _fmt(r["median_ms"], ".2f"),
                    _fmt(r.get("speedup_vs_compile"), ".3f") + "x" + mark,
                    _fmt(r.get("rel_err_vs_fp32"), ".4f"),
                    _fmt(breakdown.get("attention"), ".1f"),
                    _fmt(breakdown.get("gemm"), ".1f"),
                    _fmt(breakdown.get("elementwise"), ".1f"),
                    _fmt(breakdown.get("idle"), ".1f"),
                ]
            )
    headers = [
        "model (1024²)",
        "card",
        "variant",
        "step ms",
        "vs compile",
        "rel err vs fp32",
        "attention ms",
        "GEMM ms",
        "elementwise ms",
        "idle ms",
    ]
    text = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    return f"{text}\n\n{NOISY_NOTE}" if flagged else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md lacks it")
    args = parser.parse_args(argv)
    text = table()
    if args.check:
        if text not in README.read_text():
            print("README.md's step table is stale: run benchmarks/step_table.py", file=sys.stderr)
            return 1
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
