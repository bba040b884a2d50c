"""Dynamo precompile (``cache.precompile``, opt-in, with ``cache-all``): a warm start that
skips Dynamo's tracing.

Even with every Inductor and AOT-autograd artifact cached, a new process re-traces the model's
Python with Dynamo before it can look those artifacts up: 7.2 of PixArt-XL's 10.8 s warm
start on an H100, 20.5 of FLUX.1-dev's 26.7 s (``benchmarks/results/README.md``). torch's
*caching precompile* (``torch._dynamo.config.caching_precompile``, experimental) saves what
Dynamo produced (the transformed bytecode, its guards, the compiled backend) as one entry per
compiled function, and loads it instead of tracing. On this repository's CPU machine (torch
2.13, tiny PixArt, O2, ``benchmarks/results/2026-11-26_cpu_compile_tiny_pixart_precompile.json``)
a warm start in a new process took 1.4 s against 2.9 s with only the other caches warm.

What difforge adds:

- **Keys.** torch names an entry by the function's qualified name and first line only
  (``PixArtTransformer2DModel.forward``), and keeps one folder for every option set. difforge
  keeps entries under ``<cache root>/precompile/<key>/`` where ``<key>`` hashes everything
  that can change the compiled code: the options (:meth:`CompileConfig.key`), the source of
  every difforge module, the torch and Triton versions, the accelerator and the model's
  Python (:func:`python_fingerprint`). Another option set, another difforge, another GPU or
  another model code starts from an empty folder.
- **Scope.** The setting is switched on only around difforge's own ``torch.compile`` and
  its calls, never for the process, and difforge writes only the entry of the function it
  compiled (torch's save writes every function compiled so far into the folder in force).
- **Repairs** of torch's entry format where it failed on diffusion models: guard sources that
  did not unpickle (:func:`repair_source_pickling`, torch 2.11;
  :func:`repair_guard_installing_sources`, 2.13), a decorated ``forward``'s inner function
  stored as a placeholder (:func:`repair_decorated_function_pickling`, 2.13), its entry
  recorded under the wrong module (:func:`module_of_globals`); any other failure to load or
  install an entry is a warned miss that traces afresh.

What it costs: the entry is loaded with *fewer guards*. torch drops guards it cannot
serialise, such as the identity and code of attention-processor objects. difforge's folder key
covers the model's own Python instead (:func:`python_fingerprint`: classes and their source
files, instance-patched ``forward``s, processor classes), so another processor or a patched
``forward`` is traced afresh; a monkeypatched library function or a global flag the model
reads is not covered and would run the stored code. Tensor shapes, dtypes, devices and
strides and the global state (grad mode, autocast) stay guarded. Hence opt-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import itertools
import marshal
import pickle
import platform
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from difforge.cache import CacheLayout, using_cache
from difforge.errors import warn
from difforge.options import CompileConfig

KEY = "cache.precompile"


@functools.cache
def support() -> str | None:
    """None when this torch can precompile; otherwise why not."""
    config = getattr(torch._dynamo, "config", None)
    if config is None or not hasattr(config, "caching_precompile"):
        return f"torch {torch.__version__} has no torch._dynamo.config.caching_precompile"
    try:
        from torch._dynamo.package import CompilePackage, DynamoCache  # noqa: F401
        from torch._dynamo.precompile_context import PrecompileContext  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} lacks Dynamo's package store ({exc})"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warn(message, UserWarning)


def enabled(config: CompileConfig) -> bool:
    """Whether ``config`` asks for precompile and this torch has it (else one warning)."""
    if not config.settings.get(KEY):
        return False
    why_not = support()
    if why_not is not None:
        _warn_once(f"difforge: option {KEY!r} is ignored: {why_not}")
        return False
    repair_source_pickling()
    repair_decorated_function_pickling()
    repair_guard_installing_sources()
    return True


def _reduce_init_fields(self: Any) -> tuple[Any, tuple[Any, ...]]:
    # What torch 2.13 does: rebuild from the constructor's fields; __post_init__ derives
    # the rest.
    values = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)
    return type(self), values


def _round_trips(source: Any) -> bool:
    try:
        return pickle.loads(pickle.dumps(source)) == source
    except Exception:
        return False


@functools.cache
def repair_source_pickling() -> tuple[str, ...]:
    """Make Dynamo's guard sources pickle as their constructors expect; the classes repaired.

    torch 2.11 pickles a source with *every* dataclass field, its derived ``init=False``
    ones too, and unpickles it by calling the class with them, so an entry whose guards
    hold a ``DefaultsSource`` (PixArt-XL and FLUX.1-dev have one) was written but could not
    be loaded (``TypeError: DefaultsSource.__init__() takes from 3 to 4 positional
    arguments``, H100, ``benchmarks/results/2026-11-27_h100_compile_pixart_precompile_fail.json``).
    Nothing changes on a torch whose sources already round-trip (2.13).
    """
    try:
        from torch._dynamo.source import DefaultsSource, LocalSource
        from torch._guards import Source
    except ImportError:
        return ()
    try:
        probe = DefaultsSource(LocalSource("fn"), 0)
    except Exception:
        return ()
    if _round_trips(probe):
        return ()
    derived = [c for c in _source_classes(Source) if any(not f.init for f in dataclasses.fields(c))]
    for cls in derived:
        cls.__reduce__ = _reduce_init_fields  # type: ignore[method-assign,assignment]
    return tuple(sorted(c.__name__ for c in derived))


def _source_classes(root: type) -> Iterator[type]:
    """``root`` and its subclasses that are dataclasses (Dynamo's guard sources)."""
    pending = [root]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls):
            yield cls


