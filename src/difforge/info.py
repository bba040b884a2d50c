"""What this machine can do: versions, GPUs, and which difforge features are available.

The probe (:func:`probe`) gathers facts once into a :class:`Platform`; each feature
check is a small pure function ``check(platform) -> Feature`` that says yes or no and
why, so a mode can explain itself ("fp8 not available here: compute capability 8.0 <
8.9") and tests can feed in a fake GPU. ``difforge info`` prints all of them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform as pyplatform
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from difforge.options import user_inductor_cache_dir

#: Environment variables difforge (or the Inductor it drives) reads, with what they do.
ENV_VARS: dict[str, str] = {
    "DIFFORGE_MODE": "default mode when options give none (e.g. O2, O3:cache-all)",
    "DIFFORGE_CACHE_DIR": "difforge cache root (highest precedence)",
    "DIFFORGE_GRAPH_CACHE": "1 = persist compiled artifacts (as the cache-all mode)",
    "NEXFORT_GRAPH_CACHE": "the seed's name for DIFFORGE_GRAPH_CACHE (honoured)",
    "TORCHINDUCTOR_CACHE_DIR": "Inductor's cache folder; difforge's root if DIFFORGE_CACHE_DIR is unset",
    "DIFFORGE_DUMP_PASSES": "dump graphs before/after each difforge pass",
    "DIFFORGE_DUMP_DIR": "where DIFFORGE_DUMP_PASSES writes its dumps",
}

#: Optional packages whose versions `difforge info` reports (distribution names).
PACKAGES: tuple[str, ...] = ("triton", "diffusers", "transformers")

NOT_INSTALLED = "not installed"

# Thresholds, named so a reason can quote them.
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have fp8 tensor cores
ATTENTION_MIN_CAPABILITY = (8, 0)  # torch's flash and cuDNN SDPA kernels need Ampere+
TRITON_MIN_CAPABILITY = (7, 0)  # Inductor refuses Triton below Volta
CUDNN_ATTENTION_MIN_VERSION = 90000  # cuDNN 9.0.0 (torch's encoding: major*10000+...)
AUTOTUNE_MIN_SMS = 68  # torch._inductor.utils.is_big_gpu: below this GEMM autotune is off
DIFFUSERS_MIN_VERSION = (0, 30)


@dataclass(frozen=True)
class Feature:
    """One capability: is it available here, and why (not)."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        state = "available" if self.available else "not available"
        return f"{self.name}: {state} ({self.reason})"


