"""Compile options: parsed once, at call time, into one frozen :class:`CompileConfig`.

Every switch is a dotted key (``inductor.max_autotune``, ``passes.fuse_qkv``,
``matmul.allow_tf32``, ``cache.enabled`` …). A mode is nothing but a named bundle of
such keys (:data:`MODE_SETTINGS`), so the README's mode table, the code and the tests
read from the same place. Precedence, highest first: explicit dotted option, the
modes, environment variables, defaults.
"""

from __future__ import annotations

import difflib
import json
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from difforge.errors import OptionsError
from difforge.kernels.attention_select import SELECT_POLICIES, AttentionPolicy
from difforge.quant.select import DEFAULT_MIN_FEATURES, DEFAULT_MIN_WEIGHT_ELEMENTS

MODES: tuple[str, ...] = (
    "cache-all",
    "max-autotune",
    "max-optimize",
    "cudagraphs",
    "freezing",
    "low-precision",
)

PRESETS: dict[str, tuple[str, ...]] = {
    "O1": (),
    # CUDA graphs are part of the precise tier: they change no math and remove the launch
    # gaps. H100, one run per model (benchmarks/results/2026-11-26_h100_step_o2_*.json):
    # PixArt-XL step 33.30 -> 31.70 ms, SD3 42.82 -> 40.55, FLUX 133.72 -> 129.40, SDXL VAE
    # 24.24 -> 23.59, SDXL UNet 32.04 (stock compile 37.01), same error against fp32.
    "O2": ("max-optimize", "cudagraphs"),
    "O3": ("max-optimize", "low-precision", "cudagraphs"),
}

DEFAULT_MODE = "O1"

#: Top-level options a preset sets when the user gives none. Empty today: O2/O3 leave
#: ``dynamic`` to Dynamo (static first graph, one dynamic recompile at the first shape
#: change). Making O2 dynamic from the first call was measured on an H200 (torch 2.11,
#: PixArt-XL-2 1024² step, 2026-11-26): cold compile 77.7 s instead of ~28 s, a warm start
#: in a new process 56 s (Dynamo re-traces symbolically even on a cache hit) and a 3%
#: slower step (33.33 vs 32.19 ms), which breaks the compile-time and speed targets for
#: every user who serves one resolution. ``"dynamic": true`` is the opt-in.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {"O1": {}, "O2": {}, "O3": {}}

#: What each mode switches on. Keys missing from the installed torch are skipped.
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "cache-all": {
        "cache.enabled": True,
        "inductor.fx_graph_cache": True,
        "inductor.autotune_local_cache": True,
        "functorch.enable_autograd_cache": True,
    },
    "max-autotune": {
        "inductor.max_autotune": True,
        "inductor.max_autotune_gemm": True,
        "inductor.coordinate_descent_tuning": True,
    },
    # No coordinate-descent tuning here: on an H200 it tripled PixArt's cold compile
    # (45 s -> 167 s) for no step-time gain (33.37 vs 33.67 ms); max-autotune keeps it.
    "max-optimize": {
        "inductor.aggressive_fusion": True,
        "inductor.epilogue_fusion": True,
        "inductor.shape_padding": True,
        "passes.fuse_qkv": True,
        # diffusers' q/k/v fusion on the module (row views: no second copy): H200, same
        # run, O2 step PixArt-XL 31.42 -> 31.00 ms, SD3 38.17 -> 37.60, SDXL UNet 31.60 ->
        # 31.03, same error (2026-11-29_h200_step_fm_*_s27); FLUX not yet compared.
        "fuse_qkv.modules": True,
        "passes.gelu_epilogue": True,
        "passes.split_cat_linear": True,
        "passes.joint_linear": True,
        "passes.gelu_tanh_sigmoid": True,
        "passes.attention_wide_heads": True,
        "passes.group_norm_channels_last": True,
        # FLUX's per-head RMSNorm + RoPE of q/k as one Triton kernel: H200, FLUX.1-dev step
        # O2 126.94 -> 123.71 ms, O3 98.38 -> 94.58 ms, same error (2026-11-28, s23).
        "passes.rms_norm_rope": True,
        # One read of each LayerNorm row instead of two for PixArt (1152) and SD3 (1536):
        # H200, PixArt-XL step 32.29 -> 31.82 ms, SD3 41.07 -> 40.31 ms. LayerNorm-only
        # (heuristics.py): applied to every reduction it made the SDXL VAE's GroupNorm
        # persistent and the decode 9% slower (benchmarks/results, 2026-11-26).
        "heuristics.persistent_reduction_max": 2048,
    },
    "cudagraphs": {
        "inductor.triton.cudagraphs": True,
        "inductor.triton.cudagraph_trees": True,
    },
    "freezing": {
        "inductor.freezing": True,
    },
    "low-precision": {
        # fp8 GEMMs for the large linears (CUDA cc >= 8.9; elsewhere a warning, no swap).
        "quant.fp8_linear": True,
        # The GELU-then-fp8 quantization scales from max(y): one GELU per element.
        "passes.fp8_gelu_scale": True,
        # ... and runs as one Triton kernel per row instead of Inductor's two: H200, 1.10-1.82x
        # at FLUX/PixArt/SD3 shapes, PixArt-XL's O3 step 30.07 -> 28.94 ms, same error
        # (benchmarks/results/2026-11-28_h200_*catquant*_s21.*).
        "passes.fp8_cat_quant_kernel": True,
        # diffusers' q/k/v fusion before the swap, so PixArt's 1152x3456 and SDXL's
        # 1280x3840 q/k/v pass the size filter as one fp8 GEMM: H200, PixArt-XL O3 28.97 ->
        # 27.87 ms, SDXL UNet 29.40 -> 28.68 ms, same error (2026-11-29_h200_step_fq_*_s26).
        "quant.fuse_qkv": True,
        "inductor.triton.codegen_upcast_to_fp32": False,
        "inductor.emulate_precision_casts": False,
        "inductor.use_fast_math": True,
        "matmul.allow_tf32": True,
    },
}