def rebuild_source(cls: type, values: dict[str, Any]) -> Any:
    """A guard source rebuilt from its fields without ``__post_init__`` (unpickling side of
    :func:`repair_guard_installing_sources`)."""
    source = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(source, name, value)
    return source


def _reduce_fields(self: Any) -> tuple[Any, tuple[Any, ...]]:
    return rebuild_source, (
        type(self),
        {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
    )


def _installs_a_guard(cls: type) -> bool:
    post_init = vars(cls).get("__post_init__")
    try:
        return post_init is not None and "install_guard" in inspect.getsource(post_init)
    except (OSError, TypeError):
        return False


@functools.cache
def repair_guard_installing_sources() -> tuple[str, ...]:
    """Make guard sources whose ``__post_init__`` installs a guard unpickle without it; the
    classes repaired.

    torch 2.13 unpickles a source by calling its constructor, and ``ImportSource`` (in the
    guards of FLUX's ``nested`` regions) then installs a guard, which needs a trace: loading
    raised ``TracingContext.get() must be called within an ongoing trace`` and every stored
    region was traced again. The stored guards do not need that side effect.
    """
    try:
        from torch._guards import Source
    except ImportError:
        return ()
    installing = [c for c in _source_classes(Source) if _installs_a_guard(c)]
    for cls in installing:
        cls.__reduce__ = _reduce_fields  # type: ignore[method-assign,assignment]
    return tuple(sorted(c.__name__ for c in installing))


def function_behind_wrappers(module: str, qualname: str, depth: int) -> Any:
    """The function ``depth`` ``__wrapped__`` steps behind ``module.qualname`` (unpickling
    side of :func:`repair_decorated_function_pickling`)."""
    fn: Any = importlib.import_module(module)
    for name in qualname.split("."):
        fn = getattr(fn, name)
    for _ in range(depth):
        fn = fn.__wrapped__
    return fn


def _wrapped_depth(fn: Any) -> int | None:
    """How many ``__wrapped__`` steps lead from ``fn``'s module-level name to ``fn`` (a
    function its decorator shadows there), or None when that name does not lead to it."""
    target: Any = sys.modules.get(fn.__module__)
    for name in fn.__qualname__.split("."):
        target = getattr(target, name, None)
    depth = 0
    while target is not None and target is not fn and depth < 8:
        target, depth = getattr(target, "__wrapped__", None), depth + 1
    return depth if target is fn and depth else None


@functools.cache
def repair_decorated_function_pickling() -> bool:
    """Let Dynamo's guard state pickle a function that a ``functools.wraps`` decorator
    shadows under its own name; whether the repair was installed.

    diffusers' ``apply_lora_scale`` wraps FLUX's ``forward``: Dynamo's first frame is the
    wrapper, whose closure holds the original function, and a guard reads that function's
    ``__defaults__``. torch pickles a function by its module and qualname and, finding the
    wrapper there, stores a placeholder instead ("fqn mismatch"), so on torch 2.13 the
    entry's guards could not be built (``'_Missing' object has no attribute
    '__defaults__'``) and FLUX's stored trace was never used. Such a function is stored as
    its name plus the number of ``__wrapped__`` steps to follow.
    """
    try:
        from torch._dynamo.guards import GuardsStatePickler
    except ImportError:
        return False
    original = GuardsStatePickler.reducer_override

    def reducer_override(self: Any, obj: Any) -> Any:
        if inspect.isfunction(obj) and "<locals>" not in obj.__qualname__:
            depth = _wrapped_depth(obj)
            if depth:
                return function_behind_wrappers, (obj.__module__, obj.__qualname__, depth)
        return original(self, obj)

    GuardsStatePickler.reducer_override = reducer_override  # type: ignore[method-assign]
    return True


def unloadable(entry: Any) -> str | None:
    """Why a stored entry's guards cannot be rebuilt on this torch, or None.

    torch loads an entry inside ``torch.compile`` and handles only a ``RuntimeError`` there,
    so any other failure while unpickling guards would escape to the user. Checked before
    torch installs anything, so such an entry is a plain miss.
    """
    from torch._dynamo import package

    for code in getattr(entry.dynamo, "codes", ()):
        for guarded in getattr(code, "guarded_codes", ()):
            try:
                package.load_guards_state(guarded.guards_state)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _difforge_source_hash() -> str:
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _accelerator() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{props.name} sm{props.major}{props.minor} cuda {torch.version.cuda}"
    return f"cpu {platform.machine()}"


@functools.cache
def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


@functools.cache
def _class_hash(cls: type) -> str:
    """The qualified names of ``cls`` and its bases with their source files' contents."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        digest.update(f"{klass.__module__}.{klass.__qualname__}".encode())
        source = getattr(sys.modules.get(klass.__module__), "__file__", None)
        if source:  # builtins have none; torch's own files are covered by its version too
            digest.update(_file_hash(source).encode())
    return digest.hexdigest()


#: How deep :func:`_callable_hash` follows partials, wrappers and closure cells.
_CALLABLE_DEPTH = 6
#: Values whose ``repr`` is stable across processes and says what they are.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _callable_hash(fn: Any) -> str:
    """A hash of what calling ``fn`` runs, stable across processes (no ``id``s): a
    function's code, defaults and source file, and what its closure cells hold; a
    ``functools.partial``'s function and bound arguments (diffusers' hooks and accelerate's
    offloading patch ``forward`` as ``partial(new_forward, module)``); a bound method's
    function and its object; other objects by class and attributes; ``__wrapped__``.
    Hashing a partial by its type or a closure by its code alone gave two different
    patches one folder, and the second process ran the first one's stored trace."""
    digest = hashlib.sha256()
    _hash_value(fn, digest, _CALLABLE_DEPTH, set())
    return digest.hexdigest()


