"""``compile_pipe``: compile every module of a diffusers pipeline that is worth compiling.

>>> pipe = compile_pipe(pipe, options={"mode": "O2", "memory_format": "channels_last"})

Components, by pipeline attribute: the text encoders, the denoiser (``transformer`` or
``unet``), ``controlnet``, and the VAE's ``decoder`` and ``encoder``. The VAE itself stays
an ``AutoencoderKL`` (its ``config``, ``dtype`` and the pipelines' fp32-upcast logic keep
working); only its two halves are swapped for compiled modules, since ``vae.decode`` calls
``self.decoder``. What was compiled, with which options, is recorded on the pipe and on
each compiled module, so a second call compiles nothing twice, a call with other options
recompiles from the original modules, and a pipeline sharing the modules (``from_pipe``)
adopts them.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import difforge
from difforge import regional
from difforge.batch import KEY as BATCH_KEY
from difforge.batch import has_group_norm, resolve_batch_mode
from difforge.diffusers.lora import pass_lora_methods_through
from difforge.diffusers.offload import prepare_offloading
from difforge.diffusers.pipe_methods import component
from difforge.dynamic import remove_shape_adapters
from difforge.errors import warn
from difforge.fused_projections import fuse_qkv_projections as fuse_module_projections
from difforge.memory_format import apply_memory_format
from difforge.options import CompileConfig, load_options, parse_options

log = logging.getLogger("difforge.diffusers")

__all__ = ["COMPONENTS", "CONV_COMPONENTS", "PipeState", "compile_pipe", "pipe_state"]

#: Every component ``compile_pipe`` knows, in compile order.
COMPONENTS: tuple[str, ...] = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "unet",
    "controlnet",
    "vae.decoder",
    "vae.encoder",
)

#: Conv nets: the only components that get the ``memory_format`` option.
CONV_COMPONENTS: frozenset[str] = frozenset({"unet", "controlnet", "vae.decoder", "vae.encoder"})

DENOISERS: tuple[str, ...] = ("transformer", "unet")

STATE_ATTR = "_difforge_state"
COMPILED_ATTR = "_difforge_compiled"
RECORD_ATTR = "_difforge_record"

_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule


@dataclass
class PipeState:
    """What ``compile_pipe`` did to one pipeline (stored on it as ``_difforge_state``)."""

    compiled: dict[str, str] = field(default_factory=dict)
    """Component name -> key of the options it was compiled with (also ``_difforge_compiled``)."""
    configs: dict[str, CompileConfig | None] = field(default_factory=dict)
    """Component name -> parsed config (None for a backend other than difforge)."""
    fused: set[str] = field(default_factory=set)
    """Modules whose QKV projections we fused (``"transformer"``, ``"unet"``, ``"vae"``)."""
    ran_components: set[str] = field(default_factory=set)
    """Compiled components called since they were (re)compiled: their graphs now exist."""

    @property
    def ran(self) -> bool:
        """Whether any compiled component has run (so this process has compiled graphs)."""
        return bool(self.ran_components)


@dataclass
class ComponentRecord:
    """What ``compile_pipe`` compiled a component with, kept on the compiled module itself
    (``_difforge_record``): a pipeline made from this one (``from_pipe``) shares the
    module, and ``compile_pipe`` on it adopts the module instead of compiling it again.
    Pipelines sharing a module (or the VAE whose halves it is) see each other's
    recompiles there: the record, not a pipeline's state, says what the module is."""

    key: str
    config: CompileConfig | None
    ran: bool = False
    """Whether the module has run since it was compiled (through any pipeline)."""
    marks: list[tuple[weakref.ref[PipeState], RemovableHandle]] = field(
        default_factory=list, repr=False, compare=False
    )
    """The pipelines it serves, each with the pre-hook that tells it of a run; weak, so a
    pipeline made per request with ``from_pipe`` leaves neither hook nor state behind."""

    def mark(self, module: nn.Module, state: PipeState, name: str) -> None:
        """Tell ``state`` when ``module`` runs, once per live pipeline state."""
        alive = []
        for ref, handle in self.marks:
            if ref() is None:
                handle.remove()
            else:
                alive.append((ref, handle))
        self.marks = alive
        if not any(ref() is state for ref, _ in alive):
            ref = weakref.ref(state)
            self.marks.append((ref, module.register_forward_pre_hook(_mark_ran(ref, name))))

    def unmark(self) -> None:
        """Remove every pre-hook (the module is no longer what this records)."""
        for _, handle in self.marks:
            handle.remove()
        self.marks = []


