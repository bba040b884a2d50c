"""Planted outlier channels: make random weights look like trained ones where it matters
for low-precision scaling.

Trained transformers have a few input channels whose weights are tens of times larger
than the rest; random (normal) weights have none, so a quality check on random weights
cannot show whether a quantization's scales survive them. :func:`plant_outliers`
multiplies a few input columns of every ``nn.Linear`` weight by a factor. With fp8's
per-output-channel weight scales this is the hard case: every row's absmax (so its scale)
is set by the outlier columns, and the row's other entries move down the e4m3 exponent
range. The result is another valid model (not the same function): compare only runs that
all use the planted weights.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

#: Attribute on a module that has outliers planted (a second planting would compound).
PLANTED_ATTR = "_difforge_planted_outliers"

#: A linear gets outliers only if the chosen channels are at most this share of its inputs.
MAX_CHANNEL_SHARE = 1 / 8


@dataclass(frozen=True)
class OutlierReport:
    """What :func:`plant_outliers` changed."""

    factor: float
    channels: int
    seed: int
    planted: dict[str, list[int]] = field(default_factory=dict)
    """Linear module name -> the input columns multiplied by ``factor``."""
    skipped: list[str] = field(default_factory=list)
    """Linears with too few inputs for ``channels`` outliers (see MAX_CHANNEL_SHARE)."""

    def summary(self) -> dict[str, object]:
        """JSON-ready counts (the full channel lists are long for real models)."""
        return {
            "factor": self.factor,
            "channels": self.channels,
            "seed": self.seed,
            "linears": len(self.planted),
            "skipped": len(self.skipped),
        }


def outlier_columns(name: str, in_features: int, channels: int, seed: int) -> list[int]:
    """The input columns of linear ``name`` that get outliers: drawn from a generator seeded
    by ``seed`` and the name, so every build of the model (any dtype, device or module
    order) gets the same ones."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return sorted(torch.randperm(in_features, generator=g)[:channels].tolist())


@torch.no_grad()
def plant_outliers(
    module: nn.Module, factor: float, *, channels: int = 4, seed: int = 0
) -> OutlierReport:
    """Multiply ``channels`` input columns of each ``nn.Linear`` weight in ``module`` by
    ``factor``, in place; biases and every other column are untouched. Raises
    ``ValueError`` on a module that already has outliers planted."""
    if factor <= 0 or channels < 1:
        raise ValueError(
            f"plant_outliers: need factor > 0 and channels >= 1, got {factor}, {channels}"
        )
    if getattr(module, PLANTED_ATTR, None) is not None:
        raise ValueError("plant_outliers: this module already has planted outliers")
    report = OutlierReport(factor=float(factor), channels=channels, seed=seed)
    for name, linear in module.named_modules():
        if not isinstance(linear, nn.Linear):
            continue
        if channels > linear.in_features * MAX_CHANNEL_SHARE:
            report.skipped.append(name)
            continue
        cols = outlier_columns(name, linear.in_features, channels, seed)
        linear.weight[:, cols] *= factor
        report.planted[name] = cols
    setattr(module, PLANTED_ATTR, report)
    return report
