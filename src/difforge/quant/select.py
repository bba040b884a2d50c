"""Which linears to quantize, and converting them in place with a report.

>>> report = quantize_linears(model, ModuleFilter(min_features=1024))
>>> report.converted[:3], report.skipped["proj_out"]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from difforge.quant.fp8 import ALIGNMENT, Fp8Linear

__all__ = [
    "CROSS_ATTENTION_KV",
    "DEFAULT_EXCLUDE",
    "DEFAULT_MIN_FEATURES",
    "DEFAULT_MIN_WEIGHT_ELEMENTS",
    "GATED_ACTIVATIONS",
    "ModuleFilter",
    "QuantizeReport",
    "cross_attention_kv_linears",
    "gated_output_linears",
    "quantize_linears",
]

#: Name patterns left in high precision by default (substring of the dotted module name,
#: or a glob if the pattern has ``*?[``). Why: embedders and the time/caption/context
#: projections run once per step on few rows (no speed to win) and feed every token, so
#: their error is systematic; ``norm_out`` and the patch embed are the model's last and
#: first layers, where errors reach the latents undamped; ``norm``/``adaln`` are the adaLN
#: modulation linears (one row per image, and their output scales and gates every token).
#: No ``proj_in``/``proj_out`` pattern: as a substring it also matched the largest GEMM of
#: FLUX (each single block's 15360x3072 ``proj_out``); the model-level ones are edges,
#: which ``skip_edges`` keeps in high precision.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "emb",
    "norm",
    "adaln",
    "time",
    "caption_projection",
    "context_embedder",
    "x_embedder",
)

#: Skip a linear whose in or out features are below this: a narrow side gives a GEMM too
#: thin to reach fp8's throughput, and the activation quantization costs a pass over the
#: input whatever N is. DiT linears (PixArt 1152/4608, SD3 1536, FLUX 3072) clear it; SDXL's
#: 640-wide attention does not (unmeasured below 1152: the GPU sweep in the README's
#: next-steps list measures it).
DEFAULT_MIN_FEATURES = 1024

#: Skip a linear whose weight has fewer elements (in x out) than this. Measured on an H200
#: (torch 2.11, M = 8192 rows, ``benchmarks/results/2026-11-26_h200_probe_ops.json``): the
#: fp8 GEMM alone saves 0.007 ms at 1152x1152 (1.24x) but 0.031-0.046 ms at 1152x3456 and
#: up (1.44-1.66x), while a quantization pass that Inductor cannot fuse into a producer
#: (e.g. after attention, an opaque kernel) costs 0.015-0.08 ms. The GEMM saving grows
#: with in x out, the quantization cost only with in, so square 1152-wide layers (PixArt's
#: separate q/k/v and attention out projection) lose or tie and are skipped; 2**21 sits
#: between 1152x1152 (1.3M) and 1152x3456 (4.0M). Risk: none numerically (skipping keeps
#: precision); on models with wide square layers it may leave speed on the table.
DEFAULT_MIN_WEIGHT_ELEMENTS = 2**21

#: Gated activations (by class name: diffusers' ``GEGLU``) whose feed-forward output linear
#: ``skip_gated_outputs`` keeps in high precision. Its input ``h * gelu(gate)`` is read from
#: a 2x-wide FF1 output; quantizing it per row takes a reduction pass before the scaled
#: pass, where the high-precision GEGLU is one elementwise pass. Measured on an H100 at
#: SDXL's 1280-wide level (2048 rows, ``2026-11-27_h100_probe_sdxl_fp8_s16.json``): GEGLU
#: 0.027 ms + fp16 FF2 0.041 ms against GEGLU + fp8 quantization 0.061 ms + fp8 FF2 0.035
#: ms, so fp8 made the pair 1.45x slower; at the 640-wide level (8192 rows) 0.091 vs
#: 0.15 ms. SwiGLU-style gates are not listed: unmeasured.
GATED_ACTIVATIONS: frozenset[str] = frozenset({"GEGLU"})

#: The projections of a cross-attention that read the prompt's tokens (diffusers'
#: ``Attention`` with ``is_cross_attention``), which ``skip_cross_attention_kv`` keeps in
#: high precision: they multiply only the text tokens (SDXL: 77 per prompt, 154 rows with
#: CFG), too few rows for the fp8 GEMM to pay. SDXL UNet on an H100, one run
#: (``2026-11-27_h100_step_o3_unet_s13.json``): its 120 text k/v GEMMs took 0.80 ms a step
#: in fp16 under stock compile and 1.03 ms in fp8 under O3, before their quantization.
#: ``to_kv`` is the pair after diffusers' ``fuse_qkv_projections()`` (``quant.fuse_qkv``).
CROSS_ATTENTION_KV: tuple[str, ...] = ("to_k", "to_v", "to_kv")


def _matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


@dataclass(frozen=True)
class ModuleFilter:
    """Chooses the ``nn.Linear`` modules to quantize; :meth:`reason` says why not.

    ``min_features``: both in and out features must be at least this (0 = any size).
    Risk: none numerically; too low a value can make small layers slower.
    ``exclude``: name patterns never converted (default :data:`DEFAULT_EXCLUDE`; pass
    ``DEFAULT_EXCLUDE + (...)`` to extend). Risk: removing the defaults quantizes the
    embedders and the output projection, the layers most sensitive to fp8 error.
    ``include``: if given, only names matching one of these patterns are candidates.
    ``min_weight_elements``: skip linears with ``in * out`` below this (default
    :data:`DEFAULT_MIN_WEIGHT_ELEMENTS`, measured; 0 = any).
    ``skip_edges``: leave the model's edges in high precision. Where the model has
    repeated blocks (the children of a ``ModuleList``/``Sequential`` holding 2+ modules of
    one type, as a DiT's transformer blocks), the edges are every linear outside them: the
    input and output layers, embedders, adaLN modulation, caption projections, which run
    on few rows (no speed to win) or feed every token and the latents (their error is
    systematic and undamped). Without repeated blocks (a plain MLP), the edges are the
    first and last linear in registration order. Diffusers models are also covered by name
    (``exclude``). Risk of turning it off: exactly those errors. Applies in
    :meth:`plan`/:func:`quantize_linears`, not in :meth:`reason`.
    ``skip_gated_outputs``: leave a feed-forward's output linear in high precision when its
    activation is gated (:data:`GATED_ACTIVATIONS`, SDXL's and SD 1.5's GEGLU): there the
    input's fp8 quantization costs more than the fp8 GEMM saves. Risk of turning it off:
    slower steps, not worse numerics. Applies in :meth:`plan` like ``skip_edges``.
    ``skip_cross_attention_kv``: leave a cross-attention's k/v projections (they read the
    prompt's few tokens, :data:`CROSS_ATTENTION_KV`) in high precision. Same risk, same place.
    Hard rules, not overridable: only ``nn.Linear`` (exact type, so subclasses such as
    LoRA wrappers are left alone) and in/out features multiples of 16 (``_scaled_mm``).
    """

    min_features: int = DEFAULT_MIN_FEATURES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include: tuple[str, ...] | None = None
    min_weight_elements: int = DEFAULT_MIN_WEIGHT_ELEMENTS
    skip_edges: bool = True
    skip_gated_outputs: bool = True
    skip_cross_attention_kv: bool = True

    def __post_init__(self) -> None:
        for key in ("min_features", "min_weight_elements"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        for key in ("skip_edges", "skip_gated_outputs", "skip_cross_attention_kv"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, got {getattr(self, key)!r}")
        for key in ("exclude", "include"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, str):  # a lone string would be read as characters
                value = (value,)
            value = tuple(value)
            if not all(isinstance(p, str) and p for p in value):
                raise TypeError(f"{key} must be non-empty name patterns (str), got {value!r}")
            object.__setattr__(self, key, value)

    def reason(self, name: str, module: nn.Module) -> str | None:
        """Why ``module`` (called ``name``) is not converted, or None if it is."""
        if type(module) is not nn.Linear:
            return f"not an nn.Linear ({type(module).__name__})"
        k, n = module.in_features, module.out_features
        if k % ALIGNMENT or n % ALIGNMENT:
            return f"features {k}x{n} not multiples of {ALIGNMENT}"
        if min(k, n) < self.min_features:
            return f"features {k}x{n} below min_features={self.min_features}"
        if k * n < self.min_weight_elements:
            return f"weight {k}x{n} below min_weight_elements={self.min_weight_elements}"
        if self.include is not None and not any(_matches(name, p) for p in self.include):
            return "not matched by include"
        hit = next((p for p in self.exclude if _matches(name, p)), None)
        if hit is not None:
            return f"excluded by pattern {hit!r}"
        return None

    def __call__(self, name: str, module: nn.Module) -> bool:
        return self.reason(name, module) is None

    def plan(self, root: nn.Module) -> dict[str, str | None]:
        """Every ``nn.Linear`` (and subclass) of ``root`` by name -> why it is skipped,
        or None where it is converted; :meth:`reason` plus ``skip_edges``,
        ``skip_gated_outputs`` and ``skip_cross_attention_kv``."""
        linears = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)]
        plan = {n: self.reason(n, m) for n, m in linears}
        # The structural rules, in order (the first that applies names the reason), each
        # only where the size and name rules would convert.
        skips: list[tuple[str, str]] = []
        if self.skip_edges:
            edges = edge_linears(root, [n for n, _ in linears])
            skips += [(n, f"{which} (skip_edges)") for n, which in edges.items()]
        if self.skip_gated_outputs:
            gated = gated_output_linears(root)
            skips += [
                (n, f"input is a {g}'s output (skip_gated_outputs)") for n, g in gated.items()
            ]
        if self.skip_cross_attention_kv:
            text = "reads the prompt's tokens (skip_cross_attention_kv)"
            skips += [(n, text) for n in cross_attention_kv_linears(root)]
        for name, why in skips:
            if plan.get(name, "") is None:
                plan[name] = why
        return plan


def _block_prefixes(root: nn.Module) -> list[str]:
    """Dotted prefixes (``"blocks.3."``) of the children of containers holding 2+ modules
    of one type: the repeated body of the model."""
    prefixes = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        children = list(module.named_children())
        types = [type(c) for _, c in children]
        for child_name, child in children:
            if types.count(type(child)) >= 2 and type(child) is not nn.Linear:
                prefixes.append(f"{name}.{child_name}." if name else f"{child_name}.")
    return prefixes


def edge_linears(root: nn.Module, names: list[str]) -> dict[str, str]:
    """The edges among ``names`` (linears in registration order) -> why: every linear
    outside the repeated blocks where there are some, else the first and the last."""
    body = _block_prefixes(root)
    if body:
        outer = [n for n in names if not any(n.startswith(p) for p in body)]
        return dict.fromkeys(outer, "outside the repeated blocks")
    if not names:
        return {}
    return {names[-1]: "last linear of the model", names[0]: "first linear of the model"}


def gated_output_linears(root: nn.Module) -> dict[str, str]:
    """Linears fed by a gated activation -> its class name: in a ``ModuleList`` or
    ``Sequential`` (diffusers' ``FeedForward.net``: activation, dropout, output linear),
    every ``nn.Linear`` child that comes after a child whose class is in
    :data:`GATED_ACTIVATIONS`."""
    found: dict[str, str] = {}
    for name, module in root.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        gate = None
        for child_name, child in module.named_children():
            kind = type(child).__name__
            if kind in GATED_ACTIVATIONS:
                gate = kind
            elif gate is not None and isinstance(child, nn.Linear):
                found[f"{name}.{child_name}" if name else child_name] = gate
    return found


def cross_attention_kv_linears(root: nn.Module) -> list[str]:
    """The ``to_k``/``to_v`` (or fused ``to_kv``) linears of every module of ``root`` that
    says it is a cross-attention (diffusers' ``Attention.is_cross_attention``): they read the
    prompt's tokens, not the image's. Joint attention (SD3, FLUX) is not a cross-attention: its
    context stream has projections of its own (``add_k_proj``) and is left to the size rules."""
    found = []
    for name, module in root.named_modules():
        if getattr(module, "is_cross_attention", False) is not True:
            continue
        for child in CROSS_ATTENTION_KV:
            if isinstance(getattr(module, child, None), nn.Linear):
                found.append(f"{name}.{child}" if name else child)
    return found


@dataclass
class QuantizeReport:
    """What :func:`quantize_linears` did: converted names, skipped names with reasons."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    """Weight bytes of the converted linears before (their original dtype)."""
    bytes_after: int = 0
    """fp8 weight plus float32 scale bytes of the same linears after."""

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def summary(self) -> str:
        return (
            f"{len(self.converted)} linears to fp8, {len(self.skipped)} skipped, "
            f"{self.bytes_saved / 2**20:.1f} MiB saved"
        )


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_linears(
    module: nn.Module,
    module_filter: ModuleFilter | Callable[[str, nn.Module], bool] | None = None,
    *,
    converter: Callable[[nn.Linear], nn.Module] = Fp8Linear.from_linear,
    keep: Mapping[str, str] | None = None,
) -> QuantizeReport:
    """Replace the linears of ``module`` chosen by ``module_filter`` in place.

    Each weight is quantized once, here. A plain callable filter gives no reasons; its
    skipped linears are reported as "rejected by filter". ``keep``: linears left as they
    are whatever the filter says, name -> the reason reported. Returns a
    :class:`QuantizeReport`.
    """
    keep = keep or {}
    module_filter = module_filter if module_filter is not None else ModuleFilter()
    report = QuantizeReport()
    # Collect names first: replacing while iterating named_modules would visit the new
    # modules. Names, not modules: each high-precision weight is freed as soon as it is
    # converted, so the swap never holds the whole model twice (FLUX.1-dev O3's peak).
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    plan = module_filter.plan(module) if isinstance(module_filter, ModuleFilter) else {}
    for name in names:
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            continue  # removed by an earlier conversion (an attention unfused as its part went)
        if not isinstance(linear, nn.Linear):
            continue
        if name in keep:
            why: str | None = keep[name]
        elif isinstance(module_filter, ModuleFilter):
            why = plan[name]
        else:
            why = None if module_filter(name, linear) else "rejected by filter"
        if why is not None:
            report.skipped[name] = why
            continue
        new = converter(linear)
        _set_submodule(module, name, new)
        report.converted.append(name)
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += _weight_bytes(new)
    return report


def _weight_bytes(module: nn.Module) -> int:
    """Bytes of what stands for the weight in a converted linear: its tensors but the bias
    (which the conversion keeps as it was), parameters and buffers alike."""
    tensors = {
        **dict(module.named_parameters(recurse=False)),
        **dict(module.named_buffers(recurse=False)),
    }
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name != "bias")