def _record(module: Any) -> ComponentRecord | None:
    """The record on ``module`` itself (not on a module it wraps)."""
    found = module.__dict__.get(RECORD_ATTR) if isinstance(module, nn.Module) else None
    return found if isinstance(found, ComponentRecord) else None


def pipe_state(pipe: Any) -> PipeState | None:
    """The :class:`PipeState` of a pipe that went through ``compile_pipe``, else None."""
    state = getattr(pipe, STATE_ATTR, None)
    return state if isinstance(state, PipeState) else None


# --------------------------------------------------------------------------------------------
# Finding components
# --------------------------------------------------------------------------------------------


def _owner_and_attr(pipe: Any, name: str) -> tuple[Any, str]:
    """The object holding component ``name`` and its attribute there."""
    if name.startswith("vae."):
        return getattr(pipe, "vae", None), name.split(".", 1)[1]
    return pipe, name


def _set(pipe: Any, name: str, module: nn.Module) -> None:
    owner, attr = _owner_and_attr(pipe, name)
    setattr(owner, attr, module)


def _slots(pipe: Any) -> list[str]:
    """Component names this pipeline has a slot for (the module itself may be None)."""
    registered = set(getattr(pipe, "components", None) or ())
    slots = [n for n in COMPONENTS if "." not in n and (n in registered or hasattr(pipe, n))]
    if getattr(pipe, "vae", None) is not None:
        slots += [n for n in COMPONENTS if n.startswith("vae.") and component(pipe, n) is not None]
    if "vae" in registered or hasattr(pipe, "vae"):
        slots.append("vae")  # the prefix of both halves, valid even when the VAE is absent
    return slots


def _modules(pipe: Any) -> list[str]:
    """Component names whose current value is an ``nn.Module``."""
    return [n for n in COMPONENTS if isinstance(component(pipe, n), nn.Module)]


def _check_ignores(pipe: Any, ignores: Iterable[str] | str) -> tuple[str, ...]:
    """Validate ``ignores`` against this pipeline's components; unknown names raise."""
    if isinstance(ignores, str):
        ignores = (ignores,)
    ignores = tuple(ignores)
    valid = _slots(pipe)
    for name in ignores:
        if not isinstance(name, str):
            raise TypeError(f"ignores must be component names (str), got {name!r}")
        if name not in valid:
            raise ValueError(
                f"ignores: {type(pipe).__name__} has no component {name!r}; "
                f"valid names: {', '.join(valid)}"
            )
    return ignores


def covered(name: str, prefixes: Sequence[str]) -> bool:
    """``name`` is one of the dotted component names ``prefixes`` or inside one (``vae``
    covers ``vae.decoder``)."""
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


# --------------------------------------------------------------------------------------------
# Options per component
# --------------------------------------------------------------------------------------------


def _is_ours(backend: str | Callable[..., Any]) -> bool:
    return isinstance(backend, str) and backend in difforge.OUR_BACKENDS


