"""The Dynamo backend: difforge's FX passes, then Inductor with our config and hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.fx

from difforge.autotune_buckets import bucketing_for
from difforge.autotune_buckets import cache_salt as bucket_salt
from difforge.cache import CacheLayout, compile_in_cache
from difforge.errors import OptionsError, warn
from difforge.frozen import FrozenWeightGuard, frozen_weights
from difforge.fused_weights import FusedWeights, caching_for
from difforge.fusion_memo import memoized_fusion_check
from difforge.heuristics import choices_for, installed
from difforge.index_join import cache_salt as index_join_salt
from difforge.index_join import joined_symbolic_dimensions
from difforge.kernels.attention_select import using_policy
from difforge.options import CompileConfig, load_options, parse_options
from difforge.passes import PostGradPasses, cacheable_targets, enabled_passes, run_fx_passes
from difforge.precision import with_tf32
from difforge.recompiles import RecompileTracker

log = logging.getLogger("difforge")


@dataclass
class CompileRecord:
    """What one graph's compilation did (for tests, `explain` output and benchmarks)."""

    mode: str
    inductor_patches: dict[str, Any]
    rewrites: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    regions: dict[str, int] = field(default_factory=dict)
    """Nested compile regions (``compile.regional``): subgraph name -> calls in this graph."""


#: Every graph compiled by difforge in this process, oldest first.
compile_records: list[CompileRecord] = []


def _post_grad_hook(
    config: CompileConfig, stage: str, key: str, salt: bytes = b""
) -> PostGradPasses | None:
    passes = enabled_passes(stage, config.pass_enabled)  # type: ignore[arg-type]
    # A user's own hook (explicit option, else the global config) keeps running after ours.
    user_hook = config.inductor_patches().get(key, getattr(inductor_config, key, None))
    hook = PostGradPasses(stage, passes, chained=user_hook, salt=salt)  # type: ignore[arg-type]
    return hook if hook else None


def has_unbacked_sizes(example_inputs: Sequence[Any]) -> bool:
    """Whether a graph's inputs have unbacked sizes (an unbacked batch, difforge.batch)."""
    try:
        from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    except ImportError:  # pragma: no cover - private API moved
        return False
    for value in example_inputs:
        if isinstance(value, (torch.Tensor, torch.SymInt)) and free_unbacked_symbols(value):
            return True
    return False


