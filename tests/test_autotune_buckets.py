"""Autotune bucketing: keys, the table on disk, the selector hook, options, and compiles
that change M without benchmarking again (CPU packed linear; the GPU GEMM path is `gpu`)."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import difforge
from difforge import autotune_buckets as ab
from difforge.cache import CacheWarning
from difforge.errors import OptionsError
from difforge.options import parse_options

from .helpers import rel_err

# --------------------------------------------------------------- faithful fakes
# The hook reads only these attributes of Inductor's ChoiceCaller, Layout and IR nodes.


@dataclass
class FakeNode:
    size: list[int]
    stride: list[int]
    dtype: torch.dtype = torch.float16

    def get_size(self) -> list[int]:
        return self.size

    def get_stride(self) -> list[int]:
        return self.stride

    def get_dtype(self) -> torch.dtype:
        return self.dtype


@dataclass
class FakeLayout:
    size: list[int]
    stride: list[int]
    dtype: torch.dtype = torch.float16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class FakeChoice:
    name: str
    description: str
    layout: FakeLayout
    input_nodes: list[FakeNode]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return id(self)


def mm_choices(m: int, n: int = 1152, k: int = 4608, index: int = 0) -> list[FakeChoice]:
    """An mm's candidates as Inductor lists them: ATen and two Triton configs."""
    layout = FakeLayout([m, n], [n, 1])
    nodes = [FakeNode([m, k], [k, 1]), FakeNode([k, n], [1, k])]
    configs = ["BLOCK_M=64, BLOCK_N=64, num_warps=4", "BLOCK_M=128, BLOCK_N=64, num_warps=8"]
    return [FakeChoice("mm", "", layout, nodes)] + [
        FakeChoice(f"triton_mm_{index + i}", c, layout, nodes) for i, c in enumerate(configs)
    ]


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_tables", {})


# --------------------------------------------------------------- keys and buckets


def test_nearby_m_shares_the_key_and_n_k_stay_exact() -> None:
    key, m = ab.shape_key(mm_choices(4096))
    assert m == 4096
    assert ab.shape_key(mm_choices(4080))[0] == key
    assert ab.shape_key(mm_choices(3072))[0] == key  # same key; the ratio decides reuse
    assert ab.shape_key(mm_choices(4096, n=1024))[0] != key
    assert ab.shape_key(mm_choices(4096, k=1152))[0] != key
    half = mm_choices(4096)
    half[0].layout.dtype = torch.bfloat16
    assert ab.shape_key(half)[0] != key


def test_ratio_window() -> None:
    assert ab.within(4096, 4080, 1.25) and ab.within(4096, 3300, 1.25)
    assert not ab.within(4096, 3072, 1.25)  # 1.33x: tuned again
    assert ab.within(4096, 3072, 1.5)
    assert ab.within(4096, 4096, 1.0) and not ab.within(4096, 4095, 1.0)


def test_m_colliding_with_n_or_k_keeps_m_exact() -> None:
    square, m = ab.shape_key(mm_choices(1152, n=1152, k=4608))
    assert square.endswith(f'"M={m}"]')
    assert ab.shape_key(mm_choices(1150, n=1152, k=4608))[0] != square
    as_k, _ = ab.shape_key(mm_choices(4608, n=1152, k=4608))
    assert as_k.endswith('"M=4608"]')


def test_not_a_gemm_or_symbolic_is_left_alone() -> None:
    conv = mm_choices(64)
    for c in conv:
        c.layout = FakeLayout([2, 64, 8, 8], [4096, 64, 8, 1])
    assert ab.shape_key(conv) is None
    import sympy

    dynamic = mm_choices(64)
    for c in dynamic:
        c.layout = FakeLayout([sympy.Symbol("s0"), 1152], [1152, 1])
    assert ab.shape_key(dynamic) is None


def test_identity_drops_the_call_index_and_m_in_kwargs() -> None:
    a = FakeChoice("triton_mm_3", "BLOCK_M=64", FakeLayout([8, 8], [8, 1]), [])
    b = FakeChoice("triton_mm_17", "BLOCK_M=64", FakeLayout([8, 8], [8, 1]), [])
    assert ab.identity(a, 4096) == ab.identity(b, 4000)
    packed_a = FakeChoice("_mkl_linear", "", a.layout, [], {"batch_size": 512, "B": None})
    packed_b = FakeChoice("_mkl_linear", "", a.layout, [], {"batch_size": 480, "B": None})
    assert ab.identity(packed_a, 512) == ab.identity(packed_b, 480)


