"""`cache-all`: artifacts land in the difforge cache folder and a new process reuses them."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import torch

import difforge
from difforge.cache import MARKER, CacheLayout, cache_info, clear_cache

from .helpers import dit_inputs, rel_err, run_child

_CHILD = textwrap.dedent(
    """
    import json, sys, torch, difforge
    from difforge.models import TinyDiT
    torch.manual_seed(0)
    model = TinyDiT().eval()
    x = (torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.randn(2, 7, 48))
    with torch.no_grad():
        out = difforge.compile(model, options={"mode": sys.argv[1]})(*x)
        err = float((out - model(*x)).norm() / model(*x).norm())
    c = torch._dynamo.utils.counters
    print(json.dumps({
        "hit": c["inductor"]["fxgraph_cache_hit"],
        "miss": c["inductor"]["fxgraph_cache_miss"],
        "aot_hit": c["aot_autograd"]["autograd_cache_hit"],
        "aot_bypass": c["aot_autograd"]["autograd_cache_bypass"],
        "gelu_rewrites": difforge.counters["gelu_tanh_sigmoid"],
        "err": err,
    }))
    """
)


def _child(mode: str, env: dict[str, str]) -> dict[str, float]:
    return run_child(_CHILD, mode, env=env)


def test_cache_all_persists_across_processes(tmp_path: Path) -> None:
    root, inductor_default = tmp_path / "difforge-cache", tmp_path / "inductor-default"
    env = {
        **os.environ,
        "DIFFORGE_CACHE_DIR": str(root),
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_default),
    }
    cold = _child("O2:cache-all", env)
    assert cold["miss"] >= 1 and cold["hit"] == 0 and cold["err"] < 1e-4
    assert (root / MARKER).is_file()
    assert cache_info(root)["folders"][str(root / "inductor")]["files"] > 0

    warm = _child("O2:cache-all", env)  # a new process: reloads, no code generation
    assert warm["hit"] >= 1 and warm["miss"] == 0 and warm["err"] < 1e-4
    # ...and no AOT re-trace either, although an fx pass put a Python function in the graph
    # (AOTAutograd bypasses its cache for functions it does not know, passes.registry).
    assert warm["gelu_rewrites"] >= 1
    assert warm["aot_hit"] >= 1 and warm["aot_bypass"] == 0

    # A different option changes the key: a miss, not a stale graph. (Not freezing here: on
    # the CPU its frozen graphs hold mkldnn-packed weights, which Inductor does not cache.)
    changed = _child("O1:cache-all", env)
    assert changed["miss"] >= 1 and changed["hit"] == 0

    # The cache folder can move (copied to another path or machine): still hits.
    moved = tmp_path / "moved-cache"
    root.rename(moved)
    again = _child("O2:cache-all", {**env, "DIFFORGE_CACHE_DIR": str(moved)})
    assert again["hit"] >= 1 and again["miss"] == 0


def test_without_cache_all_nothing_is_written_to_the_difforge_folder(tmp_path: Path) -> None:
    root = tmp_path / "difforge-cache"
    env = {
        **os.environ,
        "DIFFORGE_CACHE_DIR": str(root),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "i"),
    }
    _child("O2", env)
    assert not root.exists()


def test_graph_cache_env_turns_persistence_on(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "c"
    monkeypatch.setenv("DIFFORGE_GRAPH_CACHE", "1")
    monkeypatch.setenv("DIFFORGE_CACHE_DIR", str(root))
    model, inputs = _tiny()
    with torch.no_grad():
        assert rel_err(difforge.compile(model)(*inputs), model(*inputs)) < 1e-4
    assert (root / "inductor").is_dir() and (root / MARKER).is_file()
    # Inductor and Triton go back to their own folders once compilation is over.
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(root / "inductor")
    owned = [path for path in CacheLayout(root).owned() if path.exists()]
    assert owned and clear_cache(root) == owned


def _tiny():  # type: ignore[no-untyped-def]
    from difforge.models import TinyDiT

    return TinyDiT().eval(), dit_inputs()
