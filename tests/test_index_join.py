"""difforge.index_join: merged-dimension views stay views when the merged size is a sum."""

from __future__ import annotations

import re

import pytest
import sympy
import torch
from torch._inductor import sizevars
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

import difforge
from difforge import index_join
from difforge.bench.output_code import logged_code
from difforge.diffusers.presets import build_component
from difforge.diffusers.step_inputs import denoiser_step_inputs
from difforge.passes import counters

from .helpers import tiny_sdxl_one_layer

s1, s2, i, j = sympy.symbols("s1 s2 i j", integer=True, nonnegative=True)
# Tokens below one stride-2 convolution of an h x w map, as Dynamo derives them.
TOKENS = sympy.expand((1 + FloorDiv(s1 - 1, 2)) * (1 + FloorDiv(s2 - 1, 2)))


def _view_index(tokens: sympy.Expr, scale: int = 64, partner_scale: int = 64) -> sympy.Expr:
    """The index of ``x.view(B * tokens, C)`` into a contiguous ``(B, tokens, C)`` buffer."""
    return sympy.expand(
        j + scale * ModularIndexing(i, 1, tokens) + partner_scale * tokens * FloorDiv(i, tokens)
    )


def test_inductor_alone_leaves_a_symbolic_sum_unjoined_and_we_join_it() -> None:
    index = _view_index(TOKENS)
    assert sizevars.join_dimensions(index) == index  # why the extension exists
    before = counters[index_join.JOINED]
    assert index_join.join_symbolic(sizevars.join_dimensions(index)) == 64 * i + j
    assert counters[index_join.JOINED] == before + 1


def test_three_merged_dimensions_join_pairwise() -> None:
    """``(B, H2, W2, C) -> (B·H2·W2, C)`` (a transformer block's output back to the map):
    the two inner digits join first, then the outer one, as Inductor does for numbers."""
    batch = sympy.Symbol("batch", integer=True, positive=True)
    h2, w2 = 1 + FloorDiv(s1 - 1, 2), 1 + FloorDiv(s2 - 1, 2)
    tokens = sympy.expand(h2 * w2)

    def three_dims(token_index: sympy.Expr) -> sympy.Expr:
        return sympy.expand(
            j
            + 64 * ModularIndexing(token_index, 1, w2)
            + 64 * w2 * ModularIndexing(token_index, w2, h2)
            + 64 * tokens * FloorDiv(i, tokens)
        )

    # the digits of i, and the same view of a view (the digits of i mod tokens)
    for index in (three_dims(i), three_dims(ModularIndexing(i, 1, tokens))):
        assert sizevars.join_dimensions(index) == index
        assert index_join.join_symbolic(index) == 64 * i + j
    # the batch digit as a ModularIndexing (a batch inside a larger view)
    index = sympy.expand(
        j + 64 * ModularIndexing(i, 1, tokens) + 64 * tokens * ModularIndexing(i, tokens, batch)
    )
    assert sizevars.join_dimensions(index) == index
    joined = index_join.join_symbolic(index)
    assert joined == j + 64 * ModularIndexing(i, 1, sympy.expand(tokens * batch))


def test_mismatched_or_static_pairs_are_left_to_inductor() -> None:
    before = counters[index_join.JOINED]
    wrong = _view_index(TOKENS, partner_scale=32)  # not the same dimension: no join
    assert index_join.join_symbolic(wrong) == wrong
    static = _view_index(sympy.Integer(90), partner_scale=64)  # integer modulus
    assert index_join.join_symbolic(static) == static
    assert sizevars.join_dimensions(static) == 64 * i + j  # Inductor's own rule
    assert index_join.join_symbolic(sympy.Integer(3)) == 3
    assert counters[index_join.JOINED] == before


def test_the_patch_is_scoped_and_reentrant() -> None:
    original = sizevars.join_dimensions
    with index_join.joined_symbolic_dimensions() as patched:
        assert patched and sizevars.join_dimensions is not original
        with index_join.joined_symbolic_dimensions():
            pass
        assert sizevars.join_dimensions(_view_index(TOKENS)) == 64 * i + j
    assert sizevars.join_dimensions is original


def _kernel_launches(dynamic: bool) -> tuple[list[str], float, int]:
    """(Inductor's kernel names per launch, without serial numbers; error vs eager; joins)
    of the tiny SDXL UNet (one transformer layer per level) compiled at O2 channels_last, at a size whose downsampled
    token count is a symbolic sum."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    # One transformer layer per level and no mid block (its blocks are the down and up
    # blocks' kinds at the same level): the same LayerNorm -> linear views at a
    # downsampled, symbolic token count (9 joins), in fewer blocks.
    preset = tiny_sdxl_one_layer(mid_block=False)
    model = build_component(preset, "unet", dtype=torch.float32).eval()
    options = {"mode": "O2", "memory_format": "channels_last", "dynamic": dynamic}
    compiled = difforge.compile(model, options=options)
    call = denoiser_step_inputs(
        "tiny-sdxl", batch=2, height=96, width=72, device="cpu", dtype=torch.float32
    )
    joins = counters[index_join.JOINED]
    with logged_code() as code_log, torch.no_grad():
        out = compiled(*call.args, **call.kwargs)[0]
        ref = model(*call.args, **call.kwargs)[0]
    code = code_log.records
    wrapper = "\n".join(c for c in code if "def call(" in c)
    launches = re.findall(r"^\s+(cpp_fused_\w+|triton_\w+)[.(]", wrapper, flags=re.M)
    families = sorted(re.sub(r"_\d+$", "", k) for k in launches)
    err = float((out - ref).norm() / ref.norm())
    return families, err, counters[index_join.JOINED] - joins


@pytest.mark.slow
def test_dynamic_unet_gets_the_static_graphs_kernels() -> None:
    """Without the join the dynamic tiny SDXL UNet copied a LayerNorm's output before its
    linear (an identity gather, a kernel named after the LayerNorm *and* the mm) and had
    one launch more than the static graph; with it, it launches as many kernels and the
    same LayerNorm kernels. (Other kernels may fuse the same ops under other names: with
    a symbolic size a no-op permute stays in a GroupNorm kernel's name.)"""
    static, static_err, static_joins = _kernel_launches(dynamic=False)
    dynamic, dynamic_err, dynamic_joins = _kernel_launches(dynamic=True)
    assert static and static_joins == 0
    assert dynamic_joins > 0
    assert len(dynamic) == len(static)

    def layer_norms(names: list[str]) -> list[str]:
        return [n for n in names if "layer_norm" in n]

    assert layer_norms(dynamic) == layer_norms(static)
    assert not any("_mm_" in n for n in layer_norms(dynamic))
    assert static_err < 1e-5 and dynamic_err < 1e-5