# --------------------------------------------------------------- the hook


def _tune(hook: ab.BucketHook, choices: list[FakeChoice], fastest: int) -> list[FakeChoice]:
    """What Inductor does: preprocess, then (several left) benchmark and feed back."""
    kept = hook.preprocess(choices)
    if len(kept) > 1:
        timings = {c: 1.0 + i for i, c in enumerate(kept)}
        timings[kept[(fastest + 1) % len(kept)]] = float("inf")  # a failed candidate
        timings[kept[fastest]] = 0.5
        hook.feedback(timings, "mm", [], kept, lambda: {}, {})
    return kept


def test_hook_restricts_to_the_winner_of_a_nearby_m() -> None:
    hook = ab.BucketHook(ab.BucketTable(), 1.25)
    first = _tune(hook, mm_choices(4096), fastest=1)
    assert len(first) == 3 and counters["difforge"]["autotune.bucket_recorded"] == 1
    second = _tune(hook, mm_choices(4000, index=10), fastest=0)
    assert [c.name for c in second] == ["triton_mm_10"]  # same config, regenerated for M=4000
    assert counters["difforge"]["autotune.bucket_hit"] == 1
    # 1.33x away: Inductor tunes again, and the new winner is recorded next to the old.
    assert len(_tune(hook, mm_choices(3072, index=20), fastest=0)) == 3
    assert counters["difforge"]["autotune.bucket_miss"] == 2
    assert sorted(next(iter(hook.table.entries.values()))) == [3072, 4096]


def test_hook_falls_back_when_the_winner_cannot_be_rebuilt() -> None:
    hook = ab.BucketHook(ab.BucketTable(), 1.25)
    _tune(hook, mm_choices(4096), fastest=2)  # BLOCK_M=128 wins
    smaller = mm_choices(4000, index=10)[:2]  # that config is not offered for the new M
    assert hook.preprocess(smaller) == smaller
    assert counters["difforge"]["autotune.bucket_fallback"] == 1


def test_hook_never_raises_and_leaves_odd_candidates_alone() -> None:
    hook = ab.BucketHook(ab.BucketTable(), 1.25)
    broken = [FakeChoice("mm", "", None, []), FakeChoice("x", "", None, [])]  # type: ignore[arg-type]
    assert hook.preprocess(broken) == broken
    one = mm_choices(64)[:1]
    assert hook.preprocess(one) == one
    hook.feedback({object(): 1.0}, "convolution", [], [], lambda: {}, {})  # not ours: ignored
    assert not hook.table.entries


def test_bucketing_installs_and_removes_only_its_own_functions() -> None:
    if not ab.available():
        pytest.skip("this torch lacks the selector hooks")
    cache = ab._selector_cache()
    before = (list(cache.preprocessing_fns), list(cache.feedback_saver_fns))
    with ab.bucketing(True) as hook:
        assert hook is not None
        assert hook.preprocess in cache.preprocessing_fns
        assert hook.feedback in cache.feedback_saver_fns
    assert (list(cache.preprocessing_fns), list(cache.feedback_saver_fns)) == before
    with ab.bucketing(False) as off:
        assert off is None


