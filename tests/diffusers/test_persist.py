"""save_pipe / load_pipe: a fresh process reuses saved artifacts instead of recompiling.

The saving and the loading process are real subprocesses (this file is their script),
each with its own empty Inductor cache folder, so a cache hit in the loader can only come
from the saved folder. Mismatched metadata must load nothing and still give right images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difforge.diffusers import compile_pipe, load_pipe, save_pipe
from difforge.diffusers.persist import ARTIFACTS_FILE, META_FILE, environment
from difforge.diffusers.pipe import pipe_state
from difforge.diffusers.presets import build_pipeline, get_preset
from difforge.errors import DifforgeError

PRESET = "tiny-pixart"
PSNR_MIN_DB = 40.0  # see test_pipe.py


def tiny_pipe() -> tuple[Any, dict[str, Any]]:
    preset = get_preset(PRESET)
    pipe = build_pipeline(preset, text_encoders=False)
    return pipe, {**preset.prompt_kwargs(batch=1), **preset.call_kwargs(), "output_type": "np"}


def run(pipe: Any, kwargs: dict[str, Any]) -> np.ndarray:
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images


def psnr(out: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------
# The subprocesses
# ------------------------------------------------------------------------------------------


def worker(action: str, folder: str, out: str) -> None:
    """Build, compile, (load), run once, (save); write the image and the counters."""
    from torch._dynamo.utils import counters

    pipe, kwargs = tiny_pipe()
    if action == "save":
        run(pipe, kwargs)  # an eager run first, as when comparing; the loader skips it
    compile_pipe(pipe)
    result = load_pipe(pipe, folder) if action == "load" else None
    image = run(pipe, kwargs)
    if action == "save":
        save_pipe(pipe, folder)
    np.save(Path(out) / "image.npy", image)
    report = {
        "loaded": None if result is None else result.loaded,
        "reason": None if result is None else result.reason,
        "artifacts": None if result is None else result.artifacts,
        "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd")},
    }
    (Path(out) / "report.json").write_text(json.dumps(report))


def spawn(action: str, folder: Path, out: Path, cache: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFORGE_", "NEXFORT_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TORCHINDUCTOR_CACHE_DIR=str(cache),  # empty: hits can only come from the folder
        TRITON_CACHE_DIR=str(cache / "triton"),
    )
    proc = subprocess.run(
        [sys.executable, __file__, action, str(folder), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    report["image"] = np.load(out / "image.npy")
    return report


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """(saved folder, the saving process's report, its Inductor cache folder)."""
    root = tmp_path_factory.mktemp("persist")
    folder, cache = root / "saved", root / "cache_a"
    report = spawn("save", folder, root / "out_a", cache)
    return folder, report, cache


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def edit_meta(folder: Path, **changes: Any) -> None:
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = meta
        for part in parents:
            node = node[part]
        node[last] = value
    meta_path.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------


def test_saved_folder_holds_artifacts_and_metadata(saved: tuple[Path, dict, Path]) -> None:
    folder, report, _ = saved
    # Written through temp files and renames: nothing else is left behind.
    assert sorted(p.name for p in folder.iterdir()) == sorted([ARTIFACTS_FILE, META_FILE])
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["components"] == ["transformer", "vae.decoder", "vae.encoder"]
    assert set(meta["options"]) == set(meta["components"])
    env = meta["environment"]
    for key in ("torch", "triton", "cuda", "python", "difforge", "device"):
        assert key in env
    assert env == environment("cpu")
    assert meta["artifacts"]["bytes"] == (folder / ARTIFACTS_FILE).stat().st_size
    assert meta["artifacts"]["counts"]["inductor"] >= 2  # transformer + VAE decoder graphs
    assert report["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 2


def test_fresh_process_loads_instead_of_compiling(
    saved: tuple[Path, dict, Path], tmp_path: Path
) -> None:
    folder, saver, _ = saved
    loader = spawn("load", folder, tmp_path / "out_b", tmp_path / "cache_b")
    assert loader["loaded"] is True, loader["reason"]
    assert loader["artifacts"]["inductor"] >= 2
    inductor, aot = loader["counters"]["inductor"], loader["counters"]["aot_autograd"]
    # Every graph came from the loaded artifacts: no Inductor lowering or code generation.
    assert inductor.get("fxgraph_cache_hit", 0) >= 2
    assert inductor.get("fxgraph_cache_miss", 0) == 0
    assert aot.get("autograd_cache_miss", 0) == 0
    np.testing.assert_allclose(loader["image"], saver["image"], atol=1e-6)


# ------------------------------------------------------------------------------------------
# Mismatches and misuse (in this process)
# ------------------------------------------------------------------------------------------


def test_mismatched_metadata_loads_nothing_and_compiles_normally(
    saved: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, cache_a = saved
    stale = copy_of(folder, tmp_path)
    edit_meta(stale, environment__torch="2.0.0", options__transformer='{"mode": "old"}')

    def must_not_load(_data: bytes) -> None:
        raise AssertionError("load_cache_artifacts called despite a mismatch")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", must_not_load)
    # The saver's warm cache keeps the normal compile quick; hits there are torch's own.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_a))

    pipe, kwargs = tiny_pipe()
    ref = run(pipe, kwargs)
    compile_pipe(pipe)
    with pytest.warns(UserWarning) as caught:
        result = load_pipe(pipe, stale)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "torch" in message and "options[transformer]" in message and "2.0.0" in message
    assert not result
    assert set(result.mismatches) == {"torch", "options[transformer]"}
    assert result.mismatches["torch"] == ("2.0.0", torch.__version__)

    assert psnr(run(pipe, kwargs), ref) >= PSNR_MIN_DB


def test_other_compile_options_do_not_match(saved: tuple[Path, dict, Path]) -> None:
    folder, _, _ = saved
    pipe, _ = tiny_pipe()
    compile_pipe(pipe, options={"mode": "O2"}, ignores=("vae.encoder",))
    with pytest.warns(UserWarning, match=r"options\[transformer\]"):
        result = load_pipe(pipe, folder)
    assert not result.loaded
    assert {"components", "options[transformer]", "options[vae.decoder]"} <= set(result.mismatches)


def test_corrupt_artifacts_are_refused(saved: tuple[Path, dict, Path], tmp_path: Path) -> None:
    folder, _, _ = saved
    broken = copy_of(folder, tmp_path)
    data = bytearray((broken / ARTIFACTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / ARTIFACTS_FILE).write_bytes(bytes(data))
    pipe, _ = tiny_pipe()
    compile_pipe(pipe)
    with pytest.warns(UserWarning, match="checksum"):
        assert not load_pipe(pipe, broken)


def test_load_after_the_first_run_is_too_late(saved: tuple[Path, dict, Path]) -> None:
    folder, _, _ = saved
    pipe, _ = tiny_pipe()
    compile_pipe(pipe)
    pipe_state(pipe).ran_components.add("transformer")  # what its pre-hook does on a run
    with pytest.warns(UserWarning, match="too late"):
        result = load_pipe(pipe, folder)
    assert not result and "already run" in result.reason


def test_order_errors(tmp_path: Path) -> None:
    pipe, _ = tiny_pipe()
    with pytest.raises(DifforgeError, match="compile_pipe"):
        save_pipe(pipe, tmp_path / "x")
    with pytest.raises(DifforgeError, match="compile_pipe"):
        load_pipe(pipe, tmp_path / "x")
    compile_pipe(pipe)
    with pytest.raises(DifforgeError, match="has not run yet"):
        save_pipe(pipe, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_pipe(pipe, tmp_path / "x")


def test_no_warning_when_everything_matches(
    saved: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _, _ = saved
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # loads go here
    pipe, _ = tiny_pipe()
    compile_pipe(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_pipe(pipe, folder)
    assert result.loaded and result.reason == "loaded"


def test_cache_all_components_load_into_the_difforge_cache(
    saved: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``cache-all`` a component compiles against the difforge cache folder, so that
    is where the artifacts must go for its lookups to find them."""
    folder, _, _ = saved
    pipe, _ = tiny_pipe()
    compile_pipe(pipe, options={"mode": "cache-all", "cache.dir": str(tmp_path / "dc")})
    matching = copy_of(folder, tmp_path)
    edit_meta(matching, options=dict(pipe._difforge_compiled))

    seen: list[str | None] = []
    monkeypatch.setattr(
        torch.compiler,
        "load_cache_artifacts",
        lambda data: seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR")),
    )
    with pytest.warns(UserWarning, match="could not read"):
        load_pipe(pipe, matching)  # the stub returns no info, which load_pipe reports
    assert seen == [str(tmp_path / "dc" / "inductor")]


if __name__ == "__main__":  # the subprocesses of the round-trip tests
    worker(*sys.argv[1:4])