def _component_options(
    options: Mapping[str, Any] | str | None,
    backend: str | Callable[..., Any],
    conv: bool,
    denoiser: bool = False,
    module: nn.Module | None = None,
) -> tuple[dict[str, Any], CompileConfig | None]:
    """The options one component is compiled with, and their parsed config.

    ``memory_format`` re-lays conv weights; on a transformer or a text encoder it would
    only add input conversions, so non-conv components always get ``preserve``. The fp8
    linear swap (``quant.fp8_linear``, on under ``low-precision``/``O3``) applies to the
    denoiser only, like ``quantize_pipe``: text encoders run once per prompt and VAEs are
    conv-bound, so fp8 there costs quality for no speed. ``shapes.batch: "unbacked"``
    cannot trace a conv net (GroupNorm, see difforge.batch): those components (the VAE, a
    UNet) get ``"warmup"`` instead, with a warning.
    """
    raw = load_options(options)
    if not _is_ours(backend):
        return raw, None
    if not conv:
        raw["memory_format"] = "preserve"
    if not denoiser:
        raw["quant.fp8_linear"] = False
    config = parse_options(raw)
    if raw.get(BATCH_KEY) == "unbacked" and config.dynamic is True and has_group_norm(module):
        warn(
            f"difforge: {type(module).__name__} is a conv net (GroupNorm), which cannot take "
            "'shapes.batch': 'unbacked'; it compiles with 'warmup' (its batch-1 and batch>=2 "
            "graphs at the first call)",
        )
        raw[BATCH_KEY] = "warmup"
        config = parse_options(raw)
    resolve_batch_mode(config, module)  # a bad batch mode fails before the pipe is touched
    return raw, config


def _key(
    backend: str | Callable[..., Any],
    raw: Mapping[str, Any],
    config: CompileConfig | None,
    fused: bool,
) -> str:
    """What decides whether a compiled component can be reused: backend, options, fusion."""
    name = "difforge" if _is_ours(backend) else backend
    # Nested, not a JSON string inside JSON, so the key stays readable in the metadata.
    options: Any = json.loads(config.key()) if config is not None else raw
    return json.dumps(
        {"backend": name, "options": options, "fuse_qkv": fused}, sort_keys=True, default=repr
    )


# --------------------------------------------------------------------------------------------
# QKV fusion
# --------------------------------------------------------------------------------------------


def _fusion_owner(name: str) -> str | None:
    """The module whose ``fuse_qkv_projections`` covers component ``name``."""
    if name in DENOISERS:
        return name
    if name.startswith("vae."):
        return "vae"
    return None


def _original(module: Any) -> Any:
    return module._orig_mod if isinstance(module, _OptimizedModule) else module


def _is_fused(module: nn.Module) -> bool:
    """Whether ``module``'s attention runs with fused QKV projections right now.

    diffusers has two styles: older models swap in ``Fused*`` processors (and restore the
    originals on unfuse, leaving ``fused_projections`` set); newer attention modules keep
    their processor and flip ``fused_projections``.
    """
    processors = getattr(module, "attn_processors", None) or {}
    if any(type(p).__name__.startswith("Fused") for p in processors.values()):
        return True
    if getattr(module, "original_attn_processors", None) is not None:
        return False  # older style, unfused: the original processors are back
    return any(getattr(m, "fused_projections", False) is True for m in module.modules())


def _set_fusion(pipe: Any, owner: str, fuse: bool, state: PipeState) -> bool:
    """Fuse (or unfuse what we fused of) ``owner``'s QKV projections; returns whether they
    end up fused. Reads the module itself, so modules restored behind our back count."""
    module = _original(getattr(pipe, owner, None))
    fused = _is_fused(module)
    if not fuse:
        if fused and owner in state.fused:  # a user's own fusion is left alone
            getattr(module, "unfuse_qkv_projections", lambda: None)()
            fused = _is_fused(module)
        state.fused.discard(owner)
        return fused
    if fused:
        return True
    if module is None:
        return False
    # diffusers' fusion with difforge's checks (custom processors, adapter-wrapped
    # projections and models diffusers refuses stay unfused, each logged), the unfused
    # q/k/v made views of the fused rows so the weights are held once.
    fuse_module_projections(module)
    if not _is_fused(module):
        return False
    state.fused.add(owner)
    return True


