"""heuristics.persistent_reduction_max: installed only while difforge compiles, keyed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import difforge
from difforge.errors import OptionsError
from difforge.heuristics import DifforgeChoices, choices_for
from difforge.options import parse_options
from difforge.passes import PostGradPasses


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * 2


def test_choices_installed_during_compile_only() -> None:
    from torch._inductor.virtualized import V

    seen: list[object] = []

    def spy(graph: torch.fx.Graph) -> None:
        seen.append(V.choices)

    options = {
        "heuristics.persistent_reduction_max": 4096,
        "inductor.post_grad_custom_post_pass": spy,
    }
    x = torch.randn(3, 1152)
    torch.testing.assert_close(difforge.compile(_layer_norm, options=options)(x), _layer_norm(x))
    assert len(seen) == 1 and isinstance(seen[0], DifforgeChoices)
    assert seen[0].persistent_reduction_max == 4096
    assert not isinstance(V.choices, DifforgeChoices)  # restored after the compile


def test_o2_raises_the_limit_and_o1_keeps_inductor_choices() -> None:
    o2 = choices_for(parse_options({"mode": "O2"}, env={}))
    assert isinstance(o2, DifforgeChoices) and o2.persistent_reduction_max == 2048
    assert choices_for(parse_options({"mode": "O1"}, env={})) is None
    off = {"mode": "O2", "heuristics.persistent_reduction_max": None}
    assert choices_for(parse_options(off, env={})) is None  # explicit null beats the mode


def test_setting_changes_the_cache_key() -> None:
    a, b = DifforgeChoices(2048), DifforgeChoices(4096)
    uuids = {
        PostGradPasses("post_grad_pre", [], salt=s).uuid()
        for s in (b"", a.cache_salt(), b.cache_salt())
    }
    assert len(uuids) == 3
    assert bool(
        PostGradPasses("post_grad_pre", [], salt=a.cache_salt())
    )  # installed even without passes


@pytest.mark.parametrize("bad", [0, -5, "big", 1.5])
def test_bad_limit_is_a_clear_error(bad: object) -> None:
    with pytest.raises(OptionsError, match="heuristics.persistent_reduction_max"):
        parse_options({"heuristics.persistent_reduction_max": bad}, env={})


class _Origin:
    def __init__(self, aten: object) -> None:
        self.meta = {"original_aten": aten}
        self.target = aten


class _Node:
    def __init__(self, *atens: object) -> None:
        self.node = self
        self._origins = [_Origin(a) for a in atens]

    def get_origins(self) -> list[_Origin]:
        return self._origins


class _Features:
    def __init__(self, *nodes: _Node) -> None:
        self._nodes = nodes

    def reduction_nodes(self) -> tuple[_Node, ...]:
        return self._nodes


def test_only_layer_norm_reductions_qualify() -> None:
    from difforge.heuristics import _only_layer_norm

    aten = torch.ops.aten
    ln = _Node(aten.native_layer_norm.default, aten.add.Tensor)
    gn = _Node(aten.native_group_norm.default)
    assert _only_layer_norm(_Features(ln))
    assert not _only_layer_norm(_Features(ln, gn))  # a GroupNorm piece: Inductor decides
    assert not _only_layer_norm(_Features(_Node(aten.sum.dim_IntList)))  # a plain sum
    assert not _only_layer_norm(object())  # unexpected structures: no override


class _Buffer:
    def __init__(self, dtype: torch.dtype) -> None:
        self.node = self
        self._dtype = dtype

    def get_dtype(self) -> torch.dtype:
        return self._dtype


class _Kernel(_Features):
    def __init__(self, *buffers: _Buffer, reductions: tuple[_Node, ...] = ()) -> None:
        super().__init__(*reductions)
        self._buffers = buffers

    def scheduler_nodes(self) -> tuple[_Buffer, ...]:
        return self._buffers


def test_fp8_quantization_kernels_are_recognised_by_their_fp8_store() -> None:
    from difforge.heuristics import _has_group_norm, _writes_fp8

    quant = _Kernel(_Buffer(torch.float32), _Buffer(torch.float8_e4m3fn))
    assert _writes_fp8(quant)
    assert not _writes_fp8(_Kernel(_Buffer(torch.float16), _Buffer(torch.float32)))
    assert not _writes_fp8(object())  # unexpected structures: no override
    gn = _Kernel(
        _Buffer(torch.float8_e4m3fn), reductions=(_Node(torch.ops.aten.native_group_norm.default),)
    )
    assert _has_group_norm(gn) and not _has_group_norm(quant)


def test_fp8_limit_alone_installs_choices_and_changes_the_key() -> None:
    only_fp8 = choices_for(
        parse_options({"mode": "O1", "heuristics.persistent_fp8_quant_max": 8192}, env={})
    )
    assert isinstance(only_fp8, DifforgeChoices)
    assert only_fp8.persistent_reduction_max is None and only_fp8.fp8_quant_max == 8192
    assert DifforgeChoices(2048).cache_salt() != DifforgeChoices(2048, 8192).cache_salt()
    with pytest.raises(OptionsError, match="persistent_fp8_quant_max"):
        parse_options({"heuristics.persistent_fp8_quant_max": 0}, env={})
