"""The attention_hopper pass: which SDPA calls become difforge's Gluon attention.

The kernel needs a Hopper GPU (wgmma, TMA) and Gluon has no interpreter, so on the CPU the
pass is run on Dynamo's graphs (with their fake values) with the GPU check patched; the
rewritten graphs run only in the gpu test at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import dynamo_graphs

import difforge
from difforge.kernels import attention_hopper_select as sel
from difforge.kernels.attention_select import AttentionPolicy, AttentionShape, using_policy
from difforge.passes.attention import attention_hopper

ALWAYS = AttentionPolicy(select="always")
OP = torch.ops.difforge.attention_hopper.default


def _graph(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.fx.Graph:
    """The one graph Dynamo captures from ``fn`` (with fake values), not compiled."""
    (graph,) = dynamo_graphs(fn, *inputs)
    return graph


def _views(b: int = 2, s: int = 256, h: int = 3, d: int = 72, dtype=torch.float16):  # type: ignore[no-untyped-def]
    """q/k/v as [B, H, S, D] views of one fused projection (what a DiT hands SDPA)."""
    fused = torch.randn(b, s, 3 * h * d, dtype=dtype)
    return tuple(t.view(b, s, h, d).transpose(1, 2) for t in fused.chunk(3, dim=-1))


def _rewrites(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> tuple[int, torch.fx.Graph]:
    graph = _graph(fn, *inputs)
    with using_policy(ALWAYS), torch.no_grad():
        made = attention_hopper(graph)
    return made, graph


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this CPU is a Hopper GPU (the pass's device check only)."""
    monkeypatch.setattr(sel, "available", lambda device: True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2).flatten(2)


def test_pass_rewrites_self_attention_into_the_op(hopper: None) -> None:
    made, graph = _rewrites(_sdpa, *_views())
    assert made == 1
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is OP]
    assert len(calls) == 1
    _q, _k, _v, scale, bm, bn, stages = calls[0].args
    assert scale is None and (bm, bn, stages) == sel.TILES[0]
    out = calls[0].meta["example_value"]  # [B, H, S, D] over [B, S, H, D] storage
    assert out.shape == (2, 3, 256, 72) and out.transpose(1, 2).is_contiguous()
    assert not any(n.target is F.scaled_dot_product_attention for n in graph.nodes)


def test_pass_keeps_an_explicit_scale(hopper: None) -> None:
    made, graph = _rewrites(lambda q, k, v: _sdpa(q, k, v, scale=0.05), *_views())
    assert made == 1
    (call,) = [n for n in graph.nodes if n.target is OP]
    assert call.args[3] == 0.05


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("causal", lambda: (lambda q, k, v: _sdpa(q, k, v, is_causal=True), _views())),
        ("mask", lambda: (
            lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.ones(256, 256, dtype=torch.bool)),
            _views())),
        ("cross-attention", lambda: (_sdpa, (_views()[0], *_views(s=128)[1:]))),
        ("tokens not a multiple of 128", lambda: (_sdpa, _views(s=200))),
        ("head dim 20", lambda: (_sdpa, _views(d=20))),
        ("head dim 256", lambda: (_sdpa, _views(d=256))),
        ("float32", lambda: (_sdpa, _views(dtype=torch.float32))),
        ("negative scale", lambda: (lambda q, k, v: _sdpa(q, k, v, scale=-0.1), _views())),
        ("start 8 bytes into a row", lambda: (
            _sdpa, tuple(torch.randn(2, 256, 224, dtype=torch.float16)[..., 4:220]
                         .view(2, 256, 3, 72).transpose(1, 2) for _ in range(3)))),
        ("broadcast batch", lambda: (
            _sdpa, tuple(torch.randn(1, 3, 256, 72, dtype=torch.float16).expand(2, 3, 256, 72)
                         for _ in range(3)))),
        ("rows TMA cannot read", lambda: (
            _sdpa, tuple(torch.randn(2, 256, 3, 68, dtype=torch.float16)[..., :64].transpose(1, 2)
                         for _ in range(3)))),
    ],
)  # fmt: skip
def test_pass_leaves_what_the_kernel_does_not_take(hopper: None, case: str, make) -> None:  # type: ignore[no-untyped-def]
    fn, inputs = make()
    made, graph = _rewrites(fn, *inputs)
    assert made == 0, case
    assert not any(n.target is OP for n in graph.nodes)


