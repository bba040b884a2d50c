"""Shared fixtures: fresh Dynamo state per test, seeded RNG, tiny models and inputs."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never touch the user's real caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
