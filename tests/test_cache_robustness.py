"""`cache-all` robustness: damaged artifacts, concurrent writers, read-only folders, keys.

The cross-process cases run a tiny MLP in child processes (each a fresh Inductor, as a
user's next run would be); one warm cache is built per module and copied per test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import difforge
from difforge import cache
from difforge.cache import CacheLayout, CacheWarning, check_file, compile_in_cache, find_corrupt
from difforge.errors import PassError
from difforge.passes import registry

from .helpers import rel_err

_CHILD = textwrap.dedent(
    """
    import json, sys, warnings, torch
    from pathlib import Path
    from torch import nn
    import difforge
    from difforge.backend import DifforgeBackend
    from difforge.cache import CacheLayout, compile_in_cache
    from difforge.options import parse_options

    root, how = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    options = {"mode": "cache-all", "cache.dir": root}
    if how == "wrapped":  # compile_in_cache around the compile, as backend.py is to call it
        inner, layout = DifforgeBackend(parse_options(options)), CacheLayout(Path(root))
        compiled = torch.compile(
            model, backend=lambda gm, ins: compile_in_cache(layout, lambda: inner(gm, ins))
        )
    else:
        compiled = difforge.compile(model, options=options)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(x)
        err = float((out - model(x)).norm() / model(x).norm())
    c = torch._dynamo.utils.counters["inductor"]
    print(json.dumps({
        "hit": c["fxgraph_cache_hit"], "miss": c["fxgraph_cache_miss"], "err": err,
        "warnings": [str(w.message) for w in caught if "difforge" in str(w.message)],
    }))
    """
)


def _env() -> dict[str, str]:
    # The children must not fall back on (or fill) the user's own Inductor folder.
    return {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def _start(root: Path, how: str = "plain") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _child(root: Path, how: str = "plain") -> dict[str, Any]:
    return _finish(_start(root, how))


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root filled by one cold compile of the child's model."""
    root = tmp_path_factory.mktemp("warm") / "cache"
    cold = _child(root)
    assert cold["miss"] >= 1 and cold["err"] < 1e-5 and not cold["warnings"]
    return root


def _copy(warm: Path, tmp_path: Path) -> CacheLayout:
    target = tmp_path / "cache"
    shutil.copytree(warm, target)
    return CacheLayout(target)


def _files(layout: CacheLayout, pattern: str) -> list[Path]:
    return sorted(p for p in layout.inductor.rglob(pattern) if p.is_file())


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------ the checks


def test_a_fresh_cache_passes_every_check(warm_cache: Path) -> None:
    layout = CacheLayout(warm_cache)
    # The checks have real artifacts of each kind to judge (so a change of Inductor's
    # naming scheme shows up here, not as a cache that deletes itself).
    for pattern in ("fxgraph/*/*/*", "aotautograd/*/*", "*.py", "*.so"):
        assert _files(layout, pattern), pattern
    assert find_corrupt(layout) == []


def test_checks_on_damaged_files(warm_cache: Path, tmp_path: Path) -> None:
    layout = _copy(warm_cache, tmp_path)
    entry = _files(layout, "fxgraph/*/*/*")[0]
    _truncate(entry)
    shared = _files(layout, "*.so")[0]
    _truncate(shared, 0.9)
    module = _files(layout, "*.py")[0]
    module.write_text(module.read_text()[:-40] + "\n  def (")
    stray = layout.inductor / "aotautograd" / "k" / "not-an-inductor-name"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"from another torch version")
    (layout.triton / "k").mkdir()
    (layout.triton / "k" / "kernel.json").write_text('{"name": ')
    (layout.triton / "k" / "kernel.cubin").write_bytes(b"\x00" * 100)
    found = dict(find_corrupt(layout))
    assert set(found) == {
        entry,
        shared,
        module,
        layout.triton / "k" / "kernel.json",
        layout.triton / "k" / "kernel.cubin",
    }
    assert (
        "truncated ELF" in found[shared] and "not an ELF" in found[layout.triton / "k/kernel.cubin"]
    )
    assert check_file(stray, layout) is None  # an unknown name is not judged


