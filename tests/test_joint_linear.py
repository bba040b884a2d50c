"""The joint-attention rewrite (``joint_linear``) and its op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difforge
from difforge.passes import joint_linear as joint

from .helpers import rel_err


@pytest.fixture
def small_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models' copies are below the passes' size floor: lower it."""
    monkeypatch.setattr(joint, "MIN_ELEMENTS", 1)


class JointAttention(nn.Module):
    """SD3's joint attention in miniature: image and text tokens projected apart, attended
    together, their outputs projected apart again."""

    def __init__(self, dim: int = 32, heads: int = 2, text_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        text_dim = text_dim or dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            nn.Linear(text_dim, dim) for _ in range(3)
        )
        self.to_out, self.to_add_out = nn.Linear(dim, dim), nn.Linear(dim, text_dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.split_heads
        q = torch.cat([h(self.to_q(x)), h(self.add_q_proj(c))], dim=2)
        k = torch.cat([h(self.to_k(x)), h(self.add_k_proj(c))], dim=2)
        v = torch.cat([h(self.to_v(x)), h(self.add_v_proj(c))], dim=2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        o = o.reshape(x.shape[0], -1, q.shape[1] * q.shape[3])
        return self.to_out(o[:, : x.shape[1]]), self.to_add_out(o[:, x.shape[1] :])


def _compare(fn, *inputs, options=None):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        ref = fn(*inputs)
        out = difforge.compile(fn, options=options or {"mode": "O2"})(*inputs)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-5


# ------------------------------------------------------------------------------- the op
def _joint(xs, ws, bs, streams, columns):  # type: ignore[no-untyped-def]
    return torch.ops.difforge.joint_linear(xs, ws, bs, streams, columns)


@pytest.mark.parametrize("bias", [True, False])
def test_joint_linear_op_equals_the_concatenated_linears(bias: bool) -> None:
    torch.manual_seed(0)
    xs = [torch.randn(3, 7, 16), torch.randn(3, 5, 12)]
    ws = [torch.randn(24, 16), torch.randn(24, 12)]
    bs = [torch.randn(24), torch.randn(24)] if bias else [None, None]
    out = _joint(xs, ws, bs, [0, 1], [0, 0])
    ref = torch.cat([F.linear(x, w, b) for x, w, b in zip(xs, ws, bs, strict=True)], dim=1)
    assert out.shape == (3, 12, 24)
    assert rel_err(out, ref) < 1e-6


def test_joint_linear_op_mixes_a_fused_stream_and_one_linear_per_part() -> None:
    # SD3 at 1024px: the image tokens' q/k/v are one fused GEMM, the text tokens' three.
    torch.manual_seed(0)
    x, c = torch.randn(2, 9, 16), torch.randn(2, 4, 16)
    w_img, b_img = torch.randn(3 * 8, 16), torch.randn(3 * 8)
    w_txt, b_txt = torch.randn(3, 8, 16), torch.randn(3, 8)
    out = _joint(
        [x, c, c, c],
        [w_img, w_txt[1], w_txt[0], w_txt[2]],  # any order: columns say where each goes
        [b_img, b_txt[1], None, b_txt[2]],
        [0, 1, 1, 1],
        [0, 8, 0, 16],
    )
    txt = torch.cat([F.linear(c, w_txt[0]), F.linear(c, w_txt[1], b_txt[1])], dim=-1)
    txt = torch.cat([txt, F.linear(c, w_txt[2], b_txt[2])], dim=-1)
    assert rel_err(out, torch.cat([F.linear(x, w_img, b_img), txt], dim=1)) < 1e-6


def test_joint_linear_op_rejects_streams_that_do_not_fit() -> None:
    x, w = torch.randn(2, 4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="do not fit"):  # another batch
        _joint([x, torch.randn(3, 4, 8)], [w, w], [None, None], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="do not tile"):  # another output width
        _joint([x, x], [w, torch.randn(5, 8)], [None, None], [0, 1], [0, 0])
    with pytest.raises(ValueError, match="do not tile"):  # a gap: columns 6..8 unwritten
        _joint([x, x, x], [w, w, torch.randn(12, 8)], [None] * 3, [0, 0, 1], [0, 8, 0])
    with pytest.raises(ValueError, match="do not tile"):  # an overlap
        _joint([x, x, x], [w, w, torch.randn(12, 8)], [None] * 3, [0, 0, 1], [0, 4, 0])
    with pytest.raises(ValueError, match="differ in tokens"):
        _joint([x, x[:, :3]], [w, w], [None, None], [0, 0], [0, 6])
    with pytest.raises(ValueError, match="numbered"):
        _joint([x, x], [w, w], [None, None], [0, 2], [0, 0])
    with pytest.raises(ValueError, match="one dtype"):
        _joint([x, x.double()], [w, w], [None, None], [0, 1], [0, 0])
    with pytest.raises(ValueError, match=r"\[batch, tokens, features\]"):
        _joint([x[0]], [w], [None], [0], [0])


# ----------------------------------------------------------------------------- the passes
def test_joint_attention_projections_write_one_buffer(small_copies: None) -> None:
    # fuse_qkv makes one GEMM per stream first, so one joint buffer serves q, k and v.
    _compare(JointAttention().eval(), torch.randn(2, 10, 32), torch.randn(2, 6, 32))
    assert difforge.counters["fuse_qkv"] == 2
    assert difforge.counters["joint_linear"] == 1
    # cuDNN reads q, k, v as strided views: no copy
    assert difforge.counters["joint_linear.contiguous"] == 0


class JointAttentionFlatHeads(JointAttention):
    """Joint attention that views the concatenated q/k/v as ``[B * heads, S, D]`` for
    ``bmm`` (a view that needs the contiguous tensor ``cat`` returned)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, b = self.split_heads, x.shape[0]
        q = torch.cat([h(self.to_q(x)), h(self.add_q_proj(c))], dim=2)
        k = torch.cat([h(self.to_k(x)), h(self.add_k_proj(c))], dim=2)
        v = torch.cat([h(self.to_v(x)), h(self.add_v_proj(c))], dim=2)
        tokens, d = q.shape[2], q.shape[3]
        q, k, v = (t.view(b * self.heads, tokens, d) for t in (q, k, v))
        o = torch.softmax(q @ k.transpose(1, 2) * d**-0.5, dim=-1) @ v
        o = o.view(b, self.heads, tokens, d).transpose(1, 2).reshape(b, tokens, -1)
        return self.to_out(o[:, : x.shape[1]]), self.to_add_out(o[:, x.shape[1] :])


def test_joint_linear_copies_what_a_later_view_needs_contiguous(small_copies: None) -> None:
    # A reviewer's repro: the joint buffer's slices failed `.view(B * H, S, D)` in the
    # compile ("Cannot view a tensor with shape [2, 2, 13, 16] and strides (1248, 16, 96, 1)").
    _compare(JointAttentionFlatHeads().eval(), torch.randn(2, 9, 32), torch.randn(2, 4, 32))
    assert difforge.counters["joint_linear"] == 1
    assert difforge.counters["joint_linear.contiguous"] == 3  # q, k and v


class JointAttentionChannelsLastCat(JointAttention):
    """Heads moved as ``[B, D, S, H]``: cat of those is channels_last in eager, and the view
    after it holds only in that layout."""

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.split_heads
        q = torch.cat([h(self.to_q(x)), h(self.add_q_proj(c))], dim=2)
        k = torch.cat([h(self.to_k(x)), h(self.add_k_proj(c))], dim=2)
        v = torch.cat([h(self.to_v(x)), h(self.add_v_proj(c))], dim=2)
        return tuple(t.permute(0, 2, 3, 1).view(x.shape[0], -1) for t in (q, k, v))


def test_joint_linear_copies_in_the_layout_the_cat_had(small_copies: None) -> None:
    # A reviewer's repro: a contiguous copy of a channels_last cat failed the later view.
    _compare(JointAttentionChannelsLastCat().eval(), torch.randn(2, 9, 32), torch.randn(2, 4, 32))
    assert difforge.counters["joint_linear"] == 1
    assert difforge.counters["joint_linear.contiguous"] == 3


class TwoAttentions(nn.Module):
    """One joint attention for cuDNN (strided q/k/v are fine), one that views them flat."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa, self.flat = JointAttention(), JointAttentionFlatHeads()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = self.sdpa(x, c)
        return (*self.flat(a, b), a)


def test_joint_linear_copies_only_for_the_attention_that_needs_it(small_copies: None) -> None:
    _compare(TwoAttentions().eval(), torch.randn(2, 9, 32), torch.randn(2, 4, 32))
    assert difforge.counters["joint_linear"] == 2
    assert difforge.counters["joint_linear.contiguous"] == 3


class JointAttentionLateText(JointAttention):
    """The text k/v read a tensor computed after q's concatenation."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.split_heads
        q = torch.cat([h(self.to_q(x)), h(self.add_q_proj(c))], dim=2)
        c2 = F.silu(c)
        k = torch.cat([h(self.to_k(x)), h(self.add_k_proj(c2))], dim=2)
        v = torch.cat([h(self.to_v(x)), h(self.add_v_proj(c2 * 0.5))], dim=2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        o = o.reshape(x.shape[0], -1, q.shape[1] * q.shape[3])
        return self.to_out(o[:, : x.shape[1]]), self.to_add_out(o[:, x.shape[1] :])


def test_joint_linear_leaves_a_group_whose_inputs_come_later(small_copies: None) -> None:
    # A reviewer's repro: the joint op, placed at q's cat, read c2 before it was computed.
    _compare(JointAttentionLateText().eval(), torch.randn(2, 9, 32), torch.randn(2, 4, 32))
    assert difforge.counters["joint_linear"] == 0


def test_joint_linear_with_only_the_image_stream_fused(
    small_copies: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fuse_qkv's cost rule as at SD3's 1024px (the image tokens' q/k/v fuse, the few text
    # tokens' do not): one buffer still, the text stream's three GEMMs side by side in it.
    from difforge.passes import fuse_linear

    monkeypatch.setattr(fuse_linear, "SMALL_GROUP_ELEMENTS", 1)
    _compare(JointAttention().eval(), torch.randn(2, 64, 32), torch.randn(2, 6, 32))
    assert difforge.counters["fuse_qkv"] == 1
    assert difforge.counters["joint_linear"] == 1


def test_joint_linear_without_qkv_fusion_makes_one_buffer_per_projection(
    small_copies: None,
) -> None:
    options = {"mode": "O2", "passes.fuse_qkv": False}
    _compare(
        JointAttention(text_dim=24).eval(),
        torch.randn(2, 10, 32),
        torch.randn(2, 6, 24),
        options=options,
    )
    assert difforge.counters["joint_linear"] == 3


def _matches_eager_at_two_sizes(model: nn.Module) -> None:
    """``model`` compiled O2 with dynamic shapes against eager at batch 2 and 3 (other
    image and text token counts too)."""
    compiled = difforge.compile(model, options={"mode": "O2", "dynamic": True})
    with torch.no_grad():
        for batch, tokens, text in ((2, 10, 6), (3, 14, 5)):
            x, c = torch.randn(batch, tokens, 32), torch.randn(batch, text, 32)
            for o, r in zip(compiled(x, c), model(x, c), strict=True):
                assert rel_err(o, r) < 1e-5


def test_joint_linear_with_dynamic_sizes(small_copies: None) -> None:
    _matches_eager_at_two_sizes(JointAttention().eval())
    assert difforge.counters["joint_linear"] == 1


class NotJoint(nn.Module):
    """Concatenations the rewrite must leave: along features, of a projection that is also
    read elsewhere, of streams viewed by other ops (the same values here, but it compares
    ops, not what they do), and of a non-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.c, self.d = nn.Linear(16, 16), nn.Linear(16, 16)
        self.e, self.f = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = torch.cat([self.a(x), self.b(x)], dim=-1)
        c = self.c(x)
        shared = torch.cat([c, self.d(y)], dim=1)
        views = torch.cat(
            [
                self.e(x).view(2, -1, 2, 8).transpose(1, 2),
                self.f(y).view(2, -1, 2, 8).permute(0, 2, 1, 3),
            ],
            dim=2,
        )
        computed = torch.cat([torch.tanh(x), self.a(y)], dim=1)
        return features, shared, c.sum(-1), views, computed


def test_joint_linear_leaves_what_it_must_not_rewrite(small_copies: None) -> None:
    _compare(NotJoint().eval(), torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    assert difforge.counters["joint_linear"] == 0


class JointWithSidePart(JointAttention):
    """The image stream's projection also feeds an MLP (one fused GEMM of q, k, v and the MLP
    input, FLUX single-block style): a part no concatenation takes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_mlp = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_c = super().forward(x, c)
        # no GELU: gelu_epilogue would take the MLP linear before fuse_qkv sees it
        return out + torch.tanh(self.proj_mlp(x)), out_c


def test_joint_linear_leaves_a_fused_projection_with_a_part_elsewhere(small_copies: None) -> None:
    _compare(JointWithSidePart().eval(), torch.randn(2, 10, 32), torch.randn(2, 6, 32))
    assert difforge.counters["fuse_qkv"] == 2  # image: q, k, v and the MLP input in one GEMM
    assert difforge.counters["joint_linear"] == 0


def test_joint_linear_leaves_small_copies_o1_and_gradients() -> None:
    x, c = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    _compare(JointAttention().eval(), x, c)  # far below MIN_ELEMENTS
    assert difforge.counters["joint_linear"] == 0


def test_joint_linear_off_in_o1_and_in_training(small_copies: None) -> None:
    x, c = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    _compare(JointAttention().eval(), x, c, options={"mode": "O1"})
    model = JointAttention()
    out = difforge.compile(model, options={"mode": "O2"})(x, c)
    out[0].sum().backward()  # the op has no derivative: graphs that need one keep the cats
    assert model.to_q.weight.grad is not None
    assert difforge.counters["joint_linear"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "text"), [(2, 1024, 77), (3, 333, 19), (1, 4096, 154)])
def test_gpu_joint_linear_op_matches_the_concatenated_linears(
    dtype: torch.dtype, batch: int, tokens: int, text: int
) -> None:
    torch.manual_seed(0)
    dev = "cuda"
    xs = [
        torch.randn(batch, tokens, 192, device=dev, dtype=dtype),
        torch.randn(batch, text, 136, device=dev, dtype=dtype),
    ]
    ws = [
        torch.randn(360, 192, device=dev, dtype=dtype) / 14,
        torch.randn(360, 136, device=dev, dtype=dtype) / 12,
    ]
    bs = [torch.randn(360, device=dev, dtype=dtype), None]
    out = _joint(xs, ws, bs, [0, 1], [0, 0])
    ref = torch.cat(
        [
            F.linear(x.float(), w.float(), None if b is None else b.float())
            for x, w, b in zip(xs, ws, bs, strict=True)
        ],
        dim=1,
    )
    # the text stream as three GEMMs side by side (column slices of the buffer)
    parts = [ws[1][:120], ws[1][120:240], ws[1][240:]]
    b_txt = torch.randn(360, device=dev, dtype=dtype)
    split = _joint(
        [xs[0], *[xs[1]] * 3],
        [ws[0], *parts],
        [bs[0], *b_txt.split(120)],
        [0, 1, 1, 1],
        [0, 0, 120, 240],
    )
    ref_split = ref.clone()
    ref_split[:, tokens:] += b_txt.float()
    assert rel_err(split.float(), ref_split) < (4e-3 if dtype == torch.float16 else 2e-2)
    assert rel_err(out.float(), ref) < (4e-3 if dtype == torch.float16 else 2e-2)


# --------------------------------------------------------------------- fp8 linears (O3)
def _fp8_attention(text_dim: int | None = None) -> JointAttention:
    """JointAttention with every projection an ``Fp8Linear`` that traces ``_scaled_mm``
    (the 2.13 CPU build has the row-wise kernel; on CUDA it needs compute capability 8.9)."""
    from difforge.quant.fp8 import Fp8Linear

    model = JointAttention(text_dim=text_dim).eval()
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        fp8 = Fp8Linear.from_linear(getattr(model, name))
        fp8.use_scaled_mm, fp8.direct_out_dtypes = True, (torch.float32,)
        setattr(model, name, fp8)
    return model


def test_joint_scaled_mm_op_equals_the_concatenated_fp8_gemms() -> None:
    from difforge.quant.fp8 import quantize_rows, quantize_weight

    torch.manual_seed(0)
    x, c = torch.randn(2 * 7, 16), torch.randn(2 * 5, 12)
    (xq, sx), (cq, sc) = quantize_rows(x), quantize_rows(c)
    w_img, w_txt = quantize_weight(torch.randn(24, 16)), quantize_weight(torch.randn(24, 12))
    w_parts = [quantize_weight(torch.randn(8, 12)) for _ in range(3)]
    b = torch.randn(24)

    def mm(a, sa, w, b=None):  # type: ignore[no-untyped-def]
        return torch._scaled_mm(
            a, w[0].t(), scale_a=sa[:, None], scale_b=w[1][None], bias=b, out_dtype=torch.float32
        )

    def joint_mm(xs, scales, ws, bs, streams, columns):  # type: ignore[no-untyped-def]
        return torch.ops.difforge.joint_scaled_mm(
            xs, [s[:, None] for s in scales], [w[0].t() for w in ws], [w[1][None] for w in ws],
            bs, streams, columns, 2, torch.float32,
        )  # fmt: skip

    out = joint_mm([xq, cq], [sx, sc], [w_img, w_txt], [b, None], [0, 1], [0, 0])
    ref = torch.cat([mm(xq, sx, w_img, b).view(2, 7, 24), mm(cq, sc, w_txt).view(2, 5, 24)], 1)
    assert out.shape == (2, 12, 24)
    assert rel_err(out, ref) < 1e-6
    # a stream of one GEMM per part (copied into its columns), in any order
    out = joint_mm([xq] + [cq] * 3, [sx] + [sc] * 3, [w_img, *w_parts[::-1]], [None] * 4,
                [0, 1, 1, 1], [0, 16, 8, 0])  # fmt: skip
    txt = torch.cat([mm(cq, sc, w) for w in w_parts], dim=-1).view(2, 5, 24)
    assert rel_err(out, torch.cat([mm(xq, sx, w_img).view(2, 7, 24), txt], 1)) < 1e-6
    # 8 text tokens: each sample's float32 scales start 16-byte aligned, so the GEMM writes
    # the buffer's rows directly (7 tokens above: one GEMM for the stream, copied in)
    (c8, s8), w8 = quantize_rows(torch.randn(2 * 8, 12)), quantize_weight(torch.randn(24, 12))
    assert joint._scales_aligned(s8[:, None], 8, 2)
    assert not joint._scales_aligned(sc[:, None], 5, 2)
    out = joint_mm([xq, c8], [sx, s8], [w_img, w8], [b, b], [0, 1], [0, 0])
    ref = torch.cat([mm(xq, sx, w_img, b).view(2, 7, 24), mm(c8, s8, w8, b).view(2, 8, 24)], 1)
    assert rel_err(out, ref) < 1e-6
    with pytest.raises(ValueError, match="do not fit"):  # 7 rows are not a batch of 2
        joint_mm([xq[:7], cq], [sx[:7], sc], [w_img, w_txt], [None, None], [0, 1], [0, 0])


def test_joint_linear_on_fp8_linears_writes_one_buffer_per_projection(small_copies: None) -> None:
    # O3 swaps linears for fp8 ones, which fuse_qkv cannot fuse: q, k and v each get a
    # buffer that both streams' fp8 GEMMs write (SD3's O3 step kept its concatenations).
    model = _fp8_attention(text_dim=24)
    x, c = torch.randn(2, 10, 32), torch.randn(2, 6, 24)
    with torch.no_grad():
        ref = model(x, c)  # eagerly the opaque fp8 op: the same quantization and products
        out = difforge.compile(model, options={"mode": "O2"})(x, c)
    for o, r in zip(out, ref, strict=True):
        assert rel_err(o, r) < 1e-5
    assert difforge.counters["joint_linear"] == 3


def test_joint_linear_on_fp8_linears_with_dynamic_sizes(small_copies: None) -> None:
    # The batch reaches the op as the graph's symbolic size: one graph for both calls.
    _matches_eager_at_two_sizes(_fp8_attention())
    assert difforge.counters["joint_linear"] == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_joint_linear_leaves_fp8_and_plain_linears_mixed(small_copies: None) -> None:
    model = _fp8_attention()
    model.add_q_proj = nn.Linear(32, 32)  # q's streams: one fp8, one not: no common op
    _compare(model, torch.randn(2, 10, 32), torch.randn(2, 6, 32))
    assert difforge.counters["joint_linear"] == 2  # k and v


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with fp8 (compute capability 8.9+)",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("batch", "tokens", "text"), [(2, 1024, 77), (3, 336, 16), (1, 4096, 154)])
def test_gpu_joint_scaled_mm_op_matches_the_concatenated_fp8_gemms(
    dtype: torch.dtype, batch: int, tokens: int, text: int
) -> None:
    from difforge.quant.fp8 import quantize_rows, quantize_weight

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(batch * tokens, 192, device=dev, dtype=dtype)
    c = torch.randn(batch * text, 128, device=dev, dtype=dtype)
    (xq, sx), (cq, sc) = quantize_rows(x), quantize_rows(c)
    wi, si = quantize_weight(torch.randn(384, 192, device=dev, dtype=dtype) / 14)
    wt, st = quantize_weight(torch.randn(384, 128, device=dev, dtype=dtype) / 12)
    b = torch.randn(384, device=dev, dtype=dtype)
    out = torch.ops.difforge.joint_scaled_mm(
        [xq, cq], [sx[:, None], sc[:, None]], [wi.t(), wt.t()], [si[None], st[None]],
        [b, None], [0, 1], [0, 0], batch, dtype,
    )  # fmt: skip
    img = (xq.float() * sx[:, None]) @ (wi.float() * si[:, None]).t() + b.float()
    txt = (cq.float() * sc[:, None]) @ (wt.float() * st[:, None]).t()
    ref = torch.cat([img.view(batch, tokens, -1), txt.view(batch, text, -1)], dim=1)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.float(), ref) < (2e-3 if dtype == torch.float16 else 1e-2)