def test_without_the_hooks_bucketing_is_off_with_one_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ab, "_AVAILABLE", False)
    monkeypatch.setattr(ab, "_warned_unavailable", False)
    for _ in range(2):
        with ab.bucketing(True) as hook:
            assert hook is None
    assert sum("autotune.bucket is off" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------- the table on disk


def test_table_persists_under_the_cache_root(tmp_path: Path) -> None:
    with ab.bucketing(True, cache_root=tmp_path) as hook:
        _tune(hook, mm_choices(4096), fastest=1)
    path = tmp_path / "autotune" / "buckets.json"
    data = json.loads(path.read_text())
    assert data["version"] == ab.FORMAT_VERSION and len(data["entries"]) == 1
    fresh = ab.BucketTable(path)  # a new process
    key, _ = ab.shape_key(mm_choices(4000))
    m0, winner = fresh.nearest(key, 4000, 1.25)
    assert m0 == 4096 and winner.choice.startswith("triton_mm|BLOCK_M=64")
    assert not list((tmp_path / "autotune").glob(".buckets.*"))  # no temporaries left


def test_save_merges_what_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "autotune" / "buckets.json"
    mine, theirs = ab.BucketTable(path), ab.BucketTable(path)
    mine.record("a", 10, ab.Winner("x", 1.0))
    theirs.record("b", 20, ab.Winner("y", 2.0))
    theirs.save()
    mine.save()
    assert set(ab.BucketTable(path).entries) == {"a", "b"}


@pytest.mark.parametrize(
    "content", [b"{not json", b"\x00\xff", b'{"version": 99, "entries": {}}', b'{"version": 1}']
)
def test_corrupt_table_warns_once_and_is_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "autotune" / "buckets.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = ab.BucketTable(path)
    assert [w for w in caught if issubclass(w.category, CacheWarning)]
    assert table.entries == {}
    table.record("k", 1, ab.Winner("c", 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the save does not warn again
        table.save()
    assert json.loads(path.read_text())["entries"] == {"k": {"1": {"choice": "c", "ms": 1.0}}}


# --------------------------------------------------------------- options


def test_options() -> None:
    config = parse_options({"mode": "max-autotune"}, env={})
    assert config.settings["autotune.bucket"] is True
    assert config.settings["autotune.bucket_ratio"] == 1.25
    assert ab.settings_for(config, config.inductor_patches()) == (True, 1.25)
    # Without max-autotune there is nothing to bucket.
    plain = parse_options({"mode": "O2"}, env={})
    assert ab.settings_for(plain, plain.inductor_patches())[0] is False
    off = parse_options({"mode": "max-autotune", "autotune.bucket": False}, env={})
    assert ab.settings_for(off, off.inductor_patches())[0] is False
    assert ab.cache_salt(off, off.inductor_patches()) == b""
    two = parse_options({"mode": "max-autotune", "autotune.bucket_ratio": 2}, env={})
    assert ab.settings_for(two, two.inductor_patches()) == (True, 2.0)
    with pytest.raises(OptionsError, match="autotune.bucket_ratio"):
        parse_options({"autotune.bucket_ratio": 0.5}, env={})
    with pytest.raises(OptionsError, match="expects bool"):
        parse_options({"autotune.bucket": "yes"}, env={})
    with pytest.raises(OptionsError, match="did you mean 'autotune.bucket'"):
        parse_options({"autotune.buckets": True}, env={})


# --------------------------------------------------------------- compiled


def _linears(dims: tuple[int, ...]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def test_cpu_second_resolution_reuses_the_winners_without_benchmarking() -> None:
    import torch._inductor.config as inductor_config

    model = _linears((72, 136, 72))
    # Inductor's C++ GEMM template (its CPU autotune candidate) needs the weights packed,
    # which its freezing passes do only when freezing is on in the global config.
    with torch.no_grad(), inductor_config.patch(freezing=True):
        for step, m in enumerate((520, 500)):
            torch._dynamo.reset()
            compiled = difforge.compile(model, options={"mode": "max-autotune:freezing"})
            x = torch.randn(m, 72)
            assert rel_err(compiled(x), model(x)) < 1e-5
            tuned = counters["inductor"]["select_algorithm_autotune"]
            if step == 0:
                if not tuned:
                    pytest.skip("no CPU GEMM autotuning on this build (C++ template)")
                assert counters["difforge"]["autotune.bucket_recorded"] == 2
                first = tuned
    assert tuned == first, "the second resolution benchmarked again"
    assert counters["difforge"]["autotune.bucket_hit"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_second_resolution_reuses_the_winners() -> None:
    import copy

    model = _linears((256, 1024, 256)).cuda()
    fp32 = copy.deepcopy(model)
    model.half()
    with torch.no_grad():
        for step, m in enumerate((4096, 4000)):
            torch._dynamo.reset()
            compiled = difforge.compile(model, options={"mode": "max-autotune"})
            x = torch.randn(m, 256, device="cuda", dtype=torch.half)
            ref = fp32(x.float())
            eager_err = rel_err(model(x), ref)
            assert rel_err(compiled(x), ref) < max(3 * eager_err, 1e-3)
            tuned = counters["inductor"]["select_algorithm_autotune"]
            if step == 0:
                assert tuned >= 1 and counters["difforge"]["autotune.bucket_recorded"] >= 2
                first = tuned
    assert counters["difforge"]["autotune.bucket_hit"] >= 2
    assert tuned == first, "the second resolution benchmarked again"