def test_pass_leaves_dynamic_shapes_alone(hopper: None) -> None:
    """With a symbolic token count the block multiples would need a guard: SDPA stays (a
    later resolution that is not a multiple of 128 must not reach the kernel)."""
    q, k, v = _views()
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    made, graph = _rewrites(_sdpa, q, k, v)
    assert made == 0
    assert not any(n.target is OP for n in graph.nodes)


def test_always_picks_a_tile_that_fits_shared_memory(hopper: None) -> None:
    """Head dim 128 leaves out the 4-stage ring (295 KB of shared memory, over Hopper's 227)."""
    from difforge.kernels.attention_hopper import SHARED_MEMORY_LIMIT, shared_memory_bytes

    assert shared_memory_bytes(64, 128, 4, 128, q_tiles=2) > SHARED_MEMORY_LIMIT
    assert sel.fitting_tiles(72) == list(sel.TILES)
    assert sel.fitting_tiles(128) == [(64, 128, 3)]
    made, graph = _rewrites(_sdpa, *_views(d=128))
    assert made == 1
    (call,) = [n for n in graph.nodes if n.target is OP]
    assert tuple(call.args[4:]) == (64, 128, 3)


def test_available_only_on_nvidia_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert sel.available("cuda:0")
    assert not sel.available("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not sel.available("cuda:0")  # Blackwell: no wgmma
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not sel.available("cuda:0")  # ROCm's MI300 reports cc 9.4 on "cuda"


def test_pass_leaves_sdpa_off_hopper() -> None:
    """Without the patch this CPU is no Hopper GPU: nothing is rewritten."""
    made, _ = _rewrites(_sdpa, *_views())
    assert made == 0


def test_supports_and_measured_choice_off_gpu() -> None:
    shape = AttentionShape(2, 16, 4096, 4096, 72, torch.float16, "cpu")
    assert sel.supports(shape)
    assert not sel.supports(AttentionShape(2, 16, 4096, 120, 72, torch.float16, "cpu"))
    assert not sel.supports(AttentionShape(2, 16, 4000, 4000, 72, torch.float16, "cpu"))
    assert sel.choose(shape, AttentionPolicy()) is None  # no Hopper GPU to time on


def test_pass_is_opt_in() -> None:
    """No preset turns it on; the option does."""
    from difforge.options import parse_options

    for mode in ("O2", "O3", "max-optimize"):
        assert not parse_options({"mode": mode}, env={}).pass_enabled("attention_hopper")
    forced = parse_options({"mode": "O2", "passes.attention_hopper": True}, env={})
    assert forced.pass_enabled("attention_hopper")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_compiled_attention_block_matches_eager(dtype: torch.dtype) -> None:
    """A projection + SDPA + output projection compiled with the pass forced on runs the
    Gluon op and matches float32 eager as closely as eager fp16/bf16 does."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon attention needs Hopper")
    torch.manual_seed(0)
    b, s, h, d = 2, 512, 4, 72
    proj = torch.nn.Linear(h * d, 3 * h * d).cuda()
    out_proj = torch.nn.Linear(h * d, h * d).cuda()

    def block(x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in proj(x).chunk(3, dim=-1))
        return out_proj(_sdpa(q, k, v))

    x = torch.randn(b, s, h * d, device="cuda")
    with torch.no_grad():
        ref = block(x)
        proj.to(dtype), out_proj.to(dtype)
        eager = block(x.to(dtype))
        options = {"mode": "O2", "passes.attention_hopper": True, "attention.select": "always"}
        out = difforge.compile(block, options=options)(x.to(dtype))
    assert difforge.counters["attention_hopper"] == 1
    err = float((out.float() - ref).norm() / ref.norm())
    eager_err = float((eager.float() - ref).norm() / ref.norm())
    assert err <= 1.5 * eager_err + 1e-4, (err, eager_err)
