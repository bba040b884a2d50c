"""difforge.module_hooks: which hooks count (accelerate's below the root, diffusers' hook
registry), with the real libraries, and a graph pool that runs such a module without
capturing it (a replay would skip the hooks' weight moves)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import difforge
from difforge.graph_pool import HOOKED_CALLS_KEPT, GraphPool
from difforge.module_hooks import hooks_reason, hooks_stamp
from difforge.module_watch import weight_addresses
from tests.helpers import rel_err
from tests.test_graph_pool import FakeCapturer


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_a_plain_module_has_no_such_hooks() -> None:
    assert hooks_reason(_mlp()) is None


def test_accelerate_sequential_offload_counts_and_a_root_hook_does_not() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    accelerate.hooks.add_hook_to_module(model, accelerate.hooks.ModelHook())  # model offload
    assert hooks_reason(model) is None
    offloaded = _mlp()
    accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert hooks_reason(offloaded) == "0 has an accelerate hook (offloading)"


def test_accelerate_hooks_that_only_place_inputs_on_one_device_do_not_count() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()  # as a device_map dispatch onto one device hooks it
    accelerate.hooks.attach_execution_device_hook(model, "cpu")
    assert model[0]._hf_hook is not None
    assert hooks_reason(model) is None
    split = _mlp()
    accelerate.hooks.attach_execution_device_hook(split[0], "cpu")
    accelerate.hooks.attach_execution_device_hook(split[2], "meta")
    assert hooks_reason(split) == "accelerate hooks spread it over cpu, meta"


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_diffusers_group_offloading_counts(offload_type: str) -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model = _mlp()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    hooks.apply_group_offloading(
        model, onload_device=torch.device("cpu"), offload_type=offload_type, **kwargs
    )
    assert "has diffusers hooks (group_offloading)" in (hooks_reason(model) or "")


@torch.no_grad()
def test_a_pool_runs_a_hooked_module_without_capturing_it() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model = _mlp()
    hooks.apply_group_offloading(
        model, onload_device=torch.device("cpu"), offload_type="leaf_level"
    )
    capturer = FakeCapturer()
    pool = GraphPool(
        model, max_graphs=4, capturer=capturer, hooked=functools.partial(hooks_reason, model)
    )
    before = difforge.counters["cudagraphs.eager_call"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(2, 8)
            torch.testing.assert_close(pool(x), model(x))
    assert capturer.captures == 0
    assert difforge.counters["cudagraphs.eager_call"] - before == 3
    messages = [str(w.message) for w in seen if "cudagraphs" in str(w.message)]
    assert len(messages) == 1 and "a graph replay would skip" in messages[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", ["group_streamed", "group_leaf", "sequential"])
def test_gpu_o2_over_an_offloaded_denoiser_matches_eager(offload: str) -> None:
    """Offloading set up before compiling: the weights live on the CPU between calls and
    the hooks bring them over at each call; O2 must neither fuse around the hooks nor
    replay graphs that read where the weights were while recording."""
    pytest.importorskip("diffusers")
    from difforge.diffusers.presets import build_component, get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset("tiny-flux")
    torch.manual_seed(0)
    model = build_component(preset, preset.denoiser, dtype=torch.bfloat16).eval()
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cuda", dtype=torch.bfloat16
    )
    with torch.no_grad():
        expected = call(model.to("cuda"))[0].float()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    if offload == "sequential":
        import accelerate

        accelerate.cpu_offload(model.to(cpu), execution_device=cuda)
    elif offload == "group_streamed":
        model.enable_group_offload(
            onload_device=cuda,
            offload_device=cpu,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
    else:
        model.enable_group_offload(
            onload_device=cuda, offload_device=cpu, offload_type="leaf_level"
        )
    compiled = difforge.compile(model, options="O2")
    before = difforge.counters["cudagraphs.capture"]
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(call(compiled)[0].float(), expected, rtol=0.05, atol=0.05)
    assert difforge.counters["cudagraphs.capture"] == before
    assert not any(isinstance(getattr(m, "to_qkv", None), nn.Linear) for m in model.modules())


def test_hooks_on_a_compiled_wrapper_count_and_its_graphs_stay_reachable() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    from difforge.graph_pool import graphs_of

    model = _mlp()
    compiled = difforge.compile(model, options="O2")
    pool = graphs_of(compiled)
    assert pool is not None and hooks_reason(compiled) is None
    # diffusers offloading a compiled component hooks the wrapper, around the pool
    hooks.HookRegistry.check_if_exists_or_initialize(compiled).register_hook(
        hooks.ModelHook(), "probe"
    )
    assert hooks_reason(compiled) == "Sequential has diffusers hooks (probe)"
    assert graphs_of(compiled) is pool  # through the hook's forward wrapper


def test_an_accelerate_hook_on_either_root_of_a_compiled_module_does_not_count() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    compiled = difforge.compile(model, options="O1")
    accelerate.hooks.add_hook_to_module(model, accelerate.hooks.CpuOffload())
    assert hooks_reason(compiled) is None


@torch.no_grad()
def test_a_pool_captures_once_the_hooks_are_gone() -> None:
    reason: list[str | None] = ["x has diffusers hooks (first_block_cache)"]
    model = _mlp()
    capturer = FakeCapturer()
    pool = GraphPool(model, max_graphs=4, capturer=capturer, hooked=lambda: reason[0])
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="a graph replay would skip"):
        pool(x)
    pool(x)
    assert capturer.captures == 0
    reason[0] = None  # e.g. the cache disabled
    for _ in range(2):
        torch.testing.assert_close(pool(x), model(x))
    assert capturer.captures == 1


class _Doubling:
    """A diffusers hook that doubles its module's output (what a replay must not skip)."""

    @staticmethod
    def make() -> object:
        hooks = pytest.importorskip("diffusers.hooks")

        class Doubling(hooks.ModelHook):
            def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
                return output * 2

        return Doubling()


