"""Applying each compiler to the pipeline, and undoing it before the next one.

Every compiler must start from the same, original modules: otherwise the second one would
compile the first one's wrappers, or inherit its rewrites (fused QKV projections,
channels_last weights, input hooks). :class:`PipelineSnapshot` records the pipeline's
attributes and every submodule's own state, by reference (no weight copies), and puts
them back.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difforge.bench.args import BenchError
from difforge.bench.pipeline import TEXT_ENCODER_ATTRS

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: torch.compile ``mode`` of the stock baselines. CUDA graphs are left out of
#: max-autotune: diffusers pipelines mutate inputs between steps, which cudagraph trees
#: re-record or refuse, and the seed's baseline did the same.
STOCK_MODES: dict[str, str | None] = {
    "compile": None,
    "compile-max-autotune": "max-autotune-no-cudagraphs",
}


def load_compile_pipe() -> Callable[..., Any] | None:
    """``difforge.diffusers.compile_pipe`` if this version has it, else ``None``."""
    return _optional("difforge.diffusers", "compile_pipe")


def load_quantize_pipe() -> Callable[..., Any] | None:
    """``difforge.diffusers.quantize_pipe`` if this version has it, else ``None``."""
    return _optional("difforge.diffusers", "quantize_pipe")


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise  # a dependency of the module is missing: a real error, not "not available"
    fn = getattr(mod, name, None)
    return fn if callable(fn) else None


def require_quantize() -> Callable[..., Any]:
    """The quantizer, or a clear error saying this version has none."""
    fn = load_quantize_pipe()
    if fn is None:
        raise BenchError(
            "--quantize is not available in this version of difforge "
            "(difforge.diffusers.quantize_pipe does not exist yet); run without --quantize"
        )
    return fn


def compiled_components(pipe: DiffusionPipeline) -> list[tuple[object, str]]:
    """(owner, attribute) of every module the baselines compile: the text encoders, the
    denoiser, and the VAE's decoder and encoder (the VAE itself is not one graph: its
    ``decode`` has Python control flow around the decoder)."""
    out: list[tuple[object, str]] = []
    for attr in (*TEXT_ENCODER_ATTRS, "transformer", "unet", "controlnet"):
        if isinstance(getattr(pipe, attr, None), nn.Module):
            out.append((pipe, attr))
    vae = getattr(pipe, "vae", None)
    for attr in ("decoder", "encoder"):
        if isinstance(getattr(vae, attr, None), nn.Module):
            out.append((vae, attr))
    return out


def _component_name(pipe: DiffusionPipeline, owner: object, attr: str) -> str:
    return attr if owner is pipe else f"vae.{attr}"


def _is_eager(name: str, eager: Sequence[str]) -> bool:
    """``name`` is one of ``eager`` or inside one (``vae`` covers ``vae.decoder``).

    The same rule as ``difforge.diffusers.pipe.covered``, kept here because the benchmark
    also measures difforge versions that lack it (see :func:`_optional`)."""
    return any(name == e or name.startswith(f"{e}.") for e in eager)


def check_eager_components(pipe: DiffusionPipeline, eager: Sequence[str]) -> None:
    """Every name in ``eager`` (``--eager-components``) must cover a component this
    pipeline compiles; a typo would silently compile everything."""
    names = [_component_name(pipe, owner, attr) for owner, attr in compiled_components(pipe)]
    for e in eager:
        if not any(_is_eager(n, [e]) for n in names):
            raise BenchError(
                f"--eager-components: {type(pipe).__name__} compiles no component {e!r}; "
                f"its components: {', '.join(names)} (or vae for both halves)"
            )


def compile_stock(
    pipe: DiffusionPipeline,
    mode: str | None,
    dynamic: bool | None = None,
    eager: Sequence[str] = (),
) -> list[str]:
    """Wrap the components with stock ``torch.compile`` (Inductor), except those named in
    ``eager``; returns the names of the compiled ones."""
    names = []
    for owner, attr in compiled_components(pipe):
        name = _component_name(pipe, owner, attr)
        if _is_eager(name, eager):
            continue
        module = getattr(owner, attr)
        setattr(owner, attr, torch.compile(module, backend="inductor", mode=mode, dynamic=dynamic))
        names.append(name)
    return names


@dataclass
class Applied:
    """What applying a compiler did, for the report."""

    pipe: DiffusionPipeline
    how: str


def apply_compiler(
    pipe: DiffusionPipeline,
    compiler: str,
    *,
    options: str | None = None,
    fuse_qkv_projections: bool = False,
    quantize: bool = False,
    dynamic: bool | None = None,
    eager: Sequence[str] = (),
) -> Applied:
    """Compile ``pipe`` in place with ``compiler`` (a canonical name), leaving the
    components named in ``eager`` as they are. ``dynamic`` (not None) overrides the
    compiler's own choice, e.g. ``False`` for a shape-specialised baseline."""
    if compiler == "none":
        return Applied(pipe, "eager")
    check_eager_components(pipe, eager)
    if compiler in STOCK_MODES:
        mode = STOCK_MODES[compiler]
        names = compile_stock(pipe, mode, dynamic, eager)
        extra = "" if dynamic is None else f", dynamic={dynamic}"
        return Applied(pipe, f"torch.compile(mode={mode!r}{extra}) on {', '.join(names)}")
    if compiler != "difforge":
        raise BenchError(f"unknown compiler {compiler!r}")
    compile_pipe = load_compile_pipe()
    if compile_pipe is None:
        raise BenchError(
            "compiler 'difforge' needs difforge.diffusers.compile_pipe, which this version "
            "of difforge does not have yet"
        )
    if dynamic is not None:
        merged = json.loads(options) if options else {}
        merged["dynamic"] = dynamic
        options = json.dumps(merged)
    how = []
    if quantize:
        pipe = require_quantize()(pipe) or pipe
        how.append("quantize_pipe")
    pipe = compile_pipe(
        pipe, options=options, ignores=eager, fuse_qkv_projections=fuse_qkv_projections
    )
    ignores = f", ignores={list(eager)!r}" if eager else ""
    how.append(
        f"compile_pipe(options={options!r}{ignores}, fuse_qkv_projections={fuse_qkv_projections})"
    )
    return Applied(pipe, " + ".join(how))


