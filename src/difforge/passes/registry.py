"""The registry of difforge graph passes, their counters and their debug dumps.

A pass is a function that rewrites a graph in place and returns how many rewrites it
made. It runs at one of three stages:

- ``fx``: on the Dynamo FX graph (torch-level ops, before AOT autograd);
- ``post_grad_pre`` / ``post_grad_post``: on the ATen graph, through Inductor's
  ``post_grad_custom_pre_pass`` / ``post_grad_custom_post_pass`` hooks.

Each pass has a name (the option ``passes.<name>`` switches it), a tier saying which
modes turn it on, and a counter (``counters[name]``) bumped per rewrite, so tests can
assert that it fired, and did not fire where it must not.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import logging
import operator
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.fx

if TYPE_CHECKING:
    from torch._subclasses.fake_tensor import FakeTensorMode

log = logging.getLogger("difforge.passes")

Stage = Literal["fx", "post_grad_pre", "post_grad_post"]
STAGES: tuple[Stage, ...] = ("fx", "post_grad_pre", "post_grad_post")

# Tier "cleanup": exact, always on unless switched off. Tier "optimize": exact up to
# floating-point reassociation; turned on by `max-optimize` (and so by O2/O3).
Tier = Literal["cleanup", "optimize", "low-precision"]

#: Rewrites made per pass name, summed over every compilation in this process.
counters: collections.Counter[str] = collections.Counter()

PassFn = Callable[[torch.fx.Graph], int]


@dataclass(frozen=True)
class GraphPass:
    """One named rewrite: ``fn(graph) -> number of rewrites``."""

    name: str
    stage: Stage
    tier: Tier
    fn: PassFn
    doc: str

    @property
    def source_file(self) -> Path:
        """The file whose contents decide this pass's behaviour (hashed into cache keys)."""
        return Path(inspect.getfile(self.fn))


_REGISTRY: dict[str, GraphPass] = {}

#: Python functions that ``fx``-stage passes insert into Dynamo's graph, by the dotted name
#: AOTAutograd's cache checks, with a hash of their module's source as the cache salt.
_CACHEABLE_TARGETS: dict[str, str] = {}


def cacheable_target(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark ``fn``, a pure function of its tensor arguments that an fx-stage pass puts into
    the graph, as safe for AOTAutograd's cache.

    AOTAutograd refuses to cache a graph that calls a Python function it does not know
    (it cannot tell what the function does from the graph), and then re-traces the whole
    model at every start, cache or not: on a PixArt-XL step that is most of a warm start.
    ``fn``'s behaviour is fixed by its module's source, which goes into the cache key.
    """
    source = Path(inspect.getfile(fn)).read_bytes()
    _CACHEABLE_TARGETS[f"{fn.__module__}.{fn.__name__}"] = hashlib.sha256(source).hexdigest()[:16]
    return fn


def cacheable_targets() -> dict[str, str]:
    """Every :func:`cacheable_target`: dotted name -> source hash (Inductor's
    ``unsafe_marked_cacheable_functions`` format)."""
    return dict(_CACHEABLE_TARGETS)


def node_tensor(node: object) -> torch.Tensor | None:
    """The fake tensor a node carries (Dynamo graphs: ``example_value``; ATen graphs:
    ``val``), or None for non-nodes and non-tensor values."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node_value(node)
    return value if isinstance(value, torch.Tensor) else None


def node_value(node: torch.fx.Node) -> object:
    """The fake value a node carries (tensor or not): ``example_value`` (Dynamo graphs),
    else ``val`` (ATen graphs), else None."""
    return node.meta.get("example_value", node.meta.get("val"))


@contextlib.contextmanager
def guardless(fake_mode: FakeTensorMode) -> Iterator[None]:
    """``fake_mode`` active with its ShapeEnv's guards suppressed: for passes that run new
    nodes on fake tensors only to learn their shapes, so a ``dynamic`` graph stays dynamic
    (a guard recorded here would specialise what Dynamo kept symbolic)."""
    shape_env = fake_mode.shape_env
    no_guards = shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()
    with fake_mode, no_guards:
        yield


def size_hint(size: object) -> int | None:
    """A size as an int: itself, or a symbolic size's current hint (None when it has none)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def same_size(a: object, b: object) -> bool:
    """Sizes equal without adding a guard: ints by value, symbolic sizes only when provably
    equal (a pass must not specialise a ``dynamic`` graph by asking)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # sizes of different shape environments: not provably equal
        return False


#: The call targets of a plain add / mul in a Dynamo FX graph.
ADDS: tuple[object, ...] = (operator.add, torch.add)
MULS: tuple[object, ...] = (operator.mul, torch.mul)


def binary_operands(node: object, targets: tuple[object, ...]) -> tuple[object, object] | None:
    """The two operands of ``node`` when it is a plain two-operand call of one of
    ``targets`` (no ``alpha``/``out`` keywords), else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target not in targets or len(node.args) != 2 or node.kwargs:
        return None
    return node.args[0], node.args[1]


def node_arg(node: torch.fx.Node, index: int, name: str, default: object = None) -> object:
    """Argument ``name`` of a call node, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def fill_example_values(nodes: list[torch.fx.Node]) -> bool:
    """Give nodes a pass inserted (in graph order) fake values, as Dynamo's own nodes
    have, so that later passes can read their shapes; False (the rest left without) when
    there is no fake mode or a node fails on fake inputs (AOT traces it afresh anyway)."""
    # The inputs' own mode: the ambient tracing context's (what detect_fake_mode would
    # return first) can be another one while a backend runs.
    inputs = [node_tensor(i) for n in nodes for i in n.all_input_nodes]
    modes = {id(m): m for t in inputs if (m := getattr(t, "fake_mode", None)) is not None}
    if len(modes) != 1:
        return False
    (fake_mode,) = modes.values()
    with guardless(fake_mode):
        for node in nodes:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), node_value)
            try:
                if node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)  # type: ignore[arg-type]
                else:
                    value = node.target(*args, **kwargs)  # type: ignore[operator]
            except Exception:
                return False
            node.meta["example_value"] = value
    return True