def _stamped_pool(model: nn.Module, *, weights: bool = True) -> tuple[GraphPool, FakeCapturer]:
    """A pool over ``model`` that asks about hooks as ``difforge.compile``'s does (without
    the weights' addresses if ``weights`` is false)."""
    capturer = FakeCapturer(rerun=False)  # a replay leaves what it recorded, as a graph would
    pool = GraphPool(
        model,
        max_graphs=4,
        capturer=capturer,
        hooked=functools.partial(hooks_reason, model),
        hooks_stamp=functools.partial(hooks_stamp, model),
        weights=functools.partial(weight_addresses, model) if weights else None,
    )
    return pool, capturer


@torch.no_grad()
def _captured(
    *, weights: bool = True
) -> tuple[nn.Sequential, GraphPool, FakeCapturer, torch.Tensor, torch.Tensor]:
    """A stamped pool over an MLP that has captured one call: model, pool, capturer, the
    call's input and its eager output (``weights``: see :func:`_stamped_pool`)."""
    model = _mlp()
    pool, capturer = _stamped_pool(model, weights=weights)
    x = torch.randn(2, 8)
    plain = model(x)
    pool(x)
    return model, pool, capturer, x, plain


@torch.no_grad()
def test_diffusers_hooks_set_up_after_a_capture_run_eagerly_until_they_go() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model, pool, capturer, x, plain = _captured()
    replays = difforge.counters["cudagraphs.replay"]
    torch.testing.assert_close(pool(x), plain)
    assert difforge.counters["cudagraphs.replay"] == replays + 1
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model[2])
    registry.register_hook(_Doubling.make(), "doubling")
    dropped = difforge.counters["cudagraphs.hooks_invalidation"]
    with pytest.warns(UserWarning, match="a graph replay would skip"):
        torch.testing.assert_close(pool(x), plain * 2)  # a stale replay gives `plain`
    torch.testing.assert_close(pool(x), plain * 2)
    assert difforge.counters["cudagraphs.replay"] == replays + 1
    # the weights stayed where the graph read them: it is kept for when the hooks go
    assert difforge.counters["cudagraphs.hooks_invalidation"] == dropped
    assert len(pool) == 1
    registry.remove_hook("doubling")
    torch.testing.assert_close(pool(x), plain)
    assert difforge.counters["cudagraphs.replay"] == replays + 2
    assert capturer.captures == 1


@torch.no_grad()
def test_hooks_set_up_elsewhere_keep_the_graphs() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model, other = _mlp(), _mlp()
    pool, capturer = _stamped_pool(model)
    x = torch.randn(2, 8)
    pool(x)
    hooks.HookRegistry.check_if_exists_or_initialize(other[0]).register_hook(
        _Doubling.make(), "doubling"
    )
    dropped = difforge.counters["cudagraphs.hooks_invalidation"]
    replays = difforge.counters["cudagraphs.replay"]
    torch.testing.assert_close(pool(x), model(x))
    assert difforge.counters["cudagraphs.replay"] == replays + 1
    assert difforge.counters["cudagraphs.hooks_invalidation"] == dropped
    assert capturer.captures == 1 and len(pool) == 1


