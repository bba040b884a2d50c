"""Shape adapters: remove size branches of diffusers modules that defeat dynamic shapes.

With ``dynamic`` shapes Dynamo traces one graph for every image size, but a Python branch
on a size (``if dim % 4 != 0``) becomes a guard, and the first size that takes the other
side recompiles. Two such branches sit in diffusers' models; each adapter below makes the
module take one side always, on a side that gives the *same numbers* as the branch eager
would have taken:

``dynamic_pos_embed`` (PixArt's ``PatchEmbed``, no ``pos_embed_max_size``)
    eager uses the precomputed sin-cos table at the training size and recomputes it at
    any other size, and its recomputation reshapes the (2, H, W) grid to (2, 1, W, H), a
    view that guards on ``H != W`` (square and non-square sizes compile separately). The
    adapter always recomputes, flattening the grid instead (same element order, so the
    same table): one graph. The table is recomputed on the input's device; on the CPU it
    is bit-identical to the stored one (tested), on a GPU float64 ``sin``/``cos`` may
    differ in the last bit before the cast to float32. It is cast to the stored table's
    dtype, as eager adds the stored table at the training size: after ``.half()`` that
    table is float16 (eager adds a float32 table at other sizes, where the two differ by
    float16 rounding of the table).
``dynamic_unet_upsample`` (``UNet2DConditionModel`` and its relatives)
    eager passes each up block the size of its skip connection only when a latent side is
    not a multiple of ``2**num_upsamplers``; otherwise it upsamples by ``scale_factor=2``.
    For those sizes the skip connection is exactly twice as large, and nearest
    interpolation to ``size=2*n`` reads the same pixels as ``scale_factor=2``, so always
    forwarding the size is exact. The adapter sets the instance's ``num_upsamplers`` (read
    only by that test in ``forward``) so that ``2**num_upsamplers`` divides no real size.

Adapters change the module instance only (never the class), are idempotent, are recorded
on the instance and undone by :func:`remove_shape_adapters`. ``difforge.compile`` applies
them when ``dynamic`` is ``true`` and ``shapes.adapters`` is on (not under Dynamo's
automatic dynamic, ``dynamic: null``, which keeps the model as it is); each bumps
``difforge.counters[name]`` once per module it adapts.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difforge.passes.registry import counters

#: Attribute on an adapted module: adapter name -> how to undo it.
MARK = "_difforge_shape_adapters"

#: ``num_upsamplers`` set by ``dynamic_unet_upsample``: 2**30 divides no latent size a
#: GPU can hold, so ``dim % 2**30 != 0`` holds for every real input.
UNET_UPSAMPLERS = 30


@dataclass(frozen=True)
class ShapeAdapter:
    """One adapter: which modules it applies to, and how (returns the undo function)."""

    name: str
    matches: Callable[[nn.Module], bool]
    apply: Callable[[nn.Module], Callable[[], None]]
    doc: str


def _from_diffusers(module: nn.Module, class_names: tuple[str, ...]) -> bool:
    """``module`` is an instance of a diffusers class named in ``class_names`` (or a
    subclass of one): matched by name, so difforge needs no diffusers import."""
    for cls in type(module).__mro__:
        if cls.__name__ in class_names and cls.__module__.startswith("diffusers."):
            return True
    return False


# --------------------------------------------------------------------------------------------
# PixArt: PatchEmbed's sin-cos position table
# --------------------------------------------------------------------------------------------


#: Devices without float64, where diffusers computes the table's frequencies in float32.
NO_FLOAT64_DEVICES = frozenset({"mps", "npu", "neuron"})  # as diffusers 0.42


def _frequency_dtype(device: torch.device) -> torch.dtype:
    """diffusers' dtype for the table's frequencies: float64 where the device has it."""
    return torch.float32 if device.type in NO_FLOAT64_DEVICES else torch.float64


def sincos_pos_embed(
    embed_dim: int,
    height: Any,
    width: Any,
    *,
    base_size: int,
    interpolation_scale: float,
    device: torch.device,
) -> torch.Tensor:
    """``diffusers.models.embeddings.get_2d_sincos_pos_embed(embed_dim, (height, width),
    base_size=..., interpolation_scale=..., output_type="pt")`` as (1, H*W, D) float32,
    without its (2, 1, W, H) grid view (which guards on ``H != W`` under dynamic shapes).

    diffusers builds the grid with ``meshgrid(grid_w, grid_h, indexing="xy")`` (H, W) and
    reshapes it to (2, 1, W, H) before flattening each half; flattening directly gives
    the same positions in the same order.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    grid_h = (
        torch.arange(height, device=device, dtype=torch.float32)
        / (height / base_size)
        / interpolation_scale
    )
    grid_w = (
        torch.arange(width, device=device, dtype=torch.float32)
        / (width / base_size)
        / interpolation_scale
    )
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0).reshape(2, -1)
    dtype = _frequency_dtype(device)
    half = embed_dim // 2
    omega = torch.arange(half // 2, device=device, dtype=dtype)
    omega /= half / 2.0
    omega = 1.0 / 10000**omega

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos, omega)
        return torch.concat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.concat([one_axis(grid[0]), one_axis(grid[1])], dim=1)
    return emb.float().unsqueeze(0)