# -------------------------------------------------------------------------- corruption


def test_damaged_artifacts_are_removed_with_one_warning_and_recompiled(
    warm_cache: Path, tmp_path: Path
) -> None:
    layout = _copy(warm_cache, tmp_path)
    for pattern in ("fxgraph/*/*/*", "aotautograd/*/*", "*.so"):
        for path in _files(layout, pattern):
            _truncate(path)
    for path in _files(layout, "*.py"):
        path.write_bytes(os.urandom(300))
    # Today's backend: using_cache checks and repairs before Inductor reads anything.
    run = _child(layout.root)
    assert run["err"] < 1e-5 and run["miss"] >= 1
    assert len(run["warnings"]) == 1 and "corrupted cache entries" in run["warnings"][0]
    assert find_corrupt(layout) == []
    again = _child(layout.root)  # repaired: a clean hit, nothing to report
    assert again["hit"] >= 1 and again["miss"] == 0 and not again["warnings"]


def test_damage_only_the_failure_reveals_is_removed_and_recompiled(
    warm_cache: Path, tmp_path: Path
) -> None:
    layout = _copy(warm_cache, tmp_path)
    # Valid Python with another name than its content's hash (so no check can tell) that
    # fails on import: only the compile error names the file.
    (module,) = _files(layout, "*.py")
    module.write_text("raise ImportError('damaged module')\n")
    run = _child(layout.root, "wrapped")
    assert run["err"] < 1e-5
    assert len(run["warnings"]) == 1 and str(module) in run["warnings"][0]


def test_unexplained_cache_failure_empties_the_cache(warm_cache: Path, tmp_path: Path) -> None:
    layout = _copy(warm_cache, tmp_path)
    # Sources cut short and their objects gone: Inductor's CPU-feature probes fail quietly
    # and a kernel no check can judge fails to build.
    for path in _files(layout, "*.cpp"):
        _truncate(path, 0.3)
    for path in _files(layout, "*.so"):
        path.unlink()
    run = _child(layout.root, "wrapped")
    assert run["err"] < 1e-5
    assert len(run["warnings"]) == 1 and "emptied it" in run["warnings"][0]
    assert not _files(layout, "*.cpp")


