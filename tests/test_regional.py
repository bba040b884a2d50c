"""Regional compilation (``compile.regional``): one compiled body per distinct block type."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import difforge
from difforge import regional
from difforge.models.tiny import TinyDiT
from tests.helpers import dit_inputs, rel_err

pytestmark = pytest.mark.skipif(
    not regional.nested_regions_available()[0], reason="torch lacks nested_compile_region"
)


def _dit(depth: int = 6) -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT(depth=depth).eval()


def _sweep_sizes(compiled: nn.Module, model: nn.Module) -> None:
    """Three batch/size/token combinations; each output must match eager."""
    for batch, size, tokens in ((2, 16, 7), (3, 24, 11), (2, 8, 5)):
        inputs = dit_inputs(batch, size, tokens)
        assert rel_err(compiled(*inputs), model(*inputs)) < 1e-5


def _run(model: nn.Module, options: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    inputs = dit_inputs()
    with torch.no_grad():
        ref = model(*inputs)
        start = len(difforge.compile_records)
        out = difforge.compile(model, options=options)(*inputs)
    return out, ref, difforge.compile_records[start:]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_nested_matches_eager_with_one_frame_and_one_region(dynamic):
    # O2 defaults to dynamic=True; before the block's float attributes were pinned, the
    # dynamic case fell back to eager (3 graphs, aten._local_scalar_dense in the backend).
    model = _dit(6)
    out, ref, records = _run(model, {"mode": "O2", "dynamic": dynamic, "compile.regional": True})
    assert rel_err(out, ref) < 1e-5  # every block's own weights reach the shared body
    assert counters["stats"]["unique_graphs"] == 1  # one Dynamo graph, no breaks
    assert len(records) == 1
    assert list(records[0].regions.values()) == [6]  # one body, called by all 6 blocks
    # fuse_qkv ran inside the body (self-attn q/k/v and cross-attn k/v of the block)
    assert records[0].rewrites["fuse_qkv"] >= 2
    assert set(regional.marked_blocks(model)) == {f"blocks.{i}" for i in range(6)}


def test_nested_dynamic_serves_new_sizes_without_recompiling():
    model = _dit(2)
    compiled = difforge.compile(
        model, options={"mode": "O1", "dynamic": True, "compile.regional": True}
    )
    with torch.no_grad():
        _sweep_sizes(compiled, model)
    assert counters["stats"]["unique_graphs"] == 1


def test_unmarking_restores_the_blocks():
    model = _dit(2)
    groups = regional.find_repeated_blocks(model)
    regional.mark_regions(model, groups)
    assert "forward" in model.blocks[0].__dict__
    regional.unmark_regions(model)
    assert regional.find_repeated_blocks(model) == groups  # same signatures as before
    assert "forward" not in model.blocks[0].__dict__ and not regional.marked_blocks(model)


def test_float_specialisation_is_patched_only_while_tracing():
    from difforge.options import parse_options
    from difforge.tracing import tracing_settings

    config = parse_options({"dynamic": True})
    before = torch._dynamo.config.specialize_float
    with tracing_settings(config, specialize_floats=True):
        assert torch._dynamo.config.specialize_float is True
    assert torch._dynamo.config.specialize_float == before
    with tracing_settings(config):
        assert torch._dynamo.config.specialize_float == before


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_blocks_style_compiles_one_frame_for_all_blocks(dynamic):
    # The first block gets a transposed patch embedding: without dense-strided inputs the
    # dynamic frame recompiled for the other blocks (2 graphs).
    model = _dit(6)
    options = {"mode": "O2", "dynamic": dynamic, "compile.regional": "blocks"}
    out, ref, records = _run(model, options)
    assert rel_err(out, ref) < 1e-5
    # Six identical blocks, one Dynamo frame compile: the siblings reuse its code.
    assert counters["stats"]["unique_graphs"] == 1
    assert len(records) == 1
    assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.blocks)
    # Compiling again without regional restores the eager blocks.
    difforge.compile(model, options={"mode": "O1"})
    assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.blocks)


def test_off_is_whole_model_and_clears_a_previous_regional_compile():
    model = _dit(4)
    difforge.compile(model, options={"compile.regional": True})
    assert regional.marked_blocks(model)
    out, ref, records = _run(model, {"mode": "O2"})  # option off (the default)
    assert not regional.marked_blocks(model)
    assert rel_err(out, ref) < 1e-5
    assert records[0].regions == {}  # no invoke_subgraph: the blocks were inlined
    assert records[0].rewrites["fuse_qkv"] == 5  # 4 self-attn + all blocks' cross-attn k/v


def test_blocks_of_different_structure_get_different_regions():
    model = _dit(6)
    model.blocks[4].attn1.heads = 2  # same weights, different forward behaviour
    groups = regional.find_repeated_blocks(model)
    assert [len(g.names) for g in groups] == [5]
    assert "blocks.4" not in groups[0].names
    model.blocks[3].attn1.heads = 2
    groups = regional.find_repeated_blocks(model)
    assert sorted(len(g.names) for g in groups) == [2, 4]
    out, ref, records = _run(model, {"mode": "O1", "compile.regional": True})
    assert rel_err(out, ref) < 1e-5
    assert sorted(records[0].regions.values()) == [2, 4]


def test_declared_repeated_blocks_win():
    class Declared(TinyDiT):
        _repeated_blocks = ("Attention",)

    torch.manual_seed(0)
    groups = regional.find_repeated_blocks(Declared(depth=3))
    # self-attn and cross-attn differ in nothing structural here: one group of 6
    assert [g.class_name for g in groups] == ["Attention"]
    assert len(groups[0].names) == 6


class _Wrapper(nn.Module):
    """One Linear behind an activation: diffusers' GELU module, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(x))


