"""Fixtures of the diffusers tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import difforge


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records the class of every module handed to difforge.compile."""
    calls: list[str] = []
    real = difforge.compile

    def spy(module: Any, **kwargs: Any) -> Any:
        calls.append(type(module).__name__)
        return real(module, **kwargs)

    monkeypatch.setattr(difforge, "compile", spy)
    yield calls
