"""``cache.precompile``: a new process loads what Dynamo traced instead of tracing again."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

import difforge
from difforge import precompile
from difforge.errors import OptionsError

from .helpers import run_child

needs_precompile = pytest.mark.skipif(
    precompile.support() is not None, reason=f"no precompile: {precompile.support()}"
)

_CHILD = textwrap.dedent(
    """
    import json, os, sys, warnings, torch, difforge
    from difforge.models import TinyDiT
    if os.environ.get("BREAK_GUARD_LOADING"):  # as torch 2.11 failed on DefaultsSource
        def broken(state):
            raise TypeError("DefaultsSource.__init__() takes from 3 to 4 positional arguments")
        torch._dynamo.package.load_guards_state = broken
    if os.environ.get("WRAPPED_FORWARD"):  # as diffusers' apply_lora_scale wraps FLUX's
        import types
        wrappers = types.ModuleType("difforge_test_wrappers")
        sys.modules[wrappers.__name__] = wrappers
        exec(
            "import functools\\n"
            "def keep(f):\\n"
            "    @functools.wraps(f)\\n"
            "    def wrapper(self, *args, **kwargs):\\n"
            "        return f(self, *args, **kwargs)\\n"
            "    return wrapper\\n",
            wrappers.__dict__,
        )
        forward = TinyDiT.forward
        if os.environ.get("WRAPPED_DEFAULTS"):  # FLUX's forward has defaults Dynamo guards
            plain = forward
            def forward(self, latents, timestep, caption, scale=1.0):
                return plain(self, latents, timestep, caption) * scale
            forward.__module__, forward.__qualname__ = plain.__module__, plain.__qualname__
        TinyDiT.forward = wrappers.keep(forward)
    if os.environ.get("BREAK_GUARD_BUILDING"):  # as torch 2.13 failed on FLUX.1-dev's
        def unbuildable(*args, **kwargs):
            raise AttributeError("'_Missing' object has no attribute '__defaults__'")
        torch._dynamo.package.load_guard_manager = unbuildable
    patch_forward = os.environ.get("PATCH_FORWARD")
    warnings.simplefilter("always")
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    torch.manual_seed(0)
    model = TinyDiT().eval()
    if patch_forward:  # the same tensors, other Python: the stored trace must not run
        original = model.proj_out.forward
        model.proj_out.forward = lambda x: original(x) * 2
    x = (torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.randn(2, 7, 48))
    options = json.loads(sys.argv[1])
    compiled = difforge.compile(model, options=options)
    with torch.no_grad():
        out = compiled(*x)
        err = float((out - model(*x)).norm() / model(*x).norm())
    c = torch._dynamo.utils.counters
    result = {
        "hit": c["dynamo_cache"]["dynamo_cache_hit"],
        "miss": c["dynamo_cache"]["dynamo_cache_miss"],
        "traced": c["stats"]["unique_graphs"],
        "compiles": len(difforge.compile_records),
        "err": err,
        "load_errors": c["dynamo_cache"]["dynamo_cache_error"],
        "warnings": [str(w.message) for w in seen if "difforge: a stored" in str(w.message)],
    }
    if len(sys.argv) > 2:  # then a size the stored entry has never seen: a recompile
        y = (torch.randn(2, 4, 24, 16), x[1], x[2])
        with torch.no_grad():
            out = compiled(*y)
            result["new_size_err"] = float((out - model(*y)).norm() / model(*y).norm())
        result["traced_after"] = c["stats"]["unique_graphs"]
    print(json.dumps(result))
    """
)


def _child(
    options: dict,
    root: Path,
    new_size: bool = False,
    *,
    broken: bool = False,
    wrapped: bool = False,
    unbuildable: bool = False,
    patched: bool = False,
    defaults: bool = False,
) -> dict:
    env = {**os.environ, "DIFFORGE_CACHE_DIR": str(root)}
    if broken:
        env["BREAK_GUARD_LOADING"] = "1"
    if wrapped:
        env["WRAPPED_FORWARD"] = "1"
    if unbuildable:
        env["BREAK_GUARD_BUILDING"] = "1"
    if patched:
        env["PATCH_FORWARD"] = "1"
    if defaults:
        env["WRAPPED_DEFAULTS"] = "1"
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return run_child(_CHILD, json.dumps(options), *(["new-size"] if new_size else []), env=env)


_OPTIONS = {"mode": "O2:cache-all", "cache.precompile": True}


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A cache root filled by one cold child under ``_OPTIONS`` (the first process of a
    user's), and that child's result; tests copy it (``_copy``) before they change it."""
    if precompile.support() is not None:
        pytest.skip(f"no precompile: {precompile.support()}")
    root = tmp_path_factory.mktemp("precompile") / "cache"
    cold = _child(_OPTIONS, root)
    assert cold["miss"] == 1 and cold["traced"] == 1 and cold["err"] < 1e-4
    entries = list((root / "precompile").glob("*/dynamo/*/entry"))
    assert len(entries) == 1  # one key folder, one function
    return root, cold