@torch.no_grad()
def test_accelerate_offloading_set_up_after_a_capture_drops_its_graphs() -> None:
    accelerate = pytest.importorskip("accelerate")
    model, pool, capturer, x, plain = _captured()
    # the offloaded weights live in this map (the module holds meta tensors): zeroed
    # there, the hooks make the output zero, a stale replay would still give `plain`
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"), state_dict=weights)
    for tensor in weights.values():
        tensor.zero_()
    dropped = difforge.counters["cudagraphs.hooks_invalidation"]
    with pytest.warns(UserWarning, match="accelerate hook"):
        torch.testing.assert_close(pool(x), torch.zeros_like(plain))
    assert len(pool) == 1  # kept for a while, in case the hooks go again
    for _ in range(HOOKED_CALLS_KEPT):
        torch.testing.assert_close(pool(x), torch.zeros_like(plain))
    # hooks that stay: the graph's memory goes back
    assert difforge.counters["cudagraphs.hooks_invalidation"] == dropped + 1
    assert len(pool) == 0 and capturer.captures == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hook", ["doubling", "group_leaf"])
def test_gpu_hooks_set_up_after_o2_ran_are_not_replayed_over(hook: str) -> None:
    """What a user does to a compiled pipeline's denoiser between generations (a hook that
    changes an output, offloading turned on): O2's graphs, recorded without the hooks, must
    not replay."""
    diffusers_hooks = pytest.importorskip("diffusers.hooks")
    from difforge.diffusers.presets import build_component, get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset("tiny-flux")
    torch.manual_seed(0)
    model = build_component(preset, preset.denoiser, dtype=torch.bfloat16).eval().to("cuda")
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cuda", dtype=torch.bfloat16
    )
    compiled = difforge.compile(model, options="O2")
    with torch.no_grad():
        plain = call(model)[0].float()
        # bf16 O2 against bf16 eager on random weights: ~4% (H200); hooks must not add to it
        bound = 1.5 * max(rel_err(call(compiled)[0], plain) for _ in range(3))
        assert difforge.graphs_of(compiled) is not None and len(difforge.graphs_of(compiled))
        if hook == "doubling":
            registry = diffusers_hooks.HookRegistry.check_if_exists_or_initialize(model.proj_out)
            registry.register_hook(_Doubling.make(), "doubling")
        else:  # its moves are module conversions too: the module watch may drop them first
            model.enable_group_offload(
                onload_device=torch.device("cuda"),
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
            )
        expected = call(model)[0].float()
        replays = difforge.counters["cudagraphs.replay"]
        for _ in range(2):
            assert rel_err(call(compiled)[0], expected) < bound
        assert difforge.counters["cudagraphs.replay"] == replays


