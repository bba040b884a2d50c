"""The ``rms_norm_rope`` pass: FLUX's per-head RMSNorm + rotary embedding of q and k becomes
one ``difforge::rms_norm_rope`` kernel (Triton's interpreter here, this folder's conftest),
and nothing else does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from tests.helpers import rel_err
from torch import nn

import difforge
from difforge.options import parse_options

ON = {"mode": "O2", "passes.rms_norm_rope": True}
OFF = {"mode": "O2", "passes.rms_norm_rope": False}


def _rope_negative_dims(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1)`` as another codebase may
    write it: negative dims, ``.to(dtype=...)`` casts."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    rotated = x.to(dtype=torch.float32) * cos + x_rotated.to(dtype=torch.float32) * sin
    return rotated.to(dtype=x.dtype)


def _rope_type_as(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation cast back with ``.type_as(x)``, as other codebases write it."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).type_as(x)


class _Attention(nn.Module):
    """FLUX's attention in miniature (diffusers' own ``apply_rotary_emb``): q/k/v
    projections, per-head RMSNorms, text tokens joined before image tokens when
    ``joint``, RoPE on q and k, SDPA. ``variant`` breaks one condition of the rewrite."""

    def __init__(self, dim: int = 64, heads: int = 4, joint: bool = False, variant: str = ""):
        super().__init__()
        self.heads, self.joint, self.variant = heads, joint, variant
        self.qkv = nn.Linear(dim, 3 * dim)
        self.txt_qkv = nn.Linear(dim, 3 * dim)
        d = dim // heads
        self.norm_q, self.norm_k = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.norm_tq, self.norm_tk = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        for norm in (self.norm_q, self.norm_k, self.norm_tq, self.norm_tk):
            nn.init.uniform_(norm.weight, 0.5, 1.5)

    def forward(
        self, x: torch.Tensor, txt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.norm_q(q), self.norm_k(k)
        if self.joint:
            tq, tk, tv = (
                t.unflatten(-1, (self.heads, -1)) for t in self.txt_qkv(txt).chunk(3, dim=-1)
            )
            token_dim = -3 if self.variant == "negative_dims" else 1
            if self.variant == "three_parts":  # a second text stream, normed alike
                q = torch.cat([self.norm_tq(tq), self.norm_tq(tq.flip(1)), q], dim=1)
                k = torch.cat([self.norm_tk(tk), self.norm_tk(tk.flip(1)), k], dim=1)
                v = torch.cat([tv, tv.flip(1), v], dim=1)
            else:
                q = torch.cat([self.norm_tq(tq), q], dim=token_dim)
                k = torch.cat([self.norm_tk(tk), k], dim=token_dim)
                v = torch.cat([tv, v], dim=1)
        unbind_dim = -2 if self.variant == "halves" else -1
        if self.variant == "negative_dims":
            q, k = _rope_negative_dims(q, cos, sin), _rope_negative_dims(k, cos, sin)
        elif self.variant == "three_parts":
            q, k = _rope_type_as(q, cos, sin), _rope_type_as(k, cos, sin)
        else:
            q = apply_rotary_emb(q, (cos, sin), sequence_dim=1, use_real_unbind_dim=unbind_dim)
            k = apply_rotary_emb(k, (cos, sin), sequence_dim=1, use_real_unbind_dim=unbind_dim)
        if self.variant == "read_norm":  # the un-rotated norm read elsewhere: still fine
            v = v + self.norm_q(v)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2)


def _inputs(
    dim: int = 64,
    heads: int = 4,
    tokens: int = 10,
    txt: int = 3,
    joint: bool = False,
    streams: int = 1,
):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, tokens, dim, generator=g), torch.randn(2, txt, dim, generator=g)
    s, d = tokens + (streams * txt if joint else 0), dim // heads
    theta = torch.rand(s, d // 2, generator=g) * 6.3
    return x, t, theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)


def _compare(model: nn.Module, inputs: tuple[torch.Tensor, ...], fires: int) -> None:
    with torch.no_grad():
        eager = model(*inputs)
        base = difforge.compile(model, options=OFF)(*inputs)
        assert difforge.counters["rms_norm_rope"] == 0
        torch._dynamo.reset()
        out = difforge.compile(model, options=ON)(*inputs)
    assert difforge.counters["rms_norm_rope"] == fires
    assert rel_err(out, base) < 1e-5 and rel_err(out, eager) < 1e-5


@pytest.mark.parametrize("joint", [False, True], ids=["single-block", "double-block"])
def test_pass_fires_on_q_and_k(joint: bool) -> None:
    torch.manual_seed(0)
    _compare(_Attention(joint=joint).eval(), _inputs(joint=joint), fires=2)


def test_pass_fires_on_negative_dims_and_keyword_casts() -> None:
    """The same computation written with ``cat(dim=-3)``, ``flatten(-2)`` and
    ``.to(dtype=...)`` (in bfloat16, so the casts are real)."""
    torch.manual_seed(0)
    model = _Attention(joint=True, variant="negative_dims").eval().to(torch.bfloat16)
    inputs = tuple(t.to(torch.bfloat16) for t in _inputs(joint=True))
    with torch.no_grad():
        eager = model(*inputs)
        out = difforge.compile(model, options=ON)(*inputs)
    assert difforge.counters["rms_norm_rope"] == 2
    assert rel_err(out.float(), eager.float()) < 2e-2


def test_pass_fires_on_three_part_cats_and_type_as() -> None:
    """Three normed token streams joined before the rotation, cast back with
    ``.type_as(x)`` (bfloat16, so the casts are real): one kernel each for q and k."""
    torch.manual_seed(0)
    model = _Attention(joint=True, variant="three_parts").eval().to(torch.bfloat16)
    inputs = tuple(t.to(torch.bfloat16) for t in _inputs(joint=True, streams=2))
    with torch.no_grad():
        eager = model(*inputs)
        out = difforge.compile(model, options=ON)(*inputs)
    assert difforge.counters["rms_norm_rope"] == 2
    assert rel_err(out.float(), eager.float()) < 2e-2


@pytest.mark.parametrize(
    ("variant", "heads", "fires"),
    [("halves", 4, 0), ("", 8 // 3 * 3, 0), ("read_norm", 4, 2)],
    ids=["halves-rotation", "head-dim-not-power-of-two", "norm-read-elsewhere"],
)
def test_pass_declines_what_the_kernel_does_not_compute(
    variant: str, heads: int, fires: int
) -> None:
    """The rotation of halves (``use_real_unbind_dim=-2``) and a head dim of 64 / 6 ~ 10 are
    left alone; a norm also read elsewhere still rewrites (the kernel recomputes it)."""
    torch.manual_seed(0)
    dim = 60 if heads == 6 else 64
    _compare(_Attention(dim=dim, heads=heads, variant=variant).eval(), _inputs(dim, heads), fires)


def test_pass_needs_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton cannot run (a CPU without the interpreter, a GPU below cc 8.0) the
    composite stays."""
    import difforge.kernels as kernels

    monkeypatch.setattr(kernels, "triton_runs_on", lambda device, capability=(8, 0): False)
    torch.manual_seed(0)
    _compare(_Attention().eval(), _inputs(), fires=0)


