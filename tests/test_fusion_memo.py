"""difforge.fusion_memo: Inductor's fusion memory check reads reuse keys from a memo."""

from __future__ import annotations

import contextlib
import importlib
import re

import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import difforge
from difforge.fusion_memo import HIT, MISS, memoized_fusion_check
from difforge.models import TinyDiT

from .helpers import dit_inputs, rel_err

wrapper = importlib.import_module("torch._inductor.codegen.wrapper")
scheduler = importlib.import_module("torch._inductor.scheduler")


def _inductor_code(model: torch.nn.Module, inputs: tuple, memo: bool) -> list[str]:
    torch._dynamo.reset()
    patch = memoized_fusion_check() if memo else contextlib.nullcontext()
    with patch, inductor_config.patch(force_disable_caches=True), torch.no_grad():
        compiled = torch.compile(model, backend="inductor", dynamic=True)
        _, code = run_and_get_code(compiled, *inputs)
    # The AOT id counts graphs compiled in this process; everything else must match.
    return [re.sub(r"# AOT ID: .*", "", text) for text in code]


def test_memo_fires_and_leaves_inductor_code_unchanged() -> None:
    # One block: its fusion checks still repeat reuse keys (about 100 hits to 7 misses).
    model, inputs = TinyDiT(depth=1).eval(), dit_inputs()
    plain = _inductor_code(model, inputs, memo=False)
    assert difforge.counters[HIT] == 0  # no memo outside the context
    memoized = _inductor_code(model, inputs, memo=True)
    assert difforge.counters[HIT] > difforge.counters[MISS] > 0
    assert memoized == plain


def test_patch_is_scoped_and_reentrant() -> None:
    key_fn = wrapper.buffer_reuse_key
    check = scheduler.Scheduler.can_fusion_increase_peak_memory
    with memoized_fusion_check() as outer:
        assert outer and wrapper.buffer_reuse_key is not key_fn
        with memoized_fusion_check() as inner:
            assert inner
        assert wrapper.buffer_reuse_key is not key_fn  # still the outer compile's
    assert wrapper.buffer_reuse_key is key_fn
    assert scheduler.Scheduler.can_fusion_increase_peak_memory is check


def test_difforge_compile_uses_the_memo_and_matches_eager() -> None:
    model, inputs = TinyDiT(depth=1).eval(), dit_inputs()
    compiled = difforge.compile(model, options={"mode": "O2", "dynamic": True})
    # no FX-graph cache hit (another test may have compiled this model): Inductor must run
    with inductor_config.patch(force_disable_caches=True), torch.no_grad():
        assert rel_err(compiled(*inputs), model(*inputs)) < 1e-4
    assert difforge.counters[HIT] > 0
