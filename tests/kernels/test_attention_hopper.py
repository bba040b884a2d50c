"""The Gluon Hopper attention: head-dim split, input checks, its sm_90 lowering (compiled on
any machine: Triton ships ptxas) and, on a GPU, its output against SDPA."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import run_without_interpreter

from difforge.kernels import attention_hopper as ah
from difforge.kernels.attention_hopper_ws import attention_hopper_ws

needs_gluon = pytest.mark.skipif(not ah.HAVE_GLUON, reason="needs Triton's Gluon")


@pytest.mark.parametrize(
    ("d", "split"),
    [
        (72, (64, 16)),
        (64, (64, 0)),
        (128, (128, 0)),
        (80, (64, 16)),
        (96, (64, 32)),
        (40, (32, 16)),
    ],
)
def test_split_head_dim_covers_the_head_dim_in_powers_of_two(d: int, split: tuple[int, int]):
    assert ah.split_head_dim(d) == split
    assert sum(split) >= d


@needs_gluon
def test_rejects_a_sequence_that_is_not_a_multiple_of_the_blocks():
    q = torch.zeros(1, 2, 100, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 64 and 64"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


@needs_gluon
def test_rejects_a_head_dim_that_is_not_contiguous():
    q = torch.zeros(1, 2, 128, 64, dtype=torch.float16).transpose(2, 3)[..., :64, :]
    with pytest.raises(ValueError, match="contiguous head dim"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


@needs_gluon
def test_rejects_rows_that_tma_cannot_address():
    q = torch.zeros(1, 2, 128, 68, dtype=torch.float16)[..., :64]  # 136-byte rows
    with pytest.raises(ValueError, match="16-byte strides"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


@needs_gluon
@pytest.mark.parametrize("d", [8, 136])
def test_rejects_head_dims_outside_16_to_128(d: int):
    q = torch.zeros(1, 2, 128, d, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"head dim {d}"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


@needs_gluon
def test_rejects_a_scale_that_is_not_positive():
    q = torch.zeros(1, 2, 128, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="scale must be positive"):
        ah.attention_hopper(q, q, q, scale=-0.3, block_m=64, block_n=64)


@needs_gluon
def test_warp_specialized_kernel_rejects_a_one_slot_ring():
    q = torch.zeros(1, 2, 128, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="stages must be at least 2"):
        attention_hopper_ws(q, q, q, block_m=64, block_n=64, stages=1)


def test_tma_readable_wants_aligned_starts_and_no_broadcast():
    elem = 2
    fused = (256 * 216, 216, 72, 1)  # [B, S, H, D] view of a [B, S, 3 * 72] projection
    assert ah.tma_readable((2, 256, 3, 72), fused, 0, elem)
    assert ah.tma_readable((2, 256, 3, 72), fused, 72, elem)  # starting at head 1
    assert not ah.tma_readable((2, 256, 3, 72), fused, 4, elem)  # 8 bytes in
    assert not ah.tma_readable((2, 256, 3, 64), (0, 192, 64, 1), 0, elem)  # broadcast batch
    assert ah.tma_readable((1, 256, 3, 64), (0, 192, 64, 1), 0, elem)  # size 1: any stride
    assert not ah.tma_readable((2, 256, 3, 64), (256 * 192, 192, 64, 2), 0, elem)


@needs_gluon
def test_rejects_float32():
    q = torch.zeros(1, 2, 128, 64)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        ah.attention_hopper(q, q, q, block_m=64, block_n=64)


_LOWER = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from triton.tools.disasm import get_sass
from difforge.kernels import attention_hopper as ah
from difforge.kernels.attention_hopper_ws import attention_hopper_ws
from tests.helpers import run_without_interpreter

out = {}
for d in (64, 72, 128):
    q = torch.empty(2, 256, 3, d, dtype=torch.float16)  # [B, S, H, D]
    descs = ah.descriptors(q, q, q, torch.empty_like(q), 128, 64)
    fn = ah._attention_hopper_kernel
    sig = {n: mangle_type(a) for n, a in zip(fn.arg_names[:8], descs, strict=True)}
    sig.update(seq_len="i32", heads="i32", qk_scale="fp32")
    main, tail = ah.split_head_dim(d)
    consts = dict(BLOCK_M=128, BLOCK_N=64, HEAD_MAIN=main, HEAD_TAIL=tail or 8,
                  HAS_TAIL=tail > 0, STAGES=3, num_warps=8)
    sig.update(dict.fromkeys(consts, "constexpr"))
    kernel = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8})
    out[d] = {"ptx": kernel.asm["ptx"], "sass": get_sass(kernel.asm["cubin"])}

from difforge.kernels import attention_hopper_ws as ws
q = torch.empty(2, 256, 3, 72, dtype=torch.float16)
descs = ah.descriptors(q, q, q, torch.empty_like(q), 64, 128)
fn = ws._attention_hopper_ws_kernel
sig = {n: mangle_type(a) for n, a in zip(fn.arg_names[:8], descs, strict=True)}
sig.update(seq_len="i32", heads="i32", qk_scale="fp32")
consts = dict(BLOCK_M=64, BLOCK_N=128, HEAD_MAIN=64, HEAD_TAIL=16, HAS_TAIL=True, STAGES=4,
              PRODUCER_REGS=40, CONSUMER_REGS=232, num_warps=4)
sig.update(dict.fromkeys(consts, "constexpr"))
kernel = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4})
out["ws72"] = {"ptx": kernel.asm["ptx"], "sass": get_sass(kernel.asm["cubin"])}
q = torch.empty(2, 256, 3, 128, dtype=torch.float16)
descs = ah.descriptors(q, q, q, torch.empty_like(q), 64, 128)
sig = {n: mangle_type(a) for n, a in zip(fn.arg_names[:8], descs, strict=True)}
sig.update(seq_len="i32", heads="i32", qk_scale="fp32")
consts.update(HEAD_MAIN=128, HEAD_TAIL=8, HAS_TAIL=False, STAGES=3)
sig.update(dict.fromkeys(consts, "constexpr"))
kernel = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4})
out["ws128"] = {"ptx": kernel.asm["ptx"], "sass": get_sass(kernel.asm["cubin"])}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90_code(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The kernel's PTX and SASS for an H100 at head dims 64 / 72 / 128 (128x64 tiles, 3
    stages, 8 warps), built in a fresh process: this session decorates Triton functions for
    the interpreter, which cannot be lowered, and an empty cache makes it really compile."""
    import json

    out = run_without_interpreter(_LOWER, str(tmp_path_factory.mktemp("triton_cache")))
    return json.loads(out)