@dataclass(frozen=True)
class GpuInfo:
    """One visible GPU."""

    index: int
    name: str
    capability: tuple[int, int]
    memory_bytes: int
    sm_count: int

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name})"

    @property
    def capability_str(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class Platform:
    """The facts feature checks need; build it with :func:`probe` (or by hand in tests)."""

    torch_version: str = torch.__version__
    cuda_available: bool = False
    cuda_version: str | None = None
    """CUDA toolkit torch was built with (None for CPU-only or ROCm builds)."""
    hip_version: str | None = None
    cudnn_version: int | None = None
    """torch.backends.cudnn.version(): e.g. 90100 for 9.1.0, 8907 for 8.9.7."""
    gpus: tuple[GpuInfo, ...] = ()
    has_scaled_mm: bool = False
    flash_attention_built: bool = False
    triton_version: str | None = None
    """None when triton cannot be imported."""
    triton_error: str | None = None
    triton_interpret: bool = False
    cxx_compiler: str | None = None
    cxx_error: str | None = None
    cpu_vec_isa: str | None = None
    """Inductor's pick for CPU vector code ('' when it found none)."""
    diffusers_version: str | None = None
    packages: Mapping[str, str] = field(default_factory=dict)
    """Distribution name -> version, or 'not installed'."""


def format_cudnn_version(version: int | None) -> str:
    """torch's integer cuDNN version as 'major.minor.patch' ('not available' for None)."""
    if version is None:
        return "not available"
    if version >= 90000:  # cuDNN 9 switched to major*10000 + minor*100 + patch
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, without importing it (None if absent)."""
    # Triton ships as "pytorch-triton" in nightly builds.
    names = (dist, "pytorch-triton") if dist == "triton" else (dist,)
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _probe_triton() -> tuple[str | None, str | None]:
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    try:
        import triton
    except Exception as e:  # a broken install should show up as a reason, not a crash
        return None, f"import triton failed: {type(e).__name__}: {e}"
    return str(getattr(triton, "__version__", package_version("triton") or "unknown")), None


def _probe_cxx() -> tuple[str | None, str | None, str | None]:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as e:
        cxx = os.environ.get("CXX", "g++")
        return None, f"no working C++ compiler ({cxx!r}: {type(e).__name__})", None
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa())
    except Exception:
        isa = ""
    return compiler, None, isa


def _probe_gpus() -> tuple[GpuInfo, ...]:
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            GpuInfo(
                index=index,
                name=props.name,
                capability=(props.major, props.minor),
                memory_bytes=int(props.total_memory),
                sm_count=int(props.multi_processor_count),
            )
        )
    return tuple(gpus)


def probe() -> Platform:
    """Gather the facts about this process's machine (about a second: imports Inductor)."""
    cuda = torch.cuda.is_available()
    triton_version, triton_error = _probe_triton()
    cxx, cxx_error, isa = _probe_cxx()
    packages = {name: package_version(name) or NOT_INSTALLED for name in PACKAGES}
    if triton_version is not None:
        packages["triton"] = triton_version
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    flash = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)()
    return Platform(
        torch_version=torch.__version__,
        cuda_available=cuda,
        cuda_version=torch.version.cuda,
        hip_version=getattr(torch.version, "hip", None),
        cudnn_version=cudnn,
        gpus=_probe_gpus() if cuda else (),
        has_scaled_mm=hasattr(torch, "_scaled_mm"),
        flash_attention_built=bool(flash),
        triton_version=triton_version,
        triton_error=triton_error,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "") == "1",
        cxx_compiler=cxx,
        cxx_error=cxx_error,
        cpu_vec_isa=isa,
        diffusers_version=package_version("diffusers"),
        packages=packages,
    )


@functools.lru_cache(maxsize=1)
def current_platform() -> Platform:
    """:func:`probe`, once per process (GPUs and installed packages do not change)."""
    return probe()


def _platform(platform: Platform | None) -> Platform:
    return current_platform() if platform is None else platform


def _no_cuda(p: Platform) -> str:
    if p.hip_version:
        return f"ROCm build (HIP {p.hip_version}) with no visible GPU"
    if p.cuda_version is None:
        return f"torch {p.torch_version} is a CPU-only build"
    return f"torch was built with CUDA {p.cuda_version} but no CUDA GPU is visible"


def _gpus_below(p: Platform, minimum: tuple[int, int]) -> tuple[list[GpuInfo], list[GpuInfo]]:
    good = [g for g in p.gpus if g.capability >= minimum]
    bad = [g for g in p.gpus if g.capability < minimum]
    return good, bad


def _capability_reason(bad: list[GpuInfo], minimum: tuple[int, int]) -> str:
    return "; ".join(
        f"{g.label} has compute capability {g.capability_str} < {minimum[0]}.{minimum[1]}"
        for g in bad
    )


def _partial(good: list[GpuInfo], bad: list[GpuInfo], minimum: tuple[int, int]) -> str:
    """A suffix naming GPUs that miss out when others qualify."""
    return f" (not on: {_capability_reason(bad, minimum)})" if good and bad else ""


def triton_kernels(platform: Platform | None = None) -> Feature:
    """difforge's Triton kernels: triton plus a GPU, or the interpreter for CPU tests."""
    p = _platform(platform)
    name = "triton kernels"
    if p.triton_version is None:
        return Feature(name, False, p.triton_error or "triton is not importable")
    if p.cuda_available:
        good, bad = _gpus_below(p, TRITON_MIN_CAPABILITY)
        if good:
            return Feature(
                name,
                True,
                f"triton {p.triton_version} on {good[0].label}"
                + _partial(good, bad, TRITON_MIN_CAPABILITY),
            )
        return Feature(name, False, _capability_reason(bad, TRITON_MIN_CAPABILITY))
    if p.triton_interpret:
        return Feature(
            name,
            True,
            f"triton {p.triton_version} interpreter (TRITON_INTERPRET=1): slow, tests only",
        )
    return Feature(
        name,
        False,
        f"{_no_cuda(p)}; triton needs a GPU (set TRITON_INTERPRET=1 to run kernels on the CPU for tests)",
    )


