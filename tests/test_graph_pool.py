"""difforge.graph_pool: one CUDA graph per input signature, LRU-bounded, one shared pool.

CPU tests drive the pool's bookkeeping with a fake capturer whose "replay" recomputes into
the captured output buffers from the captured input buffers, as a CUDA graph would; the
GPU tests capture real graphs.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import difforge
from difforge import replay_checks
from difforge.errors import DifforgeError, OptionsError
from difforge.frozen import FrozenWeightGuard
from difforge.graph_pool import CudaCapturer, GraphPool, graphs_of, reset_graphs
from difforge.module_watch import ModuleWatch
from difforge.options import parse_options

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class FakeCapturer:
    """Replays by re-running the captured call on its static inputs into static outputs."""

    def __init__(self, fail: bool = False, rerun: bool = True) -> None:
        self.fail = fail
        self.rerun = rerun
        """False: a replay runs no Python at all and leaves the recorded outputs, as a real
        graph replaying constants would."""
        self.captures = 0
        self.devices: list[torch.device] = []

    def accepts(self, tensor: torch.Tensor) -> bool:
        return True

    def capture(
        self, fn: Callable[[], Any], device: torch.device
    ) -> tuple[Callable[[], None], Any]:
        self.devices.append(device)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        outputs = fn()

        def replay() -> None:
            if not self.rerun:
                return
            fresh = fn()
            # A real replay writes the outputs' memory whatever the mode; copy_ into
            # outputs recorded under inference_mode is allowed only inside it.
            with torch.inference_mode():
                _refill(outputs, fresh)

        return replay, outputs


def _refill(outputs: Any, fresh: Any) -> None:
    """Copy a re-run's ``fresh`` outputs into the recorded ``outputs``."""
    if isinstance(outputs, torch.Tensor):
        outputs.copy_(fresh)
    else:
        for old, new in zip(outputs, fresh, strict=True):
            old.copy_(new)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        return x * self.weight + shift


def _pool(max_graphs: int = 8, **kwargs: Any) -> tuple[GraphPool, Scale]:
    module = Scale()
    kwargs.setdefault("capturer", FakeCapturer())
    return GraphPool(module, max_graphs=max_graphs, name="scale", **kwargs), module


@torch.no_grad()
def test_replays_match_the_module_and_read_new_inputs() -> None:
    pool, module = _pool()
    for _ in range(3):
        x = torch.randn(2, 5)
        torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.capture"] == 1
    assert difforge.counters["cudagraphs.replay"] == 2
    assert len(pool) == 1


@torch.no_grad()
def test_outputs_are_copies_that_later_calls_do_not_overwrite() -> None:
    pool, _ = _pool()
    first = pool(torch.ones(4))
    second = pool(torch.full((4,), 2.0))
    third = pool(torch.full((4,), 5.0))
    assert first.tolist() == [3.0] * 4
    assert second.tolist() == [6.0] * 4
    assert third.tolist() == [15.0] * 4


def test_a_shape_captured_in_inference_mode_replays_under_no_grad() -> None:
    """Warm-up under inference_mode, serving under no_grad: the static inputs must not be
    inference tensors, which a no_grad call cannot refill (a reviewer's repro)."""
    pool, module = _pool(capturer=FakeCapturer())
    module.requires_grad_(False)
    x = torch.randn(2, 5)
    with torch.inference_mode():
        pool(x)
    with torch.no_grad():
        y = torch.randn(2, 5)
        torch.testing.assert_close(pool(y), module(y))
    assert difforge.counters["cudagraphs.replay"] == 1


@torch.no_grad()
def test_autocast_is_part_of_the_signature() -> None:
    """A graph recorded without autocast replays its float32 kernels: under autocast the
    call needs its own graph, as Dynamo would recompile."""
    module = nn.Linear(8, 8).requires_grad_(False)
    pool = GraphPool(module, max_graphs=4, capturer=FakeCapturer(rerun=False))
    x = torch.randn(2, 8)
    pool(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x)
        assert out.dtype == module(x).dtype == torch.bfloat16
    assert difforge.counters["cudagraphs.capture"] == 2 and len(pool) == 2