def test_pass_is_on_in_max_optimize_only() -> None:
    """Measured to pay (FLUX.1-dev O2 and O3 steps, H200): on wherever max-optimize is."""
    for mode in ("O2", "O3", "max-optimize"):
        assert parse_options({"mode": mode}).settings["passes.rms_norm_rope"] is True
    for mode in ("O1", "max-autotune:cudagraphs:low-precision"):
        assert parse_options({"mode": mode}).settings["passes.rms_norm_rope"] is False


def test_pass_leaves_training_graphs_alone() -> None:
    """Parameters that require grad, no torch.no_grad: the kernel has no backward, so the
    composite stays and the gradients are eager's."""
    torch.manual_seed(0)
    model = _Attention(joint=True).train()
    inputs = _inputs(joint=True)
    out = difforge.compile(model, options=ON)(*inputs)
    assert difforge.counters["rms_norm_rope"] == 0
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(*inputs).square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[name], p.grad) < 1e-4, name
    with pytest.raises(RuntimeError, match="inference-only"):
        x = torch.randn(1, 3, 2, 8, requires_grad=True)
        cos = torch.ones(3, 8)
        torch.ops.difforge.rms_norm_rope([x], [None], 1e-6, cos, cos).sum().backward()


class _HeadMajorRope(nn.Module):
    """A hand-written interleaved RoPE on ``[B, H, S, D]`` with 2-D ``[S, D]`` angles (they
    broadcast over the tokens at dim 2): not diffusers' ``[B, S, H, D]`` form, even when H
    happens to equal S."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.norm(self.proj(x).view(b, s, self.heads, -1).transpose(1, 2))
        real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        return (y.float() * cos + rotated.float() * sin).to(y.dtype)


def test_pass_declines_two_dimensional_angles() -> None:
    torch.manual_seed(0)
    x, _, cos, sin = _inputs(tokens=4)  # 4 tokens, 4 heads
    _compare(_HeadMajorRope().eval(), (x, cos[:4], sin[:4]), fires=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_pass_in_half_precision(dtype: torch.dtype) -> None:
    """The half-precision form ends in ``.to(dtype)`` (float32 graphs lose it to cleanup):
    that cast is what the kernel replaces. Against the float32 model: within the half
    dtype's own error."""
    torch.manual_seed(0)
    model = _Attention(joint=True).eval()
    x, t, cos, sin = _inputs(joint=True)
    with torch.no_grad():
        exact = model(x, t, cos, sin)
        model = model.to(dtype)
        eager = model(x.to(dtype), t.to(dtype), cos, sin)
        out = difforge.compile(model, options=ON)(x.to(dtype), t.to(dtype), cos, sin)
    assert difforge.counters["rms_norm_rope"] == 2
    # Truncating bf16 casts (the interpreter) double the error; rounding ones keep eager's.
    truncates = dtype == torch.bfloat16 and not torch.cuda.is_available()
    assert rel_err(out, exact) < (2.5 if truncates else 1.1) * rel_err(eager, exact)