#: One line per mode for docs and error messages.
MODE_DOCS: dict[str, str] = {
    "cache-all": "persist every compiled artifact under the difforge cache folder",
    "max-autotune": "benchmark GEMM/conv/Triton configs and keep the fastest (slow compile)",
    "max-optimize": "aggressive Inductor fusion and all exact difforge rewrites",
    "cudagraphs": 'replay each call as a CUDA graph to remove launch gaps: difforge records one graph per input signature in one shared memory pool, least recently used evicted (`cudagraphs.*`; Inductor\'s cudagraph trees through `torch.compile(backend="difforge")`)',
    "freezing": "fold weights into the graph as constants (inference only); a later in-place weight update raises until you recompile",
    "low-precision": "fp8 (e4m3) linears where the GPU has fp8 GEMMs (cc >= 8.9; swaps the module's nn.Linear in place, see `quant.*`), fp16/bf16 elementwise math, fast-math, TF32 matmuls",
}

#: ``shapes.batch`` values (difforge.batch says what each does).
BATCH_MODES: tuple[str, ...] = ("upward", "warmup", "unbacked", "dynamo")
#: ``cudagraphs.impl`` values: who records CUDA graphs under the ``cudagraphs`` mode.
CUDAGRAPH_IMPLS: tuple[str, ...] = ("auto", "trees", "pooled")

MemoryFormat = Literal["channels_last", "contiguous", "preserve"]
MEMORY_FORMATS: tuple[str, ...] = ("channels_last", "contiguous", "preserve")

TOP_LEVEL_KEYS: tuple[str, ...] = ("mode", "dynamic", "fullgraph", "memory_format", "disable")

