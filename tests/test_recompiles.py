"""Recompilations are reported with their reason; `recompile.strict` turns them into errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import difforge
from difforge.errors import DifforgeError
from difforge.recompiles import recompile_events


def _fn(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x) * 2 + 1


def test_static_shapes_recompile_is_reported_with_reason() -> None:
    compiled = difforge.compile(_fn, options={"dynamic": False})
    n = len(recompile_events)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 8))
        compiled(torch.randn(4, 8))  # same shape: no recompile
        assert len(recompile_events) == n
        compiled(torch.randn(6, 8))
    assert len(recompile_events) == n + 1
    event = recompile_events[-1]
    assert event.compile_index == 1 and "_fn" in event.function
    assert "size mismatch" in event.reason or "x" in event.reason
    messages = [str(w.message) for w in caught if "difforge: recompiling" in str(w.message)]
    assert len(messages) == 1 and event.reason.splitlines()[0] in messages[0]


def test_dynamic_true_does_not_recompile_or_warn() -> None:
    compiled = difforge.compile(_fn, options={"dynamic": True})
    n = len(recompile_events)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="difforge: recompiling")
        for rows in (3, 5, 9):
            compiled(torch.randn(rows, 8))
    assert len(recompile_events) == n


def test_strict_cap_raises_with_reason() -> None:
    compiled = difforge.compile(
        _fn, options={"dynamic": False, "recompile.limit": 1, "recompile.strict": True}
    )
    with pytest.warns(UserWarning, match="recompiling"):
        compiled(torch.randn(2, 3))
        compiled(torch.randn(3, 3))  # recompile #1: allowed, reported
    with pytest.raises(Exception, match=r"recompiled 2 times, more than recompile.limit=1") as info:
        compiled(torch.randn(4, 3))
    assert "last reason" in str(info.value)
    chain = info.value
    while chain is not None and not isinstance(chain, DifforgeError):
        chain = chain.__cause__ or chain.__context__
    assert isinstance(chain, DifforgeError)


def test_recompile_options_are_validated() -> None:
    with pytest.raises(difforge.OptionsError, match="'recompile.limit' expects int or null"):
        difforge.parse_options({"recompile.limit": "3"})
    with pytest.raises(difforge.OptionsError, match="'recompile.strict' expects bool"):
        difforge.parse_options({"recompile.strict": 1})


def _two_inputs(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return x * 2 + cond.sum()


def test_dynamic_turns_duck_sizing_off_so_unrelated_equal_sizes_do_not_recompile() -> None:
    # PixArt's resolution condition has size 2, like a CFG batch: with Dynamo's duck
    # sizing both get one symbol and a batch change recompiles.
    n = len(recompile_events)
    compiled = difforge.compile(_two_inputs, options={"dynamic": True})
    compiled(torch.randn(2, 8), torch.randn(2, 2))
    compiled(torch.randn(4, 8), torch.randn(4, 2))
    compiled(torch.randn(3, 8), torch.randn(4, 2))
    assert len(recompile_events) == n
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_duck_sizing_on_ties_equal_sizes_and_recompiles() -> None:
    n = len(recompile_events)
    compiled = difforge.compile(_two_inputs, options={"dynamic": True, "shapes.duck_sizing": True})
    with pytest.warns(UserWarning, match="recompiling"):
        compiled(torch.randn(2, 8), torch.randn(2, 2))
        compiled(torch.randn(3, 8), torch.randn(4, 2))
    assert len(recompile_events) == n + 1
