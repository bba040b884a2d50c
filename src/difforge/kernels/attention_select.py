"""Which attention kernel runs where: SDPA, or difforge's 8-bit attention in a measured tile.

The ``attention_int8`` graph pass (:mod:`difforge.passes.attention`) asks :func:`choose` for
each eligible ``scaled_dot_product_attention`` call (the pass is opt-in: no preset enables
it; on an H100 it does not pay yet). With the ``measured`` policy (the default), the choice
is made on this GPU at compile time: SDPA and every candidate tile are timed on random
inputs of the call's shape (medians of CUDA-graph replays), and the 8-bit kernel is used
only when its fastest tile, quantization included, beats SDPA by
``attention.min_speedup`` with its error against SDPA under :data:`MAX_REL_ERR`. Results are
kept per process, keyed by GPU, shape, dtype and policy. ``always`` skips the measurement
(A/B runs, and the CPU tests, where the kernel runs in Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from difforge.kernels import triton_runs_on

log = logging.getLogger("difforge.attention")

#: A candidate whose output differs from SDPA's by more than this (relative, on unit
#: Gaussian inputs) is never chosen: int8 Q·Kᵀ measures ~1.2e-2, fp8 P·V ~3.5e-2.
MAX_REL_ERR = 0.05
SELECT_POLICIES = ("measured", "always")


@dataclass(frozen=True)
class AttentionPolicy:
    """The ``attention.*`` options the attention passes work under (set by the backend per
    compile)."""

    select: str = "measured"
    pv_fp8: bool = False
    min_speedup: float = 1.03
    wide_max_score_bytes: int = 1 << 30


@dataclass(frozen=True)
class KernelChoice:
    """One launch configuration of :func:`difforge.kernels.attention_int8.attention_int8`."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pv_fp8: bool

    def op_args(self) -> tuple[int, int, int, int, bool]:
        return (self.block_m, self.block_n, self.num_warps, self.num_stages, self.pv_fp8)


#: Tiles timed per shape, for either P·V precision: the two fastest of the H100 sweeps
#: (``benchmarks/results/2026-11-27_h100_probe_int8attn_final_s13.json``: 128x64 with 8 warps
#: and 3 stages at PixArt's self-attention, 64x64 with 4 warps and 3 stages at the other
#: shapes; 128x128 and 2-stage tiles never won). Few on purpose: each
#: costs a Triton compile (~1 s) the first time on a machine.
CANDIDATES: tuple[KernelChoice, ...] = tuple(
    KernelChoice(bm, bn, w, st, fp8)
    for fp8 in (False, True)
    for bm, bn, w, st in ((64, 64, 4, 3), (128, 64, 8, 3))
)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    dtype: torch.dtype
    device: str


@dataclass(frozen=True)
class Measurement:
    """What :func:`choose` measured for one shape (``choice`` None: SDPA stays)."""

    choice: KernelChoice | None
    sdpa_ms: float
    best_ms: float | None  # kernel + standalone quantization
    rel_err: float | None
    kernel_ms: float | None = None  # the best candidate's kernel alone


_policy: contextvars.ContextVar[AttentionPolicy] = contextvars.ContextVar(
    "difforge_attention_policy",
    default=AttentionPolicy(),  # noqa: B039 (frozen dataclass)
)
#: Per-process results of :func:`choose`, for reuse and for benchmarks to report.
measurements: dict[tuple[object, ...], Measurement] = {}


def current_policy() -> AttentionPolicy:
    return _policy.get()


@contextlib.contextmanager
def using_policy(policy: AttentionPolicy) -> Iterator[None]:
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


def _fp8_pv_supported(device: str) -> bool:
    if not device.startswith("cuda"):
        return True  # the interpreter emulates it (kernel_available said it runs)
    return triton_runs_on(torch.device(device), (8, 9))


def allowed_candidates(policy: AttentionPolicy, device: str) -> list[KernelChoice]:
    """The tiles the policy and the GPU allow (fp8 P·V needs cc >= 8.9)."""
    fp8_ok = policy.pv_fp8 and _fp8_pv_supported(device)
    return [c for c in CANDIDATES if fp8_ok or not c.pv_fp8]


