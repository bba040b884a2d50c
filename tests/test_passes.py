"""Each pass: fires where it should (counter > 0, output equal to eager) and not elsewhere."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difforge
from difforge.errors import PassError
from difforge.passes import PostGradPasses, all_passes, enabled_passes, registry

from .helpers import dynamo_graphs, rel_err


def _run(fn, *inputs, options=None):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        ref = fn(*inputs)
        out = difforge.compile(fn, options=options or {"mode": "O2"})(*inputs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs, strict=True):
        assert rel_err(o, r) < 1e-5
    return out


# ----------------------------------------------------------------------------- cleanup
def test_remove_dropout_fires_in_inference() -> None:
    _run(
        lambda x: F.dropout(x, 0.3, training=False) * 2 + F.dropout(x, 0.0, True), torch.randn(4, 8)
    )
    assert difforge.counters["remove_dropout"] == 2


def test_remove_dropout_keeps_training_dropout() -> None:
    fn = difforge.compile(lambda x: F.dropout(x, 0.5, training=True), options={"mode": "O1"})
    out = fn(torch.ones(1000))
    assert difforge.counters["remove_dropout"] == 0
    assert (out == 0).any() and (out == 2).any()  # still drops and rescales


def test_remove_noop_conversions_fires_only_on_noops() -> None:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x.contiguous().to(torch.float32).float() * 2  # three no-ops
        b = x.transpose(0, 1).contiguous()  # real copy: must stay
        c = x.to(torch.float64)  # real conversion: must stay
        return a, b, c

    out = _run(fn, torch.randn(4, 8), options={"mode": "O1"})
    assert difforge.counters["remove_noop_conversions"] == 3
    assert out[1].is_contiguous() and out[2].dtype == torch.float64


def test_remove_noop_conversions_keeps_explicit_copies() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32, copy=True) + 1

    _run(fn, torch.randn(3, 5), options={"mode": "O1"})
    assert difforge.counters["remove_noop_conversions"] == 0


# ---------------------------------------------------------------------------- fuse_qkv
class SelfAttentionProjections(nn.Module):
    def __init__(self, dim: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, 2 * dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, 4, c // 4)
        return q.sum(-1) + self.to_k(x)[..., :4] - self.to_v(x)[..., 4:8]


def test_fuse_qkv_fuses_self_attention_projections() -> None:
    _run(SelfAttentionProjections().eval(), torch.randn(2, 9, 32))
    assert difforge.counters["fuse_qkv"] == 1


@pytest.mark.parametrize(("rows", "fused"), [(4096, 1), (256, 0)])
def test_fuse_qkv_fuses_large_weights_only_where_the_input_outweighs_them(
    rows: int, fused: int
) -> None:
    """640 -> 640 + 640 + 1280 projections (1.6M weight elements): fused over 4096 rows,
    where the two saved input reads (2 x 4096 x 640) beat the concatenation's weight
    traffic (2 x 640 x 2560), not over 256 rows (FLUX-like: weights larger than the input)."""
    module = SelfAttentionProjections(dim=640).eval()
    _run(module, torch.randn(1, rows, 640))
    assert difforge.counters["fuse_qkv"] == fused


@pytest.mark.parametrize(("mode", "fused"), [("O2", 0), ("O2:freezing", 1)])
def test_fuse_qkv_fuses_large_weights_under_freezing(mode: str, fused: int) -> None:
    """The 256-row case above, which the cost rule refuses (the in-graph weight
    concatenation would move more bytes than the fusion saves): under ``freezing`` Dynamo
    hands the weights over as graph attributes (difforge.tracing turns Inductor's freezing
    on while it traces), Inductor folds the concatenation into a constant, and the group
    is fused: no concatenation is left in the code that runs per call."""
    from torch._inductor.utils import run_and_get_code

    module = SelfAttentionProjections(dim=640).eval()
    x = torch.randn(1, 256, 640)
    with torch.no_grad():
        ref = module(x)
        out, code = run_and_get_code(difforge.compile(module, options={"mode": mode}), x)
    assert rel_err(out, ref) < 1e-5
    assert difforge.counters["fuse_qkv"] == fused
    # A per-call concatenation would be a kernel of its own (cpp_fused_cat_0 on the CPU).
    assert not re.findall(r"\b(?:cpp|triton)_\w*cat\w*", "\n".join(code))


def test_fuse_qkv_cross_attention_fuses_only_kv() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k, self.to_v = (
                nn.Linear(16, 16),
                nn.Linear(24, 16),
                nn.Linear(24, 16),
            )

        def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(
                self.to_q(x)[:, None], self.to_k(ctx)[:, None], self.to_v(ctx)[:, None]
            )

    _run(Cross().eval(), torch.randn(2, 5, 16), torch.randn(2, 7, 24))
    assert difforge.counters["fuse_qkv"] == 1  # the k/v pair; q reads another input


def test_fuse_qkv_does_not_fire_on_unshared_or_computed_weights() -> None:
    class NoShare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            z = self.b(y)  # different input: a chain, not parallel
            w = F.linear(x, self.c.weight * 2)  # computed weight: not a graph input
            return z + w

    _run(NoShare().eval(), torch.randn(3, 8))
    assert difforge.counters["fuse_qkv"] == 0


def test_fuse_qkv_off_in_o1_and_by_option() -> None:
    _run(SelfAttentionProjections().eval(), torch.randn(2, 9, 32), options={"mode": "O1"})
    torch._dynamo.reset()
    _run(
        SelfAttentionProjections().eval(),
        torch.randn(2, 9, 32),
        options={"mode": "O2", "passes.fuse_qkv": False},
    )
    assert difforge.counters["fuse_qkv"] == 0


def test_fuse_qkv_makes_slices_contiguous_when_a_view_needs_it() -> None:
    class Flattens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # view(-1) needs a contiguous tensor; a strided slice of the fused GEMM isn't.
            return self.to_q(x).view(-1) + self.to_k(x).view(-1)

    _run(Flattens().eval(), torch.randn(3, 5, 8))
    assert difforge.counters["fuse_qkv"] == 1


def test_fuse_qkv_falls_back_to_contiguous_when_the_check_is_inconclusive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On CUDA with dynamic shapes the fake SDPA kernel choice calls numel() on symbolic
    # sizes (seen on an H200 in the SDXL VAE's attention): the check cannot decide, the
    # pass must fall back to contiguous slices instead of failing the compile.
    from difforge.passes import layout_check

    def inconclusive(gm, new_nodes):  # type: ignore[no-untyped-def]
        return RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides")

    monkeypatch.setattr(layout_check, "retrace", inconclusive)
    _run(SelfAttentionProjections().eval(), torch.randn(2, 5, 32))
    assert difforge.counters["fuse_qkv"] == 1


def test_fuse_qkv_mixed_bias_groups_separately() -> None:
    _run(SelfAttentionProjections(bias=False).eval(), torch.randn(2, 9, 32))
    assert difforge.counters["fuse_qkv"] == 1


# ------------------------------------------------------------------------ gelu_epilogue
# On the CPU ``_addmm_activation``'s GELU is the exact erf form, so the CPU tests use that;
# tests/test_gpu.py checks the tanh form on CUDA.
class Mlp(nn.Module):
    def __init__(self, dim: int = 24, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        self.ff1 = nn.Linear(dim, 4 * dim, bias=bias)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(F.gelu(self.ff1(x), approximate=self.approximate))


def test_gelu_epilogue_folds_gelu_into_the_gemm() -> None:
    _run(Mlp().eval(), torch.randn(2, 7, 24))
    assert difforge.counters["gelu_epilogue"] == 1


def test_gelu_epilogue_keeps_other_forms_and_shared_outputs() -> None:
    _run(Mlp(approximate="tanh").eval(), torch.randn(2, 7, 24))  # not the CPU epilogue's form
    _run(Mlp(bias=False).eval(), torch.randn(2, 7, 24))  # addmm needs the bias

    lin = nn.Linear(16, 32).eval()

    def geglu(x: torch.Tensor) -> torch.Tensor:  # the linear's output is chunked first
        h, gate = lin(x).chunk(2, dim=-1)
        return h * F.gelu(gate)

    def pre_activation_reused(x: torch.Tensor) -> torch.Tensor:
        h = lin(x)
        return F.gelu(h) + h

    _run(geglu, torch.randn(3, 16))
    _run(pre_activation_reused, torch.randn(3, 16))
    assert difforge.counters["gelu_epilogue"] == 0


def test_gelu_epilogue_runs_before_qkv_fusion() -> None:
    # FLUX single block: the MLP projection reads the same input as q/k/v.
    class SingleBlock(nn.Module):
        def __init__(self, dim: int = 32) -> None:
            super().__init__()
            self.qkv = SelfAttentionProjections(dim)
            self.proj_mlp = nn.Linear(dim, 2 * dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.qkv(x).sum(-1) + F.gelu(self.proj_mlp(x)).sum(-1)

    _run(SingleBlock().eval(), torch.randn(2, 5, 32))
    assert difforge.counters["gelu_epilogue"] == 1
    assert difforge.counters["fuse_qkv"] == 1  # q, k, v still fused, without proj_mlp


def test_gelu_epilogue_leaves_graphs_that_need_gradients() -> None:
    model, x = Mlp(), torch.randn(2, 7, 24)
    out = difforge.compile(model, options={"mode": "O2"})(x)
    out.sum().backward()  # _addmm_activation has no derivative: the pass must stay off
    assert difforge.counters["gelu_epilogue"] == 0
    assert model.ff1.weight.grad is not None


def test_gelu_epilogue_off_in_o1() -> None:
    _run(Mlp().eval(), torch.randn(2, 7, 24), options={"mode": "O1"})
    assert difforge.counters["gelu_epilogue"] == 0


# --------------------------------------------------------------------- split_cat_linear
@pytest.fixture
def small_copies_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models' concatenations are below the pass's size floor: lower it."""
    from difforge.passes import split_linear

    monkeypatch.setattr(split_linear, "MIN_COPY_ELEMENTS", 1)


