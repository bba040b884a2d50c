"""Kernel tests: Triton's interpreter on CPU-only machines, the real GPU otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

# Must happen before any kernel module is imported: @triton.jit reads it at decoration time.
# On a CUDA machine the same tests run the compiled kernel instead.
INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _interpretable_triton_stdlib() -> Iterator[None]:
    """Make ``tl.max``/``tl.sum``/... (and our kernels) interpretable if imported before us.

    In a full ``pytest tests`` run, earlier test modules import difforge (hence triton) before
    this conftest sets ``TRITON_INTERPRET``; triton's own ``@jit`` library functions are then
    compiled-mode ``JITFunction`` objects, which the interpreter refuses to call ("Cannot call
    @triton.jit'd outside of the scope of a kernel"). Swap them, and any already imported
    ``difforge.kernels`` kernel, for interpreted twins for the duration of each kernel test
    module only; nothing changes when they already are interpreted.
    """
    if not INTERPRET:
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    twins: dict[int, InterpretedFunction] = {}
    with pytest.MonkeyPatch.context() as mp:
        ours = [m for n, m in sorted(sys.modules.items()) if n.startswith("difforge.kernels.")]
        for module in (tl, tl.standard, *ours):
            for name, obj in list(vars(module).items()):
                if isinstance(obj, JITFunction):
                    # One twin per function, so identity checks in the interpreter still hold.
                    twin = twins.setdefault(id(obj), InterpretedFunction(obj.fn))
                    mp.setattr(module, name, twin)
        yield
