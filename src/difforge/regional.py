"""Regional compilation: compile each distinct repeated block once, reuse it for its twins.

A DiT is a stack of identical blocks (PixArt-XL-2: 28, FLUX.1-dev: 19 + 38); a UNet repeats
its transformer blocks and resnets. Compiling the whole model traces, lowers and schedules
every block again, although Inductor ends up emitting the same kernels for all of them.
With ``"compile.regional": true`` difforge marks each group of structurally identical
blocks as one region, so the block body is traced, partitioned and lowered once per
distinct block type and called N times.

How (the choice, and why)
-------------------------
Two ways exist on torch >= 2.9:

1. ``"nested"`` (the default, ``true``): torch's own ``torch.compiler.nested_compile_region``
   (the ``invoke_subgraph`` higher-order op). The model is still compiled whole, as *one*
   Dynamo graph with no graph breaks; each block call becomes
   ``invoke_subgraph(subgraph_k, ...)``, whose body Dynamo traces once per group (later
   calls only check that the inputs match) and Inductor compiles once. The outer parts
   (embedders, final layer) stay compiled, a single graph keeps ``cudagraphs`` covering
   the whole step, guards are checked once per call, and difforge's FX passes run on the
   block body too (they see the subgraph modules). This is what keeps speed.
2. ``"blocks"``: ``torch.compile`` on each block with one shared backend (what diffusers'
   ``compile_repeated_blocks`` does). With ``inline_inbuilt_nn_modules`` the parameters are
   graph inputs, so Dynamo compiles the shared ``forward`` code once and every identical
   sibling reuses it. But the model around the blocks runs eagerly, every block call is a
   separate compiled frame (guards and Python overhead N times per step, a graph boundary
   that CUDA graphs cannot span), and a block type with more than ``recompile_limit``
   structural variants falls back to eager. Kept as a fallback (and as the only choice
   when ``nested_compile_region`` is missing).

On the CPU (torch 2.13, TinyDiT dim 64, 24 blocks, O2): whole model 29 s, ``nested`` 9 s,
``blocks`` 6 s (it compiles less: the outer model is left eager). Both give 1 Dynamo frame
and one subgraph per distinct block. What both lose is fusion across block boundaries and
the cross-block fusion of ``fuse_qkv`` (the cross-attention K/V projections of all blocks
read the same text embedding; whole-model compiles fuse them into one GEMM, regional ones
into one GEMM per block).

Which blocks
------------
A diffusers model that declares ``_repeated_blocks`` (class names; FLUX, the SD/SDXL UNet)
gets those. Otherwise every ``nn.ModuleList`` is searched for children that are
structurally identical: same class, same forward, same parameter/buffer names, shapes and
dtypes, same sub-module types and the same plain attributes (head counts, eps, flags,
processor types) all the way down. Identical blocks anywhere in the model form one group
(one region function); groups inside another group's blocks are dropped (outermost wins).
Blocks of one class but different structure (SDXL's 640- and 1280-channel blocks, SD3's
``context_pre_only`` last block) get separate regions, so one region is never reused for
a block it was not traced for.

Dynamic shapes (``dynamic=True``; torch 2.13, checked)
-----------------------------------------------------
With ``dynamic=True`` Dynamo does not specialise floats (``specialize_float=False``): a
plain ``float`` read inside a block (``LayerNorm.eps``, an attention scale, the
``dropout_p=0.0`` default of diffusers' ``dispatch_attention_fn`` that FLUX reads) becomes a
``SymFloat`` input. The whole-model path copes (AOT's ``tensorify_python_scalars`` pass),
but across an ``invoke_subgraph`` it fails: ``DataDependentOutputException:
aten._local_scalar_dense.default`` for a block's own float attribute, ``Freevar has no
source`` for a float read from elsewhere, and Dynamo falls back to eager around the
blocks. With ``nested`` regions and ``dynamic=True`` difforge therefore traces with
``specialize_float=True`` (:func:`difforge.tracing.tracing_settings`): floats are
constants guarded by value, as in every static compile, while sizes stay symbolic, so one
graph serves every resolution and batch, the regions included. The cost: a float passed
*as an argument* that changes value recompiles, as it does without ``dynamic``. (An
earlier version pinned the blocks' float attributes as a float subclass instead; that
missed floats read from outside the blocks' modules and graph-broke on torch 2.11.)

Pitfall (torch 2.13, checked): marking the *unbound* ``forward`` and binding it to each
instance (``types.MethodType(nested_compile_region(cls.forward), block)``) silently reuses
the first block's weights for all blocks. difforge passes the block as an explicit argument
to the region function instead, so its parameters are region inputs; a test checks every
block's weights count.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from difforge.entry import wrap_entry
from difforge.errors import OptionsError, warn
from difforge.options import REGIONAL_STYLES, bad_regional_style

log = logging.getLogger("difforge")

_OptimizedModule = torch._dynamo.eval_frame.OptimizedModule

__all__ = [
    "REGIONAL_STYLES",
    "BlockGroup",
    "find_repeated_blocks",
    "mark_regions",
    "marked_blocks",
    "nested_regions_available",
    "resolve_style",
    "unmark_regions",
    "with_region_fallback",
]

_MARK = "_difforge_region"
"""Attribute set on a marked block: the :class:`BlockGroup` signature it belongs to."""

_SKIPPED_ATTRS = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "training",
        "forward",
        _MARK,
    }
)


@dataclass(frozen=True)
class BlockGroup:
    """Blocks that share one compiled region."""

    signature: str
    """Class name and a digest of the structure (identical blocks share it)."""
    names: tuple[str, ...]
    """Qualified names of the blocks inside the compiled module, in module order."""

    @property
    def class_name(self) -> str:
        return self.signature.split("#", 1)[0]


def nested_regions_available() -> tuple[bool, str]:
    """Whether ``torch.compiler.nested_compile_region`` can be used here, and why not."""
    if getattr(torch.compiler, "nested_compile_region", None) is None:
        return False, f"torch {torch.__version__} has no torch.compiler.nested_compile_region"
    try:
        importlib.import_module("torch._higher_order_ops.invoke_subgraph")
    except ImportError as err:  # pragma: no cover - very old torch
        return False, f"torch {torch.__version__} lacks invoke_subgraph ({err})"
    return True, ""


def resolve_style(value: Any) -> str | None:
    """The regional style ``compile.regional`` asks for (None = off); raises on a bad value."""
    if value is None or value is False:
        return None
    if value is True:
        available, _ = nested_regions_available()
        return "nested" if available else "blocks"
    if isinstance(value, str) and value in REGIONAL_STYLES:
        if value == "nested":
            available, why = nested_regions_available()
            if not available:
                raise OptionsError(
                    f"'compile.regional': 'nested' needs nested_compile_region: {why}; "
                    "use 'blocks' (or true, which picks what works)"
                )
        return value
    raise bad_regional_style(value)


# --------------------------------------------------------------------------------------------
# Finding blocks
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A hashable stand-in of an attribute that may change what ``forward`` does."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if callable(value) and hasattr(value, "__qualname__"):
        return ("fn", getattr(value, "__module__", ""), value.__qualname__)
    return ("obj", type(value).__module__, type(value).__qualname__)


def _describe(module: nn.Module) -> list[Any]:
    cls = type(module)
    forward = module.__dict__.get("forward", cls.forward)
    code = getattr(forward, "__code__", None)
    out: list[Any] = [
        cls.__module__,
        cls.__qualname__,
        (code.co_filename, code.co_firstlineno) if code is not None else repr(forward),
    ]
    for key, value in sorted(module.__dict__.items()):
        if key in _SKIPPED_ATTRS or (key.startswith("_") and key.endswith("hooks")):
            continue
        if isinstance(value, dict) and key == "config":
            value = tuple(sorted((k, _plain(v)) for k, v in value.items()))
        out.append((key, _plain(value)))
    out.append(tuple((n, _plain(p)) for n, p in module._parameters.items()))
    out.append(tuple((n, _plain(b)) for n, b in module._buffers.items()))
    return out


def signature(block: nn.Module) -> str:
    """Structural identity of ``block``: equal for blocks one compiled region can serve."""
    digest = hashlib.sha256()
    for name, module in block.named_modules():
        digest.update(repr((name, _describe(module))).encode())
    return f"{type(block).__name__}#{digest.hexdigest()[:16]}"


def _declared(module: nn.Module) -> list[tuple[str, nn.Module]]:
    names = getattr(type(module), "_repeated_blocks", None) or ()
    if isinstance(names, str):
        names = (names,)
    wanted = set(names)
    return [(n, m) for n, m in module.named_modules() if n and type(m).__name__ in wanted]


def _is_block(module: nn.Module) -> bool:
    """A block worth a region: at least two sub-modules that hold weights of their own.

    Not a lone Linear/Dropout, and not a thin wrapper around one layer either (diffusers'
    ``GELU`` activation module owns just its ``proj`` Linear): a region per such wrapper
    costs a subgraph boundary, which keeps Inductor from fusing across it, and saves almost
    no compile time. (The tiny SD3 preset, whose two blocks differ, once had its GELU
    wrappers chosen as its "repeated blocks".)
    """
    owners = sum(
        1 for sub in module.modules() if next(sub.parameters(recurse=False), None) is not None
    )
    return owners >= 2


def _listed(module: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            prefix = f"{name}." if name else ""
            found += [(f"{prefix}{i}", m) for i, m in enumerate(child) if _is_block(m)]
    return found


def find_repeated_blocks(module: nn.Module) -> list[BlockGroup]:
    """Groups of structurally identical blocks in ``module`` (each with >= 2 blocks).

    The classes named by ``type(module)._repeated_blocks`` when declared, else the children
    of every ``nn.ModuleList``; a block nested inside a chosen block is not chosen again.
    """
    candidates = _declared(module) or _listed(module)
    by_sig: dict[str, list[str]] = {}
    for name, block in candidates:
        if "forward" in block.__dict__ and _MARK not in block.__dict__:
            log.info("difforge: %s has its own forward attribute; not compiled regionally", name)
            continue
        by_sig.setdefault(signature(block), []).append(name)
    groups = {sig: names for sig, names in by_sig.items() if len(names) >= 2}
    chosen = sorted(n for names in groups.values() for n in names)

    def nested(name: str) -> bool:
        return any(name.startswith(f"{other}.") for other in chosen)

    result = []
    for sig, names in groups.items():
        kept = tuple(n for n in names if not nested(n))
        if len(kept) >= 2:
            result.append(BlockGroup(sig, kept))
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return sorted(result, key=lambda g: order[g.names[0]])


# --------------------------------------------------------------------------------------------
# Marking
# --------------------------------------------------------------------------------------------


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides a fresh contiguous tensor of its size has (a copy if not):
    ``.contiguous()`` keeps any stride of a size-1 dim (a batch-1 slice), a guard does not."""
    stride, expected = t.stride(), []
    step = 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if tuple(reversed(expected)) == stride:
        return t
    return torch.clone(t, memory_format=torch.contiguous_format)