class ParallelBlock(nn.Module):
    """FLUX's single block in miniature: attention and an MLP side by side, one projection
    of both (``proj_out(cat([attn, mlp], -1))``)."""

    def __init__(self, dim: int = 16, mlp: int = 64, out: int | None = None) -> None:
        super().__init__()
        self.to_v = nn.Linear(dim, dim)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.proj_out = nn.Linear(dim + mlp, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = F.scaled_dot_product_attention(x[:, None], x[:, None], self.to_v(x)[:, None])[:, 0]
        mlp = F.gelu(self.proj_mlp(x), approximate="tanh")
        return x.mean(-1, keepdim=True) + 0.5 * self.proj_out(torch.cat([attn, mlp], dim=2))


def test_split_cat_linear_splits_the_projection_of_a_concatenation(small_copies_split) -> None:
    _run(ParallelBlock().eval(), torch.randn(2, 9, 16))
    assert difforge.counters["split_cat_linear"] == 1


def test_split_cat_linear_three_parts_and_no_bias(small_copies_split) -> None:
    proj = nn.Linear(3 * 32, 8, bias=False).eval()
    a, b = nn.Linear(8, 32).eval(), nn.Linear(8, 32).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return proj(torch.cat([a(x), torch.tanh(x).repeat(1, 1, 4), b(x)], dim=-1))

    _run(fn, torch.randn(2, 5, 8))
    assert difforge.counters["split_cat_linear"] == 1


def test_split_cat_linear_leaves_what_it_must_not_split(small_copies_split) -> None:
    proj = nn.Linear(32, 8).eval()

    def cat_read_twice(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joined = torch.cat([x, x * 2], dim=-1)
        return proj(joined), joined.sum(-1)

    def cat_of_mixed_dtypes(x: torch.Tensor) -> torch.Tensor:  # the int part is promoted
        return proj(torch.cat([x, (x > 0).int()], dim=-1))

    def cat_along_tokens(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.cat([x, x], dim=1), proj.weight[:, :16], proj.bias)

    _run(cat_read_twice, torch.randn(2, 5, 16))
    _run(cat_along_tokens, torch.randn(2, 5, 16))
    _run(cat_of_mixed_dtypes, torch.randn(2, 5, 16))
    # K = 80 features into N = 64 outputs: the extra output would move more than the copy.
    _run(ParallelBlock(out=64).eval(), torch.randn(2, 9, 16))
    _run(ParallelBlock().eval(), torch.randn(2, 9, 16), options={"mode": "O1"})
    assert difforge.counters["split_cat_linear"] == 0


def test_split_cat_linear_leaves_small_copies() -> None:
    # 2 x 9 rows of 80 features: far below MIN_COPY_ELEMENTS, one GEMM stays cheaper.
    _run(ParallelBlock().eval(), torch.randn(2, 9, 16))
    assert difforge.counters["split_cat_linear"] == 0


# -------------------------------------------------------------------- gelu_tanh_sigmoid
def test_gelu_tanh_sigmoid_rewrites_tanh_gelus_left_by_the_epilogue() -> None:
    # On the CPU the epilogue computes erf, so a tanh GELU stays a GELU for this pass.
    _run(Mlp(approximate="tanh").eval(), torch.randn(2, 7, 24))
    assert difforge.counters["gelu_epilogue"] == 0
    assert difforge.counters["gelu_tanh_sigmoid"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_tanh_sigmoid_matches_the_tanh_form_in_low_precision(dtype: torch.dtype) -> None:
    x = torch.randn(64, 96) * 4  # deep into both tails
    ref = F.gelu(x.double(), approximate="tanh")
    with torch.no_grad():
        out = difforge.compile(lambda t: F.gelu(t, approximate="tanh"), options={"mode": "O2"})(
            x.to(dtype)
        )
    assert difforge.counters["gelu_tanh_sigmoid"] == 1
    assert out.dtype == dtype
    eager_err = rel_err(F.gelu(x.to(dtype), approximate="tanh"), ref)
    assert rel_err(out, ref) <= 1.01 * eager_err  # one rounding to dtype, like eager


def test_gelu_tanh_sigmoid_leaves_erf_gelus_float64_and_o1() -> None:
    _run(lambda t: F.gelu(t) * 2, torch.randn(4, 8))
    _run(lambda t: F.gelu(t, approximate="tanh"), torch.randn(4, 8, dtype=torch.float64))
    _run(lambda t: F.gelu(t, approximate="tanh"), torch.randn(4, 8), options={"mode": "O1"})
    assert difforge.counters["gelu_tanh_sigmoid"] == 0


# ------------------------------------------------------------------------ infrastructure
def test_every_pass_is_registered_with_a_doc_and_stage() -> None:
    passes = all_passes()
    assert {"remove_dropout", "remove_noop_conversions", "fuse_qkv"} <= set(passes)
    for p in passes.values():
        assert p.doc and p.stage in ("fx", "post_grad_pre", "post_grad_post")
        assert p.source_file.is_file()


def test_post_grad_uuid_tracks_enabled_passes_and_sources() -> None:
    some = enabled_passes("fx", lambda name: name == "remove_dropout")
    on = PostGradPasses("post_grad_pre", some)
    again = PostGradPasses("post_grad_pre", list(some))
    off = PostGradPasses("post_grad_pre", [])
    assert on.uuid() == again.uuid()
    assert on.uuid() != off.uuid()

    class NoCache:
        def __call__(self, graph: torch.fx.Graph) -> None: ...

        def uuid(self) -> None:
            return None

    # A chained user pass that opts out of caching must opt us out too.
    assert PostGradPasses("post_grad_pre", [], chained=NoCache()).uuid() is None


def test_failing_pass_names_itself_and_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(graph: torch.fx.Graph) -> int:
        raise ValueError("boom")

    monkeypatch.setitem(
        registry._REGISTRY,
        "fuse_qkv",
        registry.GraphPass("fuse_qkv", "fx", "optimize", broken, "broken for the test"),
    )
    with pytest.raises(
        Exception, match=r"pass 'fuse_qkv'.*boom.*\"passes.fuse_qkv\": false"
    ) as info:
        difforge.compile(lambda x: x + 1, options={"mode": "O2"})(torch.randn(3))
    assert isinstance(info.value.__cause__ or info.value, (PassError, Exception))
    # The suggested switch works.
    torch._dynamo.reset()
    out = difforge.compile(lambda x: x + 1, options={"mode": "O2", "passes.fuse_qkv": False})(
        torch.zeros(3)
    )
    torch.testing.assert_close(out, torch.ones(3))


def test_dump_env_writes_before_and_after(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFORGE_DUMP_PASSES", "fuse_qkv")
    monkeypatch.setenv("DIFFORGE_DUMP_DIR", str(tmp_path))
    _run(SelfAttentionProjections().eval(), torch.randn(2, 9, 32))
    before = sorted(tmp_path.glob("*_fuse_qkv_before.txt"))
    after = sorted(tmp_path.glob("*_fuse_qkv_after.txt"))
    assert before and after
    assert before[0].read_text().count("torch._C._nn.linear") == 3
    assert after[0].read_text().count("torch._C._nn.linear") == 1
    assert not list(tmp_path.glob("*remove_dropout*"))  # only the pass asked for


def test_post_grad_stage_runs_inside_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def count_addmm(graph: torch.fx.Graph) -> int:
        """Test pass: sees the ATen graph (addmm, not torch-level linear)."""
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        seen.extend(targets)
        return sum("addmm" in t for t in targets)

    test_pass = registry.GraphPass("count_addmm", "post_grad_post", "cleanup", count_addmm, "t")
    monkeypatch.setitem(registry._REGISTRY, "count_addmm", test_pass)
    lin = nn.Linear(8, 8)
    _run(lambda x: lin(x).relu(), torch.randn(4, 8), options={"inductor.fx_graph_cache": False})
    assert any("aten.addmm" in t for t in seen)
    assert difforge.counters["count_addmm"] == 1
    assert difforge.compile_records[-1].rewrites["count_addmm"] == 1
    assert "post_grad_custom_post_pass" in difforge.compile_records[-1].inductor_patches

    def broken(graph: torch.fx.Graph) -> int:
        raise KeyError("aten")

    monkeypatch.setitem(
        registry._REGISTRY,
        "count_addmm",
        registry.GraphPass("count_addmm", "post_grad_post", "cleanup", broken, "t"),
    )
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"pass 'count_addmm' \(post_grad_post stage\)"):
        difforge.compile(lambda x: lin(x) * 3, options={"inductor.fx_graph_cache": False})(
            torch.randn(4, 8)
        )


# -------------------------------------------------------------------- wide attention heads


class WideAttention(nn.Module):
    """One head of ``dim`` channels over the tokens, as the SD VAE's mid-block attention."""

    def __init__(self, dim: int = 320, **sdpa_kwargs: object) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)
        return out.squeeze(1)


def _wide_errors(
    module: nn.Module, x: torch.Tensor, options: dict | None = None, *extra: torch.Tensor
) -> tuple[float, float]:
    """(compiled half-precision error, eager half-precision error) against float32 eager."""
    with torch.no_grad():
        ref = module.float()(x.float(), *extra)
        half = module.to(x.dtype)
        eager = half(x, *extra)
        out = difforge.compile(half, options=options or {"mode": "O2"})(x, *extra)
    return rel_err(out, ref), rel_err(eager, ref)


@pytest.fixture
def wide_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pass targets CUDA (the CPU's flash kernel takes any head dim); the rewrite's math
    # is the same anywhere, so let it fire here.
    from difforge.passes import attention

    monkeypatch.setattr(attention, "WIDE_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_wide_heads_rewrites_and_stays_as_close_as_sdpa(
    wide_on_cpu: None, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    err, eager_err = _wide_errors(WideAttention(320).eval(), torch.randn(2, 50, 320).to(dtype))
    assert difforge.counters["attention_wide_heads"] == 1
    assert err <= 1.5 * eager_err + 1e-3, (err, eager_err)


def test_attention_wide_heads_keeps_an_explicit_scale(wide_on_cpu: None) -> None:
    torch.manual_seed(0)
    module = WideAttention(320, scale=0.2).eval()
    err, eager_err = _wide_errors(module, torch.randn(2, 33, 320, dtype=torch.float16))
    assert difforge.counters["attention_wide_heads"] == 1
    assert err <= 1.5 * eager_err + 1e-3, (err, eager_err)


def test_attention_wide_heads_leaves_narrow_masked_large_and_o1_calls(wide_on_cpu: None) -> None:
    x = torch.randn(2, 40, 256, dtype=torch.float16)
    _wide_errors(WideAttention(256).eval(), x)  # head dim 256: flash/cuDNN take it
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    x = torch.randn(2, 40, 320, dtype=torch.float16)
    _wide_errors(WideAttention(320).eval(), x, None, mask)  # masked
    big = {"mode": "O2", "attention.wide_max_score_bytes": 40 * 40 * 2 - 1}  # per sample
    _wide_errors(WideAttention(320).eval(), x, big)  # scores one byte over the cap
    _wide_errors(WideAttention(320).eval(), x, {"mode": "O1"})  # not the optimize tier
    assert difforge.counters["attention_wide_heads"] == 0
    _wide_errors(WideAttention(320).eval(), x, {**big, "attention.wide_max_score_bytes": 3200})
    assert difforge.counters["attention_wide_heads"] == 1  # exactly at the cap: rewritten


def test_attention_wide_heads_is_cuda_only(wide_on_cpu: None) -> None:
    from difforge.passes import attention

    x = torch.randn(2, 40, 320, dtype=torch.float16)
    attention.WIDE_DEVICES = ("cuda",)  # the default (the fixture restores its own value)
    _wide_errors(WideAttention(320).eval(), x)
    assert difforge.counters["attention_wide_heads"] == 0


def test_attention_wide_heads_with_dynamic_sizes_guards_the_cap(wide_on_cpu: None) -> None:
    """Symbolic sequence length: rewritten while the traced size fits the cap; a size past
    the cap recompiles (a guard, reported) and runs SDPA, both matching eager."""
    torch.manual_seed(0)
    module = WideAttention(320).eval().half()
    cap = 40 * 40 * 2  # 40 tokens, fp16 scores, one sample
    options = {"mode": "O2", "dynamic": True, "attention.wide_max_score_bytes": cap}
    compiled = difforge.compile(module, options=options)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="difforge: recompiling")
        # 33 tokens fit; so does a larger batch (the cap is per sample): the same graph
        for batch, tokens in ((2, 40), (2, 33), (5, 40)):
            x = torch.randn(batch, tokens, 320, dtype=torch.float16)
            assert rel_err(compiled(x), module(x)) < 2e-3
    assert difforge.counters["attention_wide_heads"] == 1
    with torch.no_grad():
        x = torch.randn(2, 48, 320, dtype=torch.float16)  # past the cap
        with pytest.warns(UserWarning, match="difforge: recompiling"):
            out = compiled(x)
        assert rel_err(out, module(x)) < 2e-3
    assert difforge.counters["attention_wide_heads"] == 1  # the recompile left SDPA alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "dim"), [(1000, 512), (4096, 512), (777, 384)])
def test_gpu_attention_wide_heads_matches_sdpa(dtype: torch.dtype, tokens: int, dim: int) -> None:
    torch.manual_seed(0)
    module = WideAttention(dim).cuda().eval()
    x = torch.randn(1, tokens, dim, device="cuda", dtype=dtype)
    err, eager_err = _wide_errors(module, x)
    assert difforge.counters["attention_wide_heads"] == 1
    assert err <= 1.5 * eager_err + 1e-3, (err, eager_err)


# ---------------------------------------------------------------- channels_last GroupNorm


class NormAct(nn.Module):
    """GroupNorm + SiLU, as every resnet of the SD VAE and UNet starts."""

    def __init__(self, channels: int = 16, groups: int = 4, affine: bool = True) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=affine)
        if affine:  # not the identity init, so weight and bias are checked
            nn.init.normal_(self.norm.weight, 1.0, 0.3)
            nn.init.normal_(self.norm.bias, 0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(x))


def _nhwc(*shape: int, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * 3 + offset).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_channels_last_fires_and_matches_eager(affine: bool) -> None:
    torch.manual_seed(0)
    # A large mean per channel: the combination must not lose the between-channel variance.
    _run(NormAct(16, 4, affine).eval(), _nhwc(2, 16, 9, 7, offset=5.0))
    assert difforge.counters["group_norm_channels_last"] == 1


def test_group_norm_channels_last_keeps_the_layout_and_half_precision() -> None:
    torch.manual_seed(0)
    module = NormAct(32, 8).eval()
    x = _nhwc(2, 32, 12, 10)
    with torch.no_grad():
        ref = module(x)
        out = difforge.compile(module.half(), options={"mode": "O2"})(x.half())
    assert difforge.counters["group_norm_channels_last"] == 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < 2e-3


def test_group_norm_channels_last_leaves_nchw_single_channel_groups_and_o1() -> None:
    torch.manual_seed(0)
    _run(NormAct(16, 4).eval(), torch.randn(2, 16, 9, 7))  # NCHW: already contiguous groups
    _run(NormAct(16, 16).eval(), _nhwc(2, 16, 9, 7))  # one channel per group
    _run(NormAct(16, 4).eval(), _nhwc(2, 16, 9, 7), options={"mode": "O1"})
    assert difforge.counters["group_norm_channels_last"] == 0


def _symbolic(shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """A fake tensor whose height and width (and batch) are symbols, as Dynamo traces with
    dynamic shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = torch.empty(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dims = [DimDynamic.DYNAMIC if i != 1 else DimDynamic.STATIC for i in range(4)]
    context = StatelessSymbolicContext(dynamic_sizes=dims)
    return mode.from_tensor(x, symbolic_context=context)


def test_is_nhwc_decides_symbolic_strides() -> None:
    from difforge.passes.norm import is_nhwc

    x = _symbolic((2, 512, 16, 12), channels_last=True)
    assert not isinstance(x.shape[2], int)  # really symbolic
    assert is_nhwc(x)
    assert not is_nhwc(_symbolic((2, 512, 16, 12), channels_last=False))
    assert is_nhwc(_nhwc(2, 16, 9, 7))
    assert not is_nhwc(torch.randn(2, 16, 9, 7))
    assert not is_nhwc(_nhwc(2, 16, 1, 1))  # 1x1: NHWC and NCHW at once
    assert not is_nhwc(_nhwc(2, 1, 9, 7))


def test_group_norm_channels_last_fires_with_dynamic_shapes() -> None:
    """A conv (whose weight fixes the channel count, as in a VAE) then GroupNorm + SiLU,
    with symbolic batch, height and width."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), NormAct(16, 4)).eval()
    options = {"mode": "O2", "dynamic": True, "memory_format": "channels_last"}
    compiled = difforge.compile(module, options=options)
    with torch.no_grad():
        for size in ((9, 7), (12, 5)):
            x = _nhwc(2, 8, *size, offset=5.0)
            assert rel_err(compiled(x), module(x)) < 1e-5
    assert difforge.counters["group_norm_channels_last"] == 1  # one graph, rewritten


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("channels", "size"), [(128, 257), (512, 64), (320, 33)])
def test_gpu_group_norm_channels_last_matches_eager(
    dtype: torch.dtype, channels: int, size: int
) -> None:
    torch.manual_seed(0)
    module = NormAct(channels, 32).cuda().eval()
    x = _nhwc(1, channels, size, size + 3, offset=2.0).cuda()
    with torch.no_grad():
        ref = module(x)
        half = module.to(dtype)
        eager = half(x.to(dtype))
        out = difforge.compile(half, options={"mode": "O2"})(x.to(dtype))
    assert difforge.counters["group_norm_channels_last"] == 1
    assert rel_err(out, ref) <= 1.5 * rel_err(eager, ref) + 1e-3


class NormFlatView(NormAct):
    """GroupNorm + SiLU, then a view that needs NCHW memory (``[B * C, H, W]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return super().forward(x).view(b * c, h, w)


def test_group_norm_channels_last_copies_when_a_later_view_rejects_nhwc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CPU GroupNorm keeps NHWC, so a view that needs NCHW fails in eager here: the retrace
    # is told to reject what CUDA's (NCHW-returning) GroupNorm graph would reject.
    from difforge.passes import layout_check

    def rejects(gm, new_nodes):  # type: ignore[no-untyped-def]
        return ValueError("Cannot view a tensor with shape ... as a tensor with shape ...")

    monkeypatch.setattr(layout_check, "retrace", rejects)
    torch.manual_seed(0)
    module = NormAct(16, 4).eval()
    x = _nhwc(2, 16, 9, 7, offset=5.0)
    with torch.no_grad():
        out = difforge.compile(module, options={"mode": "O2"})(x)
        assert rel_err(out, module(x)) < 1e-5
        # the copy has the layout Dynamo recorded (NHWC here; NCHW on CUDA)
        assert out.stride() == module(x).stride()
    assert difforge.counters["group_norm_channels_last"] == 1
    assert difforge.counters["group_norm_channels_last.contiguous"] == 1


def test_group_norm_channels_last_copies_only_the_output_a_view_rejects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Checked per GroupNorm (a reviewer's finding): the retrace rejects the first one only.
    from difforge.passes import layout_check

    verdicts = iter([ValueError("Cannot view ..."), None, None])
    monkeypatch.setattr(layout_check, "retrace", lambda gm, new_nodes: next(verdicts))
    torch.manual_seed(0)
    _run(nn.Sequential(NormAct(16, 4), NormAct(16, 4)).eval(), _nhwc(2, 16, 9, 7, offset=5.0))
    assert difforge.counters["group_norm_channels_last"] == 2
    assert difforge.counters["group_norm_channels_last.contiguous"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_group_norm_channels_last_then_an_nchw_view() -> None:
    # A reviewer's finding: CUDA's GroupNorm returns NCHW, the rewrite NHWC; `.view(B * C,
    # H, W)` after it failed the compile.
    torch.manual_seed(0)
    module = NormFlatView(64, 8).cuda().half().eval()
    x = _nhwc(2, 64, 16, 12).cuda().half()
    with torch.no_grad():
        ref = module(x)
        out = difforge.compile(module, options={"mode": "O2"})(x)
    assert difforge.counters["group_norm_channels_last"] == 1
    assert difforge.counters["group_norm_channels_last.contiguous"] == 1
    assert rel_err(out, ref) < 2e-3


def test_group_norm_channels_last_without_a_view_keeps_nhwc() -> None:
    torch.manual_seed(0)
    _run(NormAct(16, 4).eval(), _nhwc(2, 16, 9, 7))
    assert difforge.counters["group_norm_channels_last"] == 1
    assert difforge.counters["group_norm_channels_last.contiguous"] == 0


def test_the_ops_passes_insert_exist_once_the_passes_load() -> None:
    # A stored graph (compile cache, cache.precompile) that calls one of them must load in a
    # new process where no pass has run yet: loading the registry registers them all.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from difforge.passes import all_passes\n"
        "all_passes()\n"
        "for name in ('joint_linear', 'joint_scaled_mm', 'attention_int8_prepared'):\n"
        "    getattr(torch.ops.difforge, name).default\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_fill_example_values_runs_functions_and_methods_in_the_inputs_fake_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    def graph_with(modes: tuple[FakeTensorMode, FakeTensorMode]) -> tuple[torch.fx.Graph, list]:
        graph = torch.fx.Graph()
        a, b = graph.placeholder("a"), graph.placeholder("b")
        for node, mode in zip((a, b), modes, strict=True):
            with mode:
                node.meta["example_value"] = torch.empty(2, 6)
        cat = graph.call_function(torch.cat, ([a, b],), {"dim": 1})
        view = graph.call_method("view", (cat, 2, 3, 4))
        return graph, [cat, view]

    mode = FakeTensorMode()
    _, nodes = graph_with((mode, mode))
    assert registry.fill_example_values(nodes)
    assert [tuple(n.meta["example_value"].shape) for n in nodes] == [(2, 12), (2, 3, 4)]
    _, nodes = graph_with((FakeTensorMode(), FakeTensorMode()))  # no single mode: nothing
    assert not registry.fill_example_values(nodes)
    assert all("example_value" not in n.meta for n in nodes)


# --------------------------------------------------------------------------------------
# Graphs that write into tensors in place (passes/mutation.py)
# --------------------------------------------------------------------------------------


class _ClampInPlace(nn.Module):
    """An in-place write whose result is unused, next to a dropout the cleanup removes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.clamp_(min=0.0)
        return self.drop(h)


class _SharedInputMutated(nn.Module):
    """Two linears of one input with an in-place update of it between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.clone()
        y1 = self.a(h)
        h.mul_(2.0)
        return F.gelu(y1) + self.b(h)


def test_in_place_writes_survive_the_fx_cleanup() -> None:
    """Dead-code elimination after a rewrite dropped ``h.clamp_()`` (no users): a reviewer's
    repro, error 1.58 (diffusers' LTX-2 RoPE ``addcmul_`` lost its sine terms likewise)."""
    torch.manual_seed(0)
    model = _ClampInPlace().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        out = difforge.compile(model)(x)
        assert rel_err(out, model(x)) < 1e-5
    assert difforge.counters["remove_dropout"] == 1


def test_graphs_that_mutate_skip_the_rewrites_that_move_computations() -> None:
    """fuse_qkv would compute ``b(h)`` before ``h.mul_``, gelu_epilogue ``a(h)`` after it."""
    torch.manual_seed(0)
    model = _SharedInputMutated().eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = difforge.compile(model, options={"mode": "O2"})(x)
        assert rel_err(out, model(x)) < 1e-5
    assert difforge.counters["fuse_qkv"] == 0 and difforge.counters["gelu_epilogue"] == 0
    assert difforge.counters["fx_pass_skipped_mutation"] > 0


def test_mutates_recognises_in_place_forms() -> None:
    from difforge.passes.mutation import mutates

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = x.add(1)
        x.mul_(2)
        torch.relu_(y)
        b = F.relu(a, inplace=True)
        torch.add(a, 1, out=y)
        c = a.requires_grad_(False)
        return b + c

    graph = torch.fx.symbolic_trace(fn).graph
    flags = {
        str(n.target): mutates(n) for n in graph.nodes if n.op in ("call_method", "call_function")
    }
    assert flags["add"] is False and flags["mul_"] is True and flags["requires_grad_"] is False
    assert [mutates(n) for n in graph.nodes if getattr(n.target, "__name__", "") == "relu_"] == [
        True
    ]
    assert any(mutates(n) for n in graph.nodes if n.kwargs.get("inplace"))
    assert any(mutates(n) for n in graph.nodes if "out" in n.kwargs)


class _LocalWriteThenSharedInput(nn.Module):
    """diffusers' sin-cos position embedding writes ``omega /= n`` into a fresh ``arange``:
    no other node reads it, so the rewrites must still run (they did not, for PixArt)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(64, dtype=x.dtype, device=x.device)
        omega /= 64.0
        h = x + omega
        return self.a(h) + self.b(h)


def test_writes_no_other_node_reads_leave_the_rewrites_on() -> None:
    torch.manual_seed(0)
    model = _LocalWriteThenSharedInput().eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = difforge.compile(model, options={"mode": "O2"})(x)
        assert rel_err(out, model(x)) < 1e-5
    assert difforge.counters["fuse_qkv"] == 1
    assert difforge.counters["fx_pass_skipped_mutation"] == 0


def test_write_is_visible_follows_readers_and_aliases() -> None:
    from difforge.passes.mutation import graph_mutates, write_is_visible

    def fresh(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        h.mul_(2).add_(1)  # h unread elsewhere: nothing can see the first write
        g = x.exp()
        g /= 3  # read through the write's own result only
        return g

    def read_again(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        h.mul_(2)
        return h + x  # read through h: ordered only by the write having happened

    def through_a_view(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        v = h.view(-1)
        v.mul_(2)  # writes h too
        return h + 1

    def an_input(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x.sum()

    # Calls that return the tensor itself or a view, by name unknown to the rule: the fake
    # values' shared storage tells (a reviewer's repros, errors 0.44 at O2)
    def through_ravel(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        r = h.ravel()
        r.mul_(2)
        return h + 1

    def through_einsum(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        r = torch.einsum("ij->ji", h)
        r.mul_(2)
        return h + 1

    def same_dtype_long(x: torch.Tensor) -> torch.Tensor:
        h = x.long()
        r = h.long()  # returns h itself
        r.add_(1)
        return h + 1

    def item_assignment(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        y = h.sum()
        h[:, :2] = 0.0
        return h + y

    def inplace_by_position(x: torch.Tensor) -> torch.Tensor:
        h = x.add(1)
        F.leaky_relu(h, 0.2, True)
        return h + 1

    x = torch.randn(4, 6)
    (graph,) = dynamo_graphs(fresh, x.clone())
    assert not any(write_is_visible(n) for n in graph.nodes)
    assert not graph_mutates(graph)
    cases = (
        read_again, through_a_view, an_input, through_ravel, through_einsum, same_dtype_long,
        item_assignment, inplace_by_position,
    )  # fmt: skip
    for fn in cases:
        graphs = dynamo_graphs(fn, x.clone())
        assert any(graph_mutates(g) for g in graphs), fn.__name__


def test_mutates_reads_inplace_by_position_and_item_assignment() -> None:
    from difforge.passes.mutation import mutates

    def fn(x: torch.Tensor) -> torch.Tensor:
        a = x.add(1)
        F.leaky_relu(a, 0.2, True)
        F.hardtanh(a, -1.0, 1.0, True)
        b = F.leaky_relu(a, 0.2, False)
        a[0] = 1.0
        return a + b

    (graph,) = dynamo_graphs(fn, torch.randn(3, 4))
    calls = [n for n in graph.nodes if n.op == "call_function"]
    flags = [(getattr(n.target, "__name__", str(n.target)), mutates(n)) for n in calls]
    assert flags == [
        ("leaky_relu", True), ("hardtanh", True), ("leaky_relu", False),
        ("setitem", True), ("add", False),
    ], flags  # fmt: skip


class _WriteBetweenLinears(nn.Module):
    """Two linears of one input with a write into it between them, through ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.5
        y1 = self.a(h)
        if self.how == "ravel":
            h.ravel().mul_(2.0)
        elif self.how == "data":
            h.data.mul_(2.0)
        elif self.how == "setitem":
            h[:, :32] = 0.0
        elif self.how == "module_inplace":
            self.act(h)
        return y1 + self.b(h)


@pytest.mark.parametrize("how", ["ravel", "data", "setitem", "module_inplace"])
def test_writes_through_aliases_keep_the_rewrites_off(how: str) -> None:
    torch.manual_seed(0)
    model = _WriteBetweenLinears(how).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        out = difforge.compile(model, options={"mode": "O2"})(x)
        assert rel_err(out, model(x)) < 1e-5
    assert difforge.counters["fuse_qkv"] == 0


def test_dense_format_names_the_layouts_a_copy_can_make() -> None:
    from difforge.passes.layout_check import dense_format

    x = torch.randn(2, 8, 5, 3)
    assert dense_format(x) == torch.contiguous_format
    assert dense_format(x.to(memory_format=torch.channels_last)) == torch.channels_last
    assert dense_format(torch.randn(2, 4, 3, 5, 6).to(memory_format=torch.channels_last_3d)) == (
        torch.channels_last_3d
    )
    assert dense_format(x.transpose(1, 2)) is None
    assert dense_format(x[:, :4]) is None  # a slice: strided, not dense
    assert dense_format(torch.randn(4, 1, 3).expand(4, 1, 3)) == torch.contiguous_format
    assert dense_format(None) is None
    sym = _symbolic((2, 512, 16, 12), channels_last=True)
    assert dense_format(sym) == torch.channels_last
    assert dense_format(_symbolic((2, 512, 16, 12), channels_last=False)) == (
        torch.contiguous_format
    )


def test_graph_mutates_reads_each_fake_storage_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A reviewer's finding: each write compared its storage with every node's (5000 nodes of
    # `h = h.tanh(); h.mul_(2)`: 21 s per check). Now one index per graph.
    from difforge.passes import mutation

    def fn(h: torch.Tensor) -> torch.Tensor:
        for _ in range(100):
            h = torch.tanh(h)
            h = h.mul_(2)
        return h

    (graph,) = dynamo_graphs(fn, torch.randn(8))
    calls = 0
    storage = mutation._storage

    def counted(node: torch.fx.Node) -> object:
        nonlocal calls
        calls += 1
        return storage(node)

    monkeypatch.setattr(mutation, "_storage", counted)
    assert not mutation.graph_mutates(graph)
    assert calls <= 2 * len(graph.nodes)
