"""difforge.fused_weights (``fuse_qkv.cached_weights``): fused weights concatenated once,
kept current on in-place updates and parameter replacement, never under autograd."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import difforge
from difforge.errors import OptionsError
from difforge.graph_pool import GraphPool, graphs_of

from .helpers import rel_err
from .test_graph_pool import FakeCapturer
from .test_passes import SelfAttentionProjections

CACHED = {"mode": "O2", "fuse_qkv.cached_weights": True}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cat_kernels(code: list[str]) -> list[str]:
    """Per-call concatenation kernels in Inductor's generated code (CPU or Triton)."""
    return re.findall(r"\b(?:cpp|triton)_\w*cat\w*", "\n".join(code))


@pytest.mark.parametrize(("options", "fused", "cached"), [({"mode": "O2"}, 0, 0), (CACHED, 1, 2)])
def test_cached_weights_fuse_what_the_cost_rule_refuses(
    options: dict[str, object], fused: int, cached: int
) -> None:
    """640-wide q/k/v over 256 rows: the in-graph concatenation would move more bytes than
    the fusion saves, so O2 leaves them apart; cached, the group fuses (weights and biases
    concatenated once) and no concatenation runs per call."""
    from torch._inductor.utils import run_and_get_code

    module = SelfAttentionProjections(dim=640).eval()
    x = torch.randn(1, 256, 640)
    with torch.no_grad():
        ref = module(x)
        out, code = run_and_get_code(difforge.compile(module, options=options), x)
    assert rel_err(out, ref) < 1e-5
    assert difforge.counters["fuse_qkv"] == fused
    assert difforge.counters["fused_weights.cached"] == cached
    assert not _cat_kernels(code)
    if cached:
        assert "2 concatenations cached, 6.3 MiB" in difforge.compile_records[-1].notes[-1]


@torch.no_grad()
def test_in_place_updates_and_replaced_parameters_reach_the_next_call() -> None:
    module = SelfAttentionProjections(dim=32).eval()
    compiled = difforge.compile(module, options=CACHED)
    x = torch.randn(2, 9, 32)
    assert rel_err(compiled(x), module(x)) < 1e-5
    assert difforge.counters["fused_weights.cached"] == 2
    compiled(x)
    assert difforge.counters["fused_weights.refresh"] == 0  # nothing changed: no work
    module.to_k.weight.mul_(-2.0)  # a LoRA fused in place, load_state_dict
    assert rel_err(compiled(x), module(x)) < 1e-5
    assert difforge.counters["fused_weights.refresh"] == 1
    module.to_v.bias = nn.Parameter(torch.randn(64))  # a new object in the same place
    assert rel_err(compiled(x), module(x)) < 1e-5
    assert difforge.counters["fused_weights.refresh"] == 2
    # diffusers' LoRA fusing (models/lora.py): same object, same version, new memory
    module.to_q.weight.data = module.to_q.weight.data * 3.0
    assert rel_err(compiled(x), module(x)) < 1e-5
    assert difforge.counters["fused_weights.refresh"] == 3


@torch.no_grad()
def test_graphs_of_other_shapes_share_the_concatenations() -> None:
    """A recompile for another shape reads the first graph's buffers (no second copy of
    the weights), and an update reaches both graphs."""
    module = SelfAttentionProjections(dim=32).eval()
    compiled = difforge.compile(module, options={**CACHED, "dynamic": False})
    small, large = torch.randn(1, 5, 32), torch.randn(3, 11, 32)
    assert rel_err(compiled(small), module(small)) < 1e-5
    assert rel_err(compiled(large), module(large)) < 1e-5
    assert difforge.counters["fused_weights.cached"] == 4  # two groups in each of two graphs
    assert difforge.counters["fused_weights.shared"] == 2
    module.to_q.weight.mul_(3.0)
    assert rel_err(compiled(large), module(large)) < 1e-5
    assert rel_err(compiled(small), module(small)) < 1e-5


@torch.no_grad()
def test_graphs_sharing_a_buffer_follow_each_others_refreshes() -> None:
    """One graph refreshes the shared buffer from a replaced parameter; the other graph,
    called with the original again, must not trust its own last look."""
    module = SelfAttentionProjections(dim=32).eval()
    compiled = difforge.compile(module, options={**CACHED, "dynamic": False})
    small, large = torch.randn(1, 5, 32), torch.randn(3, 11, 32)
    compiled(small), compiled(large)
    original = module.to_k.weight
    module.to_k.weight = nn.Parameter(torch.randn(32, 32))
    assert rel_err(compiled(small), module(small)) < 1e-5
    module.to_k.weight = original
    assert rel_err(compiled(large), module(large)) < 1e-5
    assert rel_err(compiled(small), module(small)) < 1e-5


@torch.no_grad()
def test_a_module_cast_after_compiling_gets_buffers_of_its_new_dtype() -> None:
    """``.double()`` keeps the parameter objects (same ids): the recompile must not write
    float64 weights into the float32 graph's buffer."""
    module = SelfAttentionProjections(dim=32).eval()
    compiled = difforge.compile(module, options=CACHED)
    x = torch.randn(2, 9, 32)
    compiled(x)
    module.double()
    out = compiled(x.double())
    assert out.dtype == torch.float64
    assert rel_err(out, module(x.double())) < 1e-10