def cudagraphs(platform: Platform | None = None) -> Feature:
    """CUDA graphs (the `cudagraphs` mode): any CUDA GPU."""
    p = _platform(platform)
    name = "cudagraphs"
    if not p.cuda_available:
        return Feature(name, False, f"needs CUDA: {_no_cuda(p)}")
    return Feature(name, True, f"CUDA {p.cuda_version or p.hip_version}, {len(p.gpus)} GPU(s)")


def fp8_gemm(platform: Platform | None = None) -> Feature:
    """fp8 GEMM through ``torch._scaled_mm``: CUDA and compute capability >= 8.9.

    What ``low-precision``/``O3`` (``quant.fp8_linear``) needs to swap linears to fp8;
    without it the mode warns once and leaves the linears alone (no int8 fallback yet)."""
    feature = _fp8_gemm(_platform(platform))
    what = (
        "low-precision/O3 swap large linears to fp8"
        if feature.available
        else "low-precision/O3 keep every linear in its own precision here"
    )
    return Feature(feature.name, feature.available, f"{feature.reason}; {what}")


def _fp8_gemm(p: Platform) -> Feature:
    name = "fp8 GEMM (torch._scaled_mm)"
    minimum = FP8_MIN_CAPABILITY
    if not p.has_scaled_mm:
        return Feature(name, False, f"torch {p.torch_version} has no torch._scaled_mm")
    if not p.cuda_available:
        return Feature(name, False, f"needs CUDA and compute capability >= 8.9: {_no_cuda(p)}")
    if p.hip_version:
        return Feature(name, False, "ROCm fp8 is not supported by difforge")
    good, bad = _gpus_below(p, minimum)
    if not good:
        return Feature(name, False, _capability_reason(bad, minimum))
    g = good[0]
    return Feature(
        name,
        True,
        f"{g.label}, compute capability {g.capability_str} >= 8.9" + _partial(good, bad, minimum),
    )


def cudnn_attention(platform: Platform | None = None) -> Feature:
    """cuDNN SDPA: CUDA, cuDNN >= 9 and compute capability >= 8.0."""
    p = _platform(platform)
    name = "cuDNN attention"
    minimum = ATTENTION_MIN_CAPABILITY
    if not p.cuda_available:
        return Feature(name, False, f"needs CUDA: {_no_cuda(p)}")
    if p.cudnn_version is None:
        return Feature(name, False, "torch was built without cuDNN")
    if p.cudnn_version < CUDNN_ATTENTION_MIN_VERSION:
        return Feature(
            name, False, f"cuDNN {format_cudnn_version(p.cudnn_version)} < 9 (needs cuDNN 9)"
        )
    good, bad = _gpus_below(p, minimum)
    if not good:
        return Feature(name, False, _capability_reason(bad, minimum))
    return Feature(
        name,
        True,
        f"cuDNN {format_cudnn_version(p.cudnn_version)} on {good[0].label}"
        + _partial(good, bad, minimum),
    )


def flash_attention(platform: Platform | None = None) -> Feature:
    """torch's FlashAttention-2 SDPA kernel: built into torch, CUDA and sm80+."""
    p = _platform(platform)
    name = "flash attention"
    minimum = ATTENTION_MIN_CAPABILITY
    if not p.cuda_available:
        return Feature(name, False, f"needs CUDA: {_no_cuda(p)}")
    if not p.flash_attention_built:
        return Feature(name, False, f"torch {p.torch_version} was built without flash attention")
    good, bad = _gpus_below(p, minimum)
    if not good:
        return Feature(name, False, _capability_reason(bad, minimum))
    return Feature(
        name, True, f"FlashAttention-2 on {good[0].label}" + _partial(good, bad, minimum)
    )