def _contiguous_clone(t: torch.Tensor) -> torch.Tensor:
    return torch.clone(t, memory_format=torch.contiguous_format)


def _region_forward(cls_forward: Any) -> Any:
    """One nested compile region for a group: the block is an explicit argument, so its
    parameters are region inputs and every block of the group reuses one subgraph."""

    @torch.compiler.nested_compile_region
    def region(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # A region's outputs may not alias its inputs or each other (FLUX's single block
        # returns two slices of one tensor). Inductor inlines a clone of a computed value
        # into the kernel that computes it, so this costs a copy only for an output that
        # really is an input passed through.
        return pytree.tree_map_only(
            torch.Tensor, _contiguous_clone, cls_forward(block, *args, **kwargs)
        )

    @functools.wraps(cls_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Reuse needs equal tensor metadata, strides included: PixArt's first block gets a
        # transposed patch embedding, the others a contiguous block output. Outside the
        # region, where Inductor folds the copy into the producer (a no-op when contiguous).
        args, kwargs = pytree.tree_map_only(torch.Tensor, _contiguous, (args, kwargs))
        return region(self, *args, **kwargs)

    return forward


def marked_blocks(module: nn.Module) -> dict[str, str]:
    """Qualified name -> region signature of every block marked in ``module``."""
    return {n: m.__dict__[_MARK] for n, m in module.named_modules() if _MARK in m.__dict__}


def compiled_blocks(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, compiled block) of every block :func:`compile_blocks` put in
    ``module`` ('blocks' style); the original block is the compiled one's ``_orig_mod``."""
    return [
        (parent, attr, sub)
        for _, parent in list(module.named_modules())
        for attr, sub in list(parent._modules.items())
        if isinstance(sub, _OptimizedModule) and _MARK in sub.__dict__
    ]


def unmark_regions(module: nn.Module) -> int:
    """Undo :func:`mark_regions` and :func:`compile_blocks`; returns how many blocks."""
    count = 0
    # 'blocks' style: compiled blocks (OptimizedModules) go back to their originals.
    for parent, attr, sub in compiled_blocks(module):
        parent._modules[attr] = sub._orig_mod
        count += 1
    # 'nested' style: drop the instance forward that calls the region.
    for _, block in module.named_modules():
        if _MARK in block.__dict__:
            del block.__dict__[_MARK]
            block.__dict__.pop("forward", None)
            count += 1
    return count


def mark_regions(module: nn.Module, groups: Iterable[BlockGroup]) -> int:
    """Make every block of each group run as one shared nested compile region."""
    count = 0
    for group in groups:
        blocks = [module.get_submodule(n) for n in group.names]
        forward = _region_forward(type(blocks[0]).forward)
        for block in blocks:
            block.forward = types.MethodType(forward, block)
            block.__dict__[_MARK] = group.signature
            count += 1
    return count


def _contiguous_args(call: Any) -> Any:
    """Call ``call`` with contiguous tensor arguments (eagerly, outside the compiled frame).

    One frame serves all blocks only if their inputs match in strides too: PixArt's and
    TinyDiT's first block gets a transposed patch embedding, FLUX's blocks get slices of
    the previous block's output. Without this, the first differing block recompiles the
    frame (with dynamic shapes: 2 graphs for identical blocks). A copy only where needed.
    """

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = pytree.tree_map_only(torch.Tensor, _dense, (args, kwargs))
        return call(*args, **kwargs)

    return run


def compile_blocks(module: nn.Module, groups: Iterable[BlockGroup], compile_one: Any) -> int:
    """``blocks`` style: swap every block for ``compile_one(block)`` (an OptimizedModule that
    shares one backend, hence one Dynamo cache entry per block type); returns how many."""
    count = 0
    for group in groups:
        for name in group.names:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            compiled = compile_one(parent._modules[attr])
            compiled.forward = _contiguous_args(compiled.forward)
            compiled.__dict__[_MARK] = group.signature
            parent._modules[attr] = compiled
            count += 1
    return count


def _raised_in_region(exc: BaseException) -> bool:
    """Whether Dynamo failed while tracing or reusing a nested compile region."""
    tb = exc.__traceback__
    while tb is not None:
        if "invoke_subgraph" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _raised_in_region(cause)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def with_region_fallback(compiled: Any, module: nn.Module) -> Any:
    """``nested`` style: if Dynamo fails inside a region, warn once, unmark the regions and
    retry the call as a whole-model compile.

    Nested regions lean on young torch machinery: on torch 2.13 Dynamo's reuse of a traced
    region ("stamp out") raises ``KeyError`` for the SDXL UNet's blocks with
    ``dynamic: true`` (a size it specialised is looked up as a symbol). A slower compile
    is better than no model. Errors raised anywhere else propagate unchanged.
    """

    def wrap(call: Any) -> Any:
        @functools.wraps(call)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            except torch._dynamo.exc.InternalTorchDynamoError as exc:
                if not marked_blocks(module) or not _raised_in_region(exc):
                    raise
                unmark_regions(module)
                warn(
                    f"difforge: tracing the nested compile regions of {type(module).__name__} "
                    f"failed inside torch ({type(exc).__name__}: {_first_line(exc)}); compiling "
                    "the whole model instead (compile.regional off for this model)",
                )
                return call(*args, **kwargs)

        return run

    return wrap_entry(compiled, wrap)


def no_blocks_warning(module: nn.Module) -> None:
    warn(
        f"difforge: 'compile.regional' found no repeated blocks in {type(module).__name__} "
        "(no _repeated_blocks declared, no nn.ModuleList of identical modules); compiling "
        "the whole model instead",
    )