def _copy_container(value: Any) -> Any:
    """A shallow copy of the plain containers nn.Module mutates in place (``_modules``,
    ``_parameters``, ``_buffers``, the hook dicts, the non-persistent buffer set); any
    other value, including dict subclasses such as diffusers' immutable configs, as is."""
    if type(value) in (dict, OrderedDict, set):
        return type(value)(value)
    return value


class PipelineSnapshot:
    """The pipeline's and its modules' state, by reference, restorable after compiling.

    Restores: pipeline attributes (compiled wrappers swapped in), each submodule's
    ``__dict__`` including its parameter/buffer/child/hook dictionaries (swapped
    submodules, fused projections, attention processors, ``nn.Module.compile``), and
    each parameter's and buffer's memory layout (``.data`` re-laid in place, e.g.
    channels_last). In-place changes to weight *values* are not undone; no compiler here
    makes any.
    """

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe
        self.pipe_state = dict(vars(pipe))
        self.modules: list[tuple[nn.Module, dict[str, Any]]] = []
        self.layouts: list[tuple[torch.Tensor, torch.Size, tuple[int, ...]]] = []
        seen: set[int] = set()
        for value in self.pipe_state.values():
            if isinstance(value, nn.Module):
                self._record(value, seen)

    def _record(self, root: nn.Module, seen: set[int]) -> None:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            state = {k: _copy_container(v) for k, v in vars(module).items()}
            self.modules.append((module, state))
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None:
                    self.layouts.append((tensor, tensor.shape, tensor.stride()))

    def restore(self) -> None:
        """Put every recorded attribute and layout back."""
        for module, state in self.modules:
            current = vars(module)
            current.clear()
            for key, value in state.items():
                # Fresh copies again, so restoring twice stays possible.
                current[key] = _copy_container(value)
        for tensor, shape, stride in self.layouts:
            if tensor.shape == shape and tensor.stride() != stride:
                data = torch.empty_strided(shape, stride, dtype=tensor.dtype, device=tensor.device)
                tensor.data = data.copy_(tensor.data)
        current = vars(self.pipe)
        current.clear()
        current.update(self.pipe_state)