def kernel_available(device: str) -> bool:
    """Whether the 8-bit kernel can run on ``device``: a CUDA GPU with int8 tensor-core
    GEMMs (cc >= 8.0), or the CPU under Triton's interpreter (tests)."""
    if not device.startswith(("cuda", "cpu")):
        return False
    try:  # the CPU case asks Triton whether it interprets
        return triton_runs_on(torch.device(device), (8, 0))
    except ImportError:  # no Triton on this machine
        return False


def choose(shape: AttentionShape, policy: AttentionPolicy) -> KernelChoice | None:
    """The tile to run ``shape`` with, or None to keep SDPA."""
    if not kernel_available(shape.device):
        return None
    candidates = allowed_candidates(policy, shape.device)
    if policy.select == "always":
        # fp8 P·V first when allowed: "always" is for A/B runs of the fastest variant.
        return sorted(candidates, key=lambda c: not c.pv_fp8)[0]
    if not shape.device.startswith("cuda"):
        return None  # nothing to time in the interpreter
    name = torch.cuda.get_device_name(torch.device(shape.device))
    key = (name, shape, policy.pv_fp8, policy.min_speedup, CANDIDATES)
    if key not in measurements:
        measurements[key] = _measure(shape, candidates, policy.min_speedup)
        m = measurements[key]
        log.info(
            "difforge attention %s: sdpa %.3f ms, best 8-bit %s -> %s",
            shape, m.sdpa_ms, "n/a" if m.best_ms is None else f"{m.best_ms:.3f} ms",
            "8-bit " + str(m.choice) if m.choice else "SDPA",
        )  # fmt: skip
    return measurements[key].choice


def _measure(
    shape: AttentionShape, candidates: list[KernelChoice], min_speedup: float
) -> Measurement:
    """Time SDPA and each candidate on random inputs of ``shape`` (outside any fake mode).

    A candidate's time is its kernel plus its quantization pre-pass as standalone Triton
    kernels; in a compiled graph Inductor fuses the quantization into the producers of q, k
    and v, so this over-counts (the choice errs towards SDPA)."""
    from difforge.kernels import attention_int8 as k8
    from difforge.kernels import token_major_empty

    unset_fake = getattr(torch._subclasses.fake_tensor, "unset_fake_temporarily", None)
    with unset_fake() if unset_fake else contextlib.nullcontext(), torch.no_grad():
        gen = torch.Generator(device=shape.device).manual_seed(0)
        q, k, v = (
            torch.randn(
                shape.batch, shape.heads, s, shape.head_dim, device=shape.device,
                dtype=shape.dtype, generator=gen,
            )
            for s in (shape.seq_q, shape.seq_kv, shape.seq_kv)
        )  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ref = sdpa(q, k, v).float()
        sdpa_ms = k8.cuda_graph_ms(lambda: sdpa(q, k, v))
        best: tuple[float, KernelChoice, float, float] | None = None
        for c in candidates:
            tile = {"block_m": c.block_m, "block_n": c.block_n}
            launch = {**tile, "num_warps": c.num_warps, "num_stages": c.num_stages}
            try:
                out = k8.attention_int8(q, k, v, pv_fp8=c.pv_fp8, **launch).float()
            except Exception as exc:  # a tile that fails to compile here is skipped, said once
                log.warning("difforge attention: tile %s failed (%s); skipped", c, exc)
                continue
            err = float((out - ref).norm() / ref.norm())
            if not math.isfinite(err) or err > MAX_REL_ERR:
                continue

            prep = functools.partial(k8.prepare_operands, q, k, v, c.block_m, c.block_n, c.pv_fp8)
            kernel = functools.partial(
                k8._launch, prep(), token_major_empty(q), shape.head_dim**-0.5,
                head_dim=shape.head_dim, seq_kv=shape.seq_kv, **launch,
            )  # fmt: skip
            kernel_ms = k8.cuda_graph_ms(kernel)
            ms = kernel_ms + k8.cuda_graph_ms(prep)
            if best is None or ms < best[0]:
                best = (ms, c, err, kernel_ms)
    if best is None:
        return Measurement(None, sdpa_ms, None, None)
    ms, choice, err, kernel_ms = best
    use = sdpa_ms / ms >= min_speedup
    return Measurement(choice if use else None, sdpa_ms, ms, err, kernel_ms)