def test_compile_errors_that_are_not_the_cache_are_raised_unretried(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache")
    layout.create()
    calls = []

    def failing(exc: Exception) -> Any:
        calls.append(exc)
        raise exc

    with pytest.raises(PassError):
        compile_in_cache(layout, lambda: failing(PassError("p", "fx", ValueError("bug"))))
    with pytest.raises(ValueError, match="model bug"):
        compile_in_cache(layout, lambda: failing(ValueError("model bug")))
    assert len(calls) == 2  # no retry: neither names a cache file nor reads one
    # One naming a file of the cache that is fine gets one retry, then the original error.
    victim = layout.inductor / "ab" / "cabc.cpp"
    victim.parent.mkdir()
    victim.write_text("int main() {}\n")
    with pytest.raises(RuntimeError, match="cabc.cpp"):
        compile_in_cache(layout, lambda: failing(RuntimeError(f"cannot build {victim}: bug")))
    assert len(calls) == 5  # first try, the retry without the file, an empty folder
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(layout.inductor)


def test_files_named_in_follows_the_exception_chain(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache")
    layout.create()
    named = layout.inductor / "qw" / "cqw.main.cpp"
    named.parent.mkdir()
    named.write_text("")
    (layout.inductor / "qw" / "cqw.main.so").write_text("")
    try:
        try:
            raise OSError(f"{named}:13:37: error: 'at::vec' has not been declared.")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as exc:
        assert cache.files_named_in(exc, layout) == [named.resolve()]
    assert sorted(cache._with_siblings([named])) == sorted(named.parent.iterdir())


# ------------------------------------------------------------------------- concurrency


def test_two_processes_filling_one_cache_at_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first, second = _start(root), _start(root)
    for run in (_finish(first), _finish(second)):
        assert run["err"] < 1e-5 and not run["warnings"]  # no false alarm about the other
    assert find_corrupt(CacheLayout(root)) == []
    third = _child(root)
    assert third["hit"] >= 1 and third["miss"] == 0 and not third["warnings"]


# --------------------------------------------------------------------------- read-only


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval(), torch.randn(4, 16)


def _compile_twice(root: Path) -> list[warnings.WarningMessage]:
    model, x = _mlp()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            torch._dynamo.reset()
            out = difforge.compile(model, options={"mode": "cache-all", "cache.dir": str(root)})(x)
            assert rel_err(out, model(x)) < 1e-5
    return [w for w in caught if issubclass(w.category, CacheWarning)]


@pytest.fixture
def inductor_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Inductor's own folder for the fallback, kept out of the user's."""
    folder = tmp_path / "inductor-default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    return folder


def test_a_root_that_is_a_file_degrades_to_no_cache(tmp_path: Path, inductor_default: Path) -> None:
    root = tmp_path / "cache"
    root.write_text("not a folder")
    (warning,) = _compile_twice(root)  # one warning for both compiles
    assert "not writable" in str(warning.message) and str(root) in str(warning.message)
    assert root.is_file()


def test_a_folder_without_write_permission_degrades_to_no_cache(
    tmp_path: Path, inductor_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root, where chmod does not stop writes: deny through os.access.
    root = tmp_path / "cache"
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, **kw: (
            False if str(path).startswith(str(root)) else real_access(path, mode, **kw)
        ),
    )
    (warning,) = _compile_twice(root)
    assert "no write permission" in str(warning.message)
    assert not (root / "inductor" / "fxgraph").exists()
    assert (inductor_default / "fxgraph").is_dir()  # Inductor kept its own folder


# -------------------------------------------------------------------------------- keys


@pytest.fixture
def probe_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A post-grad difforge pass whose source file the test may edit; returns that file."""
    source = tmp_path / "probe_pass.py"
    source.write_text("def probe_pass(graph):\n    return 0\n")
    spec = importlib.util.spec_from_file_location("probe_pass", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry.all_passes()  # the built-in passes first, as in normal use
    graph_pass = registry.GraphPass(
        "probe_pass", "post_grad_post", "cleanup", module.probe_pass, ""
    )
    monkeypatch.setitem(registry._REGISTRY, "probe_pass", graph_pass)
    return source


def _compile_counts(root: Path, **options: Any) -> tuple[int, int]:
    model, x = _mlp()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    opts = {"mode": "cache-all", "cache.dir": str(root), **options}
    with torch.no_grad():
        assert rel_err(difforge.compile(model, options=opts)(x), model(x)) < 1e-5
    c = torch._dynamo.utils.counters["inductor"]
    return c["fxgraph_cache_hit"], c["fxgraph_cache_miss"]


def test_key_changes_with_pass_source_and_options(tmp_path: Path, probe_pass: Path) -> None:
    root = tmp_path / "cache"
    assert _compile_counts(root)[1] >= 1
    hit, miss = _compile_counts(root)
    assert hit >= 1 and miss == 0
    # Editing a pass's source changes the custom pass uuid: a miss, never the old graph.
    probe_pass.write_text("def probe_pass(graph):\n    return 0  # edited\n")
    assert _compile_counts(root)[1] >= 1
    assert _compile_counts(root)[1] == 0
    # So does switching the pass off, or any option that reaches Inductor's config.
    assert _compile_counts(root, **{"passes.probe_pass": False})[1] >= 1
    assert _compile_counts(root, **{"inductor.max_fusion_size": 7})[1] >= 1


# --------------------------------------------------------------------------- benchmark


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/bench_compile.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_compile", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_compile_on_tiny_pixart(tmp_path: Path, bench: Any) -> None:
    assert bench.with_cache_all("O2") == "O2:cache-all"
    assert bench.with_cache_all("cache-all:O3") == "cache-all:O3"

    out = tmp_path / "compile.json"
    argv = ["--models", "tiny-pixart", "--modes", "O1", "--cache-root", str(tmp_path / "c")]
    argv += ["--regional", "off,nested", "--step-runs", "2"]
    assert bench.main([*argv, "--output-json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["regional"] for r in results] == ["off", "nested"]
    for result in results:  # regional compiles persist and reload like whole-model ones
        assert result["mode"] == "O1:cache-all" and result["error"] is None
        phases = result["phases"]
        assert phases["cold"]["fxgraph_miss"] >= 1
        for warm in ("warm-same", "warm-new"):
            assert phases[warm]["fxgraph_hit"] >= 1 and phases[warm]["fxgraph_miss"] == 0
        assert all(p["rel_err"] < 1e-4 for p in phases.values())
        assert result["new_process_first_step_s"] > result["warm_new_s"] > 0
        assert result["step_ms"] > 0


def test_bench_compile_reference_runs_blocks_compiled_in_place_eagerly(bench: Any) -> None:
    # The `blocks` style compiles a model's blocks in place; the reference must not run them.
    def zeroing(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        return lambda *args: [torch.zeros_like(out) for out in gm(*args)]

    torch.manual_seed(0)
    block = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(torch.nn.Identity())
    model[0] = torch.compile(block, backend=zeroing)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert model(x).abs().sum() == 0  # the compiled block is what a plain call runs
        torch.testing.assert_close(bench._eager_output(model, lambda m: m(x)), block(x))


def test_bench_compile_precompile_axis(tmp_path: Path, bench: Any) -> None:
    from difforge import precompile

    if precompile.support() is not None:
        pytest.skip(f"no precompile: {precompile.support()}")
    out = tmp_path / "compile.json"
    argv = ["--models", "tiny-pixart", "--modes", "O1", "--cache-root", str(tmp_path / "c")]
    # "on" only (the "off" case is the test above): two child processes, not four.
    argv += ["--precompile", "on", "--step-runs", "0", "--output-json", str(out)]
    assert bench.main(argv) == 0
    (on,) = json.loads(out.read_text())["results"]
    assert on["precompile"] is True and on["error"] is None
    assert on["phases"]["cold"]["dynamo_cache_hit"] == 0
    assert on["phases"]["warm-new"]["dynamo_cache_hit"] == 1
    assert on["phases"]["warm-new"]["fxgraph_hit"] == 0  # nothing traced, nothing looked up
    assert all(p["rel_err"] < 1e-4 for p in on["phases"].values())
    assert bench.parse_args(["--precompile", "off,on"]).precompile == [False, True]
    with pytest.raises(SystemExit):
        bench.parse_args(["--precompile", "maybe"])


def _opaque_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_bench_compile_records_why_the_aot_cache_was_bypassed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bench: Any
) -> None:
    """A Python function kept whole in the graph (allow_in_graph) is one thing AOTAutograd's
    cache refuses; the benchmark must keep torch's reason, not only the count."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    opaque = torch._dynamo.allow_in_graph(_opaque_double)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return opaque(x.sin()) + 1

    compiled = torch.compile(fn, backend="inductor")
    with (
        torch._inductor.config.patch(fx_graph_cache=True),
        torch._functorch.config.patch(enable_autograd_cache=True),
        bench._BypassReasons().attached() as bypass,
    ):
        torch.testing.assert_close(compiled(torch.ones(4)), torch.ones(4).sin() * 2 + 1)
    assert len(bypass.reasons) == 1
    assert "_opaque_double" in bypass.reasons[0]
    logger = logging.getLogger(bench._BypassReasons.LOGGER)
    assert bypass not in logger.handlers  # detached again