def replace_with_call(
    graph: torch.fx.Graph, node: torch.fx.Node, target: Callable[..., object], args: tuple
) -> torch.fx.Node:
    """Replace ``node`` by ``target(*args)`` computing the same value: the new node takes
    ``node``'s metadata (its example value) and users, and ``node`` is erased."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def register_pass(name: str, *, stage: Stage, tier: Tier) -> Callable[[PassFn], PassFn]:
    """Decorator adding a pass to the registry; its docstring's first line is its description."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {STAGES}")

    def add(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = GraphPass(name=name, stage=stage, tier=tier, fn=fn, doc=doc)
        return fn

    return add


#: Built-in pass modules in execution order. Epilogue folding runs before QKV fusion:
#: FLUX's single blocks feed the MLP projection from the same input as q/k/v, and a
#: linear that fuse_qkv swallowed can no longer take its GELU into the epilogue. The
#: concatenation split comes next, on linears whose inputs are final (their GEMMs are
#: not fuse_qkv candidates: the weight is a slice). The activation rewrites run after
#: the epilogue folding, on the GELUs it left, and the
#: quantization rewrites after them (they match either GELU form). The joint-attention
#: rewrite takes the per-stream GEMMs that QKV fusion made, so it comes after it.
BUILTIN_MODULES: tuple[str, ...] = (
    "cleanup",
    "gemm_epilogue",
    "split_linear",
    "activation",
    "quant_fusion",
    "fuse_linear",
    "joint_linear",
    "attention",
    "norm",
    "rope",
)


def _execution_rank(graph_pass: GraphPass) -> int:
    module = graph_pass.fn.__module__.rsplit(".", 1)[-1]
    return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)


def all_passes() -> dict[str, GraphPass]:
    """Every registered pass by name, in execution order: built-in modules in
    :data:`BUILTIN_MODULES` order, then others; registration order within a module."""
    _load_builtin_passes()
    ordered = sorted(_REGISTRY.values(), key=_execution_rank)  # stable
    return {p.name: p for p in ordered}


def _load_builtin_passes() -> None:
    # Importing the modules registers their passes; done lazily so that the registry
    # module itself stays importable from `options` without a cycle.
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(f"difforge.passes.{module}")


def _dump_requested(name: str) -> bool:
    wanted = os.environ.get("DIFFORGE_DUMP_PASSES", "")
    names = {w.strip() for w in wanted.split(",") if w.strip()}
    return bool(names) and ("all" in names or "1" in names or name in names)


def _dump(name: str, when: str, graph: torch.fx.Graph) -> None:
    text = str(graph)
    folder = os.environ.get("DIFFORGE_DUMP_DIR")
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        index = len(list(path.glob(f"*_{name}_before.txt")))
        (path / f"{index:03d}_{name}_{when}.txt").write_text(text)
    else:
        log.warning("difforge pass %s, graph %s:\n%s", name, when, text)


def run_pass(graph_pass: GraphPass, graph: torch.fx.Graph) -> int:
    """Run one pass with its dump hooks and counter; wraps failures in a PassError."""
    from difforge.errors import PassError

    dump = _dump_requested(graph_pass.name)
    if dump:
        _dump(graph_pass.name, "before", graph)
    try:
        made = int(graph_pass.fn(graph))
    except Exception as exc:
        raise PassError(graph_pass.name, graph_pass.stage, exc) from exc
    if made:
        graph.lint()
        counters[graph_pass.name] += made
        log.debug("difforge pass %s made %d rewrites", graph_pass.name, made)
    if dump:
        _dump(graph_pass.name, "after", graph)
    return made