def _hash_value(value: Any, digest: Any, depth: int, seen: set[int]) -> None:
    """Feed ``value``'s process-independent identity into ``digest`` (see
    :func:`_callable_hash`); containers and callables are followed ``depth`` levels."""
    if isinstance(value, _PLAIN):
        digest.update(f"{type(value).__name__}:{value!r}".encode())
        return
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor:{value.dtype}:{tuple(value.shape)}".encode())
        return
    if isinstance(value, torch.nn.Module):  # its own code is in the fingerprint's walk
        digest.update(_class_hash(type(value)).encode())
        return
    if depth <= 0 or id(value) in seen:
        digest.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())
        return
    seen.add(id(value))
    if isinstance(value, (tuple, list, set, frozenset)):
        digest.update(f"{type(value).__name__}[".encode())
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        for item in items:
            _hash_value(item, digest, depth - 1, seen)
        digest.update(b"]")
        return
    if isinstance(value, dict):
        digest.update(b"dict{")
        for key in sorted(value, key=repr):
            _hash_value(key, digest, depth - 1, seen)
            _hash_value(value[key], digest, depth - 1, seen)
        digest.update(b"}")
        return
    if isinstance(value, functools.partial):
        digest.update(b"partial")
        for part in (value.func, value.args, value.keywords):
            _hash_value(part, digest, depth - 1, seen)
        return
    if inspect.ismethod(value):
        digest.update(b"method")
        _hash_value(value.__self__, digest, depth - 1, seen)
        _hash_value(value.__func__, digest, depth - 1, seen)
        return
    if isinstance(value, type):
        digest.update(_class_hash(value).encode())
        return
    if inspect.isbuiltin(value):
        digest.update(f"builtin:{getattr(value, '__module__', None)}.{value.__qualname__}".encode())
        return
    code = getattr(value, "__code__", None)
    if code is not None:
        digest.update(hashlib.sha256(marshal.dumps(code)).digest())
        digest.update(_file_hash(code.co_filename).encode())
        for part in (getattr(value, "__defaults__", None), getattr(value, "__kwdefaults__", None)):
            _hash_value(part, digest, depth - 1, seen)
        for cell in getattr(value, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the closure)
                digest.update(b"empty-cell")
                continue
            _hash_value(contents, digest, depth - 1, seen)
    else:  # an object: its class and attributes (a hook's settings, e.g. a storage dtype)
        digest.update(_class_hash(type(value)).encode())
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict):
            _hash_value(attrs, digest, depth - 1, seen)
    wrapped = getattr(value, "__wrapped__", None)
    if wrapped is not None:
        _hash_value(wrapped, digest, depth - 1, seen)