@torch.no_grad()
def test_first_call_outputs_do_not_alias_the_static_inputs() -> None:
    """A forward returning (a view of) its input: the first call's result must not be the
    pool's buffer, which the next replay refills."""

    class Residual(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.view(-1)

    pool = GraphPool(Residual(), max_graphs=4, capturer=FakeCapturer(), grad_sensitive=False)
    first = pool(torch.ones(2, 2))
    second = pool(torch.full((2, 2), 7.0))
    assert first[1].tolist() == [1.0] * 4 and second[1].tolist() == [7.0] * 4
    assert first[0].tolist() == [[2.0, 2.0]] * 2


@torch.no_grad()
def test_a_forward_writing_into_its_arguments_runs_without_graphs() -> None:
    """In-place updates of an argument reach the caller on every call; such a call is
    never captured (a replay would write into the pool's copy only)."""

    class Inplace(nn.Module):
        def forward(self, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
            buf.add_(1)
            return x + 1

    capturer = FakeCapturer()
    pool = GraphPool(Inplace(), max_graphs=4, capturer=capturer, grad_sensitive=False)
    buf = torch.zeros(1)
    with pytest.warns(UserWarning, match="writes into its tensor arguments"):
        pool(torch.ones(1), buf)
    pool(torch.ones(1), buf)
    assert buf.tolist() == [2.0]
    assert capturer.captures == 0 and difforge.counters["cudagraphs.eager_call"] == 1


@torch.no_grad()
def test_captures_run_on_the_inputs_device() -> None:
    capturer = FakeCapturer()
    pool, _ = _pool(capturer=capturer)
    pool(torch.ones(3))
    assert capturer.devices == [torch.device("cpu")]


@torch.no_grad()
def test_each_shape_dtype_and_plain_argument_is_its_own_graph() -> None:
    pool, module = _pool()
    calls = [
        ((torch.randn(2, 4),), {}),
        ((torch.randn(3, 4),), {}),
        ((torch.randn(2, 4, dtype=torch.float64),), {}),
        ((torch.randn(2, 4).t(),), {}),  # same shape as none above, other strides
        ((torch.randn(2, 4),), {"shift": 1.5}),
    ]
    for args, kwargs in calls * 2:
        torch.testing.assert_close(pool(*args, **kwargs), module(*args, **kwargs))
    assert difforge.counters["cudagraphs.capture"] == len(calls)
    assert difforge.counters["cudagraphs.replay"] == len(calls)


@torch.no_grad()
def test_least_recently_used_graph_is_evicted_past_the_cap() -> None:
    pool, module = _pool(max_graphs=2)
    a, b, c = torch.randn(1, 8), torch.randn(2, 8), torch.randn(3, 8)
    for x in (a, b, a, c):  # a is used again after b, so b is the one to go
        torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.evict"] == 1
    assert [sig[1][0] for sig in pool.signatures()] == [(1, 8), (3, 8)]
    pool(b)  # b comes back: captured again, evicting a (now the least recent)
    assert difforge.counters["cudagraphs.capture"] == 4
    assert [sig[1][0] for sig in pool.signatures()] == [(3, 8), (2, 8)]
    assert len(pool) == 2


def test_grad_mode_runs_eagerly_with_one_warning() -> None:
    pool, module = _pool()
    x = torch.randn(3)
    with pytest.warns(UserWarning, match="gradients enabled"):
        out = pool(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool(x)  # warned once only
    out.sum().backward()  # the eager call kept its autograd graph
    assert module.weight.grad is not None
    assert difforge.counters["cudagraphs.capture"] == 0
    assert difforge.counters["cudagraphs.eager_call"] == 2


def test_grad_mode_without_trainable_parameters_is_captured() -> None:
    pool, _ = _pool(grad_sensitive=False)
    pool(torch.randn(3))
    assert difforge.counters["cudagraphs.capture"] == 1


@torch.no_grad()
def test_unhashable_argument_runs_eagerly_with_a_warning() -> None:
    def fn(x: torch.Tensor, extra: Any) -> torch.Tensor:
        return x + len(extra)

    pool = GraphPool(fn, max_graphs=4, capturer=FakeCapturer())
    with pytest.warns(UserWarning, match="not a tensor or plain value"):
        out = pool(torch.zeros(2), extra=object.__new__(_Sized))
    assert out.tolist() == [7.0, 7.0]
    assert difforge.counters["cudagraphs.capture"] == 0


class _Sized:
    def __len__(self) -> int:
        return 7


@torch.no_grad()
def test_failed_capture_warns_once_returns_the_right_result_and_stays_eager() -> None:
    pool, module = _pool(capturer=FakeCapturer(fail=True))
    x = torch.randn(4)
    with pytest.warns(UserWarning, match="capturing scale failed"):
        torch.testing.assert_close(pool(x), module(x))
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.capture_failed"] == 1
    assert difforge.counters["cudagraphs.eager_call"] == 1
    assert len(pool) == 0


@torch.no_grad()
def test_cpu_model_with_the_cuda_capturer_runs_eagerly_and_silently() -> None:
    pool = GraphPool(Scale(), max_graphs=2, capturer=CudaCapturer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pool(torch.ones(2)).tolist() == [3.0, 3.0]
    assert difforge.counters["cudagraphs.eager_call"] == 1


@torch.no_grad()
def test_reset_drops_every_graph() -> None:
    pool, _ = _pool()
    pool(torch.randn(2))
    pool(torch.randn(3))
    pool.reset()
    assert len(pool) == 0
    pool(torch.randn(2))
    assert difforge.counters["cudagraphs.capture"] == 3


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1


def _watched() -> tuple[GraphPool, Two]:
    module = Two()
    pool = GraphPool(module, max_graphs=4, capturer=FakeCapturer(), watch=ModuleWatch(module))
    return pool, module


@torch.no_grad()
def test_replacing_a_parameter_or_submodule_drops_the_graphs() -> None:
    pool, module = _watched()
    x = torch.randn(2)
    pool(x)
    pool(x)
    assert difforge.counters["cudagraphs.capture"] == 1
    module.inner.weight = nn.Parameter(torch.tensor(5.0))  # new memory: old graphs are stale
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.invalidated"] == 1
    assert difforge.counters["cudagraphs.capture"] == 2
    # Each change is followed by a replay, so changes never add up to a volatile module.
    module.inner = Scale()  # a swapped sub-module (a LoRA layer, a fused projection)
    pool(x)
    torch.testing.assert_close(pool(x), module(x))
    module.inner.weight = nn.Parameter(torch.tensor(7.0))  # the new sub-module is watched too
    pool(x)
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.invalidated"] == 3
    assert difforge.counters["cudagraphs.capture"] == 4
    assert difforge.counters["cudagraphs.volatile"] == 0


@torch.no_grad()
def test_dtype_and_device_conversions_drop_the_graphs() -> None:
    # .to() gives every weight new memory with no registration (param.data = converted).
    pool, module = _watched()
    x = torch.randn(2, dtype=torch.float64)
    module.to(torch.float64)  # nothing captured yet: nothing to drop
    pool(x)
    pool(x)
    assert difforge.counters["cudagraphs.invalidated"] == 0
    module.inner.float()  # a sub-module's conversion counts too
    module.inner.double()
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.invalidated"] == 1
    Scale().double()  # another model: no effect
    module.to(torch.float64)  # already float64: the same memory, nothing to drop
    module.inner.to("cpu")
    pool(x)
    assert difforge.counters["cudagraphs.invalidated"] == 1
    assert difforge.counters["cudagraphs.capture"] == 2
    assert difforge.counters["cudagraphs.replay"] == 2


@torch.no_grad()
def test_module_converted_around_every_call_stops_capturing_with_one_warning() -> None:
    # The SDXL pipeline's fp16 VAE with force_upcast: .to(float32) before each decode and
    # .to(float16) after. No graph would ever be replayed on the memory it captured.
    pool, module = _watched()
    x = torch.randn(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            module.double()
            module.float()
            torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.capture"] == 2  # then two wasted invalidations
    assert difforge.counters["cudagraphs.invalidated"] == 2
    assert difforge.counters["cudagraphs.volatile"] == 1
    assert difforge.counters["cudagraphs.eager_call"] == 3
    assert len([w for w in caught if "weights changed" in str(w.message)]) == 1
    pool.reset()  # what difforge.reset_graphs does: capturing resumes
    pool(x)
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.capture"] == 3
    assert difforge.counters["cudagraphs.replay"] == 1


@torch.no_grad()
def test_one_change_between_warm_up_and_serving_keeps_capturing() -> None:
    # A LoRA loaded after the first call: one graph dropped unreplayed, then replays.
    pool, module = _watched()
    x = torch.randn(2)
    pool(x)
    module.inner.weight = nn.Parameter(torch.tensor(5.0))
    for _ in range(3):
        torch.testing.assert_close(pool(x), module(x))
    module.half().float()  # after replays: a fresh start, not a second strike
    for _ in range(3):
        torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.volatile"] == 0
    assert difforge.counters["cudagraphs.capture"] == 3
    assert difforge.counters["cudagraphs.replay"] == 4


@torch.no_grad()
def test_in_place_updates_and_other_modules_keep_the_graphs() -> None:
    pool, module = _watched()
    x = torch.randn(2)
    pool(x)
    module.inner.weight.mul_(2)  # same memory: a replay reads the new value
    Scale().weight = nn.Parameter(torch.tensor(1.0))  # another model entirely
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.invalidated"] == 0
    assert difforge.counters["cudagraphs.capture"] == 1
    assert difforge.counters["cudagraphs.replay"] == 1


class RegistersPerCall(nn.Module):
    """Registers a buffer inside forward: a registration hook that Dynamo traces."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.register_buffer("last", x.detach().sum(), persistent=False)
        return self.linear(x) + self.last


@torch.no_grad()
def test_registration_inside_a_compiled_forward_does_not_recompile() -> None:
    module = RegistersPerCall().eval()
    compiled = difforge.compile(module, options={"mode": "O2"})  # a pool and its watch
    assert isinstance(graphs_of(compiled), GraphPool)
    graphs = []
    for shift in range(5):
        x = torch.randn(2, 4) + shift
        torch.testing.assert_close(compiled(x), module(x))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # One recompile is the model's own ("last" exists after the first call); the watch's
    # generation must not add one per call.
    assert graphs[1:] == [2, 2, 2, 2], graphs


def test_max_graphs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_graphs"):
        GraphPool(Scale(), max_graphs=0)


# ------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "impl"),
    [
        ({"mode": "O3", "dynamic": True}, "pooled"),
        ({"mode": "O3"}, "pooled"),
        ({"mode": "O2"}, "pooled"),
        ({"mode": "O1"}, None),
        ({"mode": "max-optimize"}, None),
        ({"mode": "O2", "cudagraphs.impl": "trees"}, "trees"),
        ({"mode": "O3", "dynamic": True, "cudagraphs.impl": "trees"}, "trees"),
        ({"mode": "O2:cudagraphs", "cudagraphs.impl": "pooled"}, "pooled"),
    ],
)
def test_cudagraph_impl_resolution(options: dict[str, Any], impl: str | None) -> None:
    config = parse_options(options)
    assert config.cudagraph_impl() == impl
    if impl is not None:
        assert config.settings["inductor.triton.cudagraphs"] is True
        assert config.without_inductor_cudagraphs().cudagraph_impl() is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cudagraphs.impl": "tree"}, "did you mean 'trees'"),
        ({"cudagraphs.max_graphs": 0}, "positive integer"),
        ({"cudagraphs.max_graphs": 2.5}, "expects int"),
        ({"shapes.batch": "warm-up"}, "must be one of upward, warmup, unbacked, dynamo"),
    ],
)
def test_bad_cudagraph_and_batch_options_raise_at_parse_time(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(OptionsError, match=message):
        parse_options(options)


@torch.no_grad()
def test_compile_with_dynamic_cudagraphs_routes_calls_through_a_pool() -> None:
    module = Scale()
    compiled = difforge.compile(
        module, options={"mode": "O2:cudagraphs", "dynamic": True, "cudagraphs.max_graphs": 3}
    )
    pool = graphs_of(compiled)
    assert isinstance(pool, GraphPool) and pool.max_graphs == 3
    for n in (2, 5):  # CPU tensors: the compiled code runs, nothing is captured
        x = torch.randn(n)
        torch.testing.assert_close(compiled(x), module(x))
    assert difforge.counters["cudagraphs.capture"] == 0
    assert reset_graphs(compiled) is True
    # Inductor records no graphs of its own under the pool.
    assert difforge.compile_records[-1].inductor_patches["triton.cudagraphs"] is False


@torch.no_grad()
def test_static_o2_compile_routes_calls_through_a_pool() -> None:
    compiled = difforge.compile(Scale(), options={"mode": "O2"})
    assert isinstance(graphs_of(compiled), GraphPool)
    x = torch.randn(4)
    compiled(x)
    assert difforge.compile_records[-1].inductor_patches["triton.cudagraphs"] is False


def test_trees_impl_keeps_inductor_cudagraph_trees() -> None:
    compiled = difforge.compile(Scale(), options={"mode": "O2", "cudagraphs.impl": "trees"})
    assert graphs_of(compiled) is None
    assert reset_graphs(compiled) is False


@torch.no_grad()
def test_a_new_signature_every_call_stops_capturing_with_one_warning() -> None:
    pool, module = _pool(max_graphs=2)
    x = torch.randn(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(10):  # a float argument that changes per call: nothing ever replays
            torch.testing.assert_close(pool(x, shift=float(i)), module(x, shift=float(i)))
    # 2 kept + 2 x max_graphs evicted unreplayed, then no more captures
    assert difforge.counters["cudagraphs.capture"] == 6
    assert difforge.counters["cudagraphs.thrashing"] == 1
    assert difforge.counters["cudagraphs.eager_call"] == 4
    assert sum("without a single replay" in str(w.message) for w in caught) == 1
    # A kept graph replays again, and with it capturing resumes.
    torch.testing.assert_close(pool(x, shift=5.0), module(x, shift=5.0))
    assert difforge.counters["cudagraphs.replay"] == 1
    pool(x, shift=42.0)
    assert difforge.counters["cudagraphs.capture"] == 7


@torch.no_grad()
def test_signatures_that_come_back_never_count_as_thrashing() -> None:
    pool, module = _pool(max_graphs=2)
    sizes = [torch.randn(n) for n in (1, 2, 3, 4, 5)]
    for _ in range(4):  # each size evicted before it comes back, but every call replays once
        for x in sizes:
            torch.testing.assert_close(pool(x), module(x))
            torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.thrashing"] == 0
    assert difforge.counters["cudagraphs.capture"] == 20


# ---------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_pool_replays_real_graphs_and_bounds_memory() -> None:
    device = torch.device("cuda")
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device).half()
    pool = GraphPool(net, max_graphs=2, name="mlp")
    sizes = (128, 512, 2048, 96, 1024)
    for rows in sizes:  # first pass: every size captured, three evicted
        x = torch.randn(rows, 64, device=device, dtype=torch.half)
        torch.testing.assert_close(pool(x), net(x))
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for _ in range(3):  # later passes: captures and evictions go on; memory does not grow
        for rows in sizes:
            x = torch.randn(rows, 64, device=device, dtype=torch.half)
            out = pool(x)
            torch.testing.assert_close(pool(x), out)  # the replay of the same input
            torch.testing.assert_close(out, net(x))
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() <= reserved + (8 << 20)
    assert difforge.counters["cudagraphs.capture"] == 4 * len(sizes)
    assert difforge.counters["cudagraphs.evict"] == 4 * len(sizes) - 2
    assert difforge.counters["cudagraphs.replay"] == 3 * len(sizes)


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_two_modules_share_one_pool_and_keep_their_results() -> None:
    # A pipeline's denoiser and VAE: separate pools of graphs in one memory pool, replayed
    # one after the other; each output must survive the other module's replays.
    device = torch.device("cuda")
    first = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)).to(device).half()
    second = nn.Sequential(nn.Linear(64, 1024), nn.SiLU(), nn.Linear(1024, 32)).to(device).half()
    pools = GraphPool(first, max_graphs=2, name="a"), GraphPool(second, max_graphs=2, name="b")
    for step in range(4):
        x = torch.randn(300 + step % 2, 64, device=device, dtype=torch.half)
        y = pools[0](x)
        z = pools[1](y)
        torch.testing.assert_close(y, first(x))  # after the second module's replay
        torch.testing.assert_close(z, second(y))
    assert difforge.counters["cudagraphs.capture"] == 4
    assert difforge.counters["cudagraphs.replay"] == 4


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_pool_captures_after_every_earlier_graph_is_gone() -> None:
    # The shared memory pool must outlive the graphs in it (a freed pool's id asserts).
    device = torch.device("cuda")
    net = nn.Linear(64, 64).to(device).half()
    x = torch.randn(8, 64, device=device, dtype=torch.half)
    for _ in range(2):
        pool = GraphPool(net, max_graphs=1, name="linear")
        pool(x)
        torch.testing.assert_close(pool(x), net(x))
        del pool
        gc.collect()
    assert difforge.counters["cudagraphs.capture"] == 2
    assert difforge.counters["cudagraphs.capture_failed"] == 0


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_dynamic_model_replays_across_sizes() -> None:
    device = torch.device("cuda")
    net = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64)).to(device).half()
    compiled = difforge.compile(
        net, options={"mode": "O2:cudagraphs", "dynamic": True, "cudagraphs.max_graphs": 3}
    )
    for rows in (96, 200, 96, 333, 200):
        x = torch.randn(rows, 64, device=device, dtype=torch.half)
        torch.testing.assert_close(compiled(x), net(x), rtol=2e-3, atol=2e-3)
    assert difforge.counters["cudagraphs.capture"] == 3
    assert difforge.counters["cudagraphs.replay"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@torch.no_grad()
def test_broadcast_inputs_keep_their_strides_and_replay_new_values() -> None:
    # Diffusers pipelines pass the timestep as t.expand(batch): stride 0, one element.
    seen: list[tuple[int, ...]] = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.stride())
        return x * t[:, None]

    pool = GraphPool(fn, max_graphs=2, capturer=FakeCapturer())
    x = torch.randn(3, 4)
    for value in (1.0, 2.0, 5.0):
        t = torch.tensor(value).expand(3)
        torch.testing.assert_close(pool(x, t), x * value)
    assert set(seen) == {(0,)}  # the graph's inputs had the caller's layout
    assert difforge.counters["cudagraphs.capture"] == 1
    assert difforge.counters["cudagraphs.replay"] == 2


@torch.no_grad()
def test_aliasing_inputs_run_eagerly_with_a_warning() -> None:
    pool, module = _pool()
    base = torch.randn(6)
    overlapping = base.as_strided((4, 3), (1, 1))  # rows share elements
    with pytest.warns(UserWarning, match="alias each other"):
        torch.testing.assert_close(pool(overlapping), module(overlapping))
    assert difforge.counters["cudagraphs.capture"] == 0


class _Box:
    """An output container torch's pytree does not know."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


@torch.no_grad()
def test_outputs_pytree_cannot_copy_run_eagerly_with_a_warning() -> None:
    def fn(x: torch.Tensor) -> _Box:
        return _Box(x * 2)

    pool = GraphPool(fn, max_graphs=2, capturer=FakeCapturer())
    with pytest.warns(UserWarning, match="returns a _Box"):
        first = pool(torch.ones(2))
    second = pool(torch.full((2,), 3.0))
    assert first.value.tolist() == [2.0, 2.0] and second.value.tolist() == [6.0, 6.0]
    assert len(pool) == 0 and difforge.counters["cudagraphs.eager_call"] == 1


@torch.no_grad()
def test_converting_a_module_with_storage_less_weights_still_works() -> None:
    # A sparse buffer has no data pointer; .to() must not fail on it, and a real
    # conversion is still seen through the dtype.
    pool, module = _watched()
    indices = torch.tensor([[0, 1]])
    sparse = torch.sparse_coo_tensor(indices, torch.ones(2), (3,), check_invariants=True)
    module.register_buffer("mask", sparse)
    x = torch.randn(2)
    pool(x)
    pool(x)
    module.to("cpu")  # a no-op
    pool(x)
    assert difforge.counters["cudagraphs.invalidated"] == 0
    module.double()
    x = x.double()
    torch.testing.assert_close(pool(x), module(x))
    assert difforge.counters["cudagraphs.invalidated"] == 1


@torch.no_grad()
def test_replays_check_the_frozen_weights_a_recorded_call_ran() -> None:
    """A replay runs no Python, so the guard inside the compiled call cannot see an in-place
    update: the pool runs the checks it collected while recording."""
    weight = torch.full((4,), 3.0)
    frozen = weight.clone()  # what freezing folded
    guard = FrozenWeightGuard(lambda x: x * frozen, [("attribute", "weight", weight)])
    pool = GraphPool(guard, max_graphs=2, name="frozen", capturer=FakeCapturer(rerun=False))
    x = torch.randn(4)
    pool(x)
    pool(x)  # unchanged weights: the replay runs
    assert difforge.counters["cudagraphs.replay"] == 1
    weight.add_(1.0)
    with pytest.raises(DifforgeError, match="changed in place after this graph was compiled"):
        pool(x)
    assert difforge.counters["cudagraphs.replay"] == 1


@torch.no_grad()
def test_graphs_without_freezing_carry_no_weight_checks() -> None:
    pool, module = _pool()
    x = torch.randn(3)
    pool(x)
    (entry,) = pool._entries.values()
    assert entry.before_replay == ()
    module.weight.add_(1.0)  # shared memory: the replay reads the new value
    torch.testing.assert_close(pool(x), module(x))


def test_checks_noted_in_a_nested_scope_reach_the_enclosing_one() -> None:
    weight = torch.ones(2)
    a = FrozenWeightGuard(lambda: 1, [("attribute", "w", weight)])
    b = FrozenWeightGuard(lambda: 2, [])
    a()  # no scope open: nothing noted, nothing kept
    with replay_checks.collecting() as outer:
        a()
        with replay_checks.collecting() as inner:
            b()
            b()
    assert inner == [b.check]
    assert outer == [a.check, b.check]
    assert (len(a), len(b)) == (1, 0)


@torch.no_grad()
def test_compiled_freezing_with_pooled_graphs_refuses_stale_replays() -> None:
    """difforge.compile's whole path on the CPU, with the fake capturer in place of CUDA."""
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    compiled = difforge.compile(
        module, options={"mode": "freezing:cudagraphs", "cudagraphs.impl": "pooled"}
    )
    pool = graphs_of(compiled)
    assert isinstance(pool, GraphPool)
    pool.capturer = FakeCapturer(rerun=False)
    x = torch.randn(4, 8)
    expected = module(x)
    torch.testing.assert_close(compiled(x), expected)  # recorded
    torch.testing.assert_close(compiled(x), expected)  # replayed
    assert difforge.counters["cudagraphs.replay"] == 1
    (entry,) = pool._entries.values()
    (check,) = entry.before_replay
    assert len(check.__self__) == 4  # the frozen guard of two weights, two biases
    module[2].weight.mul_(2.0)
    with pytest.raises(DifforgeError, match="changed in place after this graph was compiled"):
        compiled(x)


@requires_cuda
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_frozen_pooled_graphs_refuse_an_in_place_update() -> None:
    device = torch.device("cuda")
    module = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    module = module.to(device).half().eval()
    compiled = difforge.compile(module, options={"mode": "O2:freezing"})
    assert isinstance(graphs_of(compiled), GraphPool)
    x = torch.randn(32, 64, device=device, dtype=torch.half)
    expected = module(x)
    for _ in range(3):  # record, then replays
        torch.testing.assert_close(compiled(x), expected, rtol=2e-3, atol=2e-3)
    assert difforge.counters["cudagraphs.replay"] == 2
    module[0].bias.add_(1.0)
    with pytest.raises(DifforgeError, match="changed in place after this graph was compiled"):
        compiled(x)
    reset_graphs(compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(x), module(x), rtol=2e-3, atol=2e-3)
