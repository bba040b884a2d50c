"""Custom Triton kernels registered as ``torch.library`` ops (``difforge::name``).

Each kernel module holds the Triton kernel, a launcher that checks layouts, a plain-torch
reference with the same name plus ``_reference``, and the op registration with its fake
implementation. Importing a kernel module registers its op; Triton is imported lazily there,
so importing this package alone costs nothing.
"""

from __future__ import annotations

import os

__all__: list[str] = ["interpreting"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): the
    kernels then take CPU tensors and work around the interpreter's known bugs."""
    import triton

    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