def python_fingerprint(target: Any) -> str:
    """A hash of the Python that ``target``'s stored trace runs and torch does not guard.

    A loaded entry keeps the guards on tensors and global state, but not on which code the
    model's objects run: torch drops, e.g., the guards on diffusers' attention-processor
    objects. So the folder key covers, for every submodule, its class and base classes with
    their source files, a ``forward`` patched onto the instance, and the class of its
    attention ``processor``: another processor, a patched forward or an edited model file
    starts from an empty folder instead of running the stored code. Weights are not in it.
    """
    digest = hashlib.sha256()
    if not isinstance(target, torch.nn.Module):
        digest.update(_callable_hash(target).encode())
        return digest.hexdigest()
    for module in target.modules():
        digest.update(_class_hash(type(module)).encode())
        patched = vars(module).get("forward")
        if patched is not None:
            digest.update(_callable_hash(patched).encode())
        processor = getattr(module, "processor", None)
        if processor is not None:
            digest.update(_class_hash(type(processor)).encode())
    return digest.hexdigest()


def folder(config: CompileConfig, target: Any = None) -> Path:
    """Where ``config``'s precompiled entries for ``target`` (its :func:`python_fingerprint`)
    live."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    parts = (config.key(), _difforge_source_hash(), torch.__version__, triton_version)
    model = python_fingerprint(target) if target is not None else "any"
    digest = hashlib.sha256("\n".join((*parts, _accelerator(), model)).encode()).hexdigest()
    return CacheLayout(config.cache_dir).precompile / digest[:32]


@contextlib.contextmanager
def precompiling(config: CompileConfig, store_folder: Path | None = None) -> Iterator[None]:
    """Dynamo's caching precompile on, its store at ``config``'s folder, and Inductor and
    Triton at the cache root's folders (difforge.cache), where the stored entry's kernels
    were written: a loaded entry rebuilds its compiled code from them, not from scratch."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.package import DynamoCache

    store = str((store_folder or folder(config)) / "dynamo")
    load = DynamoCache.load

    def checked_load(fn: Callable[..., Any]) -> Any:
        entry = load(fn)
        why = None if entry is None else unloadable(entry)
        if why is None:
            return entry
        _unused_entry(f"for {source_id(fn)} cannot be loaded", why, "traced again and rewritten")
        return None

    # torch's store takes its folder from TORCHINDUCTOR_CACHE_DIR, which must name Inductor's
    # own folder here; instance attributes shadow the methods for this context only.
    shadowed = {"path_prefix": lambda: store, "load": checked_load}
    saved = {name: vars(DynamoCache)[name] for name in shadowed if name in vars(DynamoCache)}
    for name, value in shadowed.items():
        setattr(DynamoCache, name, value)
    try:
        with (
            using_cache(CacheLayout(config.cache_dir)),
            dynamo_config.patch(caching_precompile=True),
            _install_failures_are_misses(),
        ):
            yield
    finally:
        for name in shadowed:
            if name in saved:
                setattr(DynamoCache, name, saved[name])
            else:
                delattr(DynamoCache, name)