def _loop_overlaps(sass: str) -> bool:
    """Whether some P·V HGMMA (A operand from registers) is followed by softmax
    exponentials (MUFU.EX2) before the next wait for all wgmma groups: the overlap the
    kernel is built for, as ptxas scheduled it."""
    ops = []
    for raw in sass.splitlines():
        text = raw.split("\t")[-1].strip()  # get_sass: "<control>\t<instruction>"
        if not text or text.startswith(("Function", "/", ".")):
            continue
        tokens = text.split()
        op = tokens[1] if tokens[0].startswith("@") and len(tokens) > 1 else tokens[0]
        ops.append((text, op))
    waiting_pv = False
    for text, op in ops:
        if op.startswith("HGMMA") and re.search(r"HGMMA\S* R\d+, R\d+, gdesc", text):
            waiting_pv = True  # A operand from registers: a P·V, not a Q·Kᵀ
        elif op.startswith("WARPGROUP.DEPBAR") and "gsb0, 0x0" in text:
            waiting_pv = False  # waited for every group
        elif op.startswith("MUFU.EX2") and waiting_pv:
            return True
    return False


@needs_gluon
@pytest.mark.parametrize("d", [64, 72, 128])
def test_lowers_with_the_softmax_overlapping_the_previous_pv(
    sm90_code: dict[str, dict[str, str]], d: int
):
    """ptxas keeps P_{j-1}·V_{j-1} in flight while the softmax of block j exponentiates, K/V
    stream through 4-D TMA boxes of the [B, S, H, D] view, and nothing spills."""
    code = sm90_code[str(d)]
    assert _loop_overlaps(code["sass"])
    assert "cp.async.bulk.tensor.4d" in code["ptx"]
    assert "ld.local" not in code["ptx"] and "st.local" not in code["ptx"]