def test_weights_made_under_inference_mode_are_not_cached() -> None:
    """Inference tensors have no version counter to watch: the in-graph concatenation
    stays (where the cost rule allows it) and the compile succeeds."""
    with torch.inference_mode():
        module = SelfAttentionProjections(dim=32).eval()
        x = torch.randn(2, 9, 32)
        assert rel_err(difforge.compile(module, options=CACHED)(x), module(x)) < 1e-5
    assert difforge.counters["fuse_qkv"] == 1
    assert difforge.counters["fused_weights.cached"] == 0


def test_freezing_folds_instead_of_caching() -> None:
    module = SelfAttentionProjections(dim=640).eval()
    x = torch.randn(1, 256, 640)
    with torch.no_grad():
        out = difforge.compile(module, options={**CACHED, "mode": "O2:freezing"})(x)
        assert rel_err(out, module(x)) < 1e-5
    assert difforge.counters["fuse_qkv"] == 1  # constants: fused, folded by Inductor
    assert difforge.counters["fused_weights.cached"] == 0


def test_buffer_sources_are_named_the_same_in_every_process() -> None:
    """AOTAutograd's cache key includes the lifted buffers' sources: a name with an object
    id in it would miss the cache on every warm start."""
    from difforge.fused_weights import _declare_source

    names = []
    for _ in range(2):
        gm = torch.fx.symbolic_trace(nn.Identity())
        gm._param_name_to_source = {}
        assert _declare_source(gm, "_difforge_fused_weight_0")
        names.append(gm._param_name_to_source["_difforge_fused_weight_0"].name)
    assert names[0] == names[1]


def test_with_gradients_the_concatenation_stays_in_the_graph() -> None:
    """Autograd must see the weights: a graph traced with gradients on caches nothing, and
    the fused GEMM still trains every projection."""
    module = SelfAttentionProjections(dim=32)
    x = torch.randn(2, 9, 32)
    out = difforge.compile(module, options=CACHED)(x)
    out.sum().backward()
    assert difforge.counters["fuse_qkv"] == 1
    assert difforge.counters["fused_weights.cached"] == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_off_by_default() -> None:
    module = SelfAttentionProjections(dim=32).eval()
    with torch.no_grad():
        difforge.compile(module, options={"mode": "O2"})(torch.randn(2, 9, 32))
    assert difforge.counters["fuse_qkv"] == 1  # fused, concatenated in the graph
    assert difforge.counters["fused_weights.cached"] == 0


def test_the_option_takes_a_bool_only() -> None:
    with pytest.raises(OptionsError, match="fuse_qkv.cached_weights"):
        difforge.compile(nn.Linear(2, 2), options={"fuse_qkv.cached_weights": "yes"})


@torch.no_grad()
def test_a_pooled_replay_refreshes_a_stale_concatenation_first() -> None:
    """A replay runs no Python: the pool runs the refresh the recorded call noted. The fake
    capturer replays nothing (as a CUDA graph would not run the wrapper), so the refreshed
    buffer itself is what the replay would read."""
    module = SelfAttentionProjections(dim=32).eval()
    compiled = difforge.compile(module, options={**CACHED, "cudagraphs.impl": "pooled"})
    pool = graphs_of(compiled)
    assert isinstance(pool, GraphPool)
    pool.capturer = FakeCapturer(rerun=False)
    x = torch.randn(2, 9, 32)
    compiled(x)  # recorded
    compiled(x)  # replayed
    assert difforge.counters["cudagraphs.replay"] == 1
    assert difforge.counters["fused_weights.refresh"] == 0
    module.to_q.weight.add_(1.0)
    compiled(x)
    assert difforge.counters["cudagraphs.replay"] == 2
    assert difforge.counters["fused_weights.refresh"] == 1
    (entry,) = pool._entries.values()
    (refresh,) = entry.before_replay
    fused = refresh.__self__
    weights = torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight])
    assert any(torch.equal(g.buffer, weights) for g in fused.groups)


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_replays_read_the_refreshed_concatenation() -> None:
    device = torch.device("cuda")
    module = SelfAttentionProjections(dim=640).to(device).half().eval()
    compiled = difforge.compile(module, options=CACHED)
    assert isinstance(graphs_of(compiled), GraphPool)
    x = torch.randn(1, 256, 640, device=device, dtype=torch.half)
    for _ in range(3):  # record, then replays
        assert rel_err(compiled(x).float(), module(x).float()) < 2e-3
    assert difforge.counters["cudagraphs.replay"] == 2
    assert difforge.counters["fused_weights.cached"] == 2
    module.to_v.weight.mul_(-1.0)
    assert rel_err(compiled(x).float(), module(x).float()) < 2e-3
    assert difforge.counters["cudagraphs.replay"] == 3
    assert difforge.counters["fused_weights.refresh"] == 1