def _unused_entry(what: str, why: str, then: str) -> None:
    """Count a stored entry torch read but difforge did not use as an error, not a hit,
    and warn once."""
    counters = torch._dynamo.utils.counters["dynamo_cache"]
    counters["dynamo_cache_hit"] -= 1  # counted as read by torch; it is not used
    counters["dynamo_cache_error"] += 1
    _warn_once(
        f"difforge: a stored {KEY} entry {what} on torch {torch.__version__} ({why[:200]}); {then}"
    )


@contextlib.contextmanager
def _install_failures_are_misses() -> Iterator[None]:
    """Turn any failure while torch installs a loaded entry into the RuntimeError that
    torch.compile handles (it warns and traces afresh), counted and warned about once.

    Unpickling is checked before (:func:`unloadable`); building the guards can still fail:
    FLUX.1-dev's forward is decorated (diffusers' ``apply_lora_scale``), and torch stores a
    guard on the wrapped function's ``__defaults__``, a closure variable it cannot restore
    (``AttributeError: '_Missing' object has no attribute '__defaults__'`` from inside
    torch.compile, torch 2.13, 2026-11-27).
    """
    from torch._dynamo.package import CompilePackage

    install = CompilePackage.install

    def checked_install(self: Any, backends: Any) -> None:
        try:
            install(self, backends)
        except Exception as exc:
            _unused_entry("cannot be installed", f"{type(exc).__name__}: {exc}", "traced again")
            # torch's handler initializes the package afresh, which asserts that it is not
            # initialized yet (torch 2.13): undo what the failed install left behind.
            with contextlib.suppress(Exception):
                self.uninstall()
            self._initialized = False
            advance_unique_ids()  # names it installed outside uninstall's list stay taken
            if isinstance(exc, RuntimeError):
                raise
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    CompilePackage.install = checked_install  # type: ignore[method-assign]
    try:
        yield
    finally:
        CompilePackage.install = install  # type: ignore[method-assign]


_INSTALLED_NAME = re.compile(r"^__\w*?_(\d+)$")


def advance_unique_ids() -> None:
    """Make Dynamo's next global names unique after a stored entry was loaded.

    Dynamo names the globals it installs from one per-process counter
    (``__builtins_dict___0``...). A loaded entry installs the names of the process that wrote
    it, so the first trace after a load (a recompile for a new shape) asked for a name that
    was already taken and failed (``AssertionError: Name '__builtins_dict___0' already
    exists in scope``, torch 2.13). The counter is moved past every such name in use.
    """
    from torch._dynamo import bytecode_transformation

    if not hasattr(bytecode_transformation, "_unique_id_counter"):
        return
    highest = -1
    for module in list(sys.modules.values()):
        names = getattr(module, "__dict__", None)
        if not isinstance(names, dict):
            continue
        for name in list(names):
            if isinstance(name, str) and name.startswith("__") and name[-1:].isdigit():
                match = _INSTALLED_NAME.match(name)
                if match:
                    highest = max(highest, int(match.group(1)))
    if highest >= 0:
        current = next(bytecode_transformation._unique_id_counter)
        start = max(current, highest + 1)
        bytecode_transformation._unique_id_counter = itertools.count(start)