def _regions(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How often each ``invoke_subgraph`` body (a nested compile region) is called."""
    hop = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if hop is not None and node.target is hop and node.args:
            body = node.args[0]
            name = str(body.target) if isinstance(body, torch.fx.Node) else repr(body)
            calls[name] = calls.get(name, 0) + 1
    return calls


def _mark_cacheable_targets(patches: dict[str, Any]) -> None:
    """Let AOTAutograd cache graphs that call our fx passes' functions (passes.registry
    .cacheable_target); without this every start re-traces the model through AOT."""
    key = "unsafe_marked_cacheable_functions"
    if not hasattr(inductor_config, key):  # pragma: no cover - torch without the knob
        return
    marked = dict(patches.get(key) or getattr(inductor_config, key) or {})
    marked.update(cacheable_targets())
    patches[key] = marked


class DifforgeBackend:
    """A compiler for ``torch.compile(backend=...)`` bound to one parsed config."""

    def __init__(
        self,
        config: CompileConfig,
        name: str = "a compiled function",
        hooked: Callable[[], str | None] | None = None,
    ) -> None:
        self.config = config
        self.records: list[CompileRecord] = []
        self.recompiles = RecompileTracker(
            config.settings["recompile.limit"],
            bool(config.settings["recompile.strict"]),
            name,
            hooked=hooked,
        )

    def __call__(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]
    ) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        config = self.config
        if config.disable:
            return gm.forward
        self.recompiles.on_compile()
        start = time.perf_counter()
        record = CompileRecord(mode=config.mode, inductor_patches={}, regions=_regions(gm))
        unbacked = has_unbacked_sizes(example_inputs)
        patches = config.inductor_patches()
        # Not under precompile (a loaded entry would skip the refresh) nor freezing (Inductor
        # would fold the buffer into a constant that no refresh reaches).
        cache_weights = (
            bool(config.settings["fuse_qkv.cached_weights"])
            and not bool(config.settings["cache.precompile"])
            and not patches.get("freezing")
        )
        with (
            using_policy(config.attention_policy()),
            caching_for(gm, example_inputs, cache_weights) as weight_cache,
        ):
            record.rewrites.update(run_fx_passes(gm, enabled_passes("fx", config.pass_enabled)))
        fused_groups = weight_cache.prune() if weight_cache is not None else []
        if weight_cache is not None and fused_groups:
            record.notes.append(
                f"fuse_qkv.cached_weights: {len(fused_groups)} concatenations cached, "
                f"{weight_cache.nbytes() / 2**20:.1f} MiB"
            )

        if (
            unbacked
            and "layout_optimization" not in patches
            and hasattr(inductor_config, "layout_optimization")
        ):
            # Inductor's layout optimisation makes convs channels_last, but a fake conv with
            # an unbacked batch reports a contiguous output: the real (channels_last) output
            # then fails Inductor's stride assert. On the CPU (oneDNN) it is always on; on
            # GPUs Inductor already turns it off for graphs with dynamic conv shapes.
            patches["layout_optimization"] = False
        choices = choices_for(config)
        hooks = {
            "post_grad_custom_pre_pass": _post_grad_hook(
                config,
                "post_grad_pre",
                "post_grad_custom_pre_pass",
                salt=(choices.cache_salt() if choices is not None else b"")
                + bucket_salt(config, patches)
                + index_join_salt(),
            ),
            "post_grad_custom_post_pass": _post_grad_hook(
                config, "post_grad_post", "post_grad_custom_post_pass"
            ),
        }
        patches.update({k: v for k, v in hooks.items() if v is not None})
        _mark_cacheable_targets(patches)
        record.inductor_patches = dict(patches)

        freezing = bool(patches.get("freezing"))
        if freezing and torch.is_grad_enabled():
            freezing = False
            note = (
                "freezing needs inference: call the compiled module under torch.no_grad() "
                "or torch.inference_mode(); this graph was compiled without freezing"
            )
            record.notes.append(note)
            warn(f"difforge: {note}")
        # Collected before Inductor runs: freezing rewrites the graph module's attributes.
        weights = frozen_weights(gm, example_inputs) if freezing else []
        kinds = {kind for kind, _, _ in weights}
        if freezing and "input" in kinds and "attribute" not in kinds:
            _warn_unfrozen(record)  # weights there, but none where Inductor can fold them

        def run_inductor() -> Callable[..., Any]:
            with (
                functorch_config.patch(config.functorch_patches()),
                installed(choices),
                bucketing_for(config, patches),
                memoized_fusion_check(),
                joined_symbolic_dimensions(),
            ):
                return compile_fx(gm, example_inputs, config_patches=patches)

        if config.cache_enabled:
            # Repairs damaged artifacts first; retries once when a failure is the cache's.
            compiled = compile_in_cache(CacheLayout(config.cache_dir), run_inductor)
        else:
            compiled = run_inductor()

        for hook in hooks.values():
            if hook is not None:
                for name, count in hook.made.items():
                    record.rewrites[name] = record.rewrites.get(name, 0) + count
        record.seconds = time.perf_counter() - start
        self.records.append(record)
        compile_records.append(record)
        log.info(
            "difforge compiled a graph in %.1f s (mode %r, rewrites %s)",
            record.seconds,
            config.mode or "O1",
            {k: v for k, v in record.rewrites.items() if v},
        )
        if freezing:
            compiled = FrozenWeightGuard(compiled, weights)
        if fused_groups:
            compiled = FusedWeights(compiled, fused_groups)
        return with_tf32(compiled) if config.allow_tf32 else compiled


_warned_unfrozen = False


def _warn_unfrozen(record: CompileRecord) -> None:
    """Freezing asked for, but Dynamo traced the weights as graph inputs: nothing folds."""
    global _warned_unfrozen
    note = (
        "freezing had no effect on this graph: Dynamo traced the weights as inputs, which "
        "happens when Inductor's global freezing flag was off while it traced; compile with "
        "difforge.compile()/compile_pipe(), or set torch._inductor.config.freezing = True "
        "before the first call"
    )
    record.notes.append(note)
    if not _warned_unfrozen:
        _warned_unfrozen = True
        warn(f"difforge: {note}")


_warned_dynamic = False
_warned_regional = False
_warned_fp8 = False
_ENTRY_POINT_BACKENDS: dict[str, DifforgeBackend] = {}


def difforge_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | str | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``"difforge"`` backend as ``torch.compile`` finds it (entry point or registry).

    ``torch.compile(m, backend="difforge", options={...})`` passes ``options`` here at
    the first call; ``mode="O3"`` is accepted as a shorthand for ``options={"mode": ...}``.
    """
    global _warned_dynamic, _warned_regional, _warned_fp8
    opts = load_options(options)
    if mode is not None:
        if "mode" in opts and opts["mode"] != mode:
            raise OptionsError(
                f"conflicting 'mode': torch.compile(mode={mode!r}) but options say "
                f"{opts['mode']!r}; give it once"
            )
        opts["mode"] = mode
    config = parse_options(opts)
    # One backend per distinct options (and cache folder), so recompiles of a function are
    # counted across calls.
    key = config.placement_key()
    if key not in _ENTRY_POINT_BACKENDS:
        _ENTRY_POINT_BACKENDS[key] = DifforgeBackend(config)
    backend = _ENTRY_POINT_BACKENDS[key]
    if config.settings.get("compile.regional") and not _warned_regional:
        _warned_regional = True
        warn(
            "difforge: 'compile.regional' only takes effect through difforge.compile() or "
            "compile_pipe() (it marks the module's blocks before tracing); with torch.compile "
            "the whole model is compiled",
        )
    if config.settings.get("quant.fp8_linear") and not _warned_fp8:
        _warned_fp8 = True
        warn(
            "difforge: fp8 linears ('quant.fp8_linear', on under low-precision/O3) are swapped "
            "in by difforge.compile() or compile_pipe() before tracing; torch.compile(backend="
            "'difforge') only sees the traced graph, so the linears keep their precision "
            "(quantize first with difforge.quant.quantize_linears() or quantize_pipe())",
        )
    if config.dynamic is not None and not _warned_dynamic:
        _warned_dynamic = True
        warn(
            "difforge: the 'dynamic' option only takes effect through difforge.compile(); "
            "with torch.compile pass dynamic=... to torch.compile itself",
        )
    return backend(gm, example_inputs)