# Keys of our own (not mirrored from a torch config module): default and doc.
OWN_SETTINGS: dict[str, tuple[Any, type | tuple[type, ...], str]] = {
    "matmul.allow_tf32": (
        False,
        bool,
        "TF32 for float32 matmuls and convs while the compiled code runs "
        "(risk: ~1e-3 relative error on fp32 models; none on fp16/bf16)",
    ),
    "cache.enabled": (False, bool, "persist compiled artifacts under cache.dir"),
    "cache.dir": (None, (str, type(None)), "where cache-all persists artifacts"),
    "cache.precompile": (
        False,
        bool,
        "with cache-all, also store what Dynamo traced (torch's experimental caching "
        "precompile) so that a new process skips tracing; entries keyed by options, "
        "difforge source, torch/Triton versions and GPU; fewer guards (e.g. on attention "
        "processors) than a traced graph, hence opt-in (difforge.precompile)",
    ),
    "recompile.limit": (
        None,
        (int, type(None)),
        "recompilations per function before recompile.strict raises "
        "(default: torch._dynamo.config.recompile_limit)",
    ),
    "recompile.strict": (False, bool, "raise instead of warning past recompile.limit"),
    "heuristics.persistent_reduction_max": (
        None,
        (int, type(None)),
        "largest row (reduction) length Inductor keeps in registers in one pass (one read "
        "of the row instead of two); null = Inductor's own limit (1024), which sends the "
        "LayerNorms of 1152- to 3072-wide DiTs to looped reductions",
    ),
    "heuristics.persistent_fp8_quant_max": (
        None,
        (int, type(None)),
        "largest row length of an fp8 activation quantization (a reduction kernel that "
        "writes float8) kept in registers in one pass; null = Inductor's choice. Off: on an "
        "H100 PixArt's FF1 GELU + quantization (4608 wide) took 97 us persistent vs 89.5 us "
        "looped (benchmarks/results/2026-11-26_h100_probe_ffblock_pq.json)",
    ),
    "autotune.bucket": (
        True,
        bool,
        "under max-autotune: reuse a GEMM's autotune winner for another M (batch x tokens) "
        "within autotune.bucket_ratio of a measured one, N/K/dtypes/strides equal, instead of "
        "benchmarking again (a resolution change recompiles without re-tuning); speed effect "
        "not yet measured on a GPU (difforge.autotune_buckets)",
    ),
    "autotune.bucket_ratio": (
        1.25,
        (int, float),
        "autotune.bucket: largest max(M, M0) / min(M, M0) for which the winner measured at M0 "
        "serves M (>= 1; 1 = the same M only)",
    ),
    "shapes.adapters": (
        True,
        bool,
        "with dynamic: true, adapt diffusers modules whose size "
        "branches would recompile per resolution (PixArt's position table, the UNet's "
        "upsample sizes); exact, see difforge.dynamic",
    ),
    "shapes.batch": (
        None,
        (str, type(None)),
        "with dynamic: true, how batch 1 and larger batches avoid recompiling each other "
        "(Dynamo makes batch 1 a constant): 'upward' = a first call at batch 1 compiles the "
        "batch>=2 graph too (a first call at batch>=2 compiles only its own), 'warmup' = the "
        "batch-1 and batch>=2 graphs both compiled at the first call, 'unbacked' = one graph "
        "for every batch (slower steps, torch >= 2.13, no conv nets), 'dynamo' = Dynamo's "
        "default; null = 'upward' for diffusers/transformers models, else 'dynamo'; see "
        "difforge.batch",
    ),
    "cudagraphs.impl": (
        "auto",
        str,
        "who records CUDA graphs under the cudagraphs mode: 'trees' = Inductor's cudagraph "
        "trees (one graph per size, all kept); 'pooled' = difforge records the whole call once "
        "per input signature into one shared memory pool and keeps at most "
        "cudagraphs.max_graphs (least recently used evicted, difforge.graph_pool; needs "
        "difforge.compile/compile_pipe); 'auto' = pooled (torch.compile(backend='difforge') "
        "cannot wrap the call, so Inductor's trees record there)",
    ),
    "fuse_qkv.cached_weights": (
        False,
        bool,
        "fuse_qkv: concatenate the fused weights once, into a buffer the graph reads, "
        "instead of on every call; an in-place weight update recomputes it (checked on "
        "every call and before every pooled CUDA-graph replay). Fuses every group, as under "
        "freezing (SDXL's 1280-wide q/k/v and text k/v too), for one more copy of the fused "
        "weights in memory; inference graphs only (difforge.fused_weights). Off by default: "
        "on an H100 it saved 0.3-1.1% of a step (SDXL UNet 32.09 -> 31.99 ms, PixArt-XL "
        "31.53 -> 31.19, SD3 38.96 -> 38.68) for 0.4-1.6 GiB more memory "
        "(2026-11-28_h100_step_cached_*_s18.json)",
    ),
    "cudagraphs.max_graphs": (
        8,
        int,
        "cudagraphs.impl 'pooled': how many captured graphs (input signatures: resolution, "
        "batch) are kept; the least recently used is evicted past it",
    ),
    "compile.regional": (
        False,
        (bool, str),
        "compile each distinct repeated block (transformer blocks, UNet blocks) once and reuse "
        "it for its identical siblings: true or 'nested' = one graph with torch's "
        "nested_compile_region, 'blocks' = torch.compile per block (outer model eager); cuts "
        "compile time, no numeric change (difforge.regional)",
    ),
    "quant.fp8_linear": (
        False,
        bool,
        "swap the module's eligible nn.Linear for fp8 linears (e4m3 weights per output "
        "channel quantized once, activations per row at run time, torch._scaled_mm) before "
        "tracing; mutates the module in place; only where the fp8 GEMM exists (CUDA, compute "
        "capability >= 8.9), else one warning and no swap (risk: ~2-4% relative error per "
        "linear on random data; check image quality per model)",
    ),
    "quant.min_features": (
        DEFAULT_MIN_FEATURES,
        int,
        "fp8 swap: skip linears with in or out features below this",
    ),
    "quant.min_weight_elements": (
        DEFAULT_MIN_WEIGHT_ELEMENTS,
        int,
        "fp8 swap: skip linears with in*out below this (measured crossover, "
        "difforge.quant.select.DEFAULT_MIN_WEIGHT_ELEMENTS)",
    ),
    "quant.exclude": (
        None,
        (list, type(None)),
        "fp8 swap: name patterns kept in high precision (substring or glob); null = the "
        "defaults (embedders, adaLN/norm, time/caption/context projections, x_embedder; "
        "the model's first and last linears are kept by quant.skip_edges)",
    ),
    "quant.include": (
        None,
        (list, type(None)),
        "fp8 swap: if set, only linears whose names match one of these patterns",
    ),
    "quant.skip_edges": (
        True,
        bool,
        "fp8 swap: keep the model's edges in high precision: every linear outside its "
        "repeated blocks (input/output layers, embedders, modulation), or the first and last "
        "linear of a model without repeated blocks",
    ),
    "quant.skip_gated_outputs": (
        True,
        bool,
        "fp8 swap: keep a feed-forward's output linear in high precision when its activation "
        "is gated (GEGLU: SDXL, SD 1.5), whose fp8 row quantization costs more than the fp8 "
        "GEMM saves (H100, SDXL's 1280-wide level: GEGLU + FF2 0.068 ms fp16 vs 0.098 ms "
        "fp8; difforge.quant.select.GATED_ACTIVATIONS)",
    ),
    "quant.skip_cross_attention_kv": (
        True,
        bool,
        "fp8 swap: keep a cross-attention's k/v projections in high precision: they read "
        "only the prompt's tokens (SDXL: 154 rows with CFG), too few for fp8 to pay (H100, "
        "SDXL UNet: 120 such GEMMs 0.80 ms a step in fp16, 1.03 ms in fp8; "
        "difforge.quant.select.CROSS_ATTENTION_KV)",
    ),
    "fuse_qkv.modules": (
        False,
        bool,
        "before tracing, call the module's diffusers fuse_qkv_projections() (its attention "
        "then runs one q/k/v GEMM over weights concatenated once), the unfused q/k/v becoming "
        "views of the fused rows (difforge.fused_projections: no second copy, no per-call "
        "concatenation, in-place updates of either stay in step). Changes the module in "
        "place, as compile_pipe(fuse_qkv_projections=True) does; models with custom "
        "attention processors or adapter-wrapped (LoRA) projections are left unfused. On "
        "in max-optimize (O2, O3)",
    ),
    "quant.fuse_qkv": (
        False,
        bool,
        "fp8 swap: first call the module's diffusers fuse_qkv_projections(), so each "
        "attention's q/k/v (and k/v, added q/k/v) become one wider fp8 linear (PixArt's "
        "1152x3456 to_qkv passes the size filter where 1152x1152 to_q does not); the graph "
        "pass fuse_qkv cannot fuse fp8 linears. The unfused linears become views of the "
        "fused rows (difforge.fused_projections), so no weight is held twice. On in "
        "low-precision",
    ),
    "attention.select": (
        "measured",
        str,
        "how the attention_int8 pass (low-precision) and the attention_hopper pass pick SDPA "
        "or their kernel per shape: 'measured' = time both (and each candidate tile) on this "
        "GPU at compile time and use the kernel only where it wins by "
        "attention.min_speedup; 'always' = every eligible call, untimed (A/B runs)",
    ),
    "attention.pv_fp8": (
        False,
        bool,
        "8-bit attention may run P·V in fp8 e4m3 too (2x the tensor-core rate of fp16; error "
        "vs SDPA ~3.5e-2 relative on random data instead of ~1.2e-2)",
    ),
    "attention.min_speedup": (
        1.03,
        (int, float),
        "attention.select 'measured': the 8-bit kernel (quantization included) or the Gluon "
        "attention must be this many times faster than SDPA to replace it",
    ),
    "attention.wide_max_score_bytes": (
        1 << 30,
        int,
        "attention_wide_heads (O2/O3): largest score matrix per sample (heads x queries x "
        "keys x element size) for which an SDPA call with head dim > 256 becomes GEMM + "
        "softmax + GEMM (materialised twice, scores and probabilities, for the whole batch); "
        "the SD VAE's mid-block at a 1024² decode needs 512 MiB a sample, at 2048² 8 GiB. Per "
        "sample so that, with dynamic shapes, a batch change never recompiles",
    ),
    "shapes.duck_sizing": (
        None,
        (bool, type(None)),
        "give equal sizes of different inputs one symbol (Dynamo's default); null = off when "
        "dynamic is true, because e.g. PixArt's resolution micro-condition (size 2) then gets "
        "tied to the batch size and every batch change recompiles",
    ),
}