def _copy(cold_cache: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the module's cold cache root (the folder moves: see below)."""
    root = tmp_path / "cache"
    shutil.copytree(cold_cache[0], root)
    return root, cold_cache[1]


@needs_precompile
def test_a_new_process_loads_the_trace_instead_of_tracing(
    tmp_path: Path, cold_cache: tuple[Path, dict]
) -> None:
    """The cold child (``cold_cache``) stored one entry; a new process loads it instead of
    tracing, and other options, a damaged entry or a patched forward trace afresh."""
    root, cold = _copy(cold_cache, tmp_path)
    options = _OPTIONS
    entries = list((root / "precompile").glob("*/dynamo/*/entry"))
    assert len(entries) == 1

    warm = _child(options, root, new_size=True)
    assert warm["hit"] == 1 and warm["traced"] == 0 and warm["compiles"] == 0
    assert warm["err"] == pytest.approx(cold["err"], rel=1e-6, abs=1e-9)
    # A size the entry has not seen recompiles (once this clashed with the loaded globals'
    # names: advance_unique_ids) and is right.
    assert warm["traced_after"] == 1 and warm["new_size_err"] < 1e-4

    # Other options: another key folder, traced afresh, never the stored code.
    other = _child({**options, "mode": "O1:cache-all"}, root)
    assert other["hit"] == 0 and other["traced"] == 1
    assert len(list((root / "precompile").glob("*/dynamo/*/entry"))) == 2

    # Without the option nothing is loaded, and a damaged entry is only a miss.
    assert _child({"mode": "O2:cache-all"}, root)["traced"] == 1
    entries[0].write_bytes(b"truncated")
    damaged = _child(options, root)
    assert damaged["hit"] == 0 and damaged["traced"] == 1 and damaged["err"] < 1e-4

    # A model whose Python differs (a patched forward) with the same tensors: another
    # folder, traced afresh; torch's own guards would have run the stored trace.
    patched = _child(options, root, patched=True)
    assert patched["hit"] == 0 and patched["traced"] == 1 and patched["err"] < 1e-4

    # The rewritten entry loads from a cache folder moved to another path.
    moved = tmp_path / "moved-cache"
    root.rename(moved)
    again = _child(options, moved)
    assert again["hit"] == 1 and again["traced"] == 0 and again["err"] < 1e-4


@needs_precompile
def test_a_forward_wrapped_in_another_module_loads(tmp_path: Path) -> None:
    # functools.wraps gives the wrapper the wrapped function's __module__ while its code reads
    # the decorator module's globals; torch installed the loaded entry's compiled function in
    # the wrong one (NameError: '__compiled_fn_1_...'; FLUX.1-dev, H100 and CPU, 2026-11-27).
    root = tmp_path / "cache"
    options = {"mode": "O2:cache-all", "cache.precompile": True}
    cold = _child(options, root, wrapped=True)
    assert cold["miss"] == 1 and cold["traced"] == 1 and cold["err"] < 1e-4
    warm = _child(options, root, wrapped=True)
    assert warm["hit"] == 1 and warm["traced"] == 0 and warm["compiles"] == 0
    assert warm["err"] == pytest.approx(cold["err"], rel=1e-6, abs=1e-9)


@needs_precompile
def test_a_decorated_forward_with_guarded_defaults_loads(tmp_path: Path) -> None:
    # FLUX.1-dev on torch 2.13: the guard on the decorated function's __defaults__ referred
    # to a function torch could not pickle (its name leads to the wrapper), so the entry was
    # stored with a placeholder and never loaded ('_Missing' object has no attribute
    # '__defaults__'). precompile.repair_decorated_function_pickling stores it by name and
    # __wrapped__ steps.
    root = tmp_path / "cache"
    options = {"mode": "O1:cache-all", "cache.precompile": True}
    cold = _child(options, root, wrapped=True, defaults=True)
    assert cold["miss"] == 1 and cold["traced"] == 1 and cold["err"] < 1e-4
    warm = _child(options, root, wrapped=True, defaults=True)
    assert warm["warnings"] == [] and warm["load_errors"] == 0
    assert warm["hit"] == 1 and warm["traced"] == 0 and warm["compiles"] == 0
    assert warm["err"] == pytest.approx(cold["err"], rel=1e-6, abs=1e-9)


def test_functions_behind_wrappers_pickle_by_name_and_depth() -> None:
    import functools

    from difforge.models import tiny

    def keep(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)

        return wrapper

    original = tiny.timestep_embedding
    try:
        tiny.timestep_embedding = keep(keep(original))
        assert precompile._wrapped_depth(original) == 2
        assert (
            precompile.function_behind_wrappers(original.__module__, original.__qualname__, 2)
            is original
        )
        assert precompile._wrapped_depth(tiny.timestep_embedding) is None  # its own name
    finally:
        tiny.timestep_embedding = original
    assert precompile._wrapped_depth(original) is None
    assert precompile._wrapped_depth(keep(original)) is None  # a wrapper nobody names


@needs_precompile
def test_an_entry_whose_guards_cannot_be_built_is_a_miss(
    tmp_path: Path, cold_cache: tuple[Path, dict]
) -> None:
    # torch 2.13 stored a guard on FLUX.1-dev's decorated forward (the closure variable's
    # __defaults__) that it could not build when loading: an AttributeError from inside
    # torch.compile, and torch's own fallback then failed to re-initialize the package.
    root, cold = _copy(cold_cache, tmp_path)
    warm = _child(_OPTIONS, root, new_size=True, unbuildable=True)
    assert warm["hit"] == 0 and warm["load_errors"] == 1 and warm["traced"] == 1
    assert warm["err"] == pytest.approx(cold["err"], rel=1e-6, abs=1e-9)
    assert len(warm["warnings"]) == 1 and "__defaults__" in warm["warnings"][0]
    # The names the failed install left behind do not clash with the next trace's.
    assert warm["traced_after"] == 2 and warm["new_size_err"] < 1e-4


def test_module_of_globals_is_scoped_and_leaves_plain_functions_alone() -> None:
    import functools
    import types

    wrappers = types.ModuleType("difforge_test_scoped_wrappers")
    exec("def keep(f):\n    return lambda *a: f(*a)\n", wrappers.__dict__)
    sys_modules = __import__("sys").modules
    sys_modules[wrappers.__name__] = wrappers
    try:

        def forward(x: int) -> int:
            return x

        wrapped = functools.wraps(forward)(wrappers.keep(forward))
        assert wrapped.__module__ == __name__
        with precompile.module_of_globals(wrapped):
            assert wrapped.__module__ == wrappers.__name__
        assert wrapped.__module__ == __name__
        with precompile.module_of_globals(forward):  # its globals are its module's
            assert forward.__module__ == __name__
    finally:
        del sys_modules[wrappers.__name__]


@needs_precompile
def test_an_entry_whose_guards_cannot_load_is_a_miss_and_is_rewritten(
    tmp_path: Path, cold_cache: tuple[Path, dict]
) -> None:
    # torch handles only a RuntimeError while it installs an entry; torch 2.11's TypeError
    # from unpickling a guard source escaped from torch.compile (H100, 2026-11-27).
    root, _ = _copy(cold_cache, tmp_path)
    options = _OPTIONS
    broken = _child(options, root, broken=True)
    assert broken["hit"] == 0 and broken["load_errors"] == 1 and broken["traced"] == 1
    assert broken["err"] < 1e-4
    assert len(broken["warnings"]) == 1 and "TypeError: DefaultsSource" in broken["warnings"][0]
    healthy = _child(options, root)  # the traced entry was written again and loads
    assert healthy["hit"] == 1 and healthy["traced"] == 0 and healthy["load_errors"] == 0


def test_guard_sources_that_pickle_derived_fields_are_repaired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pickle

    from torch._dynamo.source import DefaultsSource, LocalSource
    from torch._guards import Source

    def every_field(self):  # torch 2.11's reduce: derived (init=False) fields too
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    classes, pending = [], [Source]
    while pending:
        classes.append(pending.pop())
        pending.extend(classes[-1].__subclasses__())
    for cls in classes:  # monkeypatch puts every class's own reduce back afterwards
        if "__reduce__" in vars(cls):
            monkeypatch.setattr(cls, "__reduce__", vars(cls)["__reduce__"])
        else:
            monkeypatch.setattr(cls, "__reduce__", cls.__reduce__, raising=False)
    source = DefaultsSource(LocalSource("fn"), 1)
    keyword = DefaultsSource(LocalSource("fn"), "scale", is_kw=True)
    assert precompile.repair_source_pickling.__wrapped__() == ()  # this torch round-trips
    monkeypatch.setattr(DefaultsSource, "__reduce__", every_field)
    with pytest.raises(TypeError, match="positional argument"):
        pickle.loads(pickle.dumps(source))

    repaired = precompile.repair_source_pickling.__wrapped__()
    assert "DefaultsSource" in repaired and "LocalSource" not in repaired
    for original in (source, keyword):
        copy = pickle.loads(pickle.dumps(original))
        assert copy == original and copy.name == original.name


def test_precompile_needs_the_persistent_cache() -> None:
    with pytest.raises(OptionsError, match="'cache.precompile' stores entries"):
        difforge.parse_options({"mode": "O2", "cache.precompile": True})
    assert difforge.parse_options({"mode": "O2:cache-all"}).settings["cache.precompile"] is False


def test_folder_key_follows_options(tmp_path: Path) -> None:
    def folder(options: dict) -> Path:
        return precompile.folder(difforge.parse_options({**options, "cache.dir": str(tmp_path)}))

    base = {"mode": "O2:cache-all", "cache.precompile": True}
    assert folder(base) == folder(dict(base))
    assert folder(base) != folder({**base, "mode": "O3:cache-all"})
    assert folder(base) != folder({**base, "dynamic": True})
    assert folder(base).parent == tmp_path / "precompile"


def test_folder_key_follows_the_models_python(tmp_path: Path) -> None:
    from torch import nn

    config = difforge.parse_options(
        {"mode": "O2:cache-all", "cache.precompile": True, "cache.dir": str(tmp_path)}
    )

    class Processor:
        def __call__(self, x: object) -> object:
            return x

    class OtherProcessor(Processor):
        pass

    def model(processor: object = None) -> nn.Module:
        m = nn.Sequential(nn.Linear(4, 4), nn.GELU())
        if processor is not None:
            m[0].processor = processor
        return m

    base = precompile.folder(config, model(Processor()))
    assert precompile.folder(config, model(Processor())) == base  # other weights: same
    assert precompile.folder(config, model(OtherProcessor())) != base
    assert precompile.folder(config, model()) != base
    patched = model(Processor())
    patched[1].forward = lambda x: x
    assert precompile.folder(config, patched) != base
    other_class = model(Processor())
    other_class[1] = nn.SiLU()
    assert precompile.folder(config, other_class) != base


def _double(module: object, x: object) -> object:
    return x


def _triple(module: object, x: object) -> object:
    return x


def _with_post(post: object) -> object:
    def forward(x: object) -> object:
        return post(x)  # type: ignore[operator]

    return forward


class _Hook:
    def __init__(self, dtype: object) -> None:
        self.storage_dtype = dtype

    def new_forward(self, x: object) -> object:
        return x


def test_folder_key_follows_partial_closure_and_bound_forwards(tmp_path: Path) -> None:
    """Patched forwards are told apart by what they run, not by their type or code alone:
    diffusers' hooks and accelerate patch ``forward`` as ``partial(fn, module)``, users as
    closures; one folder for two of them made a second process run the first one's trace
    (a reviewer's repro: 0.33 error against eager)."""
    import functools

    import torch
    from torch import nn

    config = difforge.parse_options(
        {"mode": "O2:cache-all", "cache.precompile": True, "cache.dir": str(tmp_path)}
    )

    def key(forward: object) -> object:
        m = nn.Sequential(nn.Linear(4, 4))
        m[0].forward = forward
        return precompile.folder(config, m)

    lin = nn.Linear(4, 4)
    double, triple = functools.partial(_double, lin), functools.partial(_triple, lin)
    assert key(double) == key(functools.partial(_double, nn.Linear(8, 8)))  # stable
    assert key(double) != key(triple)
    assert key(functools.partial(_double, lin, scale=2)) != key(double)
    assert key(_with_post(abs)) == key(_with_post(abs))
    assert key(_with_post(abs)) != key(_with_post(round))
    bf16, fp8 = _Hook(torch.bfloat16), _Hook(torch.float8_e4m3fn)
    assert key(bf16.new_forward) == key(_Hook(torch.bfloat16).new_forward)
    assert key(bf16.new_forward) != key(fp8.new_forward)


def test_unsupported_torch_warns_once_and_compiles_without(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(precompile, "support", lambda: "this torch has no precompile")
    monkeypatch.setattr(precompile, "_warned", set())
    config = difforge.parse_options(
        {"mode": "O2:cache-all", "cache.precompile": True, "cache.dir": str(tmp_path)}
    )
    with pytest.warns(UserWarning, match="'cache.precompile' is ignored: this torch"):
        assert precompile.enabled(config) is False
    assert precompile.enabled(config) is False  # no second warning (pytest would not fail)
    assert precompile.enabled(difforge.parse_options({"mode": "O2:cache-all"})) is False
