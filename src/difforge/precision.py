"""Scoped numeric switches (TF32) applied while compiled code runs, never globally."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _has_fp32_precision_api() -> bool:
    # torch >= 2.9 has `fp32_precision`; mixing it with the legacy allow_tf32 flags warns.
    try:
        return isinstance(torch.backends.cuda.matmul.fp32_precision, str)
    except AttributeError:
        return False


@contextlib.contextmanager
def tf32_enabled() -> Iterator[None]:
    """Let float32 matmuls and convs use TF32 inside the block, restoring the old state."""
    if _has_fp32_precision_api():
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags


def tf32_is_on() -> bool:
    """Whether float32 matmuls may use TF32 right now."""
    if _has_fp32_precision_api():
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)  # pragma: no cover


def with_tf32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a compiled callable so that it runs with TF32 on."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with tf32_enabled():
            return fn(*args, **kwargs)

    return run