_POSITIVE_INTS = frozenset(
    {
        "heuristics.persistent_reduction_max",
        "heuristics.persistent_fp8_quant_max",
        "cudagraphs.max_graphs",
    }
)
#: Own string keys with a fixed set of values.
_CHOICES: dict[str, tuple[str, ...]] = {
    "attention.select": SELECT_POLICIES,
    "cudagraphs.impl": CUDAGRAPH_IMPLS,
    "shapes.batch": BATCH_MODES,
}
_NON_NEGATIVE_INTS = frozenset(
    {
        "quant.min_features",
        "quant.min_weight_elements",
        "attention.wide_max_score_bytes",
        "recompile.limit",
    }
)
#: What ``compile.regional`` takes besides true/false (difforge.regional).
REGIONAL_STYLES: tuple[str, ...] = ("nested", "blocks")
_PATTERN_LISTS = frozenset({"quant.exclude", "quant.include"})

TORCH_CONFIG_NAMESPACES: tuple[str, ...] = ("inductor", "functorch")
NAMESPACES: tuple[str, ...] = (
    "inductor",
    "functorch",
    "passes",
    "matmul",
    "cache",
    "recompile",
    "shapes",
    "heuristics",
    "quant",
    "attention",
    "cudagraphs",
    "autotune",
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _closest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def bad_regional_style(value: object) -> OptionsError:
    """The error for a ``compile.regional`` value that is neither a bool nor a style."""
    hint = _closest(value, REGIONAL_STYLES) if isinstance(value, str) else ""
    return OptionsError(
        f"option 'compile.regional' must be true, false or one of "
        f"{', '.join(REGIONAL_STYLES)}; got {value!r}{hint}"
    )


def _torch_config(namespace: str) -> dict[str, Any]:
    """The current values of a torch config module, keyed by their dotted names."""
    if namespace == "inductor":
        import torch._inductor.config as module
    else:
        import torch._functorch.config as module
    return module.get_config_copy()


def _pass_defaults() -> dict[str, bool]:
    from difforge.passes.registry import all_passes

    return {f"passes.{p.name}": p.tier == "cleanup" for p in all_passes().values()}


def _check_type(key: str, value: Any, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass; a user writing 1 for true is most likely a mistake.
    if isinstance(value, bool) and bool not in _as_tuple(expected):
        raise OptionsError(f"option {key!r} expects {_type_names(expected)}, got bool {value!r}")
    if not isinstance(value, expected):
        raise OptionsError(
            f"option {key!r} expects {_type_names(expected)}, got {type(value).__name__} {value!r}"
        )


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: type | tuple[type, ...]) -> str:
    return " or ".join("null" if x is type(None) else x.__name__ for x in _as_tuple(t))


def _expected_type_of(current: Any) -> type | tuple[type, ...] | None:
    if isinstance(current, bool):
        return bool
    if isinstance(current, int):
        return int
    if isinstance(current, float):
        return (int, float)
    if isinstance(current, str):
        return str
    return None  # None-valued or structured torch settings: accept as given


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise OptionsError(f"environment variable {name}={raw!r} must be 1 or 0 (or true/false)")


def user_inductor_cache_dir(env: Mapping[str, str] | None = None) -> str | None:
    """TORCHINDUCTOR_CACHE_DIR if the user chose it, else None.

    The first time Inductor asks for its cache folder, torch writes its own default
    (``/tmp/torchinductor_$USER``) into ``os.environ`` (``cache_dir_utils.cache_dir``), and
    importing difforge already imports Dynamo: that value is torch's, not a choice, and a
    cache root under /tmp would not survive a reboot. So a value equal to torch's default
    counts as unset."""
    env = os.environ if env is None else env
    value = env.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:  # private API (torch 2.9-2.13); without it every value counts as the user's
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
    except ImportError:
        return value
    if os.path.abspath(os.path.expanduser(value)) == os.path.abspath(torch_default()):
        return None
    return value


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The cache root: DIFFORGE_CACHE_DIR, else a ``difforge`` folder inside a
    TORCHINDUCTOR_CACHE_DIR the user set (never that folder itself, which Inductor owns;
    see :func:`user_inductor_cache_dir`), else the user cache directory."""
    env = os.environ if env is None else env
    if env.get("DIFFORGE_CACHE_DIR"):
        return Path(env["DIFFORGE_CACHE_DIR"]).expanduser()
    inductor_dir = user_inductor_cache_dir(env)
    if inductor_dir:
        return Path(inductor_dir).expanduser() / "difforge"
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "difforge"


def parse_mode(mode: str) -> tuple[str | None, tuple[str, ...]]:
    """Split ``"O2:cache-all"`` into its preset (if any) and its modes in canonical order."""
    if not isinstance(mode, str):
        raise OptionsError(f"option 'mode' expects str, got {type(mode).__name__} {mode!r}")
    tokens = [t.strip() for t in mode.split(":")]
    if mode.strip() == "":
        tokens = []
    preset: str | None = None
    chosen: set[str] = set()
    valid = [*PRESETS, *MODES]
    for token in tokens:
        if token in PRESETS:
            if preset is not None and preset != token:
                raise OptionsError(
                    f"mode {mode!r} combines presets {preset!r} and {token!r}; pick one "
                    "(presets may be combined with single modes, e.g. 'O2:cache-all')"
                )
            preset = token
            chosen.update(PRESETS[token])
        elif token in MODES:
            chosen.add(token)
        else:
            shown = "empty mode (check for '::' or a trailing ':')" if not token else repr(token)
            raise OptionsError(
                f"unknown mode {shown} in {mode!r}; valid modes: {', '.join(MODES)}; "
                f"presets: {', '.join(PRESETS)}{_closest(token, valid)}"
            )
    return preset, tuple(m for m in MODES if m in chosen)


@dataclass(frozen=True)
class CompileConfig:
    """Everything one compilation needs, validated. Build it with :func:`parse_options`."""

    mode: str
    """The modes in force, canonical order, joined by ':' ('' for plain O1)."""
    preset: str | None
    """The preset named in ``mode``, if any."""
    modes: tuple[str, ...]
    dynamic: bool | None
    """Dynamic shapes: True = symbolic from the start, None = after the first change."""
    fullgraph: bool
    """Raise on graph breaks instead of splitting the model."""
    memory_format: MemoryFormat
    """Layout for 4-D conv weights and inputs; channels_last is faster for UNets/VAEs."""
    disable: bool
    """Return the module unchanged (eager), for A/B checks."""
    settings: Mapping[str, Any] = field(repr=False)
    """Every dotted switch in force (mode values, env, explicit overrides)."""
    explicit: frozenset[str] = field(default_factory=frozenset, repr=False)
    """The dotted keys the user set explicitly (they beat modes and env)."""

    def namespace(self, name: str) -> dict[str, Any]:
        """The settings of one namespace, without the prefix."""
        prefix = f"{name}."
        return {k[len(prefix) :]: v for k, v in self.settings.items() if k.startswith(prefix)}

    def inductor_patches(self) -> dict[str, Any]:
        """The ``torch._inductor.config`` patch this config applies while compiling."""
        return self.namespace("inductor")

    def functorch_patches(self) -> dict[str, Any]:
        """The ``torch._functorch.config`` patch this config applies while compiling."""
        return self.namespace("functorch")

    def pass_enabled(self, name: str) -> bool:
        return bool(self.settings.get(f"passes.{name}", False))

    @property
    def allow_tf32(self) -> bool:
        return bool(self.settings["matmul.allow_tf32"])

    @property
    def duck_sizing(self) -> bool:
        """Whether Dynamo may tie equal sizes of different inputs to one symbol."""
        explicit = self.settings.get("shapes.duck_sizing")
        return (self.dynamic is not True) if explicit is None else bool(explicit)

    def attention_policy(self) -> AttentionPolicy:
        """The ``attention.*`` settings for the attention_int8 pass."""
        return AttentionPolicy(
            select=str(self.settings["attention.select"]),
            pv_fp8=bool(self.settings["attention.pv_fp8"]),
            min_speedup=float(self.settings["attention.min_speedup"]),
            wide_max_score_bytes=int(self.settings["attention.wide_max_score_bytes"]),
        )

    def cudagraph_impl(self) -> str | None:
        """Who records CUDA graphs: 'trees' (Inductor), 'pooled' (difforge.graph_pool), or
        None when the cudagraphs mode is off."""
        if not self.settings.get("inductor.triton.cudagraphs", False):
            return None
        impl = str(self.settings["cudagraphs.impl"])
        return "pooled" if impl == "auto" else impl

    def without_inductor_cudagraphs(self) -> CompileConfig:
        """This config with Inductor's own CUDA graphs off (difforge's pool records them)."""
        settings = dict(self.settings)
        settings["inductor.triton.cudagraphs"] = False
        return replace(self, settings=types.MappingProxyType(settings))

    @property
    def cache_enabled(self) -> bool:
        return bool(self.settings["cache.enabled"])

    @property
    def cache_dir(self) -> Path:
        configured = self.settings.get("cache.dir")
        return Path(configured).expanduser() if configured else default_cache_dir()

    def placement_key(self) -> str:
        """:meth:`key` plus the folder compiled artifacts go to (with the cache on): two
        configs that differ only there compile the same code but must not share a backend
        or a compiled component, or the second folder would never be written."""
        folder = str(self.cache_dir) if self.cache_enabled else None
        return json.dumps([self.key(), folder])

    def key(self) -> str:
        """A stable JSON string of everything that can change the compiled result (not where
        it is stored: see :meth:`placement_key`), so cache entries stay portable."""
        return json.dumps(
            {
                "mode": self.mode,
                "dynamic": self.dynamic,
                "fullgraph": self.fullgraph,
                "memory_format": self.memory_format,
                "settings": {k: v for k, v in self.settings.items() if k != "cache.dir"},
            },
            sort_keys=True,
            default=repr,
        )


def _bare_mode(text: str) -> str | None:
    """``text`` when it is a mode string alone (``"O2"``, ``"O3:cache-all"``), else None."""
    tokens = [t.strip() for t in text.split(":")]
    if all(t in PRESETS or t in MODES for t in tokens):
        return ":".join(tokens)
    return None


def load_options(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Options as a plain dict: JSON strings decoded, with position-bearing errors; a bare
    mode string (``"O2"``, ``"max-autotune:cudagraphs"``) is ``{"mode": ...}``."""
    if options is None:
        return {}
    if isinstance(options, str):
        try:
            loaded = json.loads(options) if options.strip() else {}
        except json.JSONDecodeError as exc:
            mode = _bare_mode(options)
            if mode is not None:
                return {"mode": mode}
            hint = "" if options.lstrip().startswith("{") else " (or a mode such as 'O2')"
            raise OptionsError(
                f"options are not valid JSON{hint}: {exc.msg} at line {exc.lineno} column "
                f"{exc.colno} (char {exc.pos}) in {options!r}"
            ) from None
        if not isinstance(loaded, dict):
            raise OptionsError(f"options JSON must be an object, got {type(loaded).__name__}")
        return loaded
    if isinstance(options, Mapping):
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise OptionsError(f"option keys must be strings, got {bad!r}")
        return dict(options)
    raise OptionsError(
        "options must be a dict, a JSON string, a mode string or None, got "
        f"{type(options).__name__}"
    )


