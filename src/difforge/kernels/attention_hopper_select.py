"""Where the warp-specialized Gluon attention replaces SDPA: Hopper GPUs, self-attention
shapes it takes, and (policy ``measured``) only where it times faster than SDPA on this GPU.

On an H200 (``benchmarks/results/2026-11-29_h200_probe_hopperattn_v9_s30.json``) it beat
cuDNN at PixArt-XL's self-attention (head dim 72: 1.19x) and lost at head dim 64 and 128
(0.95-0.99x), so timing per shape, once per process, decides; the ``attention.*`` options
(``select``, ``min_speedup``) are shared with the 8-bit attention's choice.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from difforge.kernels.attention_select import AttentionPolicy, AttentionShape

log = logging.getLogger("difforge.attention")

#: (rows per consumer warp group, kv block, ring stages) timed per shape: the fastest two
#: of the H200 sweep (v9: 64x128 with 4 stages, then 3; 256-wide kv blocks and 64-wide
#: ones with 6 stages lost everywhere).
TILES: tuple[tuple[int, int, int], ...] = ((64, 128, 4), (64, 128, 3))
#: A tile whose output differs from SDPA's by more than this (relative, random inputs) is
#: never used: both are exact fp16/bf16 attention (~3e-4 apart at fp16, ~2e-3 at bf16).
MAX_REL_ERR = 1e-2


@dataclass(frozen=True)
class HopperMeasurement:
    """What :func:`choose` timed for one shape (``tile`` None: SDPA stays)."""

    tile: tuple[int, int, int] | None
    sdpa_ms: float
    best_ms: float | None


#: Per-process results of :func:`choose`, keyed by GPU name, shape and policy.
measurements: dict[tuple[object, ...], HopperMeasurement] = {}


def available(device: str) -> bool:
    """Whether the kernel can run on ``device``: a Hopper GPU (wgmma and TMA; cc 9.x) and a
    Triton with Gluon."""
    from difforge.kernels.attention_hopper import HAVE_GLUON

    if not HAVE_GLUON or not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.version.hip is not None:  # ROCm calls its GPUs "cuda" too (MI300: cc 9.4)
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] == 9


def fitting_tiles(head_dim: int) -> list[tuple[int, int, int]]:
    """The :data:`TILES` whose shared memory fits a Hopper CTA at ``head_dim`` (head dim 128
    leaves out the 4-stage ring)."""
    from difforge.kernels.attention_hopper import SHARED_MEMORY_LIMIT, shared_memory_bytes

    return [
        t
        for t in TILES
        if shared_memory_bytes(t[0], t[1], t[2], head_dim, q_tiles=2) <= SHARED_MEMORY_LIMIT
    ]


def supports(shape: AttentionShape) -> bool:
    """Whether the kernel takes ``shape``: self-attention (q and kv of one length) over whole
    CTA and kv blocks (no masking yet), a head dim TMA can address (a multiple of 8, 16-128)."""
    d = shape.head_dim
    if d % 8 or not 16 <= d <= 128 or shape.seq_q != shape.seq_kv:
        return False
    tiles = fitting_tiles(d)
    return bool(tiles) and all(shape.seq_q % (2 * bm) == 0 and shape.seq_q % bn == 0
                               for bm, bn, _ in tiles)  # fmt: skip


def choose(shape: AttentionShape, policy: AttentionPolicy) -> tuple[int, int, int] | None:
    """The tile to run ``shape`` with, or None to keep SDPA."""
    if not available(shape.device) or not supports(shape):
        return None
    if policy.select == "always":
        return fitting_tiles(shape.head_dim)[0]
    name = torch.cuda.get_device_name(torch.device(shape.device))
    key = (name, shape, policy.min_speedup, TILES)
    if key not in measurements:
        measurements[key] = _measure(shape, policy.min_speedup)
        m = measurements[key]
        log.info(
            "difforge attention %s: sdpa %.3f ms, Gluon %s -> %s",
            shape, m.sdpa_ms, "n/a" if m.best_ms is None else f"{m.best_ms:.3f} ms",
            f"Gluon {m.tile}" if m.tile else "SDPA",
        )  # fmt: skip
    return measurements[key].tile


def _measure(shape: AttentionShape, min_speedup: float) -> HopperMeasurement:
    """Time SDPA and each tile on random ``[B, S, H, D]``-strided q/k/v of ``shape`` (the
    layout of a DiT's projections), outside any fake mode, as CUDA-graph replays."""
    from difforge.kernels.attention_hopper_ws import attention_hopper_ws
    from difforge.kernels.attention_int8 import cuda_graph_ms

    unset_fake = getattr(torch._subclasses.fake_tensor, "unset_fake_temporarily", None)
    with unset_fake() if unset_fake else contextlib.nullcontext(), torch.no_grad():
        gen = torch.Generator(device=shape.device).manual_seed(0)
        q, k, v = (
            torch.randn(
                shape.batch, shape.seq_q, shape.heads, shape.head_dim, device=shape.device,
                dtype=shape.dtype, generator=gen,
            ).transpose(1, 2)
            for _ in range(3)
        )  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ref = sdpa(q, k, v).float()
        sdpa_ms = cuda_graph_ms(lambda: sdpa(q, k, v))
        best: tuple[float, tuple[int, int, int]] | None = None
        for tile in fitting_tiles(shape.head_dim):
            bm, bn, stages = tile

            def run(bm: int = bm, bn: int = bn, stages: int = stages) -> torch.Tensor:
                return attention_hopper_ws(q, k, v, block_m=bm, block_n=bn, stages=stages)

            try:
                err = float((run().float() - ref).norm() / ref.norm())
            except Exception as exc:  # a tile that fails here (shared memory) is skipped
                log.warning("difforge attention: Gluon tile %s failed (%s); skipped", tile, exc)
                continue
            if not err <= MAX_REL_ERR:
                continue
            ms = cuda_graph_ms(run)
            if best is None or ms < best[0]:
                best = (ms, tile)
    if best is None:
        return HopperMeasurement(None, sdpa_ms, None)
    ms, tile = best
    return HopperMeasurement(tile if sdpa_ms / ms >= min_speedup else None, sdpa_ms, ms)