def _patch_embed_forward(self: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """``PatchEmbed.forward`` for ``pos_embed_max_size=None``, always recomputing the
    table (see the module docstring)."""
    height = latent.shape[-2] // self.patch_size
    width = latent.shape[-1] // self.patch_size
    latent = self.proj(latent)
    if self.flatten:
        latent = latent.flatten(2).transpose(1, 2)  # BCHW -> BNC
    if self.layer_norm:
        latent = self.norm(latent)
    pos_embed = sincos_pos_embed(
        self.pos_embed.shape[-1],
        height,
        width,
        base_size=self.base_size,
        interpolation_scale=self.interpolation_scale,
        device=latent.device,
    ).to(self.pos_embed.dtype)
    return (latent + pos_embed).to(latent.dtype)


def _is_sincos_patch_embed(module: nn.Module) -> bool:
    return (
        _from_diffusers(module, ("PatchEmbed",))
        and getattr(module, "pos_embed_max_size", 0) is None
        and isinstance(getattr(module, "pos_embed", None), torch.Tensor)
        and all(hasattr(module, a) for a in ("base_size", "interpolation_scale", "patch_size"))
    )


def _adapt_patch_embed(module: nn.Module) -> Callable[[], None]:
    module.forward = types.MethodType(_patch_embed_forward, module)

    def undo() -> None:
        module.__dict__.pop("forward", None)

    return undo


# --------------------------------------------------------------------------------------------
# UNets: forward the skip sizes to the upsamplers always
# --------------------------------------------------------------------------------------------


def _is_unet_with_upsample_branch(module: nn.Module) -> bool:
    return _from_diffusers(module, ("UNet2DConditionModel",)) and isinstance(
        getattr(module, "num_upsamplers", None), int
    )


def _adapt_unet(module: nn.Module) -> Callable[[], None]:
    original = module.num_upsamplers
    module.num_upsamplers = UNET_UPSAMPLERS

    def undo() -> None:
        module.num_upsamplers = original

    return undo


ADAPTERS: tuple[ShapeAdapter, ...] = (
    ShapeAdapter(
        "dynamic_pos_embed",
        _is_sincos_patch_embed,
        _adapt_patch_embed,
        "PixArt's PatchEmbed recomputes its sin-cos table at every size (no square branch)",
    ),
    ShapeAdapter(
        "dynamic_unet_upsample",
        _is_unet_with_upsample_branch,
        _adapt_unet,
        "UNet up blocks always interpolate to the skip connection's size",
    ),
)


def apply_shape_adapters(root: nn.Module) -> list[str]:
    """Adapt every matching submodule of ``root`` (itself included); returns the names of
    the adapters applied now (already adapted modules are skipped)."""
    applied = []
    for module in root.modules():
        done: dict[str, Callable[[], None]] = module.__dict__.get(MARK, {})
        for adapter in ADAPTERS:
            if adapter.name in done or not adapter.matches(module):
                continue
            done[adapter.name] = adapter.apply(module)
            module.__dict__[MARK] = done
            counters[adapter.name] += 1
            applied.append(adapter.name)
    return applied


def remove_shape_adapters(root: nn.Module) -> list[str]:
    """Undo every adapter on ``root``'s submodules; returns the names undone."""
    removed = []
    for module in root.modules():
        done = module.__dict__.pop(MARK, None)
        for name, undo in (done or {}).items():
            undo()
            removed.append(name)
    return removed


def shape_adapters(root: nn.Module) -> dict[str, list[str]]:
    """Adapter name -> qualified names of the submodules of ``root`` it adapted."""
    out: dict[str, list[str]] = {}
    for qualname, module in root.named_modules():
        for name in module.__dict__.get(MARK, {}):
            out.setdefault(name, []).append(qualname)
    return out


__all__ = [
    "ADAPTERS",
    "ShapeAdapter",
    "apply_shape_adapters",
    "remove_shape_adapters",
    "shape_adapters",
    "sincos_pos_embed",
]