def _validate_dotted(key: str, value: Any, torch_configs: dict[str, dict[str, Any]]) -> None:
    namespace, _, name = key.partition(".")
    if namespace in TORCH_CONFIG_NAMESPACES:
        current = torch_configs[namespace]
        if name not in current:
            raise OptionsError(
                f"unknown option {key!r}: torch.{'_inductor' if namespace == 'inductor' else '_functorch'}"
                f".config has no setting {name!r}{_closest(name, list(current))}"
            )
        expected = _expected_type_of(current[name])
        if expected is not None:
            _check_type(key, value, expected)
        return
    if namespace == "passes":
        known = _pass_defaults()
        if key not in known:
            raise OptionsError(
                f"unknown pass {name!r}; registered passes: "
                f"{', '.join(k.split('.', 1)[1] for k in known)}{_closest(key, list(known))}"
            )
        _check_type(key, value, bool)
        return
    if key in OWN_SETTINGS:
        _check_type(key, value, OWN_SETTINGS[key][1])
        if key in _POSITIVE_INTS and value is not None and value < 1:
            raise OptionsError(f"{key!r} must be a positive integer or null, got {value!r}")
        if key in _NON_NEGATIVE_INTS and value is not None and value < 0:
            raise OptionsError(f"{key!r} must be an integer >= 0, got {value!r}")
        if key == "compile.regional" and isinstance(value, str) and value not in REGIONAL_STYLES:
            # Checked here, not only when regions are built: by then difforge.compile and
            # compile_pipe have changed the module (memory format, fp8 swap, fused q/k/v).
            raise bad_regional_style(value)
        choices = _CHOICES.get(key)
        if choices is not None and value is not None and value not in choices:
            raise OptionsError(
                f"{key!r} must be one of {', '.join(choices)}, got {value!r}"
                f"{_closest(str(value), choices)}"
            )
        if key == "attention.min_speedup" and not value > 0:
            raise OptionsError(f"{key!r} must be a positive number, got {value!r}")
        if key == "autotune.bucket_ratio" and not value >= 1:
            raise OptionsError(f"{key!r} must be a number >= 1, got {value!r}")
        patterns = value if key in _PATTERN_LISTS and value is not None else []
        if not all(isinstance(v, str) and v for v in patterns):
            raise OptionsError(f"{key!r} must be a list of non-empty strings, got {value!r}")
        return
    valid = [*TOP_LEVEL_KEYS, *OWN_SETTINGS, *(f"{n}.<name>" for n in TORCH_CONFIG_NAMESPACES)]
    raise OptionsError(
        f"unknown option {key!r}; valid keys: {', '.join(valid)}, passes.<name>"
        f"{_closest(key, [*TOP_LEVEL_KEYS, *OWN_SETTINGS])}"
    )


