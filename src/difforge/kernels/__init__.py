"""Custom Triton kernels registered as ``torch.library`` ops (``difforge::name``).

Each kernel module holds the Triton kernel, a launcher that checks layouts, a plain-torch
reference with the same name plus ``_reference``, and the op registration with its fake
implementation. Importing a kernel module registers its op; Triton is imported lazily there,
so importing this package alone costs nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__: list[str] = [
    "head_dim_tiles",
    "interpreting",
    "last_dim_dense",
    "token_major_empty",
    "triton_runs_on",
]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): the
    kernels then take CPU tensors and work around the interpreter's known bugs."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device, min_capability: tuple[int, int] = (8, 0)) -> bool:
    """Whether difforge's Triton kernels may run on ``device``: an NVIDIA GPU of at least
    ``min_capability`` (bf16 needs 8.0, float8 e4m3 8.9: Triton refuses the type below),
    or the CPU under Triton's interpreter (the CPU tests). Not ROCm: the kernels are only
    tested on NVIDIA."""
    import torch

    if device.type == "cuda":
        return (
            torch.version.hip is None
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= min_capability
        )
    return device.type == "cpu" and interpreting()


def last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last stride is 1 (what the kernels index by column), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def head_dim_tiles(d: int, min_width: int) -> tuple[int, int]:
    """Tile widths ``(main, tail)`` covering head dim ``d`` (``tail`` 0: one tile).

    ``main`` is the largest power of two <= d, ``tail`` the power of two >= the rest; both
    at least ``min_width`` (what an 8-bit or 16-bit tensor-core instruction needs). When
    the two would be no narrower than one power-of-two tile, one tile it is. Head dim 72
    gives 64 + 32 for an int8 Q·Kᵀ (min 32) and 64 + 16 for 16-bit MMAs: 1.33x and 1.11x
    the work of 72 instead of 1.78x for a 128-wide tile.
    """
    full = max(min_width, _next_power_of_2(d))
    main = max(min_width, 1 << (d.bit_length() - 1))
    if main >= d:
        return main, 0
    tail = max(min_width, _next_power_of_2(d - main))
    return (full, 0) if main + tail >= full else (main, tail)


def token_major_empty(
    like: torch.Tensor, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An attention output for ``like [B, H, Sq, D]`` (``head_dim``/``dtype`` default to its
    own), laid out as ``[B, Sq, H, D]``: what SDPA's flash kernels return, so diffusers'
    following ``transpose(1, 2).reshape(B, Sq, H * D)`` is free."""
    b, h, sq, d = like.shape
    out = like.new_empty((b, sq, h, head_dim or d), dtype=dtype or like.dtype)
    return out.transpose(1, 2)