def max_autotune(platform: Platform | None = None) -> Feature:
    """GEMM autotuning (the `max-autotune` mode): a big enough GPU, or Inductor's C++ template."""
    p = _platform(platform)
    name = "max-autotune"
    if p.cuda_available:
        if p.triton_version is None:
            return Feature(name, False, f"GEMM autotuning needs triton: {p.triton_error}")
        big = [g for g in p.gpus if g.sm_count >= AUTOTUNE_MIN_SMS]
        if big:
            return Feature(
                name, True, f"Triton GEMM templates on {big[0].label} ({big[0].sm_count} SMs)"
            )
        small = ", ".join(f"{g.label} has {g.sm_count} SMs" for g in p.gpus)
        return Feature(
            name,
            False,
            f"{small} < {AUTOTUNE_MIN_SMS}, so Inductor skips GEMM autotuning "
            "(pointwise/reduction tuning still runs)",
        )
    if p.cxx_compiler is None:
        return Feature(name, False, f"no GPU and {p.cxx_error or 'no C++ compiler'}")
    if not p.cpu_vec_isa:
        return Feature(
            name, False, "no GPU, and Inductor found no CPU vector ISA for its C++ GEMM template"
        )
    return Feature(
        name,
        True,
        f"CPU only: Inductor's C++ GEMM template ({p.cpu_vec_isa}); "
        "needs constant weights (the freezing mode)",
    )


def inductor_cpp(platform: Platform | None = None) -> Feature:
    """Inductor's C++ backend (all CPU code): a working C++ compiler."""
    p = _platform(platform)
    name = "inductor C++ backend"
    if p.cxx_compiler is None:
        return Feature(name, False, f"{p.cxx_error}; install g++ or set CXX")
    isa = f", vector ISA: {p.cpu_vec_isa}" if p.cpu_vec_isa else ", no vector ISA (scalar code)"
    return Feature(name, True, f"C++ compiler {p.cxx_compiler}{isa}")


def diffusers_integration(platform: Platform | None = None) -> Feature:
    """``difforge.diffusers`` (compile_pipe, save/load_pipe): diffusers installed."""
    p = _platform(platform)
    name = "diffusers integration"
    if p.diffusers_version is None:
        return Feature(
            name, False, "diffusers is not installed (pip install 'difforge[diffusers]')"
        )
    need = ".".join(map(str, DIFFUSERS_MIN_VERSION))
    if _parse_version(p.diffusers_version) < DIFFUSERS_MIN_VERSION:
        return Feature(name, False, f"diffusers {p.diffusers_version} < {need}")
    return Feature(name, True, f"diffusers {p.diffusers_version}")


FEATURE_CHECKS: tuple[Callable[[Platform | None], Feature], ...] = (
    triton_kernels,
    cudagraphs,
    fp8_gemm,
    cudnn_attention,
    flash_attention,
    max_autotune,
    inductor_cpp,
    diffusers_integration,
)


def features(platform: Platform | None = None) -> list[Feature]:
    """Every feature check, in display order."""
    p = _platform(platform)
    return [check(p) for check in FEATURE_CHECKS]


def environment(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The difforge-related environment variables and their values (None when unset).

    TORCHINDUCTOR_CACHE_DIR counts as unset when it holds the default torch itself wrote
    into the environment (see ``options.user_inductor_cache_dir``): reporting it as set
    would contradict the cache folder printed next to it."""
    env = os.environ if env is None else env
    values = {name: env.get(name) for name in ENV_VARS}
    values["TORCHINDUCTOR_CACHE_DIR"] = user_inductor_cache_dir(env)
    return values


def report(platform: Platform | None = None) -> dict[str, Any]:
    """Everything `difforge info` shows, as JSON-ready data."""
    from difforge import __version__
    from difforge.options import MODE_DOCS, MODES, PRESETS, default_cache_dir

    p = _platform(platform)
    return {
        "versions": {
            "difforge": __version__,
            "torch": p.torch_version,
            **p.packages,
            "python": sys.version.split()[0],
        },
        "platform": pyplatform.platform(),
        "cuda": {
            "available": p.cuda_available,
            "cuda_version": p.cuda_version,
            "hip_version": p.hip_version,
            "cudnn_version": format_cudnn_version(p.cudnn_version)
            if p.cudnn_version is not None
            else None,
            "gpus": [
                {**asdict(g), "capability": g.capability_str, "memory_gib": g.memory_bytes / 2**30}
                for g in p.gpus
            ],
        },
        "features": [asdict(f) for f in features(p)],
        "modes": {m: MODE_DOCS.get(m, "") for m in MODES},
        "presets": {name: list(modes) for name, modes in PRESETS.items()},
        "environment": environment(),
        "cache_dir": str(default_cache_dir()),
    }
