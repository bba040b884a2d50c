"""Which linears to quantize, and converting them in place with a report.

>>> report = quantize_linears(model, ModuleFilter(min_features=1024))
>>> report.converted[:3], report.skipped["proj_out"]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from difforge.quant.fp8 import ALIGNMENT, Fp8Linear

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_MIN_FEATURES",
    "ModuleFilter",
    "QuantizeReport",
    "quantize_linears",
]

#: Name patterns left in high precision by default (substring of the dotted module name,
#: or a glob if the pattern has ``*?[``). Why: embedders and the time/caption/context
#: projections run once per step on few rows (no speed to win) and feed every token, so
#: their error is systematic; ``proj_in``/``proj_out``/``norm_out`` and the patch embed
#: are the model's first and last layers, where errors reach the latents undamped;
#: ``norm``/``adaln`` are the adaLN modulation linears (one row per image, and their output
#: scales and gates every token).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "emb",
    "proj_in",
    "proj_out",
    "norm",
    "adaln",
    "time",
    "caption_projection",
    "context_embedder",
    "x_embedder",
)

#: Skip a linear whose in or out features are below this. A guess, not a measurement:
#: below ~1k the fp8 GEMM's gain is eaten by the activation quantization's extra pass
#: over the input. DiT linears (PixArt 1152/4608, SD3 1536, FLUX 3072) clear it; SDXL's
#: 640-wide attention does not. The true crossover must be measured on a GPU.
DEFAULT_MIN_FEATURES = 1024


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
    Hard rules, not overridable: only ``nn.Linear`` (exact type, so subclasses such as
    LoRA wrappers are left alone) and in/out features multiples of 16 (``_scaled_mm``).
    """

    min_features: int = DEFAULT_MIN_FEATURES
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.min_features, int) or self.min_features < 0:
            raise ValueError(f"min_features must be an int >= 0, got {self.min_features!r}")
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
        if self.include is not None and not any(_matches(name, p) for p in self.include):
            return "not matched by include"
        hit = next((p for p in self.exclude if _matches(name, p)), None)
        if hit is not None:
            return f"excluded by pattern {hit!r}"
        return None

    def __call__(self, name: str, module: nn.Module) -> bool:
        return self.reason(name, module) is None


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
) -> QuantizeReport:
    """Replace the linears of ``module`` chosen by ``module_filter`` in place.

    Each weight is quantized once, here. A plain callable filter gives no reasons; its
    skipped linears are reported as "rejected by filter". Returns a :class:`QuantizeReport`.
    """
    module_filter = module_filter if module_filter is not None else ModuleFilter()
    report = QuantizeReport()
    # Collect first: replacing while iterating named_modules would visit the new modules.
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        if isinstance(module_filter, ModuleFilter):
            why = module_filter.reason(name, linear)
        else:
            why = None if module_filter(name, linear) else "rejected by filter"
        if why is not None:
            report.skipped[name] = why
            continue
        new = converter(linear)
        _set_submodule(module, name, new)
        report.converted.append(name)
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += sum(b.numel() * b.element_size() for b in new.buffers(recurse=False))
    return report
