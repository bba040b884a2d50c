"""Shared fixtures: fresh Dynamo state per test, seeded RNG, tiny models and inputs."""

from __future__ import annotations

import os
import tempfile

import torch

# Triton kernels run in Triton's interpreter on CPU-only machines. This must be set before
# anything imports triton or decorates a kernel (Inductor imports triton during earlier
# tests), so it lives in the top-level conftest; a CUDA machine runs the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Tests never touch the user's real caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One fresh Inductor cache per test session: an FX-graph cache hit installs the size guards
# recorded with the cached entry, so entries left by earlier runs (other sizes) made the
# dynamic-shape sweeps recompile. Tests of the caches themselves set their own folders.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="difforge-tests-inductor-")
)


# Inductor's CPU code here is scalar C++ unless DIFFORGE_TEST_VECTORIZE=1. These tests check
# difforge's rewrites against eager, not Inductor's CPU vectorizer (our users' kernels are
# Triton's); choosing SIMD tilings and probing the CPU's vector ISA took half of every CPU
# compile (tiny SDXL dynamic sweep: 132 s vectorized, 62 s scalar). Inductor's own switch,
# an environment variable, so xdist workers and the tests' child processes (whose caches
# and saved pipelines record the ISA) compile alike.
if os.environ.get("DIFFORGE_TEST_VECTORIZE", "0") != "1":
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
    import torch._inductor.config as _inductor_config

    # In case torch._inductor.config was imported before this file set the variable.
    _inductor_config.cpp.vec_isa_ok = os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "1"


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no compiled code, zeroed counters and a fixed seed."""
    import difforge

    for var in (
        "DIFFORGE_MODE",
        "DIFFORGE_GRAPH_CACHE",
        "NEXFORT_GRAPH_CACHE",
        "DIFFORGE_CACHE_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    difforge.counters.clear()
    torch.manual_seed(0)