# --------------------------------------------------------------------------------------------
# compile_pipe
# --------------------------------------------------------------------------------------------


def _captures_outputs(forward: Any) -> bool:
    """Whether ``forward`` is wrapped by transformers' ``capture_outputs`` decorator."""
    fn = forward
    for _ in range(8):  # a short chain of functools.wraps layers
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_filename.endswith("output_capturing.py"):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _install_output_hooks(module: nn.Module) -> None:
    """Install transformers' output-capturing hooks on a text encoder now.

    transformers >= 5 installs them at the first forward that asks for hidden states,
    under a threading lock Dynamo cannot trace: the first compiled call would break the
    graph there and compile other graphs than a process that ran the encoder eagerly
    first, so saved artifacts would miss. Installed up front, every process compiles the
    same graphs. As in eager, the outermost decorated module on each path hooks its own
    subtree (``CLIPTextModelWithProjection`` delegates to a decorated ``CLIPTextModel``).
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return
    install = getattr(output_capturing, "maybe_install_capturing_hooks", None)
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if install is None or registry is None:
        return
    pending = [module]
    while pending:
        current = pending.pop()
        if registry.get(current) and _captures_outputs(type(current).forward):
            install(current)
        else:
            pending.extend(current.children())


def _mark_ran(state_ref: weakref.ref[PipeState], name: str) -> Callable[..., None]:
    # Runs outside the compiled frame (OptimizedModule's own hooks), so it adds no guards.
    def hook(module: nn.Module, _args: tuple[Any, ...]) -> None:
        if (state := state_ref()) is not None:
            state.ran_components.add(name)
        if (record := _record(module)) is not None:
            record.ran = True

    return hook


def _restore(pipe: Any, name: str, state: PipeState, why: str) -> nn.Module:
    """Put the original module of ``name`` back on the pipe and forget its record."""
    current = component(pipe, name)
    original = _original(current)
    # What it records stops being true: a pipeline sharing the wrapper must not adopt it,
    # nor the original ('blocks' style records there).
    for module in (current, original):
        if (record := _record(module)) is not None:
            record.unmark()
            del module.__dict__[RECORD_ATTR]
    regional.unmark_regions(original)  # blocks compiled regionally go back to eager
    _set(pipe, name, original)
    state.compiled.pop(name, None)
    state.configs.pop(name, None)
    state.ran_components.discard(name)
    if name in CONV_COMPONENTS:
        apply_memory_format(original, "preserve")  # drop the old input-layout hook
    remove_shape_adapters(original)  # the next compile applies them again if dynamic
    log.info("difforge: %s: %s", name, why)
    return original


def _same_folder(before: CompileConfig | None, config: CompileConfig | None) -> bool:
    """The key leaves out the cache folder (it is saved with the pipe and must stay
    portable); a new folder still recompiles, or nothing would be written there."""
    return config is None or before is None or before.placement_key() == config.placement_key()


def _track(
    state: PipeState, name: str, compiled: nn.Module, key: str, config: CompileConfig | None
) -> None:
    """Record ``compiled`` as this pipeline's ``name`` (and on the module, for pipelines
    made from this one or sharing its VAE), with a hook that notes when it first runs."""
    record = _record(compiled)
    if record is None or record.key != key:
        if record is not None:
            record.unmark()
        record = compiled.__dict__[RECORD_ATTR] = ComponentRecord(key, config)
    record.mark(compiled, state, name)
    if record.ran:
        state.ran_components.add(name)
    state.compiled[name] = key
    state.configs[name] = config


def _ensure_state(pipe: Any) -> PipeState:
    state = pipe_state(pipe)
    if state is None:
        state = PipeState()
        setattr(pipe, STATE_ATTR, state)
        setattr(pipe, COMPILED_ATTR, state.compiled)
    return state


def compile_pipe(
    pipe: Any,
    *,
    options: Mapping[str, Any] | str | None = None,
    backend: str | Callable[..., Any] = "difforge",
    ignores: Iterable[str] | str = (),
    fuse_qkv_projections: bool = False,
) -> Any:
    """Compile the pipeline's text encoders, denoiser, controlnet and VAE halves in place.

    ``options`` (dict, JSON string or a mode such as ``"O2"``) are validated before anything
    changes.
    ``ignores``: component names or dotted prefixes left eager (``"vae"`` = both halves);
    names this pipeline does not have raise ``ValueError``. ``fuse_qkv_projections`` calls
    diffusers' ``fuse_qkv_projections()`` on the denoiser and the VAE first, where the model
    supports it. Calling again with the same arguments compiles nothing; with other
    options, components are recompiled from their original modules. Returns ``pipe``.
    """
    if isinstance(pipe, nn.Module) or not _slots(pipe):
        raise TypeError(
            f"compile_pipe expects a diffusers pipeline (with some of {', '.join(COMPONENTS)}), "
            f"got {type(pipe).__name__}; compile a single module with difforge.compile()"
        )
    ignores = _check_ignores(pipe, ignores)
    if not (callable(backend) or isinstance(backend, str)):
        raise TypeError(f"backend must be a name or a callable, got {backend!r}")
    targets = [n for n in _modules(pipe) if not covered(n, ignores)]
    # Parse everything first: a bad option must fail before the pipe is touched.
    plans = {
        n: _component_options(
            options, backend, n in CONV_COMPONENTS, n in DENOISERS, _original(component(pipe, n))
        )
        for n in targets
    }
    state = _ensure_state(pipe)

    for name in [n for n in state.compiled if covered(n, ignores)]:
        _restore(pipe, name, state, "now ignored; restored the original module")

    # Fusion changes the original modules, so their compiled keys record it.
    owners = sorted({o for o in (_fusion_owner(n) for n in targets) if o is not None})
    fused = {o: _set_fusion(pipe, o, fuse_qkv_projections, state) for o in owners}

    for name in targets:
        raw, config = plans[name]
        owner = _fusion_owner(name)
        # fuse_qkv.modules (on in O2/O3) fuses while compiling: recorded as fused from the
        # first call on, so the same call again finds the same key.
        fuses_itself = config is not None and bool(config.settings["fuse_qkv.modules"])
        key = _key(backend, raw, config, bool(owner and (fused.get(owner) or fuses_itself)))
        current = component(pipe, name)
        record = _record(current)
        recorded = state.compiled.get(name)
        # The record on the module in the slot says what it is: compiled with these options
        # by this pipeline, or by one it shares the module with (from_pipe: adopted).
        if record is not None and record.key == key and _same_folder(record.config, config):
            if recorded != key:
                log.info("difforge: %s is compiled with these options already; adopted", name)
            _track(state, name, current, key, config)
            continue
        # 'compile.regional': 'blocks' compiles the blocks in place and keeps the module.
        if isinstance(current, _OptimizedModule) or recorded is not None:
            if record is None and recorded is None:
                why = "was compiled outside difforge"
            elif recorded is None:
                why = "was compiled for another pipeline with other options"
            elif record is None or record.key != recorded:
                why = "was recompiled by a pipeline sharing it"
            else:
                why = "compile options changed"
            current = _restore(pipe, name, state, f"{why}; recompiling from the original module")
        if name.startswith("text_encoder"):
            _install_output_hooks(current)
        compiled = difforge.compile(current, backend=backend, options=raw)
        if compiled is current and not regional.marked_blocks(current):
            continue  # "disable": true returns the module unchanged
        _set(pipe, name, compiled)
        _track(state, name, compiled, key, config)
    # diffusers' pipeline methods that skip compiled components or change their weights
    # unseen (difforge.diffusers.lora, .offload).
    pass_lora_methods_through(pipe, COMPONENTS)
    prepare_offloading(pipe, COMPONENTS)
    return pipe