@contextlib.contextmanager
def module_of_globals(target: Any) -> Iterator[None]:
    """While torch.compile sets up ``target``'s entry, give its function the ``__module__``
    of the globals its code reads.

    torch records an entry's module as ``fn.__module__`` and installs the compiled code's
    globals (``__compiled_fn_...``) in that module. A forward decorated with
    ``functools.wraps`` (diffusers' ``apply_lora_scale`` on FLUX.1-dev's) takes the wrapped
    function's ``__module__`` while its code reads the decorator's module, so the first call
    after loading raised ``NameError: name '__compiled_fn_1_...' is not defined`` (torch
    2.13), and torch 2.11 raised it already in the compiling process (FLUX.1-dev, H100,
    2026-11-27). The entry keeps the module's name as a string, so the attribute is needed
    only while torch.compile records it, and is restored after.
    """
    fn = _entry_function(target)
    fn = getattr(fn, "__func__", fn)
    code_globals = getattr(fn, "__globals__", None)
    name = code_globals.get("__name__") if isinstance(code_globals, dict) else None
    module = sys.modules.get(name) if isinstance(name, str) else None
    original = getattr(fn, "__module__", None)
    if module is None or vars(module) is not code_globals or original == name:
        yield
        return
    fn.__module__ = name
    try:
        yield
    finally:
        fn.__module__ = original


def _entry_function(target: Any) -> Any:
    """The function torch keys ``target``'s entry by (a module: its ``forward``)."""
    return target.forward if isinstance(target, torch.nn.Module) else target


def source_id(target: Any) -> str:
    """torch's name for the entry of ``target`` (a module: its ``forward``)."""
    from torch._dynamo.package import CompilePackage

    return CompilePackage.source_id_from_fn(_entry_function(target))


def save(config: CompileConfig, target: Any, store_folder: Path | None = None) -> bool:
    """Write ``target``'s entry (what Dynamo recorded for it in this process) to
    ``store_folder`` (default: ``config``'s folder for ``target``); False when there is
    nothing to write."""
    from torch._dynamo.package import DynamoCache
    from torch._dynamo.precompile_context import PrecompileContext

    key = source_id(target)
    with precompiling(config, store_folder or folder(config, target)):
        entries, _ = PrecompileContext.create_cache_entries()
        entry = entries.get(key)
        if entry is None:
            return False
        DynamoCache.write(entry, key)
    return True


def with_precompile(
    compiled: Any, config: CompileConfig, target: Any, store_folder: Path | None = None
) -> Any:
    """Make every call of ``compiled`` run under :func:`precompiling` and save ``target``'s
    entry after a call that compiled (the first one, and any recompile), in
    ``store_folder`` (default: ``config``'s folder for ``target``)."""
    from difforge.entry import wrap_entry

    frames = torch._dynamo.utils.counters["stats"]
    store_folder = store_folder or folder(config, target)  # hashed once, not at every call

    def wrap(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def run(*args: Any, **kwargs: Any) -> Any:
            before = frames["unique_graphs"]
            with precompiling(config, store_folder):
                out = call(*args, **kwargs)
            if frames["unique_graphs"] != before:
                save(config, target, store_folder)
            return out

        return run

    return wrap_entry(compiled, wrap)


__all__ = [
    "KEY",
    "advance_unique_ids",
    "enabled",
    "folder",
    "module_of_globals",
    "precompiling",
    "python_fingerprint",
    "repair_decorated_function_pickling",
    "repair_guard_installing_sources",
    "repair_source_pickling",
    "save",
    "source_id",
    "support",
    "unloadable",
    "with_precompile",
]
