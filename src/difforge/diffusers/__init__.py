"""difforge for diffusers pipelines: compile, save and load whole pipelines.

>>> from difforge.diffusers import compile_pipe, save_pipe, load_pipe
>>> pipe = compile_pipe(pipe, options={"mode": "O2"}, ignores=("vae.encoder",))

Model presets (real architectures with random weights) live in
:mod:`difforge.diffusers.presets`. Nothing here imports diffusers itself.
"""

from __future__ import annotations

from difforge.diffusers.persist import LoadResult, load_pipe, save_pipe
from difforge.diffusers.pipe import COMPONENTS, compile_pipe
from difforge.diffusers.quantize import quant_report, quantize_pipe

__all__ = [
    "COMPONENTS",
    "LoadResult",
    "compile_pipe",
    "load_pipe",
    "quant_report",
    "quantize_pipe",
    "save_pipe",
]
