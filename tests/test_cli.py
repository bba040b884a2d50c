"""The `difforge` command line and the feature checks behind `difforge info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import difforge
from difforge import info
from difforge.cache import CacheLayout
from difforge.cli import main

VENV_BIN = Path(sys.executable).parent
needs_cpu_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")


@pytest.fixture
def inductor_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point Inductor's default cache at a private folder: tests never touch the real one."""
    path = tmp_path / "torchinductor_default"
    path.mkdir()
    (path / "fxgraph.bin").write_bytes(b"x" * 10)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def _fill(folder: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        file = folder / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(os.urandom(size))


# ---------------------------------------------------------------------------- info


@needs_cpu_torch
def test_info_names_torch_and_explains_missing_cudagraphs(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert difforge.__version__ in out
    line = next(row for row in out.splitlines() if row.startswith("cudagraphs"))
    assert "not available" in line
    assert "needs CUDA" in line  # the reason, not just the verdict
    for mode in difforge.MODES:
        assert mode in out
    assert "DIFFORGE_CACHE_DIR" in out


@needs_cpu_torch
def test_info_json_lists_features(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] == torch.__version__
    assert data["cuda"]["available"] is False
    by_name = {f["name"]: f for f in data["features"]}
    assert {"cudagraphs", "fp8 GEMM (torch._scaled_mm)", "inductor C++ backend"} <= set(by_name)
    assert by_name["cudagraphs"]["available"] is False
    assert by_name["cudagraphs"]["reason"]
    assert set(data["presets"]) == set(difforge.PRESETS)
    assert "DIFFORGE_MODE" in data["environment"]


def test_info_environment_hides_torchs_own_inductor_cache_dir() -> None:
    """torch writes /tmp/torchinductor_$USER into the environment itself once Inductor
    runs: `difforge info` must not report that as the user's TORCHINDUCTOR_CACHE_DIR (the
    cache folder it prints beside it ignores it too), but a real choice shows."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = {"TORCHINDUCTOR_CACHE_DIR": default_cache_dir(), "DIFFORGE_MODE": "O2"}
    assert info.environment(env)["TORCHINDUCTOR_CACHE_DIR"] is None
    assert info.environment(env)["DIFFORGE_MODE"] == "O2"
    env["TORCHINDUCTOR_CACHE_DIR"] = "/data/inductor"
    assert info.environment(env)["TORCHINDUCTOR_CACHE_DIR"] == "/data/inductor"


def test_missing_package_shows_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(info, "package_version", lambda dist: None)
    monkeypatch.setattr(info, "_probe_triton", lambda: (None, "triton is not installed"))
    p = info.probe()
    assert p.packages == dict.fromkeys(info.PACKAGES, info.NOT_INSTALLED)
    assert not info.diffusers_integration(p).available
    assert "not installed" in info.triton_kernels(p).reason


def _gpu(capability: tuple[int, int], sms: int = 108, name: str = "NVIDIA A100") -> info.GpuInfo:
    return info.GpuInfo(0, name, capability, 80 * 2**30, sms)


def _cuda_platform(*gpus: info.GpuInfo, cudnn: int = 90100) -> info.Platform:
    return info.Platform(
        torch_version="2.11.0+cu130",
        cuda_available=True,
        cuda_version="13.0",
        cudnn_version=cudnn,
        gpus=gpus,
        has_scaled_mm=True,
        flash_attention_built=True,
        triton_version="3.6.0",
        cxx_compiler="g++",
        cpu_vec_isa="avx512",
        diffusers_version="0.42.1",
    )


def test_feature_checks_on_a_fake_a100_and_h100() -> None:
    a100 = _cuda_platform(_gpu((8, 0)))
    fp8 = info.fp8_gemm(a100)
    assert not fp8.available
    assert "compute capability 8.0 < 8.9" in fp8.reason
    assert info.cudagraphs(a100).available
    assert info.cudnn_attention(a100).available
    assert info.max_autotune(a100).available

    h100 = _cuda_platform(_gpu((9, 0), sms=132, name="NVIDIA H100"))
    assert all(f.available for f in info.features(h100)), info.features(h100)


def test_feature_checks_name_what_is_missing() -> None:
    old_cudnn = info.cudnn_attention(_cuda_platform(_gpu((9, 0)), cudnn=8907))
    assert not old_cudnn.available and "8.9.7 < 9" in old_cudnn.reason
    turing = _cuda_platform(_gpu((7, 5), name="Tesla T4", sms=40))
    assert "7.5 < 8.0" in info.flash_attention(turing).reason
    autotune = info.max_autotune(turing)
    assert not autotune.available and "40 SMs < 68" in autotune.reason
    cpu = info.Platform(triton_version="3.6.0", triton_interpret=True)
    assert info.triton_kernels(cpu).available  # the interpreter counts, for tests
    no_cxx = info.Platform(cxx_error="no working C++ compiler ('g++': InvalidCxxCompiler)")
    assert not info.inductor_cpp(no_cxx).available
    assert "g++" in info.inductor_cpp(no_cxx).reason


def test_format_cudnn_version() -> None:
    assert info.format_cudnn_version(90100) == "9.1.0"
    assert info.format_cudnn_version(8907) == "8.9.7"
    assert info.format_cudnn_version(None) == "not available"


# --------------------------------------------------------------------------- cache


def test_cache_info_reports_sizes(
    tmp_path: Path, inductor_default: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "cache"
    _fill(root / "inductor", {"fxgraph/a": 2048, "fxgraph/b": 1024})
    assert main(["cache", "info", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert str(root) in out
    line = next(row for row in out.splitlines() if row.startswith(str(root / "inductor")))
    assert "3.0 KiB" in line and line.rstrip().endswith("2")
    assert str(inductor_default) in out and "not owned by difforge" in out

    assert main(["cache", "info", "--dir", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["folders"][str(root / "inductor")] == {"bytes": 3072, "files": 2}
    assert data["folders"][str(root / "triton")] == {"bytes": 0, "files": 0}
    assert data["torch_inductor_default"]["path"] == str(inductor_default)


def test_cache_clear_removes_only_owned_folders(
    tmp_path: Path, inductor_default: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "cache"
    _fill(root, {"inductor/x": 10, "triton/abc/kernel.cubin": 10, "keep.txt": 5, "mine/y": 5})
    # Without difforge's marker the folders are somebody else's: nothing is removed.
    assert main(["cache", "clear", "--dir", str(root)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert (root / "inductor" / "x").exists()
    CacheLayout(root).create()
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")

    assert main(["cache", "clear", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {root / 'inductor'}" in out
    assert f"removed {root / 'triton'}" in out
    assert not (root / "inductor").exists() and not (root / "triton").exists()
    assert (root / "keep.txt").read_bytes() and (root / "mine" / "y").exists()
    assert outside.exists()
    assert inductor_default.exists()  # not ours unless --inductor-default

    assert main(["cache", "clear", "--dir", str(root)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_cache_clear_inductor_default(
    tmp_path: Path, inductor_default: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "cache"
    _fill(root, {"inductor/x": 10})
    CacheLayout(root).create()
    assert main(["cache", "clear", "--dir", str(root), "--inductor-default", "--dry-run"]) == 0
    assert f"would remove {inductor_default}" in capsys.readouterr().out
    assert inductor_default.exists() and (root / "inductor").exists()

    assert main(["cache", "clear", "--dir", str(root), "--inductor-default", "--yes"]) == 0
    assert f"removed {inductor_default}" in capsys.readouterr().out
    assert not inductor_default.exists()
    assert not root.exists()  # it was left empty, so it went too


def test_cache_clear_refuses_home(capsys: pytest.CaptureFixture) -> None:
    assert main(["cache", "clear", "--dir", str(Path.home()), "--yes"]) == 1
    assert "refusing" in capsys.readouterr().err


def test_cache_clear_help_documents_inductor_default(capsys: pytest.CaptureFixture) -> None:
    assert main(["cache", "clear", "--help"]) == 0
    assert "nexfort.utils.clear_inductor_cache" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench


def test_bench_without_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "difforge.bench", None)  # makes the import fail
    assert main(["bench", "--steps", "2"]) == 2
    assert "the benchmark is not installed in this version" in capsys.readouterr().err


def test_bench_delegates_remaining_args(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("difforge.bench")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "difforge.bench", fake)
    assert main(["bench", "--model", "pixart", "--help"]) == 3
    assert seen == [["--model", "pixart", "--help"]]


# ---------------------------------------------------------------------------- main


def test_bad_subcommand_exits_nonzero_with_usage(capsys: pytest.CaptureFixture) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "usage: difforge" in err and "invalid choice" in err


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: difforge" in capsys.readouterr().err


def test_version_in_process(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"difforge {difforge.__version__}"


def test_python_dash_m_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "difforge", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"difforge {difforge.__version__}"


def test_console_script_runs() -> None:
    script = VENV_BIN / "difforge"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (difforge not pip-installed)")
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"difforge {difforge.__version__}"