def test_pass_on_symbolic_token_counts() -> None:
    """Under ``dynamic: true`` the kernel takes symbolic token and batch counts: one graph
    serves three token counts and two batches, every output equal to eager. (The tiny-FLUX
    size sweeps leave this pass off: tests/diffusers/test_dynamic.py says why.)"""
    model = _Attention(joint=True).eval()
    compiled = difforge.compile(model, options={**ON, "dynamic": True, "recompile.strict": True})
    with torch.no_grad():
        for tokens, batch in ((10, 2), (7, 2), (13, 3)):
            x, t, cos, sin = _inputs(tokens=tokens, joint=True)
            x, t = x[:1].expand(batch, -1, -1).contiguous(), t[:1].expand(batch, -1, -1)
            assert rel_err(compiled(x, t, cos, sin), model(x, t, cos, sin)) < 1e-5
    assert difforge.counters["rms_norm_rope"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_pass_on_tiny_flux() -> None:
    """diffusers' FluxTransformer2DModel (tiny preset, its real block code): every q and k
    of every block, double and single, rewritten; the step unchanged."""
    from difforge.diffusers.presets import get_preset
    from difforge.diffusers.step_inputs import denoiser_step_inputs

    preset = get_preset("tiny-flux")
    model = preset.build_component("transformer").eval()
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cpu", dtype=torch.float32
    )
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    with torch.no_grad():
        eager = call(model)[0]
        out = call(difforge.compile(model, options=ON))[0]
    assert difforge.counters["rms_norm_rope"] == 2 * blocks
    assert rel_err(out, eager) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tiny_flux_o2_runs_the_kernel() -> None:
    """Plain O2 (the pass is on there since it measured faster) on a CUDA GPU in bfloat16:
    every q and k of tiny FLUX goes through the kernel; the step stays within bfloat16's
    error of eager against float32."""
    from difforge.diffusers.presets import get_preset
    from difforge.diffusers.step_inputs import StepCall, denoiser_step_inputs

    preset = get_preset("tiny-flux")
    model = preset.build_component("transformer").eval().cuda()
    call = denoiser_step_inputs(
        preset, batch=1, height=64, width=64, device="cuda", dtype=torch.float32
    )
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    with torch.no_grad():
        exact = call(model)[0]
        model = model.to(torch.bfloat16)
        half = StepCall(*torch.utils._pytree.tree_map_only(
            torch.Tensor,
            lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t,
            (call.args, call.kwargs),
        ))  # fmt: skip
        eager = half(model)[0]
        out = half(difforge.compile(model, options={"mode": "O2"}))[0]
    assert difforge.counters["rms_norm_rope"] == 2 * blocks
    assert rel_err(out.float(), exact) < 1.5 * rel_err(eager.float(), exact) + 1e-3