def _merge_call_arg(name: str, from_options: Any, from_call: Any) -> Any:
    if from_call is not None and from_options is not None and from_call != from_options:
        raise OptionsError(
            f"conflicting {name!r}: {name}={from_call!r} was passed to compile() but the "
            f"options say {from_options!r}; give it once"
        )
    return from_call if from_call is not None else from_options


def parse_options(
    options: Mapping[str, Any] | str | None = None,
    *,
    dynamic: bool | None = None,
    fullgraph: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> CompileConfig:
    """Validate ``options`` (dict, JSON string or a bare mode such as ``"O2"``) against the
    modes, env and torch configs.

    Raises :class:`OptionsError` for anything wrong, before any tracing happens.
    """
    env = os.environ if env is None else env
    raw = load_options(options)

    for key in raw:
        if "." not in key and key not in TOP_LEVEL_KEYS:
            raise OptionsError(
                f"unknown option {key!r}; valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}, "
                f"or dotted keys such as 'inductor.max_autotune' or 'passes.fuse_qkv'"
                f"{_closest(key, [*TOP_LEVEL_KEYS, *MODES])}"
            )

    mode_text = raw.get("mode")
    if mode_text is None:
        mode_text = env.get("DIFFORGE_MODE") or DEFAULT_MODE
    preset, modes = parse_mode(mode_text)

    for key in ("dynamic",):
        if key in raw and raw[key] is not None:
            _check_type(key, raw[key], bool)
    for key in ("fullgraph", "disable"):
        if key in raw:
            _check_type(key, raw[key], bool)
    memory_format = raw.get("memory_format", "preserve")
    if memory_format not in MEMORY_FORMATS:
        raise OptionsError(
            f"option 'memory_format' must be one of {', '.join(MEMORY_FORMATS)}, "
            f"got {memory_format!r}{_closest(str(memory_format), MEMORY_FORMATS)}"
        )
    if dynamic is not None:
        _check_type("dynamic", dynamic, bool)
    if fullgraph is not None:
        _check_type("fullgraph", fullgraph, bool)

    torch_configs = {ns: _torch_config(ns) for ns in TORCH_CONFIG_NAMESPACES}
    dotted = {k: v for k, v in raw.items() if "." in k}
    for key, value in dotted.items():
        _validate_dotted(key, value, torch_configs)

    settings: dict[str, Any] = {k: v[0] for k, v in OWN_SETTINGS.items()}
    settings.update(_pass_defaults())

    # Environment: lowest precedence above the defaults.
    graph_cache = _env_bool(env, "DIFFORGE_GRAPH_CACHE")
    if graph_cache is None:
        graph_cache = _env_bool(env, "NEXFORT_GRAPH_CACHE")
    if graph_cache is not None:
        settings["cache.enabled"] = graph_cache
        if graph_cache:
            settings.update(_available(MODE_SETTINGS["cache-all"], torch_configs))
    if env.get("DIFFORGE_CACHE_DIR") or env.get("TORCHINDUCTOR_CACHE_DIR"):
        settings["cache.dir"] = str(default_cache_dir(env))

    for mode in modes:
        settings.update(_available(MODE_SETTINGS[mode], torch_configs))
    settings.update(dotted)

    if settings.get("cache.precompile") and not settings["cache.enabled"]:
        raise OptionsError(
            "option 'cache.precompile' stores entries in the persistent cache; add "
            "'cache-all' to the mode or set 'cache.enabled': true"
        )
    if "cache.dir" in dotted and not settings["cache.enabled"]:
        raise OptionsError(
            "option 'cache.dir' is set but caching is off; add 'cache-all' to the mode "
            "or set 'cache.enabled': true"
        )

    dynamic = _merge_call_arg("dynamic", raw.get("dynamic"), dynamic)
    if dynamic is None and preset is not None:
        dynamic = PRESET_DEFAULTS[preset].get("dynamic")
    return CompileConfig(
        mode=":".join(modes),
        preset=preset,
        modes=modes,
        dynamic=dynamic,
        fullgraph=bool(_merge_call_arg("fullgraph", raw.get("fullgraph"), fullgraph)),
        memory_format=memory_format,
        disable=bool(raw.get("disable", False)),
        settings=types.MappingProxyType(settings),
        explicit=frozenset(dotted),
    )


def _available(mode_settings: dict[str, Any], torch_configs: dict[str, dict[str, Any]]) -> dict:
    """Drop the torch settings this torch version lacks (modes target 2.9 through 2.13+)."""
    kept = {}
    for key, value in mode_settings.items():
        namespace, _, name = key.partition(".")
        if namespace in TORCH_CONFIG_NAMESPACES and name not in torch_configs[namespace]:
            continue
        kept[key] = value
    return kept


def mode_table_markdown() -> str:
    """The README's mode table, generated from :data:`MODE_SETTINGS` and the presets."""
    rows = ["| mode | what it does | settings it turns on |", "| --- | --- | --- |"]
    for mode in MODES:
        settings = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in MODE_SETTINGS[mode].items())
        rows.append(f"| `{mode}` | {MODE_DOCS[mode]} | {settings} |")
    for preset, modes in PRESETS.items():
        what = " + ".join(f"`{m}`" for m in modes) or "Inductor defaults + cleanup passes"
        defaults = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in PRESET_DEFAULTS[preset].items())
        if defaults:
            what += f"; {defaults} unless given"
        rows.append(f"| `{preset}` | preset | {what} |")
    return "\n".join(rows)