@needs_gluon
@pytest.mark.parametrize("key", ["ws72", "ws128"])
def test_warp_specialized_kernel_lowers_to_a_producer_and_two_consumers(
    sm90_code: dict[str, dict[str, str]], key: str
):
    """The producer warp gives registers back and the consumers take them (setmaxnreg), the
    consumers still overlap softmax and P·V, and nothing spills (the pass's tiles: 64x128
    with 4 stages at head dim 72, 3 at 128)."""
    code = sm90_code[key]
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", code["ptx"])
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", code["ptx"])
    assert _loop_overlaps(code["sass"])
    assert "ld.local" not in code["ptx"] and "st.local" not in code["ptx"]


def test_overlap_check_tells_serial_from_overlapped_code():
    """The SASS check itself: a wait between the HGMMA and the exponentials is serial."""
    pv = "HGMMA.64x64x16.F32 R24, R88, gdesc[UR12].tnspB, R24 ;"
    qk = "HGMMA.64x64x16.F32 R56, gdesc[UR16], RZ, !UPT ;"
    wait, partial = "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;", "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;"
    exp = "MUFU.EX2 R1, R1 ;"
    assert not _loop_overlaps("\n".join([pv, wait, exp]))
    assert _loop_overlaps("\n".join([pv, exp, wait]))
    assert _loop_overlaps("\n".join([pv, partial, exp, wait]))  # one group still running
    assert not _loop_overlaps("\n".join([pv, wait, qk, exp]))  # only a Q·Kᵀ in flight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "tile"), [
    ((1, 3, 384, 72), (64, 64, 3, 4)),
    ((2, 5, 256, 64), (128, 64, 2, 8)),
    ((1, 2, 512, 128), (64, 128, 2, 4)),
    ((3, 1, 128, 80), (128, 128, 2, 8)),
    ((1, 2, 2048, 72), (128, 128, 4, 8)),  # the pass's tile: the ring wraps 4 times
    ((1, 2, 2048, 128), (128, 128, 3, 8)),  # its head-dim-128 tile
    ((1, 2, 256, 72), (128, 128, 4, 8)),  # fewer kv blocks than ring stages
])  # fmt: skip
@pytest.mark.parametrize("layout", ["bhsd", "fused_bs3hd"])
@pytest.mark.parametrize("kernel", ["plain", "ws"])
def test_gpu_matches_sdpa(
    dtype: torch.dtype, shape: tuple[int, ...], tile: tuple[int, ...], layout: str, kernel: str
):
    """Against float32 SDPA, for contiguous q/k/v and for views of one fused projection
    ``[B, S, 3, H, D]`` (what a DiT's compiled graph hands attention)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("wgmma and TMA need Hopper")
    torch.manual_seed(0)
    b, h, s, d = shape
    if layout == "bhsd":
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    else:
        fused = torch.randn(b, s, 3, h, d, device="cuda", dtype=dtype)
        q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    bm, bn, stages, warps = tile
    if kernel == "ws":  # two consumer warp groups of block_m / 2 rows
        out = attention_hopper_ws(q, k, v, block_m=bm // 2, block_n=bn, stages=stages)
    else:
        out = ah.attention_hopper(q, k, v, block_m=bm, block_n=bn, stages=stages, num_warps=warps)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    err = (out.float() - ref).norm() / ref.norm()
    sdpa_err = (sdpa.float() - ref).norm() / ref.norm()
    assert err <= 1.5 * sdpa_err + 1e-4, (err, sdpa_err)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