def test_wrappers_of_one_layer_are_not_blocks():
    wrappers = nn.ModuleList([_Wrapper() for _ in range(4)])
    pairs = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2)])
    model = nn.ModuleDict({"wrappers": wrappers, "pairs": pairs})
    groups = regional.find_repeated_blocks(model)
    assert [g.names for g in groups] == [("pairs.0", "pairs.1")]


def test_no_repeated_blocks_warns_and_compiles_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="found no repeated blocks") as seen:
        compiled = difforge.compile(model, options={"compile.regional": True})
    # Attributed to the line that called difforge.compile, not to difforge or torch.
    assert [w.filename for w in seen] == [__file__]
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1


def test_warnings_from_inside_torch_point_at_the_callers_line() -> None:
    """A recompile is reported from deep inside Dynamo; the warning names the user's call."""
    model = nn.Linear(8, 8).eval()
    compiled = difforge.compile(model, options={"mode": "O1", "dynamic": False})
    with torch.no_grad():
        compiled(torch.randn(2, 8))
        with pytest.warns(UserWarning, match="difforge: recompiling") as seen:
            compiled(torch.randn(3, 8))  # another batch: a reported recompile
    assert {w.filename for w in seen if "recompiling" in str(w.message)} == {__file__}


@pytest.mark.parametrize("value", ["sometimes", 1, "Nested"])
def test_bad_values_are_errors(value):
    with pytest.raises(difforge.OptionsError, match=r"compile\.regional"):
        difforge.compile(_dit(2), options={"compile.regional": value})


def test_plain_function_is_an_error():
    with pytest.raises(difforge.OptionsError, match="needs an nn.Module"):
        difforge.compile(lambda x: x + 1, options={"compile.regional": True})


def test_torch_compile_entry_point_warns_that_it_is_whole_model():
    model = _dit(2)
    compiled = torch.compile(model, backend="difforge", options={"compile.regional": True})
    import difforge.backend as backend

    backend._warned_regional = False
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        compiled(*dit_inputs())
    assert any("only takes effect through difforge.compile" in str(w.message) for w in caught)


@pytest.mark.slow
def test_regional_cuts_compile_time_on_many_blocks():
    """CPU smoke number (not a claim about GPUs): 16 blocks, O2, whole vs nested regions."""
    seconds = {}
    for value in (False, True):
        torch._dynamo.reset()
        model = _dit(16)
        start = time.perf_counter()
        out, ref, _ = _run(model, {"mode": "O2", "compile.regional": value})
        seconds[value] = time.perf_counter() - start
        assert rel_err(out, ref) < 1e-5
    print(f"\nTinyDiT x16 O2 on CPU: whole {seconds[False]:.1f} s, regional {seconds[True]:.1f} s")
    assert seconds[True] < seconds[False]


def test_blocks_style_dynamic_serves_new_sizes_without_recompiling():
    model = _dit(3)
    compiled = difforge.compile(
        model, options={"mode": "O1", "dynamic": True, "compile.regional": "blocks"}
    )
    with torch.no_grad():
        _sweep_sizes(compiled, model)
    assert counters["stats"]["unique_graphs"] == 1


def test_nested_automatic_dynamic_keeps_regions_after_the_dynamic_recompile():
    # dynamic=None: static first graph, one dynamic recompile; floats stay constants
    # (they never change value), so the regions survive the recompile.
    model = _dit(3)
    start = len(difforge.compile_records)
    compiled = difforge.compile(model, options={"mode": "O1", "compile.regional": True})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*recompiling")
        _sweep_sizes(compiled, model)
    records = difforge.compile_records[start:]
    assert [list(r.regions.values()) for r in records] == [[3], [3]]


_GLOBAL_SCALE = 0.5


def _scaled(x, factor=2.0):
    return x * factor


class _ScaledOut(nn.Module):
    """A projection whose forward reads a float default and a float global."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return _scaled(self.inner(x)) * _GLOBAL_SCALE


def test_floats_read_outside_the_blocks_modules_work_nested_with_dynamic_shapes():
    # A float default of a helper and a module-level float, read by every block's
    # attention output (as FLUX reads dispatch_attention_fn's dropout_p=0.0): before difforge
    # traced nested regions with specialize_float, these became SymFloat region inputs
    # and the compile failed ("Freevar has no source") or fell back to 'blocks'.
    model = _dit(3)
    for block in model.blocks:
        block.attn1.to_out = _ScaledOut(block.attn1.to_out)
    start = len(difforge.compile_records)
    compiled = difforge.compile(
        model, options={"mode": "O1", "dynamic": True, "compile.regional": "nested"}
    )
    with torch.no_grad():
        _sweep_sizes(compiled, model)
    assert counters["stats"]["unique_graphs"] == 1
    records = difforge.compile_records[start:]
    assert [list(r.regions.values()) for r in records] == [[3]]
