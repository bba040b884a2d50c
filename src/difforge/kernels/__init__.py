"""Custom Triton kernels registered as ``torch.library`` ops (``difforge::name``).

Each kernel module holds the Triton kernel, a launcher that checks layouts, a plain-torch
reference with the same name plus ``_reference``, and the op registration with its fake
implementation. Importing a kernel module registers its op; Triton is imported lazily there,
so importing this package alone costs nothing.
"""

from __future__ import annotations

__all__: list[str] = []