@torch.no_grad()
def test_hooks_that_come_and_go_at_every_other_call_keep_the_graph() -> None:
    """A guider's layer skip: hooks registered before its pass and removed after, each step;
    its passes run eagerly, the others replay the one graph."""
    hooks = pytest.importorskip("diffusers.hooks")
    model = _mlp()
    pool, capturer = _stamped_pool(model)
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model[0])
    x = torch.randn(2, 8)
    plain = model(x)
    eager = difforge.counters["cudagraphs.eager_call"]
    replays = difforge.counters["cudagraphs.replay"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            torch.testing.assert_close(pool(x), plain)
            registry.register_hook(_Doubling.make(), "skip")
            torch.testing.assert_close(pool(x), model(x))
            registry.remove_hook("skip")
    assert capturer.captures == 1
    assert difforge.counters["cudagraphs.replay"] - replays == 2
    assert difforge.counters["cudagraphs.eager_call"] - eager == 3


@torch.no_grad()
def test_hooks_registered_before_diffusers_hooks_were_counted_still_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool made while diffusers' hooks module was not loaded: counting starts later,
    and the registrations made before it must still change the stamp."""
    import sys

    from difforge import module_hooks

    hooks = pytest.importorskip("diffusers.hooks")
    registry_class = hooks.HookRegistry
    for name in ("register_hook", "remove_hook"):  # as before difforge wrapped them
        method = getattr(registry_class, name)
        monkeypatch.setattr(registry_class, name, getattr(method, "__wrapped__", method))
    monkeypatch.setattr(module_hooks, "_counting", False)
    monkeypatch.delitem(sys.modules, "diffusers.hooks.hooks")
    model = _mlp()
    pool, _ = _stamped_pool(model)
    x = torch.randn(2, 8)
    plain = model(x)
    pool(x)
    pool(x)
    monkeypatch.setitem(sys.modules, "diffusers.hooks.hooks", hooks.hooks)
    registry_class.check_if_exists_or_initialize(model[2]).register_hook(
        _Doubling.make(), "doubling"
    )  # uncounted: nothing wraps the registry yet
    with pytest.warns(UserWarning, match="a graph replay would skip"):
        torch.testing.assert_close(pool(x), plain * 2)


def _offloaded_tiny_flux() -> tuple[nn.Module, Any, torch.Tensor]:
    """A tiny FLUX under accelerate's offload (on the CPU), its step call, eager output."""
    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("diffusers")
    from difforge.diffusers.presets import build_component, get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset("tiny-flux")
    torch.manual_seed(0)
    model = build_component(preset, preset.denoiser).eval()
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        expected = call(model)[0]
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model, call, expected


@torch.no_grad()
def test_recompiles_under_offloading_hooks_are_reported_once_together() -> None:
    """accelerate's offload hooks each part of a tiny FLUX: Dynamo breaks the graph at
    every hook and recompiles the frames it resumes in for parts of other shapes (11 here);
    one warning says so instead of one per frame and reason."""
    from difforge.recompiles import recompile_events

    model, call, expected = _offloaded_tiny_flux()
    compiled = difforge.compile(model, options="O1")
    before = len(recompile_events)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(call(compiled)[0], expected, rtol=1e-4, atol=1e-4)
    ours = [str(w.message) for w in seen if str(w.message).startswith("difforge")]
    assert len(recompile_events) - before >= 2  # recompiles happened, and were recorded
    assert len(ours) == 1 and "has an accelerate hook (offloading)" in ours[0]
    assert "Dynamo breaks the graph at each hook" in ours[0]


@torch.no_grad()
def test_strict_recompiles_under_offloading_hooks_name_the_hooks() -> None:
    model, call, _ = _offloaded_tiny_flux()
    options = {"mode": "O1", "recompile.strict": True, "recompile.limit": 1}
    compiled = difforge.compile(model, options=options)
    # Dynamo wraps what a backend raises (BackendCompilerFailed); the message stays
    with pytest.raises(Exception, match="accelerate hook.*recompile.strict off"):
        call(compiled)


def test_a_stamp_keeps_no_removed_root_hook_alive() -> None:
    import gc
    import weakref

    accelerate = pytest.importorskip("accelerate")
    model = _mlp()
    hook = accelerate.hooks.ModelHook()
    accelerate.hooks.add_hook_to_module(model, hook)
    stamp = hooks_stamp(model)
    gone = weakref.ref(hook)
    accelerate.hooks.remove_hook_from_module(model)
    del hook
    gc.collect()
    assert gone() is None
    assert hooks_stamp(model) != stamp


@torch.no_grad()
def test_weights_moved_while_hooks_were_there_drop_the_graphs() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model, pool, capturer, x, _ = _captured()
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model[2])
    registry.register_hook(_Doubling.make(), "doubling")
    with pytest.warns(UserWarning, match="a graph replay would skip"):
        pool(x)
    model[0].weight.data = model[0].weight.data * 2  # new memory, as offloading would
    registry.remove_hook("doubling")
    dropped = difforge.counters["cudagraphs.hooks_invalidation"]
    torch.testing.assert_close(pool(x), model(x))  # a stale replay gives the old output
    assert difforge.counters["cudagraphs.hooks_invalidation"] == dropped + 1
    assert capturer.captures == 2


@torch.no_grad()
def test_without_weight_addresses_graphs_are_not_replayed_after_hooks() -> None:
    hooks = pytest.importorskip("diffusers.hooks")
    model, pool, capturer, x, _ = _captured(weights=False)
    registry = hooks.HookRegistry.check_if_exists_or_initialize(model[2])
    registry.register_hook(_Doubling.make(), "doubling")
    with pytest.warns(UserWarning, match="a graph replay would skip"):
        pool(x)
    registry.remove_hook("doubling")
    pool(x)
    assert capturer.captures == 2
