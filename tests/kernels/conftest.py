"""Kernel tests: Triton's interpreter on CPU-only machines, the real GPU otherwise."""

from __future__ import annotations

import os

import torch

# Must happen before any kernel module is imported: @triton.jit reads it at decoration time.
# On a CUDA machine the same tests run the compiled kernel instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
